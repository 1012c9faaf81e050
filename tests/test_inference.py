"""cnnkit.inference: one strict predictor over runs, .keras files and exported SavedModels."""

import csv
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import cnnkit
from cnnkit import inference
from cnnkit.runs import Run

NAMES = [f"digit{d}" for d in range(10)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An untrained seed net saved three ways: run directory, .keras file, exported SavedModel."""
    root = tmp_path_factory.mktemp("inference")
    keras.utils.set_random_seed(0)
    model = cnnkit.build("8C5-MP2-FC32", (28, 28, 1), 10)
    run_dir = Run(model, class_names=NAMES).save(root / "run")
    cnnkit.export(model, root / "savedmodel", class_names=NAMES, verify=False, verbose=0)
    return {"model": model, "run": run_dir, "keras": run_dir / "model.keras", "savedmodel": root / "savedmodel"}


@pytest.fixture(scope="module")
def digits():
    return cnnkit.data.load("mnist-sample").arrays("test")[0][:6]


@pytest.mark.parametrize("kind", ["run", "keras", "savedmodel"])
def test_every_source_gives_the_models_probabilities(saved, digits, kind):
    predictor = inference.load_predictor(saved[kind], trust=kind == "savedmodel")  # a SavedModel is code
    assert predictor.image_shape == (28, 28, 1)
    assert predictor.class_names == NAMES  # the run's own model.keras too (its config.yaml has them)
    expected = saved["model"](digits.astype("float32"), training=False).numpy()
    probabilities = predictor.predict(digits)
    assert probabilities.dtype == np.float32 and probabilities.shape == (6, 10)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(predictor.predict(digits[0]), expected[:1], atol=1e-5)  # one image
    np.testing.assert_allclose(predictor.predict(digits[..., 0]), expected, atol=1e-5)  # no channel axis
    np.testing.assert_allclose(predictor.predict(digits, batch_size=4), expected, atol=1e-5)
    assert predictor.predict(digits[:0]).shape == (0, 10)


@pytest.mark.parametrize("kind", ["run", "savedmodel"])
def test_wrong_dtype_or_shape_is_a_clear_error(saved, digits, kind):
    predictor = inference.load_predictor(saved[kind], trust=kind == "savedmodel")
    with pytest.raises(ValueError, match=r"uint8 raw pixels .* Received: images.dtype=float32"):
        predictor.predict(digits.astype("float32"))
    with pytest.raises(ValueError, match=r"one image \(28, 28, 1\) or a batch \(N, 28, 28, 1\).*\(6, 20, 28, 1\)"):
        predictor.predict(digits[:, :20])
    with pytest.raises(ValueError, match=r"images.shape=\(6, 28, 28, 3\)"):
        predictor.predict(np.repeat(digits, 3, axis=-1))
    with pytest.raises(ValueError, match="batch_size=0"):
        predictor.predict(digits, batch_size=0)


def test_keras_predictions_are_one_compiled_call_not_model_predict(saved, digits, monkeypatch):
    model = saved["model"]
    predictor = inference.keras_predictor(model)

    def refuse(*args, **kwargs):
        raise AssertionError("model.predict was called")

    monkeypatch.setattr(model, "predict", refuse)
    for size in (1, 3, 6, 2):
        predictor.predict(digits[:size])
    assert predictor._forward.experimental_get_tracing_count() == 1  # one trace for every batch size


def test_top_k_is_sorted_and_capped(saved, digits):
    predictor = inference.load_predictor(saved["run"])
    probabilities = predictor.predict(digits)
    best = predictor.top_k(digits, k=3)
    assert len(best) == 6 and all(len(row) == 3 for row in best)
    for row, values in zip(best, probabilities):
        assert [p for _, p in row] == sorted(values, reverse=True)[:3]
        assert row[0][0] == NAMES[int(values.argmax())]
    assert len(predictor.top_k(digits[0], k=50)[0]) == 10
    with pytest.raises(ValueError, match="k=0"):
        predictor.top_k(digits, k=0)


def test_files_and_folders_are_decoded_like_training_images(saved, digits, tmp_path):
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(digits[0, ..., 0]).save(folder / "a.png")
    Image.fromarray(np.kron(digits[1, ..., 0], np.ones((2, 2), np.uint8))).convert("RGB").save(folder / "more" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")
    extra = tmp_path / "c.png"
    Image.fromarray(digits[2, ..., 0]).save(extra)

    files, skipped = inference.image_files([folder, extra])
    assert files == [folder / "a.png", folder / "more" / "b.jpg", extra]
    assert skipped == [folder / "notes.txt"]
    predictor = inference.load_predictor(saved["savedmodel"], trust=True)
    batch = predictor.load_images(files)
    assert batch.shape == (3, 28, 28, 1) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], digits[0])  # a PNG of the right size is read exactly
    results = predictor.predict_files(files, k=2, batch_size=2)
    assert [path for path, _ in results] == files
    alone = predictor.top_k(digits[0], k=2)[0]
    assert [name for name, _ in results[0][1]] == [name for name, _ in alone]
    np.testing.assert_allclose([p for _, p in results[0][1]], [p for _, p in alone], atol=1e-5)

    path = inference.write_csv(results, tmp_path / "out.csv")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and rows[0]["path"] == str(files[0]) and rows[1]["rank"] == "2"
    assert rows[0]["class_name"] == results[0][1][0][0]
    assert float(rows[0]["probability"]) == pytest.approx(results[0][1][0][1], rel=1e-5)


def test_bad_files_and_paths_are_named(saved, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    predictor = inference.load_predictor(saved["run"])
    with pytest.raises(ValueError, match="broken.png"):
        predictor.predict_files([broken])
    with pytest.raises(FileNotFoundError, match="missing"):
        inference.image_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image files"):
        inference.image_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inference.load_predictor(tmp_path / "nowhere")


def test_a_savedmodel_without_the_uint8_signature_is_refused(tmp_path):
    module = tf.Module()
    module.serve = tf.function(lambda x: {"scores": x * 2.0}, input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "other"), signatures={"serving_default": module.serve})
    with pytest.raises(ValueError, match="not a SavedModel exported by cnnkit"):
        inference.load_predictor(tmp_path / "other", trust=True)


def test_a_labels_file_that_does_not_name_one_class_per_output_is_refused(saved, tmp_path):
    import shutil

    export = shutil.copytree(saved["savedmodel"], tmp_path / "export")
    assert inference.load_predictor(export, trust=True).class_names == NAMES
    (export / "labels.txt").write_text("\n".join(NAMES[:9]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels.txt' names 9 classes, one a line; the model has 10 outputs"):
        inference.load_predictor(export, trust=True)


def test_symlinked_subfolders_are_followed_and_a_dangling_link_is_not_dropped(digits, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(digits[0, ..., 0]).save(elsewhere / "b.png")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(digits[1, ..., 0]).save(folder / "a.png")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")  # dangling: its reader names it
    files, skipped = inference.image_files([folder])
    assert files == [folder / "a.png", folder / "gone.png", folder / "linked" / "b.png"] and skipped == []


def test_a_left_out_subfolder_is_named_with_its_reason_not_as_a_file(digits, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(digits[0, ..., 0]).save(folder / "a.png")
    (folder / "again").symlink_to(folder, target_is_directory=True)  # a loop
    with pytest.warns(UserWarning, match=rf"Skipped 1 folder\(s\): {folder / 'again'} \(a second way into the folder"):
        files, skipped = inference.image_files([folder])
    assert files == [folder / "a.png"] and skipped == []


def test_class_names_must_name_every_output():
    model = cnnkit.build("4C3-MP2-FC8", (12, 12, 1), 3)
    with pytest.raises(ValueError, match=r"`class_names` must name the model's 3 outputs. Received: 1 class names \['a'\]"):
        inference.keras_predictor(model, class_names=["a"])
    inputs = keras.Input((8, 8, 1))
    maps = keras.Model(inputs, keras.layers.Conv2D(3, 3, activation="softmax")(inputs))
    with pytest.raises(ValueError, match=r"one output of class probabilities \(N, K\). .*\(None, 6, 6, 3\)"):
        inference.keras_predictor(maps)
    stub = inference.Predictor(lambda images: np.zeros((len(images), 3), np.float32), image_shape=(2, 2, 1),
                               class_names=["a", "b"], source="stub")
    with pytest.raises(ValueError, match=r"stub returned probabilities of shape \(N, 3\) for 2 class names"):
        stub.top_k(np.zeros((2, 2, 1), np.uint8))


def test_tflite_and_onnx_exports_are_refused_saying_what_can_be_loaded(tmp_path):
    onnx_export, tflite_file, saved_model = tmp_path / "exp_onnx", tmp_path / "m.tflite", tmp_path / "sm"
    onnx_export.mkdir()
    saved_model.mkdir()
    for file in (onnx_export / "model.onnx", onnx_export / "verification.json", tflite_file, saved_model / "saved_model.pb"):
        file.write_bytes(b"")
    for path in (onnx_export, onnx_export / "model.onnx", tflite_file):
        with pytest.raises(ValueError, match=rf"'{path}' is a TFLite or ONNX model or export, which cannot be used for "
                                             r"prediction: only SavedModel exports \(format='savedmodel'\), run "
                                             r"directories and .keras files can"):
            inference.load_predictor(path, trust=True)
    with pytest.raises(ValueError, match=rf"graph file of a SavedModel: pass its directory '{saved_model}'"):
        inference.load_predictor(saved_model / "saved_model.pb", trust=True)


def test_one_extension_given_as_a_string_is_one_ending_not_its_letters(tmp_path):
    for name in ["a.png", "b.jpg", "notes.svg", "c.PNG"]:
        (tmp_path / name).write_bytes(b"x")
    files, skipped = inference.image_files(tmp_path, extensions=".png")
    assert files == [tmp_path / "a.png", tmp_path / "c.PNG"]
    assert skipped == [tmp_path / "b.jpg", tmp_path / "notes.svg"]
    with pytest.raises(ValueError, match=r"extensions must be a non-empty sequence of file endings such as '.png'. "
                                         r"Received: extensions=\(\)"):
        inference.image_files(tmp_path, extensions=())


def test_a_file_reached_twice_is_listed_once_and_an_iterator_of_inputs_is_named(digits, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ["a.png", "b.png"]:
        Image.fromarray(digits[0, ..., 0]).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "linked").symlink_to(folder, target_is_directory=True)
    files, skipped = inference.image_files([folder / "b.png", folder, tmp_path / "linked", folder / "notes.txt"])
    assert files == [folder / "b.png", folder / "a.png", folder / "notes.txt"]  # a file named is taken as given
    assert skipped == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"No image files .* found. Received: inputs=\['{tmp_path / 'empty'}'\]"):
        inference.image_files(path for path in [tmp_path / "empty"])


def test_predict_files_expands_a_folder_as_image_files_does(saved, digits, tmp_path):
    folder = tmp_path / "digits"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(digits[0, ..., 0]).save(folder / "0.png")
    Image.fromarray(digits[1, ..., 0]).save(folder / "more" / "1.png")
    (folder / "notes.txt").write_text("not an image")
    predictor = inference.load_predictor(saved["run"])
    with pytest.warns(UserWarning, match=rf"Skipped 1 file\(s\) not named as images: {folder / 'notes.txt'}$"):
        results = predictor.predict_files([folder, folder / "0.png"], k=1)
    assert [path for path, _ in results] == [folder / "0.png", folder / "more" / "1.png"]
    assert [ranked for _, ranked in results] == predictor.top_k(digits[:2], k=1)


@pytest.mark.parametrize("shape, probabilities, output_shape", [
    ((None, None, None, 3), lambda x: tf.nn.softmax(tf.reduce_mean(tf.cast(x, tf.float32), [1, 2])), "(None, 3)"),
    ((None, 4, 4, 1), lambda x: tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])[:, :tf.shape(x)[0] + 1],
     "(None, None)"),
], ids=["any_image_size", "unknown_class_count"])
def test_a_savedmodel_of_unknown_image_size_or_class_count_is_refused(tmp_path, shape, probabilities, output_shape):
    module = tf.Module()
    module.serve = tf.function(lambda x: {"probabilities": probabilities(x)},
                               input_signature=[tf.TensorSpec(shape, tf.uint8, name="image")])
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    with pytest.raises(ValueError, match=r"not a SavedModel exported by cnnkit: expected a serving_default signature "
                                         r"taking uint8 images \(N, H, W, C\) of known H, W, C and returning "
                                         r"'probabilities' \(N, K\) of known K. Received: inputs \[TensorSpec\(shape="
                                         rf"{re.escape(str(tf.TensorShape(shape)))}.*'probabilities': "
                                         rf"TensorSpec\(shape={re.escape(output_shape)}"):
        inference.load_predictor(tmp_path / "sm", trust=True)
