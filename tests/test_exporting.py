"""cnnkit.export: SavedModel / TFLite / ONNX, verified in a fresh process, written atomically."""

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

import cnnkit
from cnnkit import exporting
from cnnkit.data.folder import convert_image
from cnnkit.inference import load_predictor
from cnnkit.runs import Run, write_run

SEED_NET = "20C5-MP2-50C5-MP2-FC256"


@pytest.fixture(scope="session")
def tiny_data():
    """400 train / 100 test real digits from the bundled MNIST sample."""
    sample = cnnkit.data.load("mnist-sample")
    x, y = sample.arrays("train")
    x_test, y_test = sample.arrays("test")
    return cnnkit.data.from_arrays(x[:400], y[:400], x_test=x_test[:100], y_test=y_test[:100], seed=0)


@pytest.fixture(scope="session")
def seed_run(tiny_data, tmp_path_factory):
    """The seed's conv net, one epoch on the tiny digits, float32."""
    run_dir = tmp_path_factory.mktemp("seed") / "run"
    return cnnkit.recipes.train(SEED_NET, tiny_data, epochs=1, batch_size=64, precision="float32",
                                run_dir=run_dir, verbose=0)


def _report(path):
    return json.loads((path / exporting.REPORT_FILE).read_text())


def _encode(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format=fmt)
    return buffer.getvalue()


def _tiny_run(path, channels=1):
    """A small untrained run directory (8x8 images, classes a, b, c)."""
    keras.utils.set_random_seed(4)
    model = cnnkit.build("4C3-FC8", (8, 8, channels), 3)
    return write_run(path, model=model, history={"loss": [1.0]}, metrics={}, config={}, class_names=["a", "b", "c"])


