"""cnnkit.tuner.search on tiny data: trials, invalid and failed ones, setup errors, the files it writes."""

import csv
import io
import re

import keras
import numpy as np
import pytest
import yaml

import cnnkit
from cnnkit import config
from cnnkit.recipes.train import train
from cnnkit.tuner import SearchError, search

FAST = {"epochs": 1, "precision": "float32", "verbose": 0}


def _rows(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _custom_gradients():
    from tensorflow.python.framework import ops

    return {name for name in ops._gradient_registry._registry if name.startswith("CustomGradient-")}


def test_random_search_records_trials_and_writes_its_files(tiny_data, tiny_space, tmp_path, capsys, counter):
    gradients = _custom_gradients()
    result = search(tiny_space, tiny_data, max_trials=3, directory=tmp_path / "search", callbacks=[counter()],
                    epochs=1, precision="float32", verbose=1)
    # TensorFlow registers a gradient per traced train step that would keep each trial's variables alive
    assert _custom_gradients() == gradients
    output = capsys.readouterr().out
    assert counter.calls == 3 and len(result.trials) == 3
    assert [line.split()[2] for line in output.splitlines() if line.startswith("trial ")] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "Sensitivity of val_accuracy" in output and result.table().splitlines()[0] in output
    assert {trial.status for trial in result.trials} == {"COMPLETED"}
    assert result.best_score == max(trial.score for trial in result.trials)
    assert result.best_arch == tiny_space["arch"].format(**result.best_hyperparameters)
    first = result.trials[0]
    assert first.timing["build_seconds"] > 0 and first.timing["first_step_seconds"] > 0 and first.seconds > 0
    assert first.metrics["val_accuracy"] == first.score and first.best_epoch == 1
    rows = _rows(tmp_path / "search" / "trials.csv")
    assert [row["status"] for row in rows] == ["COMPLETED"] * 3
    assert float(rows[0]["score"]) == first.score and rows[0]["arch"] == first.arch
    assert (tmp_path / "search" / "sensitivity.png").stat().st_size > 0
    assert (tmp_path / "search" / "search.yaml").is_file()

    recipe_path = tmp_path / "search" / "best_recipe.yaml"
    text = recipe_path.read_text()
    assert text.startswith("# Best configuration of search 'tiny'") and f"cnnkit run {recipe_path}" in text
    assert "so its best_val_accuracy in metrics.json (the highest val_accuracy in history.csv) should match the " \
           "search's val_accuracy within noise;" in " ".join(line[14:] for line in text.splitlines()[2:6])
    recipe = yaml.safe_load(text)
    assert recipe.pop("recipe") == "train"
    config.validate_kwargs(train, recipe)
    assert (recipe["arch"], recipe["learning_rate"], recipe["batch_size"], recipe["epochs"], recipe["schedule"]) == (
        result.best_arch, 0.05, 8, 1, "constant")

    model = result.best_model()  # the best trial's weights: its validation accuracy is the score
    images, labels = tiny_data.arrays("val")
    predicted = np.argmax(model.predict(images, verbose=0), axis=1)
    assert np.mean(predicted == labels) == pytest.approx(result.best_score, abs=1e-6)


def test_invalid_networks_are_recorded_untrained_and_not_counted(tiny_data, tmp_path, counter):
    space = {"arch": "{f}C{k}-MP2-FC4", "hyperparameters": {"f": [2], "k": [9, 3], "learning_rate": 0.05}}
    result = search(space, tiny_data, algorithm="grid", max_trials=1, directory=tmp_path / "grid",
                    callbacks=[counter()], **FAST)
    assert [(trial.status, trial.values["k"]) for trial in result.trials] == [("INVALID", 9), ("COMPLETED", 3)]
    assert counter.calls == 1
    invalid = result.trials[0]
    assert invalid.error.startswith("2C9-MP2-FC4: ") and "(8 - 9 + 0)/1 + 1 = 0" in invalid.error
    assert not list((tmp_path / "grid" / "keras_tuner" / "trial_0").glob("checkpoint*"))
    assert [row["status"] for row in _rows(tmp_path / "grid" / "trials.csv")] == ["INVALID", "COMPLETED"]


def test_failed_trials_are_recorded_and_the_search_goes_on(tiny_data, tiny_space, tmp_path, counter, capfd):
    counter.actions = {2: "oom", 3: "nan"}
    result = search(tiny_space, tiny_data, max_trials=4, directory=tmp_path / "search", callbacks=[counter()],
                    **FAST)
    assert [trial.status for trial in result.trials] == ["COMPLETED", "FAILED", "FAILED", "COMPLETED"]
    assert result.trials[1].error == "out of memory: OOM when allocating tensor of shape [8,8]"
    assert result.trials[2].error == "the training loss became nan in epoch 1"
    assert "Traceback" not in capfd.readouterr().err  # a failure of the kind trials have is one line
    assert result.best_trial.trial_id in ("0", "3")


def test_failures_in_a_row_stop_the_search_and_keep_the_trials(tiny_data, tiny_space, tmp_path, counter):
    counter.actions = {1: "error", 2: "error"}
    with pytest.raises(SearchError, match="2 trials in a row failed.*RuntimeError: boom in training"):
        search(tiny_space, tiny_data, max_trials=4, max_consecutive_failed_trials=2, directory=tmp_path / "search",
               callbacks=[counter()], **FAST)
    assert [row["status"] for row in _rows(tmp_path / "search" / "trials.csv")] == ["FAILED", "FAILED"]


def test_a_search_stopped_by_failures_shows_the_last_error_alone(tiny_data, tiny_space, tmp_path, counter):
    counter.actions = {1: "nan", 2: "nan"}
    with pytest.raises(SearchError, match=r"the last error: the training loss became nan in epoch 1\. Finished"):
        search(tiny_space, tiny_data, max_trials=4, max_consecutive_failed_trials=2, directory=tmp_path / "search",
               callbacks=[counter()], **FAST)


def test_overwrite_removes_the_old_searchs_report_even_if_the_new_one_stops(tiny_data, tiny_space, tmp_path,
                                                                           counter):
    search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", **FAST)
    assert (tmp_path / "search" / "report.html").is_file()
    counter.actions = {1: "setup"}
    with pytest.raises(SearchError, match="setup error"):
        search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", overwrite=True,
               callbacks=[counter()], **FAST)
    assert not (tmp_path / "search" / "report.html").exists()


