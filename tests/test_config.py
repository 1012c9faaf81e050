"""Recipe files: lookup, overrides, validation against the recipe function's signature."""

import re
import sys
import textwrap
from pathlib import Path

import pytest

from cnnkit import config
from cnnkit.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "tuner").glob("*.yaml"))


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def _fake_train(arch, data, *, epochs=10, learning_rate=1e-3, model_options=None, run_dir=None):
    return {"arch": arch, "data": data, "epochs": epochs, "learning_rate": learning_rate,
            "model_options": model_options, "run_dir": run_dir}


def _fake_finetune(backbone, data, *, epochs=5):
    return ("finetune", backbone, data, epochs)


@pytest.fixture
def fake_recipes(monkeypatch, tmp_path):
    """A packaged-recipes folder in tmp_path and a fake ``cnnkit.recipes`` with two functions."""
    import types

    folder = tmp_path / "packaged"
    folder.mkdir()
    module = types.ModuleType("fake_recipes")
    module.train = _fake_train
    module.finetune = _fake_finetune
    module.__all__ = ["train", "finetune"]
    monkeypatch.setitem(sys.modules, "cnnkit.recipes", module)
    real_packaged_dir = config.packaged_dir
    monkeypatch.setattr(config, "packaged_dir", lambda kind="recipes": folder if kind == "recipes" else real_packaged_dir(kind))
    return folder


# -- overrides ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("epochs=3", (["epochs"], 3)),
        ("data=mnist-sample", (["data"], "mnist-sample")),
        ("learning_rate=1e-3", (["learning_rate"], 0.001)),
        ("learning_rate=0.05", (["learning_rate"], 0.05)),
        ("model_options.activation=tanh", (["model_options", "activation"], "tanh")),
        ("deterministic=true", (["deterministic"], True)),
        ("early_stopping=null", (["early_stopping"], None)),
        ("run_dir=", (["run_dir"], None)),
        ("image_size=[64, 64]", (["image_size"], [64, 64])),
        ("name=a=b", (["name"], "a=b")),
        ("note=2024-06-01", (["note"], "2024-06-01")),  # no dates
        ("run_dir=2024-06-01", (["run_dir"], "2024-06-01")),  # a path key: the text as typed
        ("data.path=010", (["data", "path"], "010")),
        ("run_dir=runs/exp #2", (["run_dir"], "runs/exp #2")),
        ("backbone='a b.keras'", (["backbone"], "a b.keras")),
        ("data.test_path=null", (["data", "test_path"], None)),
        ("space.backbone=010", (["space", "backbone"], "010")),  # a search space's backbone folder
        ("space.weights=007", (["space", "weights"], "007")),
        ("data={path: 010, image_size: 28}", (["data"], {"path": "010", "image_size": 28})),  # in a mapping too
        ("space={backbone: 2024, weights: true}", (["space"], {"backbone": "2024", "weights": "true"})),
    ],
)
def test_parse_override(text, expected):
    assert config.parse_override(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("epochs=010", 10),  # YAML 1.1: octal 8
    ("epochs=-010", -10),
    ("seed=0x1F", 31),
    ("seed=0o17", 15),
    ("seed=1:00", "1:00"),  # YAML 1.1: base 60, 60
    ("learning_rate=1:30.5", "1:30.5"),
    ("seed=0b101", "0b101"),
    ("image_size=[010, 0x10]", [10, 16]),
])
def test_override_integers_are_yaml_1_2(text, expected):
    value = config.parse_override(text)[1]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text, expected", [
    ("-.5", -0.5),  # signed floats without a leading digit; YAML 1.1 (PyYAML) left these strings
    ("+.5", 0.5),
    (".5e1", 5.0),
    ("1.", 1.0),
    ("1_0.5", "1_0.5"),  # YAML 1.1: 10.5, though 1_000 was a string
    ("1_000", "1_000"),
    ("yes", "yes"),  # YAML 1.1: booleans
    ("No", "No"),
    ("on", "on"),
    ("OFF", "OFF"),
    ("y", "y"),
    ("true", True),
    ("False", False),
    ("TRUE", True),
    ("[yes, no, right]", ["yes", "no", "right"]),  # class names
])
def test_files_and_overrides_read_floats_and_booleans_as_yaml_1_2(text, expected):
    for value in (config.parse_override(f"x={text}")[1], config._yaml_document(f"x: {text}\n")[0]["x"]):
        assert value == expected and type(value) is type(expected)