def _calibrate_batch_norm(model, images):
    """Set every batch norm's moving statistics to those of ``images`` (untrained nets output constants)."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(images.astype("float32"), training=True)


# -- SavedModel -------------------------------------------------------------------------------


def test_savedmodel_of_the_seed_net_matches_keras_in_a_fresh_process(seed_run, tiny_data, tmp_path):
    out = cnnkit.export(seed_run, tmp_path / "lenet", data=tiny_data, verbose=0)
    assert out == tmp_path / "lenet"
    assert (out / "saved_model.pb").is_file() and (out / "variables").is_dir()
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # not mkdtemp's 0o700
    assert (out / exporting.LABELS_FILE).read_text().splitlines() == [str(d) for d in range(10)]
    report = _report(out)
    assert report["passed"] and report["verified"] == "in a fresh process" and report["file"] == "saved_model.pb"
    assert report["runtime"].startswith("tensorflow ") and report["cnnkit_imported"] is False
    assert report["max_abs_diff"] <= 1e-5 and report["class_agreement"] == 1.0
    assert report["bytes_class_agreement"] == 1.0 and report["class_name_agreement"] == 1.0
    assert report["examples"] == exporting.PARITY_SAMPLES and "test split" in report["sample"]
    card = (out / exporting.CARD_FILE).read_text()
    assert "serving_bytes" in card and "uint8 `[N, 28, 28, 1]`" in card and "max |export - keras|" in card

    # the signatures, read here with plain TensorFlow
    images, _ = tiny_data.arrays("test")
    images = images[:8]
    loaded = tf.saved_model.load(str(out))
    plain = loaded.signatures["serving_default"](images=tf.constant(images))
    expected = seed_run.model(images.astype("float32"), training=False).numpy()
    np.testing.assert_allclose(plain["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(plain["class_id"].numpy(), expected.argmax(axis=1))
    assert [name.decode() for name in plain["class_name"].numpy()] == [str(i) for i in expected.argmax(axis=1)]
    encoded = loaded.signatures["serving_bytes"]
    png = encoded(image_bytes=tf.constant([_encode(image, "PNG") for image in images]))
    np.testing.assert_array_equal(png["class_id"].numpy(), plain["class_id"].numpy())
    np.testing.assert_allclose(png["probabilities"].numpy(), plain["probabilities"].numpy(), atol=1e-6)
    big = np.kron(images[0], np.ones((3, 2, 1), np.uint8))  # 84x56, resized to 28x28 in the graph
    jpeg = encoded(image_bytes=tf.constant([_encode(big, "JPEG"), _encode(np.repeat(images[1], 3, -1), "JPEG")]))
    assert jpeg["probabilities"].shape == (2, 10)
    np.testing.assert_allclose(jpeg["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)


def test_non_ascii_class_names_export_and_verify(tmp_path):
    names = ["café", "狗", "owl"]
    out = cnnkit.export(cnnkit.build("FC8", (8, 8, 1), 3), tmp_path / "unicode", class_names=names, verbose=0)
    report = _report(out)
    assert report["passed"] and report["class_name_agreement"] == 1.0 and report["class_names"] == names
    assert (out / exporting.LABELS_FILE).read_text(encoding="utf-8").splitlines() == names
    images = np.random.default_rng(4).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    served = tf.saved_model.load(str(out)).signatures["serving_default"](images=tf.constant(images))
    decoded = [name.decode("utf-8") for name in served["class_name"].numpy()]
    assert decoded == [names[i] for i in served["class_id"].numpy()]


@pytest.mark.parametrize("channels", [1, 3])
def test_serving_bytes_blends_transparency_onto_white_as_training_does(tmp_path, channels):
    run_dir = _tiny_run(tmp_path / "run", channels)
    rgba = np.random.default_rng(5).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[:3, :, 3] = 0  # transparent over colour (black where the alpha is dropped)
    rgba[3:5, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    predictor = load_predictor(run_dir)
    expected = predictor.predict(predictor.load_images([tmp_path / "transparent.png"]))
    out = cnnkit.export(run_dir, tmp_path / "export", verbose=0)
    serve = tf.saved_model.load(str(out)).signatures["serving_bytes"]
    got = serve(image_bytes=tf.constant([(tmp_path / "transparent.png").read_bytes()]))["probabilities"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _bmp32(rgb):
    """A 32-bit BI_RGB BMP whose fourth byte is 0 (unused, as many tools write it; PIL reads RGB)."""
    height, width, _ = rgb.shape
    pixels = b"".join(bytes([*rgb[row, col, ::-1], 0]) for row in range(height - 1, -1, -1) for col in range(width))
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 32, 0, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels), 0, 0, 54) + header + pixels


def test_serving_bytes_decodes_jpeg_and_32_bit_bmp_as_training_does(tmp_path):
    run_dir = _tiny_run(tmp_path / "run", 3)
    rgb = np.random.default_rng(7).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=100)  # TF's fast DCT is up to ~48 levels off here
    files = {"noise.jpg": buffer.getvalue(), "padded.bmp": _bmp32(rgb)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    predictor = load_predictor(run_dir)
    pixels = predictor.load_images([tmp_path / name for name in files])
    np.testing.assert_array_equal(pixels[1], rgb)  # PIL: the BMP's fourth byte is padding
    out = cnnkit.export(run_dir, tmp_path / "export", verbose=0)
    loaded = tf.saved_model.load(str(out))
    got = loaded.signatures["serving_bytes"](image_bytes=tf.constant(list(files.values())))["probabilities"]
    expected = loaded.signatures["serving_default"](images=tf.constant(pixels))["probabilities"]
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)


def test_training_pixels_match_convert_image_exactly():
    rng = np.random.default_rng(6)
    for mode, count in (("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4)):
        pixels = rng.integers(0, 256, (16, 16, count), dtype=np.uint8)
        if count % 2 == 0:
            pixels[:4, :, -1] = np.array([0, 1, 128, 255])[:, None]  # transparent, faint, half, opaque rows
        image = Image.fromarray(pixels.squeeze(-1) if count == 1 else pixels, mode)
        for target, channels in (("L", 1), ("RGB", 3)):
            expected = np.asarray(convert_image(image, target)).reshape(16, 16, channels)
            got = exporting._training_pixels(tf.constant(pixels), channels).numpy()
            np.testing.assert_array_equal(got, expected, err_msg=f"{mode} -> {target}")


def test_batch_norm_and_dropout_are_inactive_in_the_export(tmp_path):
    keras.utils.set_random_seed(1)
    model = cnnkit.build("8C3-BN-MP2-D0.5-FC16-D0.5", (12, 10, 3), 2, batch_norm=True)
    images = np.random.default_rng(1).integers(0, 256, (32, 12, 10, 3), dtype=np.uint8)
    _calibrate_batch_norm(model, images)
    out = cnnkit.export(model, tmp_path / "bn", class_names=["cat", "dog"], verbose=0)
    report = _report(out)
    assert report["passed"] and report["max_abs_diff"] <= 1e-5 and report["bytes_class_agreement"] == 1.0
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    first = serve(images=tf.constant(images))["probabilities"].numpy()
    np.testing.assert_array_equal(first, serve(images=tf.constant(images))["probabilities"].numpy())
    np.testing.assert_allclose(first, model(images.astype("float32"), training=False).numpy(), atol=1e-5)
    training_mode = model(images.astype("float32"), training=True).numpy()
    assert np.abs(training_mode - first).max() > 1e-3  # dropout / batch statistics would show
    assert (out / exporting.LABELS_FILE).read_text() == "cat\ndog\n"


def test_nested_backbone_model_exports_with_parity(tmp_path):
    keras.utils.set_random_seed(2)
    backbone = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(backbone(x))
    x = keras.layers.Dropout(0.3)(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    images = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    _calibrate_batch_norm(model, images)
    assert model(images.astype("float32"), training=False).numpy().std(axis=0).min() > 1e-3  # outputs vary
    report = _report(cnnkit.export(model, tmp_path / "mobilenet", verbose=0))
    assert report["passed"] and report["max_abs_diff"] <= 1e-5 and report["bytes_class_agreement"] == 1.0


def test_finetuned_backbone_run_exports_with_parity(tmp_path):
    sample = cnnkit.data.load("mnist-sample")
    source = sample.subset(classes=range(5), per_class=40, val_per_class=5)
    target = sample.subset(classes=range(5, 10), per_class=16, val_per_class=4)
    pretrained = cnnkit.recipes.train("4C3-BN-MP2-8C3-BN-FC16", source, epochs=1, batch_size=32,
                                      run_dir=tmp_path / "pretrained", verbose=0)
    tuned = cnnkit.recipes.finetune(pretrained.run_dir, target, batch_size=16, run_dir=tmp_path / "tuned", verbose=0,
                                    stages=[{"unfreeze": "all", "epochs": 1, "learning_rate": 1e-2}])
    out = cnnkit.export(tuned.run_dir, tmp_path / "export", data=target, verbose=0)  # a run directory path
    report = _report(out)
    assert report["passed"] and report["max_abs_diff"] <= 1e-5 and report["bytes_class_agreement"] == 1.0
    assert report["source"] == str(tmp_path / "tuned")
    assert (out / exporting.LABELS_FILE).read_text().split() == ["5", "6", "7", "8", "9"]


# -- TFLite and ONNX --------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "runtime"), [("tflite", "ai-edge-litert"), ("onnx", "onnxruntime")])
def test_float_tflite_and_onnx_match_keras(seed_run, tiny_data, tmp_path, fmt, runtime):
    # from the run directory: a model loaded from disk and never called (Keras's ONNX export needs a call)
    out = cnnkit.export(seed_run.run_dir, tmp_path / fmt, format=fmt, data=tiny_data, verbose=0)
    report = _report(out)
    assert report["file"] == exporting.MODEL_FILES[fmt] and (out / report["file"]).is_file()
    assert report["runtime"].startswith(runtime) and report["cnnkit_imported"] is False
    assert report["passed"] and report["max_abs_diff"] <= 1e-5 and report["tolerance"] == 1e-5
    assert report["keras_accuracy"] == report["export_accuracy"]


def test_fitted_preprocessing_exports_to_onnx_with_parity(tmp_path):
    from cnnkit.recipes.preprocess import fit_preprocessing

    images = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    keras.utils.set_random_seed(0)
    layers = fit_preprocessing(["center_pixel", "standardize"], images)  # per-pixel, then per-channel statistics
    model = cnnkit.build("4C3-MP2-FC8", (8, 8, 1), 3, preprocessing=layers)
    out = cnnkit.export(model, tmp_path / "onnx", format="onnx", verbose=0)
    report = _report(out)
    assert report["passed"] is True and report["max_abs_diff"] <= exporting.TOLERANCE


def test_a_model_with_a_uint8_input_exports_to_onnx_and_is_checked_with_uint8_images(tmp_path):
    inputs = keras.Input((8, 8, 1), dtype="uint8")
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(flat))
    out = cnnkit.export(model, tmp_path / "onnx", format="onnx", verbose=0)
    report = _report(out)
    assert report["passed"] is True and report["max_abs_diff"] <= exporting.TOLERANCE


def test_mixed_precision_model_is_exported_as_a_float32_copy(tmp_path):
    keras.utils.set_random_seed(3)
    model = cnnkit.build(SEED_NET, (28, 28, 1), 10, dtype="mixed_bfloat16")
    out = cnnkit.export(model, tmp_path / "mixed", format="tflite", verbose=0)
    report = _report(out)
    assert "float32 copy" in report["reference"] and "mixed_bfloat16" in report["reference"]
    assert report["passed"] and report["max_abs_diff"] <= 1e-5
    assert model.get_layer("conv1").dtype_policy.name == "mixed_bfloat16"  # the caller's model is untouched


@pytest.mark.parametrize("quantize", ["float16", "dynamic", "int8"])
def test_quantised_tflite_reports_its_accuracy_change_on_the_recorded_test_split(seed_run, tmp_path, quantize):
    run = Run(seed_run.model, config={"arguments": {"data": "mnist-sample"}}, class_names=seed_run.class_names)
    calibration = {"representative_samples": 50} if quantize == "int8" else {}  # int8 only
    out = cnnkit.export(run, tmp_path / quantize, format="tflite", quantize=quantize, verbose=0, **calibration)
    report = _report(out)
    assert report["quantize"] == quantize and report["tolerance"] is None and report["passed"]
    assert report["examples"] == 1000 and "mnist-sample" in report["data"]  # the whole test split
    assert report["accuracy_change_points"] == pytest.approx(
        100 * (report["export_accuracy"] - report["keras_accuracy"]), abs=1e-3)
    assert report["keras_accuracy"] > 0.5 and abs(report["accuracy_change_points"]) <= 5
    assert report["calibration_images"] == (50 if quantize == "int8" else None)
    float_size = 4 * seed_run.model.count_params()
    assert report["size_bytes"] < (0.6 if quantize == "float16" else 0.35) * float_size
    if quantize == "int8":
        details = Interpreter(model_path=str(out / "model.tflite")).get_tensor_details()
        assert sum(d["dtype"] == np.int8 for d in details) > sum(d["dtype"] == np.float32 for d in details)


def test_int8_uses_recorded_load_options_with_a_name(seed_run, tmp_path):
    recorded = {"name": "mnist-sample", "val_split": 0}
    run = Run(seed_run.model, config={"arguments": {"data": recorded}}, class_names=seed_run.class_names)
    report = _report(cnnkit.export(run, tmp_path / "int8", format="tflite", quantize="int8",
                                   representative_samples=20, verbose=0))
    assert report["passed"] and report["calibration_images"] == 20
    assert "mnist-sample" in report["data"] and report["examples"] == 1000 and report["keras_accuracy"] > 0.5


def test_int8_needs_sample_images(seed_run, tmp_path):
    bare = Run(seed_run.model)
    with pytest.raises(ValueError, match="representative_data"):
        cnnkit.export(bare, tmp_path / "int8", format="tflite", quantize="int8", verbose=0)
    assert list(tmp_path.iterdir()) == []  # no target, no staging folder left
    images = cnnkit.data.load("mnist-sample").arrays("train")[0][:20]
    report = _report(cnnkit.export(bare, tmp_path / "int8", format="tflite", quantize="int8",
                                   representative_data=images, verbose=0))
    assert report["calibration_images"] == 20 and "keras_accuracy" not in report and report["passed"]
    with pytest.raises(ValueError, match="representative_data"):
        cnnkit.export(bare, tmp_path / "bad", format="tflite", quantize="int8",
                      representative_data=images.astype("float32"), verbose=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["int8"]


# -- atomicity, overwrite, arguments ----------------------------------------------------------


def test_an_export_that_fails_halfway_leaves_nothing(seed_run, tmp_path, monkeypatch):
    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(exporting, "_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        cnnkit.export(seed_run, tmp_path / "export", format="tflite", verbose=0)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary sibling


def test_a_failed_check_leaves_nothing_and_keeps_the_old_export(seed_run, tmp_path, monkeypatch):
    out = cnnkit.export(seed_run, tmp_path / "export", format="onnx", verbose=0)
    before = (out / "model.onnx").read_bytes()
    real = exporting._keras_probabilities
    monkeypatch.setattr(exporting, "_keras_probabilities", lambda model, images: real(model, images) + 1e-3)
    with pytest.raises(exporting.ExportVerificationError, match="tolerance"):
        cnnkit.export(seed_run, out, format="tflite", overwrite=True, verbose=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]
    assert (out / "model.onnx").read_bytes() == before and not (out / "model.tflite").exists()


def test_nan_probabilities_fail_the_check_whatever_the_tolerance(tmp_path):
    keras.utils.set_random_seed(0)
    model = cnnkit.build("4C3-MP2-FC8", (8, 8, 1), 3)
    weights = model.get_weights()
    weights[0][0, 0, 0, 0] = np.nan  # a diverged run: NaN compares as within any tolerance
    model.set_weights(weights)
    with pytest.raises(exporting.ExportVerificationError,
                       match=r"probabilities that are NaN or infinite on \d+ image\(s\) from the export and \d+ from "
                             r"the Keras model.*\"max_abs_diff\": null"):
        cnnkit.export(model, tmp_path / "export", format="tflite", verbose=0)
    assert list(tmp_path.iterdir()) == []


def test_an_overwrite_whose_last_rename_fails_puts_the_old_export_back(seed_run, tmp_path, monkeypatch):
    out = cnnkit.export(seed_run, tmp_path / "export", format="tflite", verify=False, verbose=0)
    before = (out / "model.tflite").read_bytes()
    replace = exporting.os.replace

    def failing_into_place(source, target):
        if Path(source).name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return replace(source, target)

    monkeypatch.setattr(exporting.os, "replace", failing_into_place)
    with pytest.raises(OSError, match="No space left"):
        cnnkit.export(seed_run, out, format="tflite", overwrite=True, verify=False, verbose=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # no staging, no hidden .old
    assert (out / "model.tflite").read_bytes() == before


def test_an_export_killed_between_its_renames_is_recovered_by_the_next(seed_run, tmp_path):
    out = cnnkit.export(seed_run, tmp_path / "export", format="tflite", verify=False, verbose=0)
    before = (out / "model.tflite").read_bytes()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = f".export.{exporting._host_tag()}-{int(exited.stdout)}."  # what a SIGKILLed export left
    (tmp_path / f"{killed}abcd1234.old").mkdir()
    out.rename(tmp_path / f"{killed}abcd1234.old" / "export")  # the earlier export, moved aside
    (tmp_path / f"{killed}efgh5678.partial").mkdir()
    (tmp_path / f"{killed}efgh5678.partial" / "model.tflite").write_bytes(b"half")
    running = tmp_path / f"{exporting._staging_prefix(out)}ijkl9012.partial"  # this live process's: kept
    running.mkdir()
    with pytest.warns(UserWarning, match="was killed while it replaced the earlier one"), \
            pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        cnnkit.export(seed_run, out, format="tflite", verify=False, verbose=0)
    assert (out / "model.tflite").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["export", running.name])


def test_a_model_safe_mode_blocks_exports_from_its_path_only_with_trust(tmp_path):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda images: images / 255.0)(inputs)  # code in the file: safe mode refuses it
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x)))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="trust=True"):
        cnnkit.export(tmp_path / "lambda.keras", tmp_path / "refused", format="tflite", verify=False, verbose=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lambda.keras"]
    out = cnnkit.export(tmp_path / "lambda.keras", tmp_path / "trusted", format="tflite", trust=True, verbose=0)
    assert _report(out)["passed"] is True


def test_existing_target_needs_overwrite(seed_run, tmp_path, capsys):
    out = cnnkit.export(seed_run, tmp_path / "export", format="onnx", verify=False)
    assert "verified: skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="overwrite=True"):
        cnnkit.export(seed_run, out, format="tflite", verify=False, verbose=0)
    cnnkit.export(seed_run, out, format="tflite", verify=False, overwrite=True, verbose=0)
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "labels.txt", "model.tflite",
                                                          "verification.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_a_relative_path_exports_and_verifies(tmp_path, monkeypatch, fmt):
    monkeypatch.chdir(tmp_path)
    out = cnnkit.export(cnnkit.build("FC8", (8, 8, 1), 3), f"exports/{fmt}", format=fmt, verbose=0)
    assert out == tmp_path / "exports" / fmt and out.is_absolute()
    assert _report(out)["passed"] and sorted(path.name for path in (tmp_path / "exports").iterdir()) == [fmt]


def test_overwrite_replaces_only_an_earlier_export_or_an_empty_directory(tmp_path):
    run_dir = _tiny_run(tmp_path / "run")
    folder = tmp_path / "folder"
    (folder / "older").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match="earlier cnnkit export.*folder"):
        cnnkit.export(run_dir, folder, overwrite=True, verify=False, verbose=0)
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt", "older"]
    assert (folder / "notes.txt").read_text() == "my notes"

    before = sorted(path.name for path in run_dir.iterdir())
    for target in (run_dir, tmp_path):  # the run itself, or a directory holding it
        with pytest.raises(ValueError, match="run being exported"):
            cnnkit.export(str(run_dir), target, overwrite=True, verify=False, verbose=0)
    assert sorted(path.name for path in run_dir.iterdir()) == before

    (tmp_path / "empty").mkdir()
    out = cnnkit.export(run_dir, tmp_path / "empty", format="tflite", overwrite=True, verbose=0)
    cnnkit.export(run_dir, out, format="savedmodel", overwrite=True, verbose=0)  # onto the earlier export
    assert _report(out)["format"] == "savedmodel" and not (out / "model.tflite").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "pb"}, "format='pb'"),
    ({"format": "savedmodel", "quantize": "int8"}, "quantize='int8'"),
    ({"format": "tflite", "quantize": "int4"}, "quantize='int4'"),
    ({"representative_samples": 0}, "representative_samples=0"),
    ({"tolerance": -1.0}, "tolerance=-1.0"),
    ({"class_names": ["a", "b"]}, "one name per model output"),
    ({"class_names": [f"c{i}" for i in range(9)] + ["two\nlines"]}, "two\\\\nlines"),
    ({"class_names": [f"c{i}" for i in range(9)] + ["cat\x0cdog"]}, "cat\\\\x0cdog"),  # a line break to splitlines
    ({"class_names": [f"c{i}" for i in range(9)] + ["a\u2028b"]}, "single lines"),
])
def test_bad_arguments_are_refused_before_writing(seed_run, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cnnkit.export(seed_run, tmp_path / "export", verbose=0, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_data_with_other_classes_is_refused_before_writing(tmp_path):
    run_dir = _tiny_run(tmp_path / "run")  # classes a, b, c
    other = cnnkit.data.from_arrays(np.zeros((6, 8, 8, 1), np.uint8), np.array([0, 1, 2] * 2), class_names=["a", "c", "b"],
                                    val_split=0)
    with pytest.raises(ValueError, match=r"classes are not the model's: .*3 classes \[a, c, b\], the model 3 classes "
                                         r"\[a, b, c\]"):
        cnnkit.export(run_dir, tmp_path / "export", data=other, verbose=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_bad_sources_and_targets(seed_run, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        cnnkit.export(seed_run, tmp_path / "file", overwrite=True, verbose=0)
    with pytest.raises(ValueError, match="run_or_model"):
        cnnkit.export(object(), tmp_path / "export", verbose=0)
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        cnnkit.export(tmp_path / "no-such-run", tmp_path / "export", verbose=0)
    flat = keras.Sequential([keras.Input((16,)), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        cnnkit.export(flat, tmp_path / "export", verbose=0)


def test_the_card_and_report_give_the_models_input_dtype(tmp_path, monkeypatch):
    inputs = keras.Input((8, 8, 1), dtype="uint8")
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(flat))
    out = cnnkit.export(model, tmp_path / "u8", format="tflite", verify=False, verbose=0)
    assert _report(out)["input_dtype"] == "uint8"
    card = (out / exporting.CARD_FILE).read_text()
    assert "Input uint8 `[N, 8, 8, 1]`" in card and 'images.astype("uint8")' in card and "Input float32" not in card
    monkeypatch.chdir(tmp_path)  # the card's code names the export by its directory name
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    scope = {"images": images}
    exec(card.split("```python\n")[1].split("```")[0], scope)
    np.testing.assert_allclose(scope["probabilities"], model(images, training=False).numpy(), atol=1e-5)


@pytest.mark.parametrize(("outputs", "shapes"), [
    (lambda x: [keras.layers.Dense(3)(keras.layers.Flatten()(x)), keras.layers.Dense(2)(keras.layers.Flatten()(x))],
     r"\(None, 3\), \(None, 2\)"),
    (lambda x: keras.layers.Conv2D(3, 3, activation="softmax")(x), r"\(None, 6, 6, 3\)"),  # class maps
])
def test_a_model_without_one_class_matrix_output_is_refused_before_writing(tmp_path, outputs, shapes):
    inputs = keras.Input((8, 8, 1))
    with pytest.raises(ValueError, match=r"one output of class probabilities \(N, K\) can be exported. Received: "
                                         rf"output shape\(s\) {shapes}$"):
        cnnkit.export(keras.Model(inputs, outputs(inputs)), tmp_path / "export", format="tflite", verbose=0)
    assert list(tmp_path.iterdir()) == []


def test_a_check_that_does_not_run_names_the_requested_path_not_the_staging_one(tmp_path, monkeypatch):
    monkeypatch.setitem(exporting._CHECKS, "tflite", "import sys; sys.exit('no runtime here')")
    target = tmp_path / "export"
    with pytest.raises(exporting.ExportVerificationError, match="no runtime here") as caught:
        cnnkit.export(cnnkit.build("4C3-MP2-FC8", (12, 12, 1), 3), target, format="tflite", verbose=0)
    assert f"The tflite export for {target} did not run in a fresh process (exit 1)" in str(caught.value)
    assert ".partial" not in str(caught.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"format": "tflite", "quantize": "dynamic", "representative_data": np.zeros((2, 12, 12, 1), np.uint8)},
     "`representative_data` calibrates quantize='int8' only. Received: format='tflite', quantize='dynamic'"),
    ({"representative_data": "not even images"}, "Received: format='savedmodel', quantize=None"),
    ({"format": "tflite", "quantize": "float16", "representative_samples": 10},
     "`representative_samples` calibrates quantize='int8' only. Received: format='tflite', quantize='float16'"),
    ({"format": "tflite", "quantize": "int8", "representative_samples": 5,
      "representative_data": np.zeros((2, 12, 12, 1), np.uint8)}, "representative_samples=5 and representative_data"),
])
def test_calibration_arguments_without_int8_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cnnkit.export(cnnkit.build("4C3-MP2-FC8", (12, 12, 1), 3), tmp_path / "export", verbose=0, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_source_metrics_are_floats_and_values_that_are_not_finite_numbers_are_left_out(tmp_path):
    assert exporting._source_metrics({"test_accuracy": np.float32(0.5), "test_error": float("nan"), "loss": 1.0}) \
        == {"test_accuracy": 0.5}
    run = Run(cnnkit.build("4C3-MP2-FC8", (12, 12, 1), 3), metrics={"test_accuracy": np.float32(0.75), "test_error": None})
    out = cnnkit.export(run, tmp_path / "export", format="tflite", verify=False, verbose=0)
    assert _report(out)["source_metrics"] == {"test_accuracy": 0.75}
    card = (out / exporting.CARD_FILE).read_text()
    assert "| Source test accuracy | 0.7500 |" in card and "test error" not in card


def test_cnnkit_export_is_the_function():
    assert cnnkit.export is exporting.export
    assert callable(cnnkit.export)
