"""Tests of load / list_datasets, the bundled MNIST sample and the script that makes it."""

import hashlib
import http.client
import importlib.util
import os
import urllib.error
from importlib import resources
from pathlib import Path

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.data import list_datasets, load

REPO = Path(__file__).parents[2]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_fake_mnist(folder, n_train=40, n_test=20, **extra):
    """A tiny npz with the mnist.npz keys; pixel [0, 0] holds the example index."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)
        arrays[f"x_{split}"] = x
        arrays[f"y_{split}"] = (np.arange(n) % 10).astype(np.uint8)
    arrays.update(extra)
    np.savez(folder / "mnist.npz", **arrays)
    return arrays


@pytest.fixture
def real_mnist_dir(monkeypatch):
    """CNNKIT_DATA_DIR as CI sets it; pointed at ../shared/datasets when unset here."""
    if not os.environ.get("CNNKIT_DATA_DIR"):
        monkeypatch.setenv("CNNKIT_DATA_DIR", str(SHARED_DATASETS))
    return Path(os.environ["CNNKIT_DATA_DIR"])


def test_list_datasets():
    assert list_datasets() == ["mnist", "mnist-long-tailed", "mnist-sample"]
    assert cnnkit.data.load is load


def test_unknown_name_lists_close_matches_first():
    with pytest.raises(ValueError) as info:
        load("mnist_smple")
    message = str(info.value)
    assert "Unknown dataset 'mnist_smple'" in message
    assert "Did you mean 'mnist-sample'?" in message
    assert "Known datasets: mnist-sample, mnist, mnist-long-tailed." in message
    with pytest.raises(
        ValueError, match="Known datasets: mnist, mnist-long-tailed, mnist-sample. Received: name='cifar10'"
    ):
        load("cifar10")
    with pytest.raises(ValueError, match="Received: name=3"):
        load(3)


def test_unknown_keyword_names_it_and_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"does not take \['image_size'\].*\['val_split', 'seed'\]"
    ):
        load("mnist-sample", image_size=(32, 32))


def test_mnist_from_cnnkit_data_dir(tmp_path, monkeypatch):
    arrays = write_fake_mnist(tmp_path)
    monkeypatch.setenv("CNNKIT_DATA_DIR", str(tmp_path))
    data = load("MNIST", val_split=0.25, seed=1)
    assert data.source == f"mnist ({(tmp_path / 'mnist.npz').resolve()})"
    assert data.class_names == [str(d) for d in range(10)]
    assert data.image_shape == (28, 28, 1)
    assert data.class_counts == {"train": [3] * 10, "val": [1] * 10, "test": [2] * 10}
    x_test, y_test = data.arrays("test")
    np.testing.assert_array_equal(x_test[..., 0], arrays["x_test"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    val_ids = data.arrays("val")[0][:, 0, 0, 0].tolist()
    assert val_ids == load("mnist", val_split=0.25, seed=1).arrays("val")[0][:, 0, 0, 0].tolist()
    assert val_ids != load("mnist", val_split=0.25, seed=2).arrays("val")[0][:, 0, 0, 0].tolist()


def test_mnist_long_tailed_cuts_the_training_split_only(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, n_train=400, n_test=30)
    monkeypatch.setenv("CNNKIT_DATA_DIR", str(tmp_path))
    data = load("mnist-long-tailed", largest=36, smallest=4, val_split=0.1)
    assert data.class_counts["train"] == [36, 28, 22, 17, 14, 11, 8, 7, 5, 4]
    assert data.class_counts["test"] == [3] * 10
    assert data.source.endswith("long-tailed 36->4 (seed 0)")
    full_ids = set(load("mnist", val_split=0.1).arrays("train")[0][:, 0, 0, 0].tolist())
    assert set(data.arrays("train")[0][:, 0, 0, 0].tolist()) <= full_ids
    with pytest.raises(ValueError, match="the long tail needs 5000"):
        load("mnist-long-tailed")
    with pytest.raises(ValueError, match=r"Class '0' has 36 training examples; the long tail needs 40 \(the validation "
                                         r"split holds another 4 of them: split off less, e.g. val_split=0, or give a "
                                         r"smaller largest\). Received: largest=40, smallest=4"):
        load("mnist-long-tailed", largest=40, smallest=4, val_split=0.1)
    assert load("mnist-long-tailed", largest=40, smallest=4, val_split=0).class_counts["train"][0] == 40


def test_cnnkit_data_dir_without_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        load("mnist")
    message = str(info.value)
    assert str((tmp_path / "mnist.npz").resolve()) in message
    assert "CNNKIT_DATA_DIR" in message and "does not exist" in message


def test_npz_without_mnist_keys(tmp_path, monkeypatch):
    np.savez(tmp_path / "mnist.npz", images=np.zeros((2, 28, 28), np.uint8))
    monkeypatch.setenv("CNNKIT_DATA_DIR", str(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"lacks the MNIST arrays \['x_train', 'y_train', 'x_test', 'y_test'\].*\['images'\]",
    ):
        load("mnist")


def test_file_that_is_not_an_npz(tmp_path, monkeypatch):
    (tmp_path / "mnist.npz").write_text("<html>proxy error</html>")
    monkeypatch.setenv("CNNKIT_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="Cannot read .*mnist.npz as an .npz file"):
        load("mnist")


def test_a_damaged_or_wrong_member_of_mnist_npz_names_the_file_and_the_array(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_DATA_DIR", str(tmp_path))
    arrays = write_fake_mnist(tmp_path)
    archive = bytearray((tmp_path / "mnist.npz").read_bytes())
    at = archive.find(arrays["x_train"].tobytes()[:64])  # stored uncompressed: flip a pixel, the CRC no longer matches
    archive[at + 100] ^= 0xFF
    (tmp_path / "mnist.npz").write_bytes(bytes(archive))
    path = (tmp_path / "mnist.npz").resolve()
    with pytest.raises(ValueError, match=f"Cannot read the array 'x_train' of {path}: Bad CRC-32"):
        load("mnist")
    write_fake_mnist(tmp_path, y_train=np.full(40, 11, np.uint8))
    with pytest.raises(ValueError, match=rf"mnist \({path}\): y holds labels beyond the 10 class_names"):
        load("mnist")


def test_mnist_from_keras_cache(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "keras_home" / "datasets", n_train=30, n_test=10)
    monkeypatch.delenv("CNNKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    data = load("mnist", val_split=0)
    assert data.sizes == {"train": 30, "test": 10}
    assert str(tmp_path / "keras_home" / "datasets" / "mnist.npz") in data.source


def test_mnist_falls_back_to_keras_download(tmp_path, monkeypatch):
    monkeypatch.delenv("CNNKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    calls = []

    def fake_load_data():  # stands in for the download, which cannot run here
        calls.append(1)
        x = np.zeros((20, 28, 28), np.uint8)
        y = np.arange(20, dtype=np.uint8) % 10
        return (x, y), (x[:10], y[:10])

    monkeypatch.setattr(keras.datasets.mnist, "load_data", fake_load_data)
    data = load("mnist", val_split=0)
    assert calls == [1]
    assert data.sizes == {"train": 20, "test": 10}
    assert "keras.datasets.mnist.load_data" in data.source


def test_mnist_download_without_network_is_one_line_naming_the_offline_way(tmp_path, monkeypatch):
    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    monkeypatch.delenv("CNNKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # Keras's own cache: empty

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)  # Keras's real download path up to the fetch
    with pytest.raises(OSError, match=r"could not download MNIST \(URL fetch failure on https://.*mnist.npz.*\); "
                                      r"without network: set CNNKIT_DATA_DIR to a folder holding mnist.npz"):
        load("mnist")


@pytest.mark.parametrize("error, reason", [
    (TimeoutError("timed out"), "TimeoutError: timed out"),
    (ConnectionResetError(104, "Connection reset by peer"), r"ConnectionResetError: \[Errno 104\] Connection reset"),
    (http.client.IncompleteRead(b"abc", 100), r"IncompleteRead: IncompleteRead\(3 bytes read, 100 more expected\)"),
    (None, "Incomplete or corrupted file detected. The auto file hash does not match"),  # a file cut short
], ids=["timeout", "reset", "incomplete_read", "truncated_file"])
def test_every_failed_mnist_download_is_one_line_naming_the_offline_way(tmp_path, monkeypatch, error, reason):
    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    monkeypatch.delenv("CNNKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # Keras's own cache: empty

    def fetch(url, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        if error is not None:
            raise error

    monkeypatch.setattr(file_utils, "urlretrieve", fetch)  # Keras's real download path up to the fetch
    with pytest.raises(OSError, match=rf"^could not download MNIST \({reason}.*\); without network: set "
                                      r"CNNKIT_DATA_DIR to a folder holding mnist.npz, or use 'mnist-sample'$"):
        load("mnist")


def test_real_mnist(real_mnist_dir):
    data = load("mnist", val_split=0)
    assert data.source == f"mnist ({(real_mnist_dir / 'mnist.npz').resolve()})"
    assert data.class_counts == {"train": MNIST_TRAIN_COUNTS, "test": MNIST_TEST_COUNTS}
    assert data.sizes == {"train": 60000, "test": 10000}
    assert data.image_shape == (28, 28, 1)
    x_test, y_test = data.arrays("test")
    assert x_test.shape == (10000, 28, 28, 1) and x_test.dtype == np.uint8
    assert y_test.dtype == np.int32
    assert 30 < x_test.mean() < 37  # MNIST's mean pixel is about 33

    split = load("mnist")  # default val_split=0.1, stratified
    assert split.sizes == {"train": 54000, "val": 6000, "test": 10000}
    assert split.class_counts["val"] == [int(np.floor(0.1 * n + 0.5)) for n in MNIST_TRAIN_COUNTS]
    assert [
        t + v for t, v in zip(split.class_counts["train"], split.class_counts["val"])
    ] == MNIST_TRAIN_COUNTS
    assert split.fingerprint != data.fingerprint  # same content, another training set

    # the bundled sample is real MNIST: every sample image is an MNIST image with its label
    sample = resources.files("cnnkit.data").joinpath("mnist_sample.npz")
    with (
        resources.as_file(sample) as path,
        np.load(path) as s,
        np.load(real_mnist_dir / "mnist.npz") as m,
    ):
        for split_name in ("train", "test"):
            real = dict(zip((img.tobytes() for img in m[f"x_{split_name}"]), m[f"y_{split_name}"]))
            labels = [real.get(img.tobytes()) for img in s[f"x_{split_name}"]]
            assert labels == s[f"y_{split_name}"].tolist()


def test_mnist_sample_is_bundled_and_stratified():
    data = load("mnist-sample", val_split=0)
    assert data.class_counts == {"train": [500] * 10, "test": [100] * 10}
    assert data.image_shape == (28, 28, 1)
    assert data.source.startswith("mnist-sample (") and "mnist_sample.npz" in data.source
    x_train, y_train = data.arrays("train")
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
    assert 30 < x_train.mean() < 37  # real digits, not noise (MNIST mean pixel ~33)
    split = load("mnist-sample")
    assert split.class_counts["val"] == [50] * 10
    assert split.sizes == {"train": 4500, "val": 500, "test": 1000}
    resource = resources.files("cnnkit.data").joinpath("mnist_sample.npz")
    assert resource.is_file() and len(resource.read_bytes()) <= 2 * 1024 * 1024
    with resources.as_file(resource) as path, np.load(path) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_mnist_sample", REPO / "scripts" / "make_mnist_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_mnist_sample_script(tmp_path, capsys):
    source = write_fake_mnist(tmp_path / "src", n_train=60, n_test=30)
    script = load_script()
    out = tmp_path / "out" / "sample.npz"
    argv = [
        "--source",
        str(tmp_path / "src" / "mnist.npz"),
        "--out",
        str(out),
        "--train-per-class",
        "4",
        "--test-per-class",
        "2",
    ]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    payload = out.read_bytes()
    assert f"sha256 {hashlib.sha256(payload).hexdigest()}" in printed
    assert f"{len(payload):,} bytes" in printed and "40 train + 20 test" in printed
    with np.load(out) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert np.bincount(npz["y_train"]).tolist() == [4] * 10
        assert np.bincount(npz["y_test"]).tolist() == [2] * 10
        ids = npz["x_train"][:, 0, 0].tolist()
        assert ids == sorted(ids)  # original order kept
        np.testing.assert_array_equal(npz["x_train"], source["x_train"][ids])
        np.testing.assert_array_equal(npz["y_train"], source["y_train"][ids])
    assert script.main(argv) == 0  # rerun: byte-identical file
    assert out.read_bytes() == payload
    assert script.main([*argv[:-1], "4"]) == 2  # 4 test images per class, only 3 exist
    assert "class 0 has only 3 examples" in capsys.readouterr().err


def test_make_mnist_sample_script_missing_source(tmp_path, capsys):
    script = load_script()
    assert (
        script.main(["--source", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o.npz")]) == 2
    )
    assert "none.npz not found" in capsys.readouterr().err
