"""cnnkit.tuner.search over a fine-tuning space: staged trials, frozen groups, the finetune recipe it writes."""

import csv
import io
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

import cnnkit
from cnnkit import config
from cnnkit.tuner import SearchSpace, search

ROOT = Path(__file__).resolve().parents[2]
FAST = {"epochs": 2, "precision": "float32", "verbose": 0}
GROUPS = ["conv1", "conv2", "fc1"]  # of the backbone below: conv1 holds bn1


@pytest.fixture(scope="session")
def backbone(tiny_data, tmp_path_factory):
    """A run directory of a small net trained for an epoch: the backbone to fine-tune."""
    run_dir = tmp_path_factory.mktemp("backbone") / "run"
    cnnkit.recipes.train("4C3-BN-4C3-FC8", tiny_data, epochs=1, batch_size=16, run_dir=run_dir, verbose=0, report=False)
    return str(run_dir)


def _space(backbone, **hyperparameters):
    return {"name": "tiny_ft", "backbone": backbone,
            "hyperparameters": {"learning_rate": 0.05, "batch_size": 16, **hyperparameters}}


def _weights(model):
    """Every weight of the backbone nested in a fine-tuning model (or of a loaded run's model), by layer."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    layers = nested[0].layers if nested else model.layers
    return {layer.name: [weight.numpy().copy() for weight in layer.weights] for layer in layers if layer.weights}


def _changed(before, after):
    return {name for name in after if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name], strict=True))}


class BackboneAtEnd(keras.callbacks.Callback):
    """Keeps the backbone's weights at the end of every fit (a fine-tuning trial fits once per stage)."""

    weights = []

    def on_train_end(self, logs=None):
        BackboneAtEnd.weights.append(_weights(self.model))


@pytest.mark.parametrize(("values", "epochs", "initial_epoch", "expected"), [
    ({"unfreeze_depth": 2, "lr_multiplier": 0.1}, 3, 0,
     [("head", 0, 1, None), ("top2", 2, 2, {"conv2": 0.1, "fc1": 0.1})]),
    ({"unfreeze_depth": 0, "lr_multiplier": 0.1}, 3, 0, [("head", 0, 3, None)]),  # head only, one stage
    ({"unfreeze_depth": 3, "lr_multiplier": 1.0, "head_epochs": 2}, 2, 0, [("head", 0, 2, None)]),  # budget <= head
    ({"unfreeze_depth": 1, "lr_multiplier": 1.0, "head_epochs": 0}, 2, 0, [("top1", 1, 2, None)]),
    ({"unfreeze_depth": 1, "lr_multiplier": 0.5}, 6, 2, [("top1", 1, 4, {"fc1": 0.5})]),  # Hyperband carries on
    ({"unfreeze_depth": 1, "lr_multiplier": 0.5, "head_epochs": 3}, 6, 2,
     [("head", 0, 1, None), ("top1", 1, 3, {"fc1": 0.5})]),
])
def test_a_trials_epochs_split_into_a_head_stage_and_an_unfreezing_stage(values, epochs, initial_epoch, expected):
    space = SearchSpace(backbone="runs/digits", hyperparameters={"unfreeze_depth": [0, 1, 2, 3]})
    stages = space.stages_for({"learning_rate": 0.01, **values}, GROUPS, epochs, initial_epoch=initial_epoch)
    assert [(s["name"], s["unfreeze"], s["epochs"], s.get("lr_multipliers")) for s in stages] == expected
    assert all(stage["learning_rate"] == 0.01 for stage in stages)


