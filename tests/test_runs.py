"""Tests for cnnkit.runs: atomic writes, the Run object, and the write_run/load round trip."""

import json
import os
import re
import shutil
import stat
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from cnnkit import runs
from cnnkit.evaluate import classification_metrics
from cnnkit.runs import Run, atomic_save_model, atomic_write_bytes, atomic_write_text, load, write_run

keras = pytest.importorskip("keras")  # a hard dependency; this never skips in a real install

NAMES = ["zero", "one", "two"]


def _listing(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def _tiny_model(input_shape=(8, 8, 1), num_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.Conv2D(2, 3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 3, size=24)
    return x, y


@pytest.fixture(scope="module")
def trained(data):
    x, y = data
    model = _tiny_model()
    fit = model.fit(x, y, epochs=2, batch_size=8, validation_split=0.25, verbose=0)
    return model, fit.history


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    assert atomic_write_text(target, "first\n") == target
    assert target.read_text() == "first\n"
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert _listing(target.parent) == ["notes.txt"]


def test_atomic_write_keeps_permissions_of_existing_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = atomic_write_bytes(tmp_path / "fresh.bin", b"x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # not the 0o600 of a temp file


def test_failed_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')

    def fail(*args, **kwargs):
        raise OSError("rename failed")

    monkeypatch.setattr(runs.os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(target, '{"new": true}')
    assert target.read_text() == '{"old": true}'
    assert _listing(tmp_path) == ["metrics.json"]


def test_failed_write_midway_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "history.csv"
    target.write_text("epoch,loss\n1,0.5\n")
    calls = []

    def fail_fsync(fd):
        calls.append(fd)
        raise OSError("fsync failed")

    monkeypatch.setattr(runs.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_text(target, "epoch,loss\n1,0.1\n2,0.05\n")
    assert calls, "the data was never fsynced"
    assert target.read_text() == "epoch,loss\n1,0.5\n"
    assert _listing(tmp_path) == ["history.csv"]


def test_atomic_write_bytes_rejects_text(tmp_path):
    with pytest.raises(TypeError, match="Received: data of type str"):
        atomic_write_bytes(tmp_path / "x", "not bytes")


def test_atomic_save_model_failure_keeps_old_model(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"old model")

    class Exploding:
        def save(self, path):
            Path(path).write_bytes(b"half a zip")
            raise RuntimeError("crash during save")

    with pytest.raises(RuntimeError, match="crash during save"):
        atomic_save_model(Exploding(), target)
    assert target.read_bytes() == b"old model"
    assert _listing(tmp_path) == ["model.keras"]
    with pytest.raises(ValueError, match=r"end in '.keras'.*model.h5"):
        atomic_save_model(Exploding(), tmp_path / "model.h5")


# --------------------------------------------------------------------------- Run.predict


def test_predict_single_images_and_batches(trained, data):
    model, _ = trained
    x, _ = data
    run = Run(model, class_names=NAMES)
    batch = run.predict(x)
    assert batch.shape == (24, 3)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, rtol=1e-5)
    # batch without a channel axis
    np.testing.assert_allclose(run.predict(x[..., 0]), batch, atol=1e-6)
    # one image, with and without the channel axis
    for single in (x[3], x[3, :, :, 0]):
        out = run.predict(single)
        assert out.shape == (1, 3)
        np.testing.assert_allclose(out[0], batch[3], atol=1e-6)
    # floats 0-255 give the same answer as uint8
    np.testing.assert_allclose(run.predict(x.astype(np.float64)), batch, atol=1e-6)
    # chunking does not change the result
    np.testing.assert_allclose(run.predict(x, batch_size=5), batch, atol=1e-6)
    # and it matches Keras' own predict
    np.testing.assert_allclose(batch, model.predict(x, verbose=0), atol=1e-6)


def test_predict_uses_one_compiled_function_not_model_predict(trained, data, monkeypatch):
    model, _ = trained
    x, _ = data
    run = Run(model, class_names=NAMES)

    def forbidden(*args, **kwargs):
        raise AssertionError("model.predict must not be used")

    monkeypatch.setattr(model, "predict", forbidden)
    run.predict(x[0])
    fn = run._predict_fn()
    run.predict(x[:5])
    assert run._predict_fn() is fn
    assert type(fn).__name__ in {"Function", "PolymorphicFunction"}


@pytest.mark.parametrize("shape", [(9, 9), (8, 8, 3), (2, 8, 8, 2), (8,), (1, 1, 8, 8, 1)])
def test_predict_wrong_shape_names_both_shapes(trained, shape):
    run = Run(trained[0], class_names=NAMES)
    with pytest.raises(ValueError) as info:
        run.predict(np.zeros(shape, np.uint8))
    message = str(info.value)
    assert "(8, 8, 1)" in message
    assert f"x.shape={shape}" in message


def test_predict_rejects_bad_batch_size_and_text(trained):
    run = Run(trained[0], class_names=NAMES)
    with pytest.raises(ValueError, match="batch_size=0"):
        run.predict(np.zeros((8, 8), np.uint8), batch_size=0)
    with pytest.raises(ValueError, match="numeric pixel values"):
        run.predict(np.full((8, 8), "a"))


def test_predict_classes_and_evaluate(trained, data):
    model, _ = trained
    x, y = data
    run = Run(model, class_names=NAMES)
    probs = run.predict(x)
    assert run.predict_classes(x) == [NAMES[i] for i in probs.argmax(axis=1)]
    assert run.predict_classes(x[0]) == [NAMES[int(probs[0].argmax())]]

    expected = classification_metrics(y, probs, NAMES)
    assert run.evaluate((x, y)) == expected  # same compiled forward pass -> identical numbers

    class FakeImageData:
        def arrays(self, split):
            assert split == "val"
            return x[:10], y[:10]

    val = run.evaluate(FakeImageData(), split="val")
    assert val["num_examples"] == 10 and "val_accuracy" in val
    assert run.metrics == {}  # evaluate does not overwrite the stored metrics
    with pytest.raises(ValueError, match="Received: data of type int"):
        run.evaluate(3)


def test_run_class_names_and_repr(trained):
    model, history = trained
    assert Run(model).class_names == ["0", "1", "2"]
    assert Run(model, config={"class_names": NAMES}).class_names == NAMES
    with pytest.raises(ValueError, match="one name per model output \\(3\\)"):
        Run(model, class_names=["a", "b"])
    text = repr(Run(model, history=history, metrics={"test_accuracy": 0.875}, class_names=NAMES))
    assert text.startswith("Run(") and "test_accuracy=0.8750" in text and "classes=3" in text
    assert "epochs=2" in text and len(text) < 200


# --------------------------------------------------------------------------- write_run / load


def test_write_run_then_load_round_trip(tmp_path, trained, data):
    model, history = trained
    x, y = data
    metrics = classification_metrics(y, model.predict(x, verbose=0), NAMES)
    metrics["val_accuracy"] = history["val_accuracy"][-1]
    config = {"arch": "tiny", "epochs": 2, "input_shape": [8, 8, 1], "data_fingerprint": "sha256:0f0f", "seed": 0}
    config_before = dict(config)

    run_dir = write_run(
        tmp_path / "runs" / "tiny", model=model, history=history, metrics=metrics, config=config, class_names=NAMES
    )
    assert run_dir == tmp_path / "runs" / "tiny"
    assert config == config_before  # the caller's config is not modified
    assert _listing(run_dir) == sorted(
        [
            "README.md",
            "config.yaml",
            "confusion_matrix.png",
            "history.csv",
            "manifest.json",
            "metrics.json",
            "model.keras",
            "training_curves.png",
        ]
    )

    lines = (run_dir / "history.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", *history]
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (run_dir / "metrics.json").read_text().startswith('{\n  "')  # indent 2
    saved_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved_config == {**config, "class_names": NAMES}
    assert list(saved_config) == [*config, "class_names"]  # order kept, not sorted
    readme = (run_dir / "README.md").read_text()
    assert f"{metrics['test_accuracy']:.4f}" in readme and "sha256:0f0f" in readme
    assert "cnnkit.load(" in readme and 'Model: "tiny"' in readme

    loaded = load(run_dir)
    assert loaded.run_dir == run_dir
    assert loaded.class_names == NAMES
    assert loaded.history == {k: [float(v) for v in vs] for k, vs in history.items()}
    assert loaded.metrics == metrics
    assert loaded.config == {**config, "class_names": NAMES}
    np.testing.assert_allclose(loaded.predict(x), Run(model).predict(x), atol=1e-6)
    # loading by string path works too, and the loaded run can be written again
    again = load(str(run_dir)).save(tmp_path / "copy")
    assert load(again).metrics == metrics


def test_write_run_without_confusion_matrix_or_history(tmp_path, trained):
    model, _ = trained
    run_dir = write_run(
        tmp_path / "r", model=model, history={}, metrics={"test_accuracy": 0.5}, config={}, class_names=NAMES
    )
    files = _listing(run_dir)
    assert "confusion_matrix.png" not in files and "training_curves.png" not in files
    assert {"model.keras", "history.csv", "metrics.json", "config.yaml", "README.md"} <= set(files)
    assert load(run_dir).history == {}


def test_write_run_over_an_earlier_run_leaves_none_of_its_files(tmp_path, trained):
    model, history = trained
    metrics = {"test_accuracy": 0.5, "confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}
    run_dir = write_run(tmp_path / "r", model=model, history=history, metrics=metrics, config={}, class_names=NAMES)
    (run_dir / "report.html").write_text("<html>report of the earlier run</html>")
    (run_dir / runs.SKIPPED_FILE).write_text("file,reason\nbad.png,truncated\n")
    write_run(run_dir, model=model, history={}, metrics={"test_accuracy": 0.7}, config={}, class_names=NAMES)
    files = _listing(run_dir)
    assert not {"training_curves.png", "confusion_matrix.png", "report.html", runs.SKIPPED_FILE} & set(files)
    assert set(json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"]) <= set(files)


def test_write_run_only_warns_when_a_figure_fails(tmp_path, trained, monkeypatch):
    model, history = trained
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "confusion_matrix.png").write_bytes(b"stale")  # from an earlier write

    def fail(*args, **kwargs):
        raise ValueError("bad figure")

    monkeypatch.setattr("cnnkit.report.plot_confusion_matrix", fail)
    metrics = {"test_accuracy": 0.5, "confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}
    with pytest.warns(UserWarning, match=r"confusion_matrix.png: ValueError: bad figure"):
        write_run(run_dir, model=model, history=history, metrics=metrics, config={}, class_names=NAMES)
    files = _listing(run_dir)
    assert "confusion_matrix.png" not in files
    assert {"model.keras", "training_curves.png", "README.md", "manifest.json"} <= set(files)
    readme = (run_dir / "README.md").read_text()
    assert "training_curves.png" in readme and "confusion_matrix.png" not in readme
    assert load(run_dir).metrics == metrics
    assert runs.verify_manifest(run_dir) == []


def test_write_run_rejects_conflicting_class_names(tmp_path, trained):
    with pytest.raises(ValueError, match=r"config\['class_names'\]"):
        write_run(
            tmp_path / "r",
            model=trained[0],
            history={},
            metrics={},
            config={"class_names": ["a", "b", "c"]},
            class_names=NAMES,
        )
    assert not (tmp_path / "r").exists()


def test_write_run_converts_numpy_and_tuples(tmp_path, trained):
    model, _ = trained
    run_dir = write_run(
        tmp_path / "r",
        model=model,
        history={"loss": np.array([0.5, 0.25])},
        metrics={"test_accuracy": np.float32(0.5)},
        config={"input_shape": (8, 8, 1), "lr": np.float64(0.1), "path": tmp_path},
        class_names=NAMES,
    )
    run = load(run_dir)
    assert run.metrics == {"test_accuracy": 0.5}
    assert run.config["input_shape"] == [8, 8, 1] and run.config["lr"] == 0.1
    assert run.config["path"] == str(tmp_path)
    assert run.history == {"loss": [0.5, 0.25]}


def test_load_a_keras_file(tmp_path, trained, data):
    model, _ = trained
    path = atomic_save_model(model, tmp_path / "m.keras")
    run = load(path)
    assert run.class_names == ["0", "1", "2"]
    assert run.history == {} and run.metrics == {} and run.run_dir is None
    np.testing.assert_allclose(run.predict(data[0][:4]), Run(model).predict(data[0][:4]), atol=1e-6)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_dir.*expected a 'model.keras'"):
        load(empty)
    other = tmp_path / "weights.h5"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"run directory or a '.keras'.*weights.h5"):
        load(other)


def test_a_truncated_keras_file_is_named_as_corrupt_not_missing(tmp_path, trained):
    path = atomic_save_model(trained[0], tmp_path / "m.keras")
    path.write_bytes(path.read_bytes()[:-100])  # cut short, as a full disk or a killed copy leaves it
    with pytest.raises(ValueError, match=r"m.keras' is not a valid .keras file: not a zip archive"):
        load(path)


def test_a_kill_between_a_rename_and_its_manifest_entry_leaves_the_run_loadable(tmp_path, trained, monkeypatch):
    model, history = trained
    run_dir = write_run(tmp_path / "r", model=model, history=history, metrics={}, config={}, class_names=NAMES)
    forget = runs._write_manifest_files
    calls = []

    def killed_after_the_rename(folder, files):
        calls.append(files)
        if len(calls) == 2:  # the second manifest write of this file: after its rename
            raise KeyboardInterrupt("killed")
        forget(folder, files)

    monkeypatch.setattr(runs, "_write_manifest_files", killed_after_the_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(run_dir / "README.md", "# rewritten\n")
    monkeypatch.undo()
    assert (run_dir / "README.md").read_text() == "# rewritten\n"
    assert runs.verify_manifest(run_dir) == [] and load(run_dir).class_names == NAMES
    atomic_write_text(run_dir / "README.md", "# again\n")  # a completed write forgets the previous content
    assert "previous_sha256" not in json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"]["README.md"]
    (run_dir / "README.md").write_text("# rewritten\n")  # an older content, now changed outside cnnkit
    assert runs.verify_manifest(run_dir) == ["README.md: SHA-256 differs from manifest.json (changed or corrupt)"]


def test_load_is_safe_by_default(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    path = atomic_save_model(keras.Model(inputs, outputs), tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="lambda.keras.*trust=True"):
        load(path)
    run = load(path, trust=True)
    assert run.predict(np.ones(4)).shape == (1, 2)


def test_load_imports_custom_layer_modules_when_present(tmp_path, trained, monkeypatch):
    path = atomic_save_model(trained[0], tmp_path / "m.keras")
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "cnnkit_test_registering_layers.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, "cnnkit_test_registering_layers", raising=False)
    monkeypatch.setattr(
        runs,
        "_CUSTOM_OBJECT_MODULES",
        ("cnnkit_test_registering_layers", "cnnkit.no_such_package.layers", "no_such_module"),
    )
    load(path)
    assert sys.modules["cnnkit_test_registering_layers"].LOADED


# --------------------------------------------------------------------------- regressions


def test_atomic_write_text_writes_undecodable_file_names_as_their_bytes(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name: 'caf\udce9.png', a lone surrogate
    target = atomic_write_text(tmp_path / "skipped_files.csv", f"path,reason\n{name},not an image\n")
    assert target.read_bytes() == b"path,reason\ncaf\xe9.png,not an image\n"
    assert _listing(tmp_path) == ["skipped_files.csv"]


def test_temp_file_errors_name_the_target_not_the_temp_file(tmp_path, monkeypatch):
    def refuse(*, dir, prefix, suffix, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}d68wyc6b{suffix}"))

    monkeypatch.setattr(runs, "tempfile", SimpleNamespace(NamedTemporaryFile=refuse))
    with pytest.raises(PermissionError) as info:
        atomic_write_text(tmp_path / "x.csv", "a\n")
    assert info.value.filename == str(tmp_path / "x.csv") and ".tmp" not in str(info.value)
    monkeypatch.undo()

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(runs, "_write_synced", disk_full)
    with pytest.raises(OSError, match="No space left") as info:
        atomic_write_bytes(tmp_path / "x.csv", b"a\n")
    assert info.value.filename == str(tmp_path / "x.csv")
    assert _listing(tmp_path) == []


def test_a_report_written_again_into_a_finished_run_keeps_it_loadable(tmp_path):
    """`cnnkit report RUN --data X` rewrites report.html: its manifest entry follows, nothing else changes."""
    import cnnkit
    from cnnkit.html_report import write_report

    def images(seed):
        rng = np.random.default_rng(seed)
        return cnnkit.data.from_arrays(rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), np.arange(30) % 3,
                                       x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
                                       y_test=np.arange(12) % 3, val_split=0, class_names=NAMES)

    model = cnnkit.build("4C3-FC8", (8, 8, 1), 3)
    run_dir = write_run(tmp_path / "run", model=model, history={"loss": [1.0, 0.5]}, metrics={}, config={},
                        class_names=NAMES)
    write_report(run_dir, model=model, data=images(0), strict=True)  # as fitting.finish_run does
    runs.write_manifest(run_dir)
    first = (run_dir / "report.html").read_bytes()
    manifest_before = json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"]

    write_report(run_dir, data=images(1), strict=True)  # what `cnnkit report RUN --data OTHER` does
    assert (run_dir / "report.html").read_bytes() != first
    manifest = json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"]
    assert manifest["report.html"] == {"sha256": runs.file_sha256(run_dir / "report.html"),
                                       "bytes": (run_dir / "report.html").stat().st_size}
    assert {k: v for k, v in manifest.items() if k != "report.html"} == {
        k: v for k, v in manifest_before.items() if k != "report.html"}
    assert runs.verify_manifest(run_dir) == []
    assert load(run_dir).class_names == NAMES

    with open(run_dir / "README.md", "ab") as card:  # a change made outside cnnkit is still refused
        card.write(b"edited")
    with pytest.raises(ValueError, match="README.md: SHA-256 differs"):
        load(run_dir)


def test_html_reports_are_derived_files_a_run_loads_without(tmp_path, trained):
    """report.html and model.html (a report of RUN/model.keras) are listed, but changed or gone the run loads."""
    run_dir = write_run(tmp_path / "run", model=trained[0], history={}, metrics={}, config={}, class_names=NAMES)
    atomic_write_text(run_dir / "report.html", "<html>report</html>")  # as write_report writes them
    atomic_write_text(run_dir / "model.html", "<html>model</html>")
    assert {"report.html", "model.html"} <= set(json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"])
    (run_dir / "report.html").write_text("<html>edited</html>")
    (run_dir / "model.html").unlink()
    assert runs.verify_manifest(run_dir) == [] and load(run_dir).class_names == NAMES
    (run_dir / "README.md").unlink()  # a missing file that is not a report is still a problem
    assert runs.verify_manifest(run_dir) == ["README.md: missing (listed in manifest.json)"]


@pytest.mark.parametrize("name, text, problem", [
    ("manifest.json", '{\n "files": {\n  "model.keras": {\n   "sha', "is not valid JSON: Unterminated string"),
    ("manifest.json", '{"files": ["model.keras"]}', "is not a cnnkit manifest"),
    ("metrics.json", "{", "is not valid JSON: Expecting property name"),
    ("config.yaml", "x: [\n", "is not valid YAML: expected the node content"),
    ("config.yaml", "- a\n", "must hold a mapping"),
    ("history.csv", "epoch,loss\n1,x\n", "is not valid CSV: could not convert"),
    ("history.csv", 'epoch,loss\n1,"' + "9" * 200_000 + '"\n', "is not valid CSV: field larger than field limit"),
], ids=["truncated-manifest", "not-a-manifest", "metrics", "config", "config-list", "history", "history-huge-field"])
def test_run_files_that_do_not_parse_are_a_value_error_naming_the_file(tmp_path, trained, name, text, problem):
    run_dir = write_run(tmp_path / "run", model=trained[0], history={}, metrics={}, config={}, class_names=NAMES)
    if name != runs.MANIFEST_FILE:
        (run_dir / runs.MANIFEST_FILE).unlink()
    (run_dir / name).write_text(text)
    with pytest.raises(ValueError) as info:
        load(run_dir)
    message = str(info.value)
    assert message.startswith(repr(str(run_dir / name))) and problem in message and "\n" not in message


def test_an_ensemble_manifest_leaves_its_members_to_theirs(tmp_path, trained):
    """`cnnkit report` on a member rewrites its report.html and its own manifest: the ensemble still loads."""
    model = trained[0]
    run_dir = write_run(tmp_path / "ens", model=model, history={}, metrics={}, config={}, class_names=NAMES)
    member = write_run(run_dir / "members" / "0", model=model, history={}, metrics={}, config={}, class_names=NAMES)
    atomic_write_text(member / "report.html", "<html>member</html>")
    atomic_write_text(run_dir / "stage" / "logs" / "train" / "events", "tensorboard")  # logs/ at any depth
    runs.write_manifest(run_dir)
    assert not [name for name in json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"] if "/" in name]
    atomic_write_text(member / "report.html", "<html>member, written again</html>")
    assert runs.verify_manifest(run_dir) == [] and load(run_dir).class_names == NAMES

    old = {"files": {**json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"],  # as written before the fix
                     "members/0/report.html": {"sha256": "0" * 64, "bytes": 9}}}
    (run_dir / runs.MANIFEST_FILE).write_text(json.dumps(old))
    assert runs.verify_manifest(run_dir) == []


class _Killed(BaseException):
    """The process dying (a kill, a power cut), which no ``except Exception`` catches."""


def test_a_write_run_killed_over_a_finished_run_leaves_it_loadable(tmp_path, trained, monkeypatch):
    from cnnkit import report

    model, history = trained
    run_dir = write_run(tmp_path / "r", model=model, history=history, metrics={"confusion_matrix": np.eye(3)},
                        config={}, class_names=NAMES)
    atomic_write_text(run_dir / "report.html", "<html>report</html>")
    monkeypatch.setattr(report, "plot_training_curves", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        load(run_dir).save(run_dir)
    assert "training_curves.png" not in _listing(run_dir) and "report.html" not in _listing(run_dir)
    assert runs.verify_manifest(run_dir) == []
    assert load(run_dir).class_names == NAMES


def test_a_runs_own_keras_file_loads_with_the_runs_class_names(tmp_path, trained):
    run_dir = write_run(tmp_path / "run", model=trained[0], history={}, metrics={}, config={}, class_names=NAMES)
    assert load(run_dir / runs.MODEL_FILE).class_names == NAMES
    copy = shutil.copy(run_dir / runs.MODEL_FILE, run_dir / "copy.keras")  # not in the manifest: not the run's
    assert load(copy).class_names == ["0", "1", "2"]


def test_predict_warns_of_floats_already_scaled_to_0_1(trained, data):
    run = Run(trained[0], class_names=NAMES)
    x = data[0][:4]
    with pytest.warns(UserWarning, match=r"floats in 0-1 \(max 1\), but the model takes raw 0-255 pixels"):
        run.predict(x / 255.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.predict(x.astype(np.float32))
        run.predict(np.zeros((8, 8), np.float32))


def test_save_into_its_own_folder_keeps_skipped_files(tmp_path, trained):
    run_dir = write_run(tmp_path / "r", model=trained[0], history={}, metrics={}, config={}, class_names=NAMES)
    atomic_write_text(run_dir / runs.SKIPPED_FILE, "path,reason\nbad.png,truncated\n")
    run = load(run_dir)
    run.save(run_dir)
    assert (run_dir / runs.SKIPPED_FILE).read_text() == "path,reason\nbad.png,truncated\n"
    assert load(run_dir).class_names == NAMES
    run.save(tmp_path / "elsewhere")
    assert runs.SKIPPED_FILE not in _listing(tmp_path / "elsewhere")


def test_a_kill_between_a_new_files_manifest_entry_and_its_rename_leaves_the_run_loadable(tmp_path, trained,
                                                                                          monkeypatch):
    """Run.save over its own folder writes the figures anew: a kill before one is in place leaves a run that loads."""
    model, history = trained
    run_dir = write_run(tmp_path / "r", model=model, history=history, metrics={}, config={}, class_names=NAMES)
    replace = os.replace

    def killed_before_the_curves(source, target):
        if Path(target).name == "training_curves.png":
            raise _Killed()
        replace(source, target)

    monkeypatch.setattr(runs.os, "replace", killed_before_the_curves)
    with pytest.raises(_Killed):
        load(run_dir).save(run_dir)
    monkeypatch.undo()
    assert runs.verify_manifest(run_dir) == [] and load(run_dir).class_names == NAMES
    entry = json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"]["training_curves.png"]
    assert "training_curves.png" not in _listing(run_dir) and entry["previous_sha256"] is None  # absent before
    load(run_dir).save(run_dir)  # in place: the entry forgets that it was new, and a missing file is refused again
    assert "previous_sha256" not in json.loads((run_dir / runs.MANIFEST_FILE).read_text())["files"]["training_curves.png"]
    (run_dir / "training_curves.png").unlink()
    assert runs.verify_manifest(run_dir) == ["training_curves.png: missing (listed in manifest.json)"]


def test_evaluate_refuses_data_whose_class_names_are_not_the_runs(trained, data):
    import cnnkit

    x, y = data
    run = Run(trained[0], class_names=NAMES)

    def images(names):
        return cnnkit.data.from_arrays(x, y, x_test=x, y_test=y, val_split=0, class_names=names)

    assert run.evaluate(images(NAMES)) == run.evaluate((x, y))
    with pytest.raises(ValueError, match=re.escape("The data's classes are not this run's (in order): its labels would "
                                                   "be scored against other outputs. Received: data.class_names="
                                                   "['one', 'zero', 'two'], run class_names=['zero', 'one', 'two']")):
        run.evaluate(images(["one", "zero", "two"]))


def test_an_interrupted_run_is_refused_and_an_old_run_without_manifest_loads(tmp_path, trained):
    run_dir = write_run(tmp_path / "r", model=trained[0], history={}, metrics={}, config={}, class_names=NAMES)
    for name in ("history.csv", "metrics.json", "config.yaml", "README.md", runs.MANIFEST_FILE):  # killed in write_run
        (run_dir / name).unlink()
    (run_dir / "backup" / "stage1").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"{str(run_dir)!r} holds an interrupted run (a resume backup, "
                                                   "backup/, and no finished results): run the same call again to "
                                                   "resume it")):
        load(run_dir)
    shutil.rmtree(run_dir / "backup")  # a run written before cnnkit had a manifest
    assert load(run_dir).class_names == ["0", "1", "2"]


@pytest.mark.parametrize("killed_at", ["history.csv", "config.yaml"])
def test_a_save_killed_in_a_new_folder_leaves_a_run_load_refuses(tmp_path, trained, monkeypatch, killed_at):
    real_write = runs.atomic_write_text

    def killed(path, text):
        if Path(path).name == killed_at:
            raise KeyboardInterrupt("killed")
        return real_write(path, text)

    monkeypatch.setattr(runs, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        Run(trained[0], class_names=NAMES, config={"arch": "FC8"}).save(tmp_path / "r")
    missing = {"history.csv": "history.csv, metrics.json, config.yaml", "config.yaml": "config.yaml"}[killed_at]
    with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path / 'r')!r} is not a complete run: {missing} missing "
                                                   "beside its manifest.json")):
        load(tmp_path / "r")
    monkeypatch.undo()
    Run(trained[0], class_names=NAMES, config={"arch": "FC8"}).save(tmp_path / "r")  # written again: whole
    assert load(tmp_path / "r").class_names == NAMES


@pytest.mark.parametrize("class_names, problem", [
    ("cat", "`class_names` must be a list of names. Received: class_names='cat'"),
    (3, "`class_names` must be a list of names. Received: class_names=3"),
    (["cat", "dog"], "`class_names` must have one name per model output (3). Received: class_names=['cat', 'dog']"),
])
def test_class_names_in_config_yaml_that_do_not_fit_the_model_name_the_file(tmp_path, trained, class_names, problem):
    run_dir = write_run(tmp_path / "r", model=trained[0], history={}, metrics={}, config={}, class_names=NAMES)
    (run_dir / runs.MANIFEST_FILE).unlink()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"class_names": class_names}))
    with pytest.raises(ValueError, match=re.escape(f"{str(run_dir / 'config.yaml')!r}: {problem}")):
        load(run_dir)


def test_save_refuses_a_run_directory_another_process_holds(tmp_path, trained):
    import fcntl

    run = Run(trained[0], class_names=NAMES)
    (tmp_path / "r").mkdir()
    other = os.open(tmp_path / "r", os.O_RDONLY)  # another open file: flock conflicts as across processes
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(runs.DirectoryInUse, match=re.escape(f"run directory {tmp_path / 'r'} is in use by another "
                                                            "process")):
        run.save(tmp_path / "r")
    assert _listing(tmp_path / "r") == []  # nothing written beside the other process
    os.close(other)
    assert runs.lock_run_dir(tmp_path / "r")  # this process's own hold (training there): saved within it, kept
    run.save(tmp_path / "r")
    assert not runs.lock_run_dir(tmp_path / "r")
    runs.release_run_dir(tmp_path / "r")
    run.save(tmp_path / "new" / "r")  # a folder that does not exist yet: made, written, released
    probe = os.open(tmp_path / "new" / "r", os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    assert load(tmp_path / "new" / "r").class_names == NAMES
    # refused before anything is written: the folder made to lock it goes too
    with pytest.raises(TypeError, match="Run data must be plain data .* of type object"):
        Run(trained[0], class_names=NAMES, config={"bad": object()}).save(tmp_path / "new" / "refused")
    assert _listing(tmp_path / "new") == ["r"]
