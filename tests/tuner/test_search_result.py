"""cnnkit.tuner.search: resuming, Hyperband, other objectives, retraining the best configuration."""

import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

import cnnkit
from cnnkit.tuner import search

FAST = {"epochs": 1, "precision": "float32", "verbose": 0}


def _trade_offs(recipe_text):
    """The Trade-offs paragraph of a best_recipe.yaml header, its lines joined."""
    lines = recipe_text.splitlines()
    assert lines[2].startswith("# Trade-offs: trains on the training split and validates as the search did, so ")
    return " ".join(line[14:] for line in lines[2:] if line.startswith(("# Trade-offs: ", "#" + " " * 13)))


def test_the_same_call_resumes_and_other_settings_are_refused(tiny_data, tiny_space, tmp_path, counter):
    first = search(tiny_space, tiny_data, max_trials=2, directory=tmp_path / "search", callbacks=[counter()], **FAST)
    again = search(tiny_space, tiny_data, max_trials=2, directory=tmp_path / "search", callbacks=[counter()], **FAST)
    assert counter.calls == 2
    assert [(t.values, t.score) for t in again.trials] == [(t.values, t.score) for t in first.trials]
    more = search(tiny_space, tiny_data, max_trials=3, directory=tmp_path / "search", callbacks=[counter()], **FAST)
    assert counter.calls == 3 and len(more.trials) == 3
    with pytest.raises(ValueError, match=r"holds a search with epochs=1; this call has epochs=2.*overwrite=True"):
        search(tiny_space, tiny_data, max_trials=3, directory=tmp_path / "search", **{**FAST, "epochs": 2})
    fresh = search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", overwrite=True,
                   callbacks=[counter()], **{**FAST, "epochs": 2})
    assert counter.calls == 4 and len(fresh.trials) == 1 and fresh.trials[0].epochs == 2


def test_hyperband_continues_networks_and_compares_one_budget(tiny_data, tiny_space, tmp_path):
    result = search(tiny_space, tiny_data, algorithm="hyperband", factor=2, max_trials=None,
                    objective="val_balanced_accuracy", directory=tmp_path / "hyperband", **{**FAST, "epochs": 2})
    budgets = sorted({trial.epochs for trial in result.trials})
    assert budgets == [1, 2]
    continued = [trial for trial in result.trials if trial.initial_epoch == 1]  # carried on from a 1-epoch trial
    assert continued and all(trial.epochs == 2 and trial.best_epoch == 2 for trial in continued)
    completed = [trial for trial in result.trials if trial.status == "COMPLETED"]
    assert all(trial.metrics["val_balanced_accuracy"] == trial.score for trial in completed)
    assert result.sensitivity.note.startswith("trials trained for ")
    assert result.settings["direction"] == "max" and result.settings["factor"] == 2
    header = _trade_offs(result.recipe_text())
    assert "so its validation balanced accuracy should match the search's val_balanced_accuracy within noise; a " \
           "run does not log it per epoch: cnnkit.load(RUN_DIR).evaluate(data, split=\"val\")" in header


def test_val_loss_objective_picks_the_lowest(tiny_data, tiny_space, tmp_path):
    result = search(tiny_space, tiny_data, objective="val_loss", max_trials=2, directory=tmp_path / "loss", **FAST)
    assert result.direction == "min"
    assert result.best_score == min(trial.score for trial in result.trials) == result.best_trial.metrics["val_loss"]


def test_the_best_recipe_header_says_where_a_run_records_a_val_loss_objective(tiny_data, tiny_space, tmp_path):
    hyperparameters = {**tiny_space["hyperparameters"], "f": [4], "units": [8], "label_smoothing": 0.2, "l2": 1e-3}
    result = search({**tiny_space, "hyperparameters": hyperparameters}, tiny_data, objective="val_loss", max_trials=1,
                    directory=tmp_path / "search", **FAST)
    header = _trade_offs((tmp_path / "search" / "best_recipe.yaml").read_text())
    assert "the lowest val_loss in its history.csv should match the search's val_loss (plain cross-entropy) within " \
           "noise, but that val_loss includes label_smoothing and the l2 penalty (the search's score does not)" in header
    assert "best_val_accuracy" not in header and result.objective == "val_loss"


