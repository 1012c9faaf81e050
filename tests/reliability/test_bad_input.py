"""Guarantee 10: a bad recipe file or argument fails before any work, in one line, exit status 2.

Each case runs ``cnnkit run FILE [key=value ...]`` in an empty working directory with data
loading and ``keras.Model.fit`` replaced by functions that fail the test, and checks: status 2,
exactly one line on stderr naming the key, token or path, no traceback, no ``runs/`` folder.
The Python API (``config.load_recipe`` + ``config.run_recipe``) raises a ``ValueError`` with
the same message.
"""

import textwrap
from pathlib import Path

import keras
import pytest

import cnnkit
from cnnkit import config
from cnnkit.cli import main

GOOD = {"arch": "8C5-MP2-FC16", "data": "mnist-sample", "epochs": 1, "verbose": 0}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory in which loading data or training fails the test."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        pytest.fail("data was loaded or training started")

    monkeypatch.setattr(keras.Model, "fit", refuse)
    monkeypatch.setattr(cnnkit.data, "load", refuse)
    monkeypatch.setattr(cnnkit.data, "from_folder", refuse)
    return tmp_path


def _recipe(folder, text: str):
    path = folder / "recipe.yaml"
    path.write_text("# A recipe with a mistake.\n" + textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def _yaml(**changes) -> str:
    import yaml

    return yaml.safe_dump({**GOOD, **changes}, sort_keys=False)


CASES = {
    "unknown key": (_yaml(epoch=3), [], ["unknown key 'epoch'", "did you mean 'epochs'", "valid keys: arch, data"]),
    "unknown key in data": (_yaml(data={"path": "images", "image_size": 28, "val_splt": 0.2}), [],
                            ["unknown key 'val_splt'", "data (cnnkit.data.from_folder)", "'val_split'"]),
    "unknown key in a dataset mapping": (_yaml(data={"name": "mnist", "val_spilt": 0}), [],
                                         ["unknown key 'val_spilt'", "data (cnnkit.data.load('mnist'))",
                                          "'val_split'"]),
    "unknown dataset in a mapping": (_yaml(data={"name": "mnst", "val_split": 0}), [],
                                     ["data: unknown dataset 'mnst'", "did you mean 'mnist'"]),
    "string for an int": (_yaml(epochs="ten"), [], ["epochs must be an integer. Received: epochs='ten'"]),
    "list for a float": (_yaml(learning_rate=[1]), [], ["learning_rate must be a number. Received: learning_rate=[1]"]),
    "bool for an int": (_yaml(batch_size=True), [], ["batch_size must be an integer"]),
    "string for a mapping": (_yaml(model_options="tanh"), [], ["model_options must be a mapping or null"]),
    "bad notation": (_yaml(arch="20X5-MP2-FC64"), [], ["arch: token 1 '20X5'"]),
    "bad notation token 3": (_yaml(arch="20C5-MP2-FCX"), [], ["arch: token 3 'FCX'"]),
    "unknown model name": (_yaml(arch="lenett"), [], ["unknown model 'lenett'", "did you mean lenet"]),
    "unknown build option": (_yaml(model_options={"activaton": "tanh"}), [], ["unknown build option 'activaton'"]),
    "bad build option value": (_yaml(model_options={"activation": "tanhh"}), [],
                               ["model_options.activation must be one of", "Received: activation='tanhh'"]),
    "unknown dataset": (_yaml(data="mnst"), [], ["data: unknown dataset 'mnst'", "did you mean 'mnist'"]),
    "missing data path": (_yaml(data={"path": "/nope/images", "image_size": 28}), [],
                          ["data.path: no such folder '/nope/images'"]),
    "missing image_size": (_yaml(data={"path": "/nope/images"}), [], ["missing required argument 'image_size'"]),
    "invalid yaml": ("arch: FC16\ndata: [mnist-sample\nepochs: 1\n", [], ["recipe.yaml:", "invalid YAML", "line "]),
    "unknown override": (_yaml(), ["epochz=2"], ["unknown override 'epochz'", "did you mean 'epochs'"]),
    "override of the wrong type": (_yaml(), ["epochs=ten"], ["epochs must be an integer. Received: epochs='ten'"]),
    "bad notation override": (_yaml(), ["arch=64C3-XP2"], ["arch: token 2 'XP2'"]),
    "unknown backbone": ("recipe: finetune\nbackbone: mobilenet_v9\ndata: mnist-sample\n", [],
                         ["backbone (a registered name, a .keras file or a run directory): ", "'mobilenet_v9'"]),
    "missing backbone file": ("recipe: finetune\nbackbone: models/pretrained.keras\ndata: mnist-sample\n", [],
                              ["backbone: no .keras file or run directory at 'models/pretrained.keras'"]),
    "missing weights file": ("recipe: finetune\nbackbone: mobilenet_v2\nweights: notop.weights.h5\ndata: mnist\n", [],
                             ["weights: no weights file at 'notop.weights.h5'"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_recipe_fails_before_any_work_in_one_line(workdir, case, capsys):
    text, overrides, expected = CASES[case]
    path = _recipe(workdir, text)
    assert main(["run", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("cnnkit: error: ") and str(path) in line
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"
    assert sorted(p.name for p in workdir.iterdir()) == ["recipe.yaml"]  # no runs/, nothing written

    with pytest.raises(ValueError) as info:  # the Python API: the same message
        config.run_recipe(config.load_recipe(path, overrides))
    assert f"cnnkit: error: {info.value}" == line


def test_the_packaged_recipes_still_pass_the_stricter_checks():
    root = Path(__file__).resolve().parents[2]
    for kind in ("recipes", "tuner"):
        names = [name for name, _ in config.list_recipes(kind)]
        assert sorted(names) == sorted(path.stem for path in (root / kind).glob("*.yaml"))  # every one, not none
        for name in names:
            config.check_recipe_file(config.find_recipe(name, kind))


def test_train_called_directly_names_a_bad_token_before_writing_a_run(tmp_path, monkeypatch):
    monkeypatch.setattr(keras.Model, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match="token 1 '20X5'"):
        cnnkit.recipes.train("20X5-MP2", "mnist-sample", run_dir=tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()