def test_a_finetune_search_runs_staged_trials_and_writes_a_finetune_recipe(backbone, tiny_data, tmp_path, counter):
    space = _space(backbone, unfreeze_depth=[0, 1, 2, 3], lr_multiplier=[0.1, 1.0], learning_rate=[0.01, 0.05])
    directory = tmp_path / "search"
    result = search(space, tiny_data, max_trials=3, directory=directory, callbacks=[counter()], **FAST)
    assert [trial.status for trial in result.trials] == ["COMPLETED"] * 3
    values = [trial.values for trial in result.trials]
    assert len({tuple(sorted(v.items())) for v in values}) == 3 and all(trial.arch is None for trial in result.trials)
    assert counter.calls == sum(1 if v["unfreeze_depth"] == 0 else 2 for v in values)  # one fit per stage
    assert result.settings["groups"] == GROUPS and result.best_arch is None and result.best_backbone == backbone
    best = result.best_trial
    assert best.score == max(trial.score for trial in result.trials) == best.metrics["val_accuracy"]
    rows = list(csv.DictReader(io.StringIO((directory / "trials.csv").read_text())))
    assert [int(row["unfreeze_depth"]) for row in rows] == [v["unfreeze_depth"] for v in values]
    assert [float(row["lr_multiplier"]) for row in rows] == [v["lr_multiplier"] for v in values]
    varied = {name for name in ("unfreeze_depth", "lr_multiplier", "learning_rate") if len({v[name] for v in values}) > 1}
    assert varied and {row["hyperparameter"] for row in result.sensitivity.rows} >= varied
    assert backbone in result.table().splitlines()[-1] and "arch" not in result.table().splitlines()[0]

    recipe = config.load_recipe(directory / "best_recipe.yaml",
                                [f"run_dir={tmp_path / 'best'}", "verbose=0", "report=false"])
    assert recipe.qualname == "cnnkit.recipes.finetune" and recipe.kwargs["backbone"] == backbone
    stages = recipe.kwargs["stages"]
    assert stages == SearchSpace.coerce(space).stages_for({"head_epochs": 1, **best.values}, GROUPS, 2)
    assert stages[-1]["unfreeze"] == best.values["unfreeze_depth"]
    assert {stage["learning_rate"] for stage in stages} == {best.values["learning_rate"]}
    if best.values["unfreeze_depth"] and best.values["lr_multiplier"] != 1:
        assert stages[-1]["lr_multipliers"] == dict.fromkeys(GROUPS[-best.values["unfreeze_depth"]:],
                                                             best.values["lr_multiplier"])
    recipe.kwargs["data"] = tiny_data  # the search ran on in-memory data: the file says to give it
    run = config.run_recipe(recipe)
    assert [stage["unfreeze"] for stage in run.config["stages"]] == [stage["unfreeze"] for stage in stages]
    assert run.metrics["best_val_accuracy"] == pytest.approx(best.score, abs=1e-6)  # the trial, reproduced

    again = search(space, tiny_data, max_trials=3, directory=directory, callbacks=[counter()], **FAST)
    assert counter.calls == sum(1 if v["unfreeze_depth"] == 0 else 2 for v in values)  # resumed: nothing retrained
    assert [(t.values, t.score) for t in again.trials] == [(t.values, t.score) for t in result.trials]

    retrained = again.retrain(run_dir=tmp_path / "retrained", verbose=0)
    assert retrained.config["recipe"] == "finetune" and sum(retrained.config["data"]["class_counts"]["train"]) == 64


def test_unfreeze_depth_zero_keeps_the_backbone_and_depth_k_trains_exactly_the_top_k_groups(backbone, tiny_data,
                                                                                           tmp_path):
    BackboneAtEnd.weights = []
    space = _space(backbone, unfreeze_depth=[0, 2], lr_multiplier=0.5)
    result = search(space, tiny_data, algorithm="grid", max_trials=None, directory=tmp_path / "grid",
                    callbacks=[BackboneAtEnd()], **FAST)
    assert [trial.values["unfreeze_depth"] for trial in result.trials] == [0, 2]
    pretrained = _weights(cnnkit.load(backbone).model)
    depth_0, depth_2_head, depth_2 = BackboneAtEnd.weights  # fits: one stage, then head + top2
    assert set(depth_0) == set(pretrained) - {"classifier"}
    assert _changed(pretrained, depth_0) == set()  # kernels, biases and batch-norm statistics as loaded
    assert _changed(pretrained, depth_2_head) == set()
    assert _changed(pretrained, depth_2) == {"conv2", "fc1"}  # bn1 (group conv1) and conv1 stay frozen