def test_recipe_file_integers_are_yaml_1_2(fake_recipes, tmp_path):
    path = _write(tmp_path, "ints.yaml", """
        arch: FC16
        data: mnist-sample
        epochs: 010
        run_dir: 1:00
    """)
    assert config.load_recipe(path).kwargs == {"arch": "FC16", "data": "mnist-sample", "epochs": 10, "run_dir": "1:00"}
    path.write_text("arch: FC16\ndata: mnist-sample\nepochs: !!int 1:00\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'1:00' is not an integer"):
        config.load_recipe(path)


def test_a_path_key_given_as_a_number_in_a_file_is_its_text_as_in_an_override(fake_recipes, tmp_path):
    path = _write(tmp_path, "digits.yaml", """
        arch: FC16
        data: {path: 2024, test_path: 1.50}
        run_dir: 010
        epochs: 010
    """)
    assert config.load_recipe(path).kwargs == {"arch": "FC16", "data": {"path": "2024", "test_path": "1.50"},
                                               "run_dir": "010", "epochs": 10}
    assert config.load_recipe(path, ["run_dir=010"]).kwargs["run_dir"] == "010"
    space = _write(tmp_path, "space.yaml", """
        base: &base {backbone: 007, weights: 0x1F}
        space: {<<: *base, hyperparameters: {k: [3, 010]}}
        directory: 2025
        backbone: true
        weights: '12'
    """)
    assert config._read_mapping(space) == {
        "base": {"backbone": 7, "weights": 31},  # not a path key: numbers
        "space": {"backbone": "007", "weights": "0x1F", "hyperparameters": {"k": [3, 10]}},  # merged in, as text
        "directory": "2025", "backbone": "true", "weights": "12"}


@pytest.mark.parametrize("text", ["epochs", "=3", "model_options..activation=x", "x=[1,"])
def test_malformed_override_names_it(text):
    with pytest.raises(ConfigError, match=re.escape(repr(text))):
        config.parse_override(text)


def test_an_override_whose_rest_yaml_would_drop_as_a_comment_is_refused():
    with pytest.raises(ConfigError, match=re.escape("""override 'model_options.activation=tanh #2': '#' after a space starts a YAML comment, which would drop the rest of the value; quote the value (e.g. model_options.activation='"tanh #2"')""")):
        config.parse_override("model_options.activation=tanh #2")
    assert config.parse_override("note='a #2'") == (["note"], "a #2")


def test_a_data_path_that_is_a_file_is_named_as_one(tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(ConfigError, match="data.path: is a file, not a folder of class subfolders: '.*images.zip'"):
        config.check_paths({"data": {"path": str(tmp_path / "images.zip")}})


def test_missing_weights_and_search_space_paths_are_named_with_their_key(tmp_path):
    weights = tmp_path / "notop.weights.h5"
    for kwargs, key in (({"backbone": "mobilenet_v2", "weights": str(weights)}, "weights"),
                        ({"space": {"backbone": "mobilenet_v2", "weights": str(weights)}}, "space.weights")):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: no weights file at '{weights}'; expected imagenet, "
                                                        "null (untrained) or a weights file")):
            config.check_paths(kwargs)
    weights.write_bytes(b"h5")
    config.check_paths({"weights": str(weights), "space": {"weights": "imagenet", "backbone": "mobilenet_v2"}})
    config.check_paths({"weights": None, "space": {"weights": None}})
    source = _write(tmp_path, "space.yaml", "# Backbone: make it first: cnnkit quickstart\nspace: {}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{source}: space.backbone: no .keras file or run directory at "
                                                    "'runs/quickstart/pretrain' (see the header of space.yaml)")):
        config.check_paths({"space": {"backbone": "runs/quickstart/pretrain"}}, source=source)
    with pytest.raises(ConfigError, match=r"^backbone: no .keras file or run directory at 'runs/x.keras'$"):
        config.check_paths({"backbone": "runs/x.keras"})


def test_a_data_name_that_is_not_text_names_the_recipe_file_and_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("arch: FC16\ndata: {name: 5}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: data.name: a dataset name is text, one of ") + ".*mnist.*received 5$"):
        config.load_recipe(path)