def test_a_setup_error_in_a_trial_stops_at_once_and_the_trial_reruns(tiny_data, tiny_space, tmp_path, counter):
    counter.actions = {2: "setup"}
    with pytest.raises(SearchError, match="trial 1 hit a setup error.*FileNotFoundError: images/0001.png"):
        search(tiny_space, tiny_data, max_trials=3, directory=tmp_path / "search", callbacks=[counter()], **FAST)
    assert counter.calls == 2  # no trial burned after the error
    counter.calls, counter.actions = 0, {}
    result = search(tiny_space, tiny_data, max_trials=3, directory=tmp_path / "search", callbacks=[counter()], **FAST)
    assert counter.calls == 2  # the interrupted trial 1, then trial 2
    assert [(trial.trial_id, trial.status) for trial in result.trials] == [("0", "COMPLETED"), ("1", "COMPLETED"),
                                                                          ("2", "COMPLETED")]


@pytest.mark.parametrize("change, error, message", [
    ({"data": "no-val"}, ValueError, "validation split"),
    ({"data": {"path": "does/not/exist", "image_size": 8}}, ValueError, "Folder not found: does/not/exist"),
    ({"knob": {"optimizer": ["adam", "adamm"]}}, ValueError, "knob optimizer must be one of"),
    ({"knob": {"augment": ["none", "shiftt"]}}, ValueError, "unknown augmentation 'shiftt'"),
    ({"knob": {"activation": ["relu", "rellu"]}}, ValueError, "rellu"),
    ({"arch": "{f}C9-FC{units}"}, ValueError, "no network of search space 'tiny' fits input"),
    ({"arch": "{f}C3-MPP2-FC{units}"}, ValueError, "arch template '{f}C3-MPP2-FC{units}' with f=2, units=4 reads "
                                                   "'2C3-MPP2-FC4', which is not valid notation: token 2 'MPP2'"),
    ({"algorithm": "evolution"}, ValueError, "algorithm must be one of random, grid, bayesian, hyperband"),
    ({"objective": "accuracy"}, ValueError, "objective must be one of val_accuracy, val_loss"),
    ({"max_trials": 0}, ValueError, "max_trials must be an integer >= 1"),
    ({"knob": {"learning_rate": {"min": 1e-3, "max": 1e-2, "sampling": "log"}}, "algorithm": "grid"}, ValueError,
     r"hyperparameter 'learning_rate': a grid search needs a step in this range \(or a list of values instead\)"),
    ({"space": {"backbone": "mobilenet_v2", "weights": None, "hyperparameters": {"unfreeze_depth": [1, 9]}}},
     ValueError, "knob unfreeze_depth: 9 is more than the 6 layer groups of backbone 'mobilenet_v2'"),
    ({"knob": {"preprocess": ["scale", "zca"]}}, ValueError, "needs more than 64 training images: fitted on 48"),
])
def test_setup_errors_stop_before_any_trial(tiny_data, tiny_space, tmp_path, change, error, message):
    space = dict(tiny_space, hyperparameters={**tiny_space["hyperparameters"], **change.get("knob", {})})
    if "arch" in change:
        space["arch"] = change["arch"]
    data = tiny_data
    if change.get("data") == "no-val":
        data = cnnkit.data.from_arrays(*tiny_data.arrays("train"), val_split=0)
    elif "data" in change:
        data = change["data"]
    options = {key: change[key] for key in ("algorithm", "objective", "max_trials") if key in change}
    with pytest.raises(error, match=message):
        search(change.get("space", space), data, directory=tmp_path / "search", **{**FAST, **options})
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_that_holds_a_run_or_other_files_is_refused_untouched(tiny_data, tiny_space, tmp_path, overwrite):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("manifest.json", "model.keras", "report.html"):
        (run / name).write_text(name)
    with pytest.raises(ValueError, match=re.escape(f"{run} holds a run (manifest.json, model.keras, report.html) and "
                                                   "no search.yaml, so it is not a search directory")):
        search(tiny_space, tiny_data, max_trials=1, directory=run, overwrite=overwrite, **FAST)
    assert {path.name: path.read_text() for path in run.iterdir()} == {
        name: name for name in ("manifest.json", "model.keras", "report.html")}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'notes'} holds files (todo.txt) and no search.yaml")):
        search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "notes", overwrite=overwrite, **FAST)


