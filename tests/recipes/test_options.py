"""Option values that need no data are refused before any data loads, naming the key (and the recipe file)."""

import keras
import pytest

import cnnkit
from cnnkit import cli
from cnnkit.recipes import options as options_module
from cnnkit.recipes.options import CHECKED_KEYS, check_call, check_options

BAD_OPTIONS = [
    ({"optimizer": "adamm"}, "optimizer"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"schedule": "cosin"}, "schedule"),
    ({"schedule": {"name": "step", "factor": 2}}, "factor"),
    ({"precision": "bf16"}, "precision"),
    ({"augment": ["shift", "rotatoin"]}, "rotatoin"),
    ({"augment": {"name": "rotation", "degree": 5}}, "degree"),
    ({"preprocess": "zcaa"}, "zcaa"),
    ({"imbalance": "oversampl"}, "oversampl"),
    ({"imbalance": {"strategy": "oversample", "augmented_copies": "flipp"}}, "augmented_copies"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"precise_bn": -1}, "precise_bn"),
    ({"early_stopping": 0}, "early_stopping"),
    ({"ema": 1.5}, "ema"),
    ({"ema": 0.999, "early_stopping": 3}, "early_stopping and ema"),
    ({"callbacks": "EarlyStopping"}, "callbacks must be a list"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\). Received: seed=-1"),
    ({"seed": 2**32}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ({"seed": 1.5}, "seed"),
    ({"callbacks": [keras.callbacks.History(), 1]}, r"callbacks\[1\] is not a keras.callbacks.Callback. Received: 1 \(int\)"),
]


@pytest.mark.parametrize("options, named", BAD_OPTIONS)
def test_a_bad_value_is_refused_naming_it(options, named):
    with pytest.raises(ValueError, match=named):
        check_options(**options)


def test_good_values_of_every_key_pass():
    good = {"optimizer": "momentum", "learning_rate": 0.05, "schedule": {"name": "cosine", "cycles": 2},
            "momentum": 0.9, "weight_decay": 5e-4, "ema": None, "epochs": 4, "batch_size": 64,
            "steps_per_execution": 8, "precise_bn": 1000, "early_stopping": 2, "precision": "float32",
            "label_smoothing": 0.1, "augment": ["shift", {"name": "rotation", "degrees": 10}],
            "preprocess": ["scale", "zca"], "imbalance": {"strategy": "oversample", "augmented_copies": "affine"},
            "callbacks": [keras.callbacks.History()], "seed": 2**32 - 1}
    assert set(good) == set(CHECKED_KEYS)
    check_options(**good)


def test_an_unchecked_key_is_a_callers_mistake():
    with pytest.raises(TypeError, match="arch"):
        check_options(arch="lenet")


def test_a_call_is_checked_with_the_functions_own_defaults():
    cycles = {"schedule": {"name": "cosine", "cycles": 5}}
    check_call(cnnkit.recipes.train, cycles)  # train's 10 epochs: 5 cycles of 2
    with pytest.raises(ValueError, match=r"divides epochs \(12\)"):
        check_call(cnnkit.recipes.train, {**cycles, "epochs": 12})
    with pytest.raises(ValueError, match="optimizer"):  # finetune takes no schedule; its other keys are checked
        check_call(cnnkit.recipes.finetune, {"optimizer": "adamm"})


@pytest.fixture
def no_data(monkeypatch):
    """Loading any data fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")

    monkeypatch.setattr(cnnkit.data, "load", refuse)
    monkeypatch.setattr(cnnkit.data, "from_folder", refuse)


@pytest.mark.parametrize("call", [
    lambda: cnnkit.recipes.train("lenet", "mnist", optimizer="adamm"),
    lambda: cnnkit.recipes.finetune("mobilenet_v2", "mnist", weights=None, augment="rotatoin"),
    lambda: cnnkit.recipes.ensemble(2, "mnist", arch="lenet", train_options={"precision": "bf16"}),
    lambda: cnnkit.recipes.transfer("lenet", {"path": "images"}, source_classes=[0, 1], target_classes=[2, 3],
                                     finetune={"imbalance": "oversampl"}),
], ids=["train", "finetune", "ensemble", "transfer"])
def test_each_recipe_refuses_a_bad_option_before_loading_data(call, no_data):
    with pytest.raises(ValueError, match="adamm|rotatoin|bf16|oversampl"):
        call()


@pytest.mark.parametrize("recipe", [cnnkit.recipes.train, cnnkit.recipes.finetune], ids=["train", "finetune"])
def test_real_callbacks_pass_the_check(recipe, no_data):
    with pytest.raises(AssertionError, match="data was loaded"):  # checked, then the data is loaded
        recipe("lenet" if recipe is cnnkit.recipes.train else "mobilenet_v2", "mnist",
               callbacks=[keras.callbacks.TerminateOnNaN()])


def test_cnnkit_run_names_the_recipe_file_and_loads_no_data(tmp_path, no_data, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(options_module, "check_options", lambda **kw: calls.append(kw) or check_options(**kw))
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("arch: lenet\ndata: mnist\nschedule: {name: cosine, cycles: 3}\nepochs: 12\n")
    assert cli.main(["run", str(recipe), "schedule.cycles=5"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"cnnkit: error: {recipe}: cosine cycles must be an integer >= 1 that divides epochs (12)")
    assert "Received: cycles=5" in error and "\n" not in error
    assert calls and calls[0]["epochs"] == 12 and calls[0]["optimizer"] == "adam"  # train's defaults filled in