def test_an_arch_that_is_not_text_names_the_recipe_file_and_the_key(tmp_path):
    import keras

    path = tmp_path / "r.yaml"
    path.write_text("arch: 256\ndata: mnist-sample\n", encoding="utf-8")
    for overrides, shown in (([], "256"), (["arch="], "None"), (["arch=[FC8]"], r"\['FC8'\]")):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: arch must be notation") + f".*Received: arch={shown}$"):
            config.load_recipe(path, overrides)
    from cnnkit.recipes import ensemble, train

    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])
    config.validate_kwargs(train, {"arch": model, "data": "mnist-sample"})  # from Python, a keras.Model
    config.validate_kwargs(ensemble, {"members": ["FC8"], "data": "mnist-sample", "arch": None})  # its default


@pytest.mark.parametrize("override, message", [
    ("model_options.activation=tanhh", "model_options.activation must be one of ('relu', "),
    ("model_options.padding=sane", "model_options.padding must be one of ('valid', 'same'). Received: padding='sane'"),
    ("model_options.l2=-1", "model_options.l2 must be None or a number >= 0. Received: l2=-1"),
    ("model_options.initializer=he_normall", "model_options.initializer must be one of ('auto', 'he_normal', "),
])
def test_a_bad_model_option_value_names_the_recipe_file_and_the_key(tmp_path, override, message):
    path = _write(tmp_path, "r.yaml", "arch: FC8\ndata: mnist-sample\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {message}")):
        config.load_recipe(path, [override])
    config.load_recipe(path, ["model_options={activation: tanh, padding: same, initializer: theano, l2: 0.001}"])


def test_apply_overrides_nested_and_does_not_modify_input():
    original = {"epochs": 10, "model_options": {"dropout": 0.5}}
    result = config.apply_overrides(original, ["epochs=2", "model_options.activation=tanh", "new.deep.key=1"])
    assert result == {"epochs": 2, "model_options": {"dropout": 0.5, "activation": "tanh"}, "new": {"deep": {"key": 1}}}
    assert original == {"epochs": 10, "model_options": {"dropout": 0.5}}


def test_apply_overrides_through_a_scalar_fails():
    with pytest.raises(ConfigError, match="epochs is 10, not a mapping"):
        config.apply_overrides({"epochs": 10}, ["epochs.x=1"])


# -- files and validation -----------------------------------------------------------------------


def test_load_by_path_with_overrides(fake_recipes, tmp_path):
    path = _write(tmp_path, "tiny.yaml", """
        # Tiny: a test recipe.
        arch: FC16
        data: mnist-sample
        learning_rate: 1e-3   # plain YAML 1.1 would read this as a string
        model_options:
          dropout: 0.5
    """)
    recipe = config.load_recipe(str(path), ["epochs=2", "model_options.activation=tanh"])
    assert recipe.name == "tiny"
    assert recipe.function == "train"
    assert recipe.qualname == "cnnkit.recipes.train"
    assert recipe.path == path
    assert recipe.kwargs == {
        "arch": "FC16", "data": "mnist-sample", "learning_rate": 0.001, "epochs": 2,
        "model_options": {"dropout": 0.5, "activation": "tanh"},
    }
    assert config.run_recipe(recipe)["epochs"] == 2


def test_a_home_folder_tilde_is_expanded_in_every_path_key(fake_recipes, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _write(tmp_path, "r.yaml", "arch: FC16\ndata: {path: ~/images, test_path: ~/test}\nrun_dir: ~/runs/x\n")
    kwargs = config.load_recipe(path).kwargs
    assert (kwargs["run_dir"], kwargs["data"]) == (f"{tmp_path}/runs/x", {"path": f"{tmp_path}/images",
                                                                           "test_path": f"{tmp_path}/test"})
    assert config.load_recipe(path, ["run_dir=~/other", "data=mnist"]).kwargs["run_dir"] == f"{tmp_path}/other"
    finetune = _write(tmp_path, "ft.yaml", "recipe: finetune\nbackbone: ~/runs/pretrain\ndata: mnist\n")
    assert config.load_recipe(finetune).kwargs["backbone"] == f"{tmp_path}/runs/pretrain"


def test_load_by_name_from_packaged_folder(fake_recipes):
    _write(fake_recipes, "mnist_lenet.yaml", """
        # Reproduces: LeNet on MNIST.
        # Run: cnnkit run mnist_lenet
        recipe: train
        arch: lenet
        data: mnist
    """)
    for name in ("mnist_lenet", "mnist_lenet.yaml"):
        recipe = config.load_recipe(name)
        assert recipe.path == fake_recipes / "mnist_lenet.yaml"
        assert recipe.kwargs == {"arch": "lenet", "data": "mnist"}
    assert config.list_recipes() == [("mnist_lenet", "Reproduces: LeNet on MNIST.")]


def test_a_folder_named_after_a_packaged_recipe_is_that_recipe(fake_recipes, tmp_path, monkeypatch):
    _write(fake_recipes, "mnist_conv.yaml", "arch: FC16\ndata: mnist\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist_conv").mkdir()  # the run directory of `cnnkit run mnist_conv run_dir=mnist_conv`
    (tmp_path / "runs").mkdir()
    assert config.find_recipe("mnist_conv") == fake_recipes / "mnist_conv.yaml"
    with pytest.raises(ConfigError, match="^runs is a folder; expected a recipe file"):
        config.find_recipe("runs")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'mnist_conv'} is a folder; expected a recipe file")):
        config.find_recipe(tmp_path / "mnist_conv")