def test_an_endless_worker_timeout_is_refused(tiny_data, tiny_space, tmp_path):  # a heartbeat's wait would overflow
    with pytest.raises(ValueError, match=re.escape("worker_timeout must be a finite number of seconds > 0. Received: "
                                                   "worker_timeout=inf")):
        search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", worker_timeout=float("inf"), **FAST)
    assert not (tmp_path / "search").exists()


def test_a_workers_heartbeat_stops_when_its_trial_is_cut_short(tiny_data, tiny_space, tmp_path, monkeypatch):
    import threading

    import keras_tuner as kt

    def interrupted(tuner, *args, **kwargs):  # Ctrl-C in a trial: Keras Tuner never calls on_trial_end
        tuner.on_trial_begin(kt.engine.trial.Trial(kt.HyperParameters(), trial_id="7"))
        raise KeyboardInterrupt

    monkeypatch.setattr(cnnkit.tuner.tuning, "serve", lambda *args, **kwargs: None)  # a chief nobody asks
    search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", role="chief", **FAST)
    monkeypatch.setattr(kt.engine.base_tuner.BaseTuner, "search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", role="worker", worker_id="w1",
               **FAST)
    assert not [thread.name for thread in threading.enumerate() if thread.name == "heartbeat-7"]


def test_a_whitening_knob_is_checked_on_the_training_images_a_trial_fits_it_on():
    from cnnkit.tuner.space import SearchSpace
    from cnnkit.tuner.tuning import _SAMPLE_IMAGES, _check_knobs

    rng = np.random.default_rng(0)
    data = cnnkit.data.from_arrays(rng.integers(0, 256, (600, 20, 20), dtype=np.uint8), np.arange(600) % 2,
                                   val_split=0.1)
    assert _SAMPLE_IMAGES <= 20 * 20 < data.sizes["train"]  # too few for whitening in a sample, enough in all
    space = SearchSpace("4C3-FC{units}", {"units": [4], "preprocess": ["scale", "zca"]})
    with pytest.warns(UserWarning, match="fitted on 540 images, fewer than 5 x 400"):
        _check_knobs(space, data, "float32")


