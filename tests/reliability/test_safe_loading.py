"""Guarantee 7: loading a model is safe by default; code in a model file runs only with trust.

A ``.keras`` file with a ``Lambda`` layer carries Python bytecode, and a SavedModel is a
TensorFlow graph that can run any operation (write files, for one). Every way cnnkit loads a
model refuses both unless the user opts in (``trust=True`` / ``--trust-model``), in one line
naming the file and the opt-in. The models here create a marker file when their code runs, so
"refused" is checked as "the code did not run".
"""


import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import cnnkit
from cnnkit import inference
from cnnkit.cli import main
from cnnkit.runs import Run, atomic_save_model

SHAPE = (28, 28, 1)


def _marker_model(marker):
    """A small classifier whose Lambda layer creates ``marker`` whenever its Python code runs."""
    # The path is a constant in the lambda's bytecode (Keras reloads lambda defaults wrongly).
    code = eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t)[1]")  # noqa: S307
    inputs = keras.Input(SHAPE)
    x = keras.layers.Lambda(code, name="payload")(inputs)
    x = keras.layers.Dense(8, activation="relu")(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


@pytest.fixture
def payload(tmp_path):
    """``(lambda .keras file, marker path)``; the marker is removed after building and saving."""
    marker = tmp_path / "code-ran.marker"
    path = atomic_save_model(_marker_model(marker), tmp_path / "payload.keras")
    marker.unlink()
    return path, marker


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "digit.png"
    Image.fromarray(np.full(SHAPE[:2], 128, np.uint8)).save(path)
    return path


def _refusal(capsys) -> str:
    """The one stderr line of a refused command (asserting there is exactly one, no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _names_the_opt_in(message, path):
    return str(path) in message and "trust=True" in message and "--trust-model" in message


# -- .keras files with Python code --------------------------------------------------------------


def test_cnnkit_load_refuses_a_lambda_file_and_runs_no_code(payload):
    path, marker = payload
    with pytest.raises(ValueError) as info:
        cnnkit.load(path)
    message = str(info.value)
    assert "\n" not in message and _names_the_opt_in(message, path) and "Lambda" in message
    assert not marker.exists()

    run = cnnkit.load(path, trust=True)  # the opt-in; rebuilding the model runs its code
    assert marker.exists()
    assert run.predict(np.zeros(SHAPE, np.uint8)).shape == (1, 10)


def test_a_run_directory_holding_a_lambda_model_is_refused(payload, tmp_path):
    path, marker = payload
    run_dir = Run(cnnkit.load(path, trust=True).model).save(tmp_path / "run")
    marker.unlink()
    with pytest.raises(ValueError, match=r"run/model\.keras.*trust=True"):
        cnnkit.load(run_dir)
    assert not marker.exists()
    assert cnnkit.load(run_dir, trust=True).run_dir == run_dir


def test_enabling_unsafe_deserialization_globally_does_not_lift_the_refusal(payload):
    from keras.src.backend.common import global_state
    from keras.src.saving import serialization_lib

    path, marker = payload
    before = serialization_lib.in_safe_mode()
    keras.config.enable_unsafe_deserialization()
    try:
        with pytest.raises(ValueError, match="trust=True"):
            cnnkit.load(path)
    finally:
        global_state.set_global_attribute("safe_mode_saving", before)
    assert not marker.exists()


def test_load_predictor_refuses_a_lambda_file(payload):
    path, marker = payload
    with pytest.raises(ValueError) as info:
        inference.load_predictor(path)
    assert _names_the_opt_in(str(info.value), path) and not marker.exists()
    predictor = inference.load_predictor(path, trust=True)
    assert predictor.predict(np.zeros(SHAPE, np.uint8)).shape == (1, 10)


def test_cnnkit_predict_refuses_a_lambda_file_in_one_line(payload, image, capsys):
    path, marker = payload
    assert main(["predict", str(path), str(image)]) == 2
    line = _refusal(capsys)
    assert line.startswith("cnnkit: error: Refusing to load") and str(path) in line and "--trust-model" in line
    assert not marker.exists()

    assert main(["predict", str(path), str(image), "--trust-model", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


def test_cnnkit_export_refuses_a_lambda_file_unless_trusted(payload, tmp_path, capsys):
    path, marker = payload
    out = tmp_path / "export"
    assert main(["export", str(path), "--out", str(out), "--no-verify"]) == 2
    assert "--trust-model" in _refusal(capsys) and not marker.exists() and not out.exists()
    with pytest.raises(ValueError, match="trust=True"):
        cnnkit.export(path, out, verify=False, verbose=0)

    assert main(["export", str(path), "--out", str(out), "--no-verify", "--trust-model"]) == 0
    assert (out / "saved_model.pb").is_file()


def test_finetune_refuses_a_lambda_backbone_before_training(payload, tmp_path, monkeypatch):
    path, marker = payload
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError) as info:
        cnnkit.recipes.finetune(path, "mnist-sample", epochs=1, run_dir=tmp_path / "run", verbose=0)
    assert _names_the_opt_in(str(info.value), path)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_finetune_loads_a_trusted_lambda_backbone(payload, tmp_path):
    path, marker = payload
    sample = cnnkit.data.load("mnist-sample")
    (x, y), (x_test, y_test) = sample.arrays("train"), sample.arrays("test")
    data = cnnkit.data.from_arrays(x[:200], y[:200], x_test=x_test[:50], y_test=y_test[:50], seed=0)
    run = cnnkit.recipes.finetune(path, data, trust=True, stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-3}],
                                  run_dir=tmp_path / "run", verbose=0)
    assert marker.exists() and (run.run_dir / "metrics.json").is_file()


def test_ensemble_refuses_a_lambda_member(payload, tmp_path, monkeypatch):
    path, marker = payload
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match="trust=True"):
        cnnkit.recipes.ensemble([path], "mnist-sample", run_dir=tmp_path / "ensemble", verbose=0)
    assert not marker.exists()


# -- SavedModels ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """cnnkit's own export of an untrained seed net."""
    keras.utils.set_random_seed(0)
    model = cnnkit.build("8C5-MP2-FC32", SHAPE, 10)
    return cnnkit.export(model, tmp_path_factory.mktemp("export") / "savedmodel", verify=False, verbose=0)


def test_a_savedmodel_even_cnnkits_own_export_needs_trust(export_dir, image, capsys):
    with pytest.raises(ValueError) as info:
        inference.load_predictor(export_dir)
    message = str(info.value)
    assert "\n" not in message and _names_the_opt_in(message, export_dir) and "SavedModel" in message
    assert inference.load_predictor(export_dir, trust=True).predict(np.zeros(SHAPE, np.uint8)).shape == (1, 10)

    assert main(["predict", str(export_dir), str(image)]) == 2
    line = _refusal(capsys)
    assert str(export_dir) in line and "--trust-model" in line
    assert main(["predict", str(export_dir), str(image), "--trust-model"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


def test_cnnkit_load_points_a_savedmodel_to_load_predictor(export_dir):
    with pytest.raises(FileNotFoundError, match=r"SavedModel: use cnnkit\.inference\.load_predictor\(path, trust=True\)"):
        cnnkit.load(export_dir)


def test_a_savedmodel_graph_can_write_files_so_it_runs_only_when_trusted(tmp_path, image):
    """Why every SavedModel needs trust: its serving function here writes a file on each call."""
    marker = tmp_path / "graph-wrote.marker"
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec((None, *SHAPE), tf.uint8)])
    def serve(images):
        with tf.control_dependencies([tf.io.write_file(str(marker), "written by the model")]):
            return {"probabilities": tf.fill([tf.shape(images)[0], 2], 0.5)}

    module.serve = serve
    tf.saved_model.save(module, str(tmp_path / "malicious"), signatures={"serving_default": serve})

    with pytest.raises(ValueError, match="trust=True"):
        inference.load_predictor(tmp_path / "malicious")
    assert main(["predict", str(tmp_path / "malicious"), str(image)]) == 2
    assert not marker.exists()

    inference.load_predictor(tmp_path / "malicious", trust=True).predict(np.zeros(SHAPE, np.uint8))
    assert marker.read_text() == "written by the model"