def test_recipe_key_selects_the_function(fake_recipes, tmp_path):
    path = _write(tmp_path, "ft.yaml", "recipe: finetune\nbackbone: mobilenet_v2\ndata: flowers\n")
    recipe = config.load_recipe(path, ["epochs=1"])
    assert (recipe.function, recipe.kwargs) == ("finetune", {"backbone": "mobilenet_v2", "data": "flowers", "epochs": 1})
    assert config.run_recipe(recipe) == ("finetune", "mobilenet_v2", "flowers", 1)


def test_unknown_recipe_function(fake_recipes, tmp_path):
    path = _write(tmp_path, "bad.yaml", "recipe: fintune\nbackbone: x\ndata: y\n")
    with pytest.raises(ConfigError, match=r"no function 'fintune'; did you mean 'finetune'\?.*finetune, train"):
        config.load_recipe(path)


def test_a_search_space_outside_tuner_points_to_cnnkit_tune(tmp_path):
    path = _write(tmp_path, "my space.yaml", "recipe: search\nspace: lenet_space\ndata: mnist-sample\n")
    with pytest.raises(ConfigError, match=re.escape(f"no function 'search'; run a search-space file with: "
                                                    f"cnnkit tune '{path}'. Available: ")):
        config.load_recipe(path)


def test_unknown_name_lists_close_matches_first(fake_recipes):
    for name in ("mnist_lenet", "cifar_vgg", "mnist_mlp"):
        _write(fake_recipes, f"{name}.yaml", "arch: lenet\ndata: mnist\n")
    with pytest.raises(ConfigError) as info:
        config.load_recipe("mnist_lenett")
    message = str(info.value)
    assert "unknown recipe 'mnist_lenett'" in message
    assert "did you mean 'mnist_lenet'" in message
    available = message.split("Available: ")[1]
    assert available.index("mnist_lenet") < available.index("cifar_vgg")


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        config.load_recipe(str(tmp_path / "nope.yaml"))