@pytest.mark.parametrize(("space", "epochs", "message"), [
    ({"unfreeze_depth": [1, 5]}, 2, "knob unfreeze_depth: 5 is more than the 3 layer groups of backbone '{backbone}' "
                                    r"\(conv1, conv2, fc1\)"),
    ({"unfreeze_depth": 1, "head_epochs": [1, 2]}, 2, "knob head_epochs: 2 leaves none of a trial's 2 epochs"),
    ({"backbone": "mobilenet_v2", "weights": None, "input_size": [32, 32], "unfreeze_depth": {"min": 0, "max": 7}}, 2,
     r"knob unfreeze_depth: 7 is more than the 6 layer groups of backbone 'mobilenet_v2' \(stem, "),
])
def test_an_impossible_knob_stops_the_search_before_any_trial(backbone, tiny_data, tmp_path, counter, space, epochs,
                                                             message):
    fields = {key: space.pop(key) for key in ("backbone", "weights", "input_size") if key in space}
    with pytest.raises(ValueError, match=message.format(backbone=backbone)):
        search({**_space(backbone, **space), **fields}, tiny_data, directory=tmp_path / "search",
               callbacks=[counter()], **{**FAST, "epochs": epochs})
    assert counter.calls == 0 and not (tmp_path / "search").exists()


@pytest.mark.parametrize(("fields", "message"), [
    ({"hyperparameters": {"momentum": [0.9]}}, "knob 'momentum' does not apply to a fine-tuning space"),
    ({"hyperparameters": {"preprocess": "standardize"}}, "knob 'preprocess' does not apply to a fine-tuning space"),
    ({"hyperparameters": {"head_epochs": -1}}, "knob 'head_epochs' takes an integer >= 0"),
    ({"input_size": [32]}, r"input_size must be \[height, width\]"),
    ({"arch": "{f}C3", "backbone": None, "hyperparameters": {"f": [4]}, "weights": None}, "weights and input_size belong"),
])
def test_a_fine_tuning_space_refuses_what_finetune_cannot_do(fields, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.coerce({"backbone": "runs/digits", "hyperparameters": {}, **fields})


def test_the_packaged_finetune_space_runs_from_the_cli(backbone, tmp_path):
    from PIL import Image

    from cnnkit.cli import main

    space = config.load_recipe(ROOT / "tuner" / "finetune_mnist.yaml", kind="tuner").kwargs["space"]
    assert SearchSpace.coerce(space).kind == "finetune" and "unfreeze_depth" in space["hyperparameters"]
    rng = np.random.default_rng(0)
    for label in (0, 1):
        (tmp_path / "images" / str(label)).mkdir(parents=True)
        for index in range(12):
            pixels = rng.integers(0, 100, (8, 8), dtype=np.uint8) + 150 * label
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / str(label) / f"{index}.png")
    data = {"path": str(tmp_path / "images"), "image_size": 8, "color_mode": "grayscale", "val_split": 0.25}
    overrides = [f"space.backbone={backbone}", f"data={yaml.safe_dump(data, default_flow_style=True).strip()}",
                 "max_trials=1", "epochs=2", "space.hyperparameters.batch_size=8", "precision=float32",
                 f"directory={tmp_path / 'search'}", "verbose=0"]
    assert main(["tune", "finetune_mnist", *overrides]) == 0
    recipe = yaml.safe_load((tmp_path / "search" / "best_recipe.yaml").read_text())
    assert recipe["recipe"] == "finetune" and recipe["data"] == data and recipe["stages"][0]["name"] == "head"
