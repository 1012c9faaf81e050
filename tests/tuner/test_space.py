"""Search spaces: declarations become Keras Tuner hyperparameters, templates fill in, the planner judges fit."""

import itertools
import re
from pathlib import Path

import keras_tuner as kt
import numpy as np
import pytest
import yaml

from cnnkit import config
from cnnkit.tuner import KNOBS, SearchSpace

ROOT = Path(__file__).resolve().parents[2]
SPACE_FILES = sorted((ROOT / "tuner").glob("*.yaml"))


def _declared(space):
    hp = kt.HyperParameters()
    space.declare(hp)
    return hp, {parameter.name: parameter for parameter in hp.space}


def test_declarations_become_keras_tuner_hyperparameters():
    space = SearchSpace("{f}C{k}-MP2-FC{units}-D{dropout}", {
        "f": [16, 32], "k": {"min": 3, "max": 7, "step": 2}, "units": 64,
        "dropout": {"min": 0.0, "max": 0.5, "step": 0.25},
        "learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"},
        "batch_norm": [False, True], "augment": [None, "shift"], "weight_decay": [0, 0.5]})
    hp, declared = _declared(space)
    kinds = {name: type(parameter).__name__ for name, parameter in declared.items()}
    assert kinds == {"f": "Choice", "k": "Int", "units": "Fixed", "dropout": "Float", "learning_rate": "Float",
                     "batch_norm": "Boolean", "augment": "Choice", "weight_decay": "Choice"}
    assert list(declared["k"].values) == [3, 5, 7]
    assert declared["learning_rate"].sampling == "log"
    assert declared["augment"].values == ["none", "shift"]  # None in a list of names means "none"
    assert declared["weight_decay"].values == [0.0, 0.5]  # mixed int and float choices become floats
    assert hp.values["batch_norm"] is False and hp.values["units"] == 64


def test_values_round_floats_and_fill_the_template():
    space = SearchSpace("{f}C3-FC{units}-D{dropout}", {"f": [8], "units": [64], "dropout": {"min": 0.0, "max": 0.5, "step": 0.1}})
    values = space.values({"f": 8, "units": 64, "dropout": 0.30000000000000004, "tuner/epochs": 3})
    assert values == {"f": 8, "units": 64, "dropout": 0.3}
    assert space.arch_for(values) == "8C3-FC64-D0.3"
    assert space.placeholders == ("f", "units", "dropout")


def test_a_float_fills_the_template_exactly_never_in_exponent_form():
    space = SearchSpace("FC8-D{d}", {"d": [0.00005, 0.1234567891, 0.5]})  # made: each listed value reads as notation
    assert space.arch_for({"d": 0.00005}) == "FC8-D0.00005"  # not D5e-05, which the notation splits at '-'
    assert space.arch_for({"d": 0.1234567891}) == "FC8-D0.1234567891"  # not rounded to 6 digits
    assert space.arch_for({"d": np.float64(0.5)}) == "FC8-D0.5"


@pytest.mark.parametrize("declaration, only", [
    ({"min": 16, "max": 128, "step": 16, "sampling": "log"}, "only 16"),  # Keras Tuner would offer 16 alone
    ({"min": 16, "max": 128, "step": 16, "sampling": "reverse_log"}, "only 128"),
    ({"min": 16, "max": 128, "step": 1, "sampling": "log"}, "at most max/min;"),
    ({"min": 0.001, "max": 0.1, "step": 0.001, "sampling": "log"}, "at most max/min;"),
])
def test_a_log_range_refuses_a_step_that_is_not_a_useful_multiplier(declaration, only):
    with pytest.raises(ValueError, match=r"hyperparameter 'units': under \w+ sampling step is a multiplier") as error:
        SearchSpace("FC{units}", {"units": declaration})
    assert only in str(error.value)