def test_bayesian_without_its_packages_says_what_to_install(tiny_data, tiny_space, tmp_path, monkeypatch):
    from keras_tuner.src.tuners import bayesian

    monkeypatch.setattr(bayesian, "scipy", None)
    with pytest.raises(ImportError, match="algorithm='bayesian' needs scipy and scikit-learn"):
        search(tiny_space, tiny_data, algorithm="bayesian", directory=tmp_path / "search", **FAST)
    assert not (tmp_path / "search").exists()



def test_too_many_invalid_networks_in_a_row_stop_the_search(tiny_data, tmp_path, monkeypatch):
    from cnnkit.tuner import tuning

    monkeypatch.setattr(tuning, "MAX_INVALID_IN_A_ROW", 2)
    space = {"arch": "{f}C{k}", "hyperparameters": {"f": [2], "k": [9, 11, 3]}}
    with pytest.raises(SearchError, match=r"2 proposed networks in a row do not fit the input \(the last: 2C11: "):
        search(space, tiny_data, algorithm="grid", directory=tmp_path / "grid", **FAST)


def test_label_smoothing_is_a_knob_that_reaches_the_loss_and_the_best_recipe(tiny_data, tiny_space, tmp_path):
    hyperparameters = {**tiny_space["hyperparameters"], "f": [4], "units": [8], "label_smoothing": [0.2]}
    result = search({**tiny_space, "hyperparameters": hyperparameters}, tiny_data, max_trials=1,
                    directory=tmp_path / "search", **FAST)
    assert result.best_model().loss.get_config()["label_smoothing"] == pytest.approx(0.2)
    recipe = yaml.safe_load((tmp_path / "search" / "best_recipe.yaml").read_text())
    assert recipe["label_smoothing"] == 0.2
    config.validate_kwargs(train, {key: value for key, value in recipe.items() if key != "recipe"})


def test_val_loss_scores_trials_on_plain_cross_entropy_whatever_their_label_smoothing(tiny_data, tiny_space, tmp_path):
    hyperparameters = {**tiny_space["hyperparameters"], "f": [4], "units": [8], "label_smoothing": [0.0, 0.3]}
    result = search({**tiny_space, "hyperparameters": hyperparameters}, tiny_data, algorithm="grid", max_trials=None,
                    objective="val_loss", directory=tmp_path / "search", **{**FAST, "epochs": 2})
    images, labels = tiny_data.arrays("val")
    assert [trial.values["label_smoothing"] for trial in result.trials] == [0.0, 0.3]
    for trial in result.trials:  # the score is the validation cross-entropy of the trial's best-epoch weights
        model = result._tuner.load_model(result._tuner.oracle.trials[trial.trial_id])
        plain = float(np.mean(keras.losses.sparse_categorical_crossentropy(labels, model.predict(images, verbose=0))))
        assert trial.score == pytest.approx(plain, rel=1e-4)
        assert trial.metrics["val_cross_entropy"] == trial.score
    smoothed = result.trials[1]
    assert smoothed.metrics["val_loss"] != pytest.approx(smoothed.score, rel=1e-3)  # its own loss is smoothed
    assert result.best_score == min(trial.score for trial in result.trials)
    recipe = yaml.safe_load((tmp_path / "search" / "best_recipe.yaml").read_text())
    assert recipe["label_smoothing"] == result.best_trial.values["label_smoothing"]
    assert "Sensitivity of val_loss" in result.sensitivity.table()


def test_mixed_float16_trials_train_with_loss_scaling(tiny_data, tiny_space, tmp_path):
    class Optimizers(keras.callbacks.Callback):
        seen = []

        def on_train_begin(self, logs=None):
            self.seen.append(type(self.model.optimizer).__name__)

    hyperparameters = {**tiny_space["hyperparameters"], "f": [4], "units": [8]}
    search({**tiny_space, "hyperparameters": hyperparameters}, tiny_data, max_trials=1, epochs=1,
           precision="mixed_float16", directory=tmp_path / "search", callbacks=[Optimizers()], verbose=0)
    assert Optimizers.seen == ["LossScaleOptimizer"]