def test_unknown_key_names_file_key_and_valid_keys(fake_recipes, tmp_path):
    path = _write(tmp_path, "typo.yaml", "arch: FC16\ndata: mnist-sample\nepoch: 3\n")
    with pytest.raises(ConfigError) as info:
        config.load_recipe(path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown key 'epoch'" in message
    assert "did you mean 'epochs'" in message
    assert "valid keys: arch, data, epochs, learning_rate, model_options, run_dir" in message


def test_unknown_override_key_says_override(fake_recipes, tmp_path):
    path = _write(tmp_path, "ok.yaml", "arch: FC16\ndata: mnist-sample\n")
    with pytest.raises(ConfigError, match="unknown override 'batchsize'"):
        config.load_recipe(path, ["batchsize=3"])


def test_missing_required_arguments_are_named(fake_recipes, tmp_path):
    path = _write(tmp_path, "empty_args.yaml", "# nothing but\nepochs: 1\n")
    with pytest.raises(ConfigError, match=r"missing required arguments 'arch', 'data' for cnnkit\.recipes\.train"):
        config.load_recipe(path)
    assert config.load_recipe(path, ["arch=FC16", "data=mnist-sample"]).kwargs["arch"] == "FC16"


def test_yaml_syntax_error_names_file_and_line(fake_recipes, tmp_path):
    path = _write(tmp_path, "broken.yaml", """
        # header
        arch: FC16
        data: [mnist
        epochs: 1
    """)
    with pytest.raises(ConfigError) as info:
        config.load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message and "line " in message


def test_a_key_given_twice_is_refused_naming_both_lines(fake_recipes, tmp_path):
    path = _write(tmp_path, "twice.yaml", """
        arch: FC16
        data: {name: mnist-sample, val_split: 0.1}
        epochs: 20
        epochs: 1
    """)
    with pytest.raises(ConfigError, match=r"twice\.yaml:4: .*duplicate key 'epochs' \(first on line 3\)"):
        config.load_recipe(path)
    path.write_text("arch: FC16\ndata: mnist-sample\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"duplicate key 'name'"):
        config.load_recipe(path, ["data={name: mnist, name: mnist-sample}"])


def test_merged_keys_may_be_overridden_explicitly():
    assert config._yaml_document("base: &b {a: 1, b: 2}\nx: {<<: *b, a: 3}\n")[0]["x"] == {"a": 3, "b": 2}
    # an anchored mapping that overrides its own merge, itself merged before it is built
    nested = config._yaml_document("outer:\n  inner: &b\n    <<: {x: 1}\n    x: 2\ny:\n  <<: *b\n")[0]
    assert nested == {"outer": {"inner": {"x": 2}}, "y": {"x": 2}}


@pytest.mark.parametrize("text", ["- arch\n- data\n", "just a string\n", "", "# only a comment\n", "1: x\n"])
def test_top_level_must_be_a_mapping_of_names(fake_recipes, tmp_path, text):
    path = _write(tmp_path, "odd.yaml", text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        config.load_recipe(path)


def test_validate_kwargs_accepts_var_keyword():
    def recipe(arch, data, **kwargs):
        return kwargs

    config.validate_kwargs(recipe, {"arch": "x", "data": "y", "anything": 1})
    with pytest.raises(ConfigError, match="missing required argument 'data'"):
        config.validate_kwargs(recipe, {"arch": "x"})


def test_packaged_dir_in_checkout():
    import cnnkit

    if Path(cnnkit.__file__).resolve().parents[1] == ROOT:  # cnnkit imported from this checkout
        assert config.packaged_dir("recipes").resolve() == ROOT / "recipes"
        assert config.packaged_dir("tuner").resolve() == ROOT / "tuner"
    else:  # an installed cnnkit: its packages
        assert config.packaged_dir("recipes").name == "recipe_files"
        assert config.packaged_dir("tuner").name == "search_spaces"
    with pytest.raises(ValueError, match="kind"):
        config.packaged_dir("other")


def test_tuner_folder_files_use_cnnkit_tuner(tmp_path, monkeypatch):
    import types

    module = types.ModuleType("fake_tuner")

    def search(space, data, *, max_trials=10):
        return space, data, max_trials

    module.search = search
    monkeypatch.setitem(sys.modules, "cnnkit.tuner", module)
    folder = tmp_path / "tuner"
    folder.mkdir()
    path = _write(folder, "space.yaml", "space: lenet_space\ndata: mnist-sample\nmax_trials: 2\n")
    recipe = config.check_recipe_file(path)
    assert (recipe.qualname, recipe.kwargs["max_trials"]) == ("cnnkit.tuner.search", 2)


# -- every packaged file ------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPE_FILES])
def test_packaged_recipe_file_is_valid(path, monkeypatch):
    import importlib

    recipe = config.check_recipe_file(path)
    assert path.stem in dict(config.list_recipes(path.parent.name))  # the file is listed under its folder
    header = path.read_text(encoding="utf-8").lstrip().splitlines()[0]
    assert header.startswith("#"), f"{path.name} needs a header comment saying what it reproduces"
    assert recipe.name == path.stem
    if recipe.module == "cnnkit.recipes":  # the option values run_recipe checks before the call (optimizer, ...)
        from cnnkit.recipes.options import check_call

        function = config.resolve_function(recipe.module, recipe.function)
        check_call(function, recipe.kwargs)
        if recipe.function == "transfer":  # it checks its pretrain, finetune and scratch settings before the data

            class DataReached(Exception):
                pass

            def stop(data):
                raise DataReached

            monkeypatch.setattr(importlib.import_module("cnnkit.recipes.transfer"), "resolve_data", stop)
            with pytest.raises(DataReached):
                function(**recipe.kwargs)


def test_packaged_search_space_by_name_with_nested_overrides():
    recipe = config.load_recipe("mnist_conv", ["space.hyperparameters.k1=[3]", "epochs=2"], kind="tuner")
    assert recipe.qualname == "cnnkit.tuner.search"
    assert recipe.kwargs["space"]["hyperparameters"]["k1"] == [3] and recipe.kwargs["epochs"] == 2
    with pytest.raises(ConfigError, match=r"unknown override 'max_trial' .*did you mean 'max_trials'"):
        config.load_recipe("mnist_conv", ["max_trial=3"], kind="tuner")