@pytest.mark.parametrize("declaration", [
    {"min": 2, "max": 8, "step": 0},  # Keras Tuner divides by it
    {"min": 2, "max": 8, "step": -2},
    {"min": 0.0, "max": 0.5, "step": 0.75},  # the range would hold only min
])
def test_a_linear_range_refuses_a_step_that_is_not_positive_or_exceeds_the_range(declaration):
    with pytest.raises(ValueError, match=r"hyperparameter 'units': under linear sampling step must be > 0 "
                                         r"and at most max - min"):
        SearchSpace("FC{units}", {"units": declaration})


def test_a_step_equal_to_the_range_is_accepted_despite_float_rounding():
    space = SearchSpace("FC8-D{dropout}", {"dropout": {"min": 0.2, "max": 0.3, "step": 0.1}})  # 0.3 - 0.2 < 0.1
    assert space.placeholders == ("dropout",)


def test_a_log_range_with_a_multiplier_step_gives_its_powers_as_ints():
    space = SearchSpace("FC{units}", {"units": {"min": 16, "max": 128, "step": 2, "sampling": "log"}})
    _, declared = _declared(space)
    units = declared["units"]
    assert list(units.values) == [16, 32, 64, 128]  # what the grid tries
    assert {units.random_sample(seed) for seed in range(200)} == {16, 32, 64, 128}
    values = [space.values({"units": value})["units"] for value in units.values]  # the grid's are floats (16.0)
    assert values == [16, 32, 64, 128] and all(type(value) is int for value in values)
    assert space.arch_for({"units": 32}) == "FC32"


def test_numpy_values_are_declared_as_python_values_that_search_yaml_can_hold():
    space = SearchSpace("{f}C3", {"f": list(np.arange(4, 9, 4)), "learning_rate": list(np.geomspace(1e-3, 1e-2, 3)),
                                  "weight_decay": np.array([0.0, 0.5]), "batch_size": np.int64(8),
                                  "l2": {"min": np.float32(0.0), "max": np.float64(0.5)}, "batch_norm": [np.True_]})
    assert space.hyperparameters == {"f": [4, 8], "learning_rate": [0.001, pytest.approx(0.00316227766), 0.01],
                                     "weight_decay": [0.0, 0.5], "batch_size": 8, "l2": {"min": 0.0, "max": 0.5},
                                     "batch_norm": [True]}
    assert [type(value) for value in space.hyperparameters["f"]] == [int, int]
    assert type(space.hyperparameters["learning_rate"][0]) is float and type(space.hyperparameters["batch_size"]) is int
    assert SearchSpace.coerce(yaml.safe_load(yaml.safe_dump(space.to_dict()))) == space


@pytest.mark.parametrize("declaration, step", [({"min": 1e-3, "max": 1e-2, "sampling": "log"}, 2),
                                               ({"min": 0, "max": 0.5}, 0.25),
                                               ({"min": 16, "max": 64, "sampling": "log"}, 2)])
def test_a_grid_refuses_a_range_without_a_step(declaration, step):
    space = SearchSpace("{f}C3", {"f": declaration})
    with pytest.raises(ValueError, match=r"hyperparameter 'f': a grid search needs a step in this range \(or a list"):
        space.check_grid()
    SearchSpace("{f}C3", {"f": {**declaration, "step": step}}).check_grid()
    SearchSpace("{f}C3", {"f": {"min": 4, "max": 8}}).check_grid()  # every integer


def test_model_options_are_the_build_knobs():
    space = SearchSpace("{f}C3", {"f": [4], "batch_norm": [False, True], "activation": ["relu", "tanh"],
                                  "learning_rate": 0.01})
    assert space.model_options({"f": 4, "batch_norm": True, "activation": "tanh", "learning_rate": 0.01}) == {
        "batch_norm": True, "activation": "tanh"}