def test_the_best_recipe_header_quotes_its_run_command_for_the_shell(tiny_data, tiny_space, tmp_path):
    result = search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "my search", **FAST)
    header = (tmp_path / "my search" / "best_recipe.yaml").read_text().splitlines()[1]
    assert header == f"# Run:        cnnkit run '{tmp_path / 'my search' / 'best_recipe.yaml'}'"
    assert result.recipe_text("runs/a.yaml").splitlines()[1] == "# Run:        cnnkit run runs/a.yaml"


def test_retrain_uses_training_and_validation(tmp_path, tiny_space):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, (60, 8, 8), dtype=np.uint8)
    y = np.arange(60) % 2
    x[y == 1, :4] += 150
    data = cnnkit.data.from_arrays(x[:40], y[:40], x_test=x[40:], y_test=y[40:], val_split=0.25)
    result = search(tiny_space, data, max_trials=1, directory=tmp_path / "search", **FAST)
    run = result.retrain(run_dir=tmp_path / "retrained", verbose=0)
    assert run.config["data"]["class_counts"]["train"] == [20, 20]  # 30 training + 10 validation images
    assert run.metrics["num_examples"] == 20 and "best_val_accuracy" not in run.metrics


def test_a_folder_given_as_a_path_is_written_as_text_into_the_best_recipe(tiny_data, tiny_space, tmp_path):
    images, labels = tiny_data.arrays("train")
    for index, (image, label) in enumerate(zip(images[:16], labels[:16])):
        (tmp_path / "images" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(tmp_path / "images" / str(label) / f"{index}.png")
    data = {"path": tmp_path / "images", "image_size": 8, "color_mode": "grayscale", "val_split": 0.25}
    result = search(tiny_space, data, max_trials=1, directory=tmp_path / "search", **FAST)
    expected = {"path": str(tmp_path / "images"), "image_size": 8, "color_mode": "grayscale", "val_split": 0.25}
    assert result.best_recipe()["data"] == expected
    assert yaml.safe_load((tmp_path / "search" / "best_recipe.yaml").read_text())["data"] == expected
    assert (tmp_path / "search" / "report.html").is_file()


def test_a_search_directory_is_held_and_a_search_of_the_other_kind_is_refused(tiny_data, tiny_space, tmp_path,
                                                                               counter, monkeypatch):
    import fcntl
    import os

    import keras_tuner as kt

    def never_serve(*args, **kwargs):
        raise AssertionError("the search went on where nothing was left to do")

    monkeypatch.setattr(cnnkit.tuner.tuning, "serve", never_serve)
    (tmp_path / "search").mkdir()
    other = os.open(tmp_path / "search", os.O_RDONLY)  # another process's search there: flock conflicts as across processes
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(RuntimeError, match=f"search directory {tmp_path / 'search'} is in use by another process"):
        search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", **FAST)
    assert list((tmp_path / "search").iterdir()) == []
    os.close(other)

    search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", callbacks=[counter()], **FAST)
    (tmp_path / "search" / ".trials.csv.x1y2.tmp").write_text("a write a kill cut short")
    search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", callbacks=[counter()], **FAST)
    assert counter.calls == 1 and not list((tmp_path / "search").glob(".*.tmp"))  # resumed; the leftover removed
    # Keras Tuner resumes a chief's search from other files than one process's: a switch would start over.
    with pytest.raises(ValueError, match="holds a search with one process; this call has a chief and workers"):
        search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", role="chief",
               **FAST)
    settings = tmp_path / "search" / "search.yaml"
    settings.write_text(settings.read_text().replace("  seed: 0\n", "  seed: 0\n  distributed: true\n"))
    with pytest.raises(ValueError, match="holds a search with a chief and workers; this call has one process"):
        search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", **FAST)
    # As if a chief had run it: the chief's command again returns the finished search, serving no one.
    shutil.copy(tmp_path / "search" / "keras_tuner" / "tuner0.json", tmp_path / "search" / "keras_tuner" / "chief.json")
    again = search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", role="chief", **FAST)
    assert counter.calls == 1 and [trial.status for trial in again.trials] == ["COMPLETED"]
    # A worker given the same command asks no chief (none serves: Keras Tuner's client would wait an hour).
    monkeypatch.setattr(kt.engine.base_tuner.BaseTuner, "search", never_serve)
    worker = search(tiny_space, tiny_data, max_trials=1, directory=tmp_path / "search", role="worker",
                    worker_id="w1", **FAST)
    assert [(trial.trial_id, trial.status) for trial in worker.trials] == [("0", "COMPLETED")]