@pytest.mark.parametrize("arch, hyperparameters, message", [
    ("{f}C3", {}, "uses {f} but hyperparameters does not declare it"),
    ("{f}C3", {"f": [4], "learning_rat": 0.1}, r"'learning_rat' is neither .* \(did you mean 'learning_rate'\?\)"),
    ("{f}C3", {"f": {"min": 5, "max": 3}}, "hyperparameter 'f': min must be below max"),
    ("{f}C3", {"f": {"min": 0, "max": 8, "sampling": "log"}}, "'f': log sampling needs min > 0"),
    ("{f}C3", {"f": {"min": 1, "max": 8, "stepp": 1}}, "'f': a range is a mapping with min and max"),
    ("{f}C3", {"f": []}, "'f': a list of choices must not be empty"),
    ("{f}C3", {"f": [4, 4]}, "'f': the choices repeat a value"),
    ("{f}C3", {"f": [4, "x"]}, "hyperparameter 'f'"),
    ("{f}C3", {"f": [4], "learning_rate": [0.1, -1.0]}, "knob 'learning_rate' takes a number > 0"),
    ("{f}C3", {"f": [4], "batch_norm": ["yes"]}, "knob 'batch_norm' takes true or false"),
    ("{f}C3", {"f": [4], "label_smoothing": [0.1, 1.0]}, r"knob 'label_smoothing' takes a number in \[0, 1\)"),
    ("{f}C3", {"f": [4], "momentum": [0.9, 1.5]}, r"knob 'momentum' takes a number in \[0, 1\]. Received: momentum="),
    ("{f}C3", {"f": [4], "batch_size": {"min": 0, "max": 64}}, "knob 'batch_size' takes an integer >= 1"),
    ("{f}C3", {"f": [4], "unfreeze_depth": [1, 2]}, "knob 'unfreeze_depth' applies to spaces with a backbone:"),
    ("{f:3}C3", {"f": [4]}, "placeholders are plain names"),
    ("{batch_size}C3", {"batch_size": [4]}, "{batch_size} in the template is a knob's name"),
])
def test_bad_declarations_name_the_hyperparameter(arch, hyperparameters, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(arch, hyperparameters)


def test_a_value_that_makes_bad_notation_is_refused_when_the_space_is_made():
    with pytest.raises(ValueError, match=re.escape(
            "hyperparameter 'block': the value '4C3-MPP2' makes the template read '4C3-MPP2-FC4', which is not valid "
            "notation: token 2 'MPP2': not a layer; expected e.g. 64C3")):
        SearchSpace("{block}-FC{u}", {"block": ["4C3-MP2", "4C3-MPP2"], "u": [4, 8]})
    with pytest.raises(ValueError, match=re.escape("hyperparameter 'u': the value 0 makes the template read '4C3-FC0'")):
        SearchSpace("{block}-FC{u}", {"block": ["4C3"], "u": [0, 8]})  # u's first value spoils block's check
    with pytest.raises(ValueError, match=re.escape("arch template '{block}-FC4' with block='4C3-MPP2' reads "
                                                   "'4C3-MPP2-FC4', which is not valid notation: token 2 'MPP2'")):
        SearchSpace("{block}-FC4", {"block": "4C3-MPP2"})
    space = SearchSpace("{block}-FC{u}", {"block": ["4C3-MP2", "4C9-MP2"], "u": [4, 8]})  # a misfit is a trial's
    assert space.invalid_reason({"block": "4C9-MP2", "u": 4}, (8, 8, 1), 2).startswith("4C9-MP2-FC4: token 1 '4C9'")


def test_a_space_names_an_arch_or_a_backbone():
    with pytest.raises(ValueError, match="exactly one of arch"):
        SearchSpace(None, {})
    with pytest.raises(ValueError, match="exactly one of arch"):
        SearchSpace("{f}C3", {"f": [4]}, backbone="mobilenet_v2")


def test_fine_tuning_knobs_are_declared_in_backbone_spaces():
    space = SearchSpace(backbone="mobilenet_v2", hyperparameters={
        "unfreeze_depth": {"min": 0, "max": 3}, "lr_multiplier": [0.1, 1.0], "learning_rate": 1e-3})
    _, declared = _declared(space)
    assert space.kind == "finetune" and space.placeholders == ()
    assert type(declared["unfreeze_depth"]).__name__ == "Int"
    assert SearchSpace.coerce(space.to_dict()) == space
    assert {KNOBS[name][0] for name in ("unfreeze_depth", "lr_multiplier")} == {"finetune"}


def test_weights_for_a_saved_backbone_are_refused_when_the_space_is_made(tmp_path):
    import cnnkit

    saved = tmp_path / "own.keras"
    cnnkit.build("4C3-MP2-FC8", (8, 8, 1), 2).save(saved)
    assert SearchSpace(backbone=str(saved), hyperparameters={"learning_rate": 1e-3}).weights == "imagenet"
    with pytest.raises(ValueError, match=rf"weights applies to keras.applications backbones; a saved backbone "
                                         rf"\({re.escape(str(saved))}\) brings its own weights. Received: weights=None"):
        SearchSpace(backbone=str(saved), weights=None, hyperparameters={"learning_rate": 1e-3})


def test_coerce_checks_keys():
    space = SearchSpace.coerce({"arch": "{f}C3", "hyperparameters": {"f": [4, 8]}, "name": "tiny"})
    assert space.to_dict() == {"arch": "{f}C3", "hyperparameters": {"f": [4, 8]}, "name": "tiny"}
    with pytest.raises(ValueError, match="unknown key 'hyperparameter' in the search space"):
        SearchSpace.coerce({"arch": "{f}C3", "hyperparameter": {"f": [4]}})
    with pytest.raises(ValueError, match="space must be a SearchSpace or a mapping"):
        SearchSpace.coerce("{f}C3")


def test_the_planner_judges_each_combination_with_its_build_knobs():
    space = SearchSpace("{f}C{k}-MP2", {"f": [4], "k": [3, 9], "padding": ["valid", "same"]})
    reason = space.invalid_reason({"f": 4, "k": 9, "padding": "valid"}, (8, 8, 1), 2)
    assert reason.startswith("4C9-MP2: ") and "(8 - 9 + 0)/1 + 1 = 0" in reason
    assert space.invalid_reason({"f": 4, "k": 3, "padding": "valid"}, (8, 8, 1), 2) is None
    assert space.invalid_reason({"f": 4, "k": 9, "padding": "same"}, (8, 8, 1), 2) is None


def test_check_fits_refuses_a_space_where_nothing_fits():
    with pytest.raises(ValueError, match=re.escape("no network of search space 'big' fits input (8, 8, 1)")):
        SearchSpace("{f}C{k}", {"f": [4, 8], "k": [9, 11]}, name="big").check_fits((8, 8, 1), 2)
    SearchSpace("{f}C{k}", {"f": [4], "k": [9, 11, 3]}).check_fits((8, 8, 1), 2)


@pytest.mark.parametrize("path", SPACE_FILES, ids=[path.name for path in SPACE_FILES])
def test_packaged_space_files_hold_valid_spaces(path):
    recipe = config.load_recipe(path, kind="tuner")
    assert recipe.qualname == "cnnkit.tuner.search"
    space = SearchSpace.coerce(recipe.kwargs["space"])
    assert space.name == path.stem
    if recipe.kwargs["algorithm"] == "grid":
        space.check_grid()
    space.check_fits((28, 28, 1), 10)


def test_kernel_grid_file_has_the_invalid_pairs_its_header_names():
    space = SearchSpace.coerce(config.load_recipe(ROOT / "tuner" / "mnist_kernels_grid.yaml", kind="tuner").kwargs["space"])
    declared = space.hyperparameters
    invalid = [(k1, k2) for k1, k2 in itertools.product(declared["k1"], declared["k2"])
               if space.invalid_reason({"k1": k1, "k2": k2}, (28, 28, 1), 10)]
    assert invalid == [(7, 11), (9, 11)]
    assert "(7, 11) and (9, 11)" in (ROOT / "tuner" / "mnist_kernels_grid.yaml").read_text()
