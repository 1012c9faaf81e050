"""The ``cnnkit`` command line, run in-process on tiny inputs."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cnnkit import config
from cnnkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _error_lines(captured) -> list[str]:
    return [line for line in captured.err.splitlines() if line.strip()]


def _tiny_recipe(folder: Path, name: str = "tiny.yaml", **extra) -> Path:
    settings = {"arch": "FC16", "data": "mnist-sample", "epochs": 1, "batch_size": 64, "verbose": 0,
                "run_dir": str(folder / "run"), **extra}
    lines = ["# Tiny: one epoch of FC16 on the bundled MNIST sample (a test)."]
    lines += [f"{key}: {json.dumps(value)}" for key, value in settings.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- plan ---------------------------------------------------------------------------------------


def test_plan_prints_table_and_memory(capsys):
    assert main(["plan", "20C5-MP2-50C5-MP2-FC256", "--input-shape", "28,28,1", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    for text in ("24x24x20", "12x12x20", "8x8x50", "4x4x50", "FC256", "total:", "training memory estimate (batch 128"):
        assert text in out, text


def test_plan_alexnet_first_layer(capsys):
    assert main(["plan", "96C11s4p0-MP3s2", "--input-shape", "227,227,3", "--batch-size", "8",
                 "--precision", "mixed_bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "55x55x96" in out and "34,944" in out and "27x27x96" in out
    assert "(batch 8, mixed_bfloat16)" in out


def test_plan_that_does_not_fit_is_one_line_with_the_formula(capsys):
    assert main(["plan", "96C11s4p0-MP3s2", "--input-shape", "224,224,3"]) == 2
    captured = capsys.readouterr()
    lines = _error_lines(captured)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cnnkit: error: ")
    assert "(224 - 11 + 0)/4 + 1 = 54.25" in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_plan_bad_token_names_it(capsys):
    assert main(["plan", "20C5-XP2-FC10", "--input-shape", "28,28,1"]) == 2
    lines = _error_lines(capsys.readouterr())
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ") and "'XP2'" in lines[0]


def test_plan_into_a_closed_pipe_exits_quietly():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "cnnkit", "plan", "resnet20", "--input-shape", "28,28,1"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as `| head -1` does once it has its line
    stderr = process.communicate(timeout=120)[1].decode()
    assert (process.returncode, stderr) == (1, "")


def test_plan_bad_precision_is_a_user_error(capsys):
    assert main(["plan", "FC16", "--input-shape", "28,28,1", "--precision", "float8"]) == 2
    lines = _error_lines(capsys.readouterr())
    assert len(lines) == 1 and "float8" in lines[0]


@pytest.mark.parametrize("argv", [["plan", "FC16"], ["plan", "FC16", "--input-shape", "28,28"], ["nosuchcommand"], []])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: cnnkit" in capsys.readouterr().err


def test_help_and_version_return_0(capsys):
    assert main(["--help"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("cnnkit ")


def test_report_help_names_the_default_output_of_a_keras_file(capsys):
    assert main(["report", "--help"]) == 0
    assert "for a .keras file, <stem>.html beside it" in " ".join(capsys.readouterr().out.split())


def test_debug_env_reraises(monkeypatch):
    from cnnkit.spec import SpecError

    monkeypatch.setenv("CNNKIT_DEBUG", "1")
    with pytest.raises(SpecError, match="54.25"):
        main(["plan", "96C11s4p0", "--input-shape", "224,224,3"])


# -- ls, models ---------------------------------------------------------------------------------


def test_ls_lists_recipes_and_search_spaces_with_descriptions(monkeypatch, tmp_path, capsys):
    for kind in ("recipes", "tuner"):
        (tmp_path / kind).mkdir()
    (tmp_path / "recipes" / "mnist_lenet.yaml").write_text(
        "# Reproduces: LeNet (ch. 6 of a book) on\n#             MNIST. Then more.\n# Run: x\narch: lenet\n")
    (tmp_path / "recipes" / "quickstart.yaml").write_text(
        "\n# Quickstart: a small CNN.\n#\n#   not part of it\narch: FC16\n")
    (tmp_path / "tuner" / "mnist_conv.yaml").write_text("# Searches: kernel sizes.\nhyperparameters: {}\n")
    monkeypatch.setattr(config, "packaged_dir", lambda kind="recipes": tmp_path / kind)
    assert main(["ls"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "mnist_lenet  Reproduces: LeNet (ch. 6 of a book) on MNIST.",  # the first sentence, lines joined
        "quickstart   Quickstart: a small CNN.",
        "",
        "search spaces (cnnkit tune NAME):",
        "mnist_conv   Searches: kernel sizes.",
    ]


def test_ls_help_plan_and_models_do_not_import_tensorflow():
    code = textwrap.dedent("""
        import sys
        from cnnkit.cli import main
        assert main(["ls"]) == 0
        assert main(["--help"]) == 0
        assert main(["run"]) == 2
        assert main(["plan", "resnet20", "--input-shape", "28,28,1", "--classes", "10"]) == 0
        assert main(["plan", "96C11s4p0", "--input-shape", "224,224,3"]) == 2
        assert main(["models"]) == 0
        print("tensorflow imported:", "tensorflow" in sys.modules, "keras imported:", "keras" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tensorflow imported: False keras imported: False" in result.stdout


def test_python_dash_m_cnnkit():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "cnnkit", "run", "no_such_recipe_xyz"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "cnnkit: error: unknown recipe 'no_such_recipe_xyz'" in result.stderr


def test_models_lists_registered_names_with_description(capsys):
    from cnnkit.models import describe, list_models

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = list_models()
    assert len(lines) == len(names) and "lenet" in names
    lenet = next(line for line in lines if line.split()[0] == "lenet")
    assert lenet.split(None, 1)[1] == describe("lenet")


# -- run, quickstart ----------------------------------------------------------------------------


def test_run_unknown_key_exits_2_naming_it(tmp_path, capsys):
    path = _tiny_recipe(tmp_path, epoch=1)
    assert main(["run", str(path)]) == 2
    lines = _error_lines(capsys.readouterr())
    assert len(lines) == 1
    assert "unknown key 'epoch'" in lines[0] and str(path) in lines[0] and "valid keys:" in lines[0]


def test_run_bad_override_and_unknown_name_exit_2(tmp_path, capsys):
    path = _tiny_recipe(tmp_path)
    assert main(["run", str(path), "epochs"]) == 2
    assert "'epochs'" in _error_lines(capsys.readouterr())[0]
    assert main(["run", str(path), "epochz=2"]) == 2
    assert "unknown override 'epochz'" in _error_lines(capsys.readouterr())[0]
    assert main(["run", "no_such_recipe_xyz"]) == 2
    assert "unknown recipe 'no_such_recipe_xyz'" in _error_lines(capsys.readouterr())[0]
    assert main(["run", str(tmp_path / "missing" / "x.yaml")]) == 2
    assert "no such recipe file" in _error_lines(capsys.readouterr())[0]
    assert main(["run", "nothere.yaml"]) == 2  # a file name, not a packaged name
    assert "no such recipe file: nothere.yaml, and no packaged recipe 'nothere'. Available: " in \
        _error_lines(capsys.readouterr())[0]
    assert main(["tune", "mnist_cnv"]) == 2
    assert "unknown search space 'mnist_cnv'; did you mean 'mnist_conv'" in _error_lines(capsys.readouterr())[0]


def test_run_trains_and_writes_metrics(tmp_path, capsys):
    path = _tiny_recipe(tmp_path, epochs=5)
    assert main(["run", str(path), "epochs=1"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert f"run saved to {run_dir}" in out
    assert f"tiny: test accuracy {100 * metrics['test_accuracy']:.2f}%" in out
    assert "(error " in out


def test_run_on_a_folder_read_without_verify_names_an_image_that_fails_to_decode(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for index in range(12):
        folder = tmp_path / "images" / "ab"[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (8, 8), np.uint8)).save(folder / f"{index}.png")
    broken = tmp_path / "images" / "b" / "3.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header passes verify: false's check; the pixels are cut
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(yaml.safe_dump({
        "arch": "FC8", "epochs": 1, "batch_size": 4, "verbose": 0, "run_dir": str(tmp_path / "run"), "report": False,
        "data": {"path": str(tmp_path / "images"), "image_size": 8, "color_mode": "grayscale", "val_split": 0, "verify": False},
    }))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cnnkit: error: cannot decode image file {broken}: ")
    assert err.endswith("; it was not checked when the folder was read (verify: false), or it changed since\n")
    assert not (tmp_path / "run").exists()


def test_quickstart_runs_the_packaged_transfer_experiment(tmp_path, capsys):
    overrides = ["labels_per_class=5", "pretrain.epochs=1", "scratch.epochs=1", f"run_dir={tmp_path / 'qs'}",
                 "finetune.stages=[{unfreeze: 0, epochs: 1, learning_rate: 0.001}]", "verbose=0"]
    assert main(["quickstart", *overrides]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"quickstart: target test accuracy \(500 images\): fine-tuned \d+\.\d\d%  from scratch "
                    r"\d+\.\d\d%  \([+-]\d+\.\d\d points\); runs in ", line)
    for run in ("pretrain", "finetune", "scratch"):
        assert (tmp_path / "qs" / run / "metrics.json").is_file()
    finetuned = yaml.safe_load((tmp_path / "qs" / "finetune" / "config.yaml").read_text())
    assert finetuned["class_names"] == ["5", "6", "7", "8", "9"]
    assert finetuned["data"]["class_counts"]["train"] == [5] * 5


@pytest.mark.parametrize("override, message", [
    ("scratch.epoch=1", "unknown key 'epoch' for transfer's scratch (train) (did you mean 'epochs'?)"),
    ("pretrain.seed=1", "'seed' cannot be set for transfer's pretrain (train): its caller passes it"),
    ("finetune.epochs=two", "epochs must be an integer. Received: epochs='two'"),
    ("target_classes=[5]", "target_classes must name at least 2 classes (each task is a classifier)"),
])
def test_quickstart_refuses_a_bad_nested_key_before_pretraining(tmp_path, capsys, override, message):
    assert main(["quickstart", override, f"run_dir={tmp_path / 'qs'}"]) == 2
    assert f"cnnkit: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


def test_quickstart_uses_the_packaged_recipe_beside_a_file_or_folder_named_quickstart(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("arch: FC16\n", encoding="utf-8")  # not the packaged recipe
    assert main(["quickstart", "epoch=1"]) == 2
    packaged = config.packaged_dir("recipes") / "quickstart.yaml"
    assert f"cnnkit: error: {packaged}: unknown override 'epoch' for cnnkit.recipes.transfer" in capsys.readouterr().err


def test_packaged_quickstart_recipe_is_valid():
    recipe = config.check_recipe_file(config.find_recipe("quickstart"))
    assert recipe.function == "transfer"
    assert recipe.kwargs["data"] == "mnist-sample"


# -- export and predict -------------------------------------------------------------------------


@pytest.fixture
def saved_run(tmp_path):
    """An untrained FC16 classifier saved as a run directory, and a folder of two digit PNGs."""
    import keras
    import numpy as np
    from PIL import Image

    import cnnkit

    keras.utils.set_random_seed(0)
    run_dir = cnnkit.Run(cnnkit.build("FC16", (28, 28, 1), 10)).save(tmp_path / "run")
    digits = cnnkit.data.load("mnist-sample").arrays("test")[0][:2]
    (tmp_path / "images").mkdir()
    for index, digit in enumerate(digits):
        Image.fromarray(np.asarray(digit)[..., 0]).save(tmp_path / "images" / f"{index}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return run_dir, tmp_path / "images"


def test_export_then_predict_with_the_export(saved_run, tmp_path, capsys):
    run_dir, images = saved_run
    out = tmp_path / "tflite"
    assert main(["export", str(run_dir), "--format", "tflite", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"tflite export: {out / 'model.tflite'}" in printed and "tolerance 1e-05: ok" in printed
    assert json.loads((out / "verification.json").read_text())["passed"] is True

    assert main(["export", str(run_dir), "--out", str(tmp_path / "sm"), "--no-verify"]) == 0
    capsys.readouterr()
    csv_path = tmp_path / "predictions.csv"
    assert main(["predict", str(tmp_path / "sm"), str(images), "--top-k", "3", "--csv", str(csv_path),
                 "--trust-model"]) == 0  # a SavedModel is code: it needs the opt-in
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith(str(images))]
    assert len(lines) == 2 and all(len(line.split(": ")[1].split(", ")) == 3 for line in lines)
    assert "skipped 1 files that are not images" in captured.err and "notes.txt" in captured.err
    assert len(csv_path.read_text().splitlines()) == 1 + 2 * 3
    csv_path.write_text("kept\n")  # a mistyped --csv must not replace a file unasked
    assert main(["predict", str(tmp_path / "sm"), str(images), "--csv", str(csv_path), "--trust-model"]) == 2
    assert _error_lines(capsys.readouterr()) == [f"cnnkit: error: --csv {csv_path} already exists; pass --overwrite "
                                                 "to replace it"]
    assert csv_path.read_text() == "kept\n"
    assert main(["predict", str(tmp_path / "sm"), str(images), "--csv", str(csv_path), "--overwrite",
                 "--trust-model"]) == 0
    assert len(csv_path.read_text().splitlines()) == 1 + 2 * 5
    capsys.readouterr()

    assert main(["predict", str(run_dir), str(images / "0.png"), "--top-k", "1"]) == 0
    from_run = capsys.readouterr().out.strip()
    assert from_run.startswith(f"{images / '0.png'}: ") and len(from_run.splitlines()) == 1


def test_export_with_trust_model_still_refuses_a_target_holding_its_source(saved_run, tmp_path, capsys):
    run_dir, _ = saved_run
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--format", "tflite", "--out", str(out), "--no-verify"]) == 0
    source = Path(shutil.copy(run_dir / "model.keras", out / "model.keras"))  # a model kept beside its export
    capsys.readouterr()
    assert main(["export", str(source), "--format", "tflite", "--out", str(out), "--overwrite", "--no-verify",
                 "--trust-model"]) == 2
    assert f"`path` is or holds the run being exported ({source})" in capsys.readouterr().err
    assert source.is_file()


def test_predict_skips_unreadable_images_naming_them_and_predicts_the_rest(saved_run, tmp_path, capsys):
    run_dir, images = saved_run
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.png").write_bytes(b"")
    (tmp_path / "bad" / "cut.png").write_bytes((images / "0.png").read_bytes()[:60])
    assert main(["predict", str(run_dir), str(images / "1.png"), str(tmp_path / "bad"), "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    assert [line.split(": ")[0] for line in captured.out.splitlines()] == [str(images / "1.png")]
    assert "skipped 2 unreadable images: " in captured.err
    assert "empty.png (empty file (0 bytes))" in captured.err and "cut.png (cannot decode" in captured.err
    assert main(["predict", str(run_dir), str(tmp_path / "bad")]) == 2
    assert "cnnkit: error: none of the 2 images could be read" in capsys.readouterr().err
    from PIL import Image

    Image.new("L", (40, 100)).save(tmp_path / "tall.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 100x40, shown turned: upright 40x100
    Image.new("RGB", (100, 40)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("L", (56, 56)).save(tmp_path / "big.png")
    files = [str(tmp_path / name) for name in ("tall.png", "turned.jpg")]
    assert main(["predict", str(run_dir), *files, str(images / "1.png")]) == 0
    assert "resized 2 images to the model's 28x28 (from 40x100; aspect ratio not kept)" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(tmp_path / "big.png")]) == 0
    assert capsys.readouterr().err.strip().endswith("resized 1 images to the model's 28x28 (from 56x56)")


def test_a_warning_is_one_cnnkit_line(saved_run, tmp_path, capsys):
    run_dir, images = saved_run
    (images / "again").symlink_to(images, target_is_directory=True)  # a loop: the folder is left out, with a warning
    assert main(["predict", str(run_dir), str(images), "--top-k", "1"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"cnnkit: warning: Skipped 1 folder(s): {images / 'again'} (a second way into the folder " \
                       f"{images.resolve()}, listed once (a symlink))"
    assert not any("UserWarning" in line or "warnings.warn" in line for line in lines)


def test_export_and_predict_user_errors_are_one_line(saved_run, tmp_path, capsys):
    run_dir, images = saved_run
    (tmp_path / "taken").mkdir()
    for argv, text in [
        (["export", str(run_dir), "--out", str(tmp_path / "taken")], "overwrite=True"),
        (["export", str(run_dir), "--format", "tflite", "--quantize", "int8", "--out", str(tmp_path / "q")],
         "representative_data"),
        (["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")], "no-run"),
        (["predict", str(run_dir), str(tmp_path / "missing.png")], "missing.png"),
    ]:
        assert main(argv) == 2, argv
        lines = _error_lines(capsys.readouterr())
        assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ") and text in lines[0], lines
    assert main(["export", str(run_dir), "--format", "pb", "--out", str(tmp_path / "y")]) == 2
    assert "invalid choice" in capsys.readouterr().err


# -- tune ---------------------------------------------------------------------------------------


def _tiny_space_file(tmp_path: Path) -> Path:
    """A folder of 2 classes x 16 grey 8x8 PNGs and a search-space file searching over it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(2):
        (tmp_path / "images" / f"class{label}").mkdir(parents=True)
        for index in range(16):
            pixels = rng.integers(0, 100, (8, 8), dtype=np.uint8)
            pixels[:4] += 150 * label
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{label}" / f"{index}.png")
    data = {"path": str(tmp_path / "images"), "image_size": 8, "color_mode": "grayscale", "val_split": 0.25}
    space = {"name": "tiny", "arch": "{f}C3-MP2-FC{units}",
             "hyperparameters": {"f": [2, 4], "units": [4, 8], "learning_rate": 0.05, "batch_size": 8}}
    path = tmp_path / "tiny_space.yaml"
    path.write_text("# Tiny: a search over a folder of 8x8 images (a test).\n" + yaml.safe_dump(
        {"recipe": "search", "space": space, "data": data, "max_trials": 3, "epochs": 2, "precision": "float32",
         "directory": str(tmp_path / "search")}, sort_keys=False), encoding="utf-8")
    return path


def test_tune_prints_trials_and_the_best_recipe_reproduces_its_score(tmp_path, capsys):
    from cnnkit.recipes.resume import training_epoch

    training_epoch().assign(7)  # left over from an earlier run in this process: trials must not depend on it
    path = _tiny_space_file(tmp_path)
    assert main(["tune", str(path), "max_trials=2", f"directory={tmp_path / 'my search'}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^trial 0 \[1/2\]  COMPLETED  val_accuracy \d\.\d{4}", out, re.M), out
    assert re.search(r"^trial 1 \[2/2\]  COMPLETED", out, re.M) and "2 trials (2 completed)" in out
    recipe_path = tmp_path / "my search" / "best_recipe.yaml"
    assert f"train the best configuration: cnnkit run '{recipe_path}'" in out  # quoted for the shell
    for name in ("trials.csv", "sensitivity.png", "sensitivity.csv", "search.yaml"):
        assert (tmp_path / "my search" / name).is_file(), name
    best = float(re.search(r"^best: trial \d+, val_accuracy (\d\.\d+)", out, re.M).group(1))

    assert main(["run", str(recipe_path), f"run_dir={tmp_path / 'best'}", "verbose=0"]) == 0
    metrics = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert metrics["best_val_accuracy"] == pytest.approx(best, abs=1e-4)

    capsys.readouterr()
    for option in (["--data", "no-such-data"], ["--examples", "3"]):  # a run's options, not a search's
        assert main(["report", str(tmp_path / "my search"), *option]) == 2
        assert _error_lines(capsys.readouterr()) == [f"cnnkit: error: {option[0]} apply to a run's report; "
                                                     f"{tmp_path / 'my search'} is a search directory"]


def test_tune_user_errors_are_one_line(tmp_path, capsys):
    path = _tiny_space_file(tmp_path)
    for overrides, text in [
        (["max_trial=2"], "unknown override 'max_trial' for cnnkit.tuner.search (did you mean 'max_trials'?)"),
        (["space.hyperparameters.optimizer=adamm"], "knob optimizer must be one of"),
        (['space.arch="{f}C9-FC{units}"'], "no network of search space 'tiny' fits input (8, 8, 1)"),
        (["data.path=" + str(tmp_path / "nowhere")], "nowhere"),
    ]:
        assert main(["tune", str(path), *overrides]) == 2, overrides
        lines = _error_lines(capsys.readouterr())
        assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ") and text in lines[0], lines
    assert not (tmp_path / "search").exists()


def test_unwritable_outputs_and_run_files_that_do_not_parse_are_one_line_naming_the_file(saved_run, tmp_path,
                                                                                          capsys):
    run_dir, images = saved_run
    bad_manifest, bad_config = tmp_path / "bad_manifest", tmp_path / "bad_config"
    shutil.copytree(run_dir, bad_manifest)
    (bad_manifest / "manifest.json").write_text((run_dir / "manifest.json").read_text()[:40])
    shutil.copytree(run_dir, bad_config)
    (bad_config / "manifest.json").unlink()
    (bad_config / "config.yaml").write_text("x: [\n")
    for argv, text in [
        (["predict", str(run_dir), str(images / "0.png"), "--csv", "/sys/x.csv"], "Permission denied: /sys/x.csv"),
        (["export", str(run_dir), "--out", "/sys/exp", "--no-verify"], ": /sys/exp"),
        (["predict", str(bad_manifest), str(images / "0.png")],
         f"{str(bad_manifest / 'manifest.json')!r} is not valid JSON: Unterminated string"),
        (["predict", str(bad_config), str(images / "0.png")],
         f"{str(bad_config / 'config.yaml')!r} is not valid YAML: expected the node content"),
    ]:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = _error_lines(captured)
        assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ") and text in lines[0], captured.err
        assert ".tmp" not in lines[0] and ".partial" not in lines[0]
    assert not list(Path("/sys").glob(".x.csv.*")) and not Path("/sys/exp").exists()


def test_predict_csv_keeps_a_file_name_that_is_not_utf8(saved_run, tmp_path, capsys):
    run_dir, images = saved_run
    latin1 = os.fsencode(images) + b"/caf\xe9.png"
    os.link(os.fsencode(images / "0.png"), latin1)  # Linux file systems take any bytes but / and NUL
    csv_path = tmp_path / "predictions.csv"
    assert main(["predict", str(run_dir), str(images), "--top-k", "1", "--csv", str(csv_path)]) == 0
    assert f"{images}/caf\\xe9.png: " in capsys.readouterr().out  # shown escaped, as Python shows it on stderr
    assert latin1 + b",1," in csv_path.read_bytes()  # the CSV has the file's own bytes


def test_predict_prints_a_file_name_with_a_newline_or_escape_sequence_on_one_line(saved_run, tmp_path, capsys):
    run_dir, images = saved_run
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ["a\nb.png", "c\x1b[31md.png"]:
        shutil.copy(images / "0.png", folder / name)
    csv_path = tmp_path / "predictions.csv"
    assert main(["predict", str(run_dir), str(folder), "--top-k", "1", "--csv", str(csv_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines[:2]] == [f"{folder}/a\\nb.png", f"{folder}/c\\x1b[31md.png"]
    assert "\x1b" not in "".join(lines)
    assert f"{folder}/a\nb.png".encode() in csv_path.read_bytes()  # quoted by the csv module, name kept


def test_predict_checks_the_csv_folder_before_predicting_and_predicts_a_file_named_twice_once(saved_run, tmp_path,
                                                                                               capsys, monkeypatch):
    run_dir, images = saved_run
    (tmp_path / "afile").write_text("x")
    under_a_file = tmp_path / "afile" / "sub" / "o.csv"
    assert main(["predict", str(run_dir), str(images), "--csv", str(under_a_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any prediction
    assert _error_lines(captured) == [f"cnnkit: error: --csv {under_a_file} cannot be written: {tmp_path / 'afile'} "
                                      "is not a folder"]
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))  # root writes anyway
    assert main(["predict", str(run_dir), str(images), "--csv", str(locked / "new" / "o.csv")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and _error_lines(captured) == [
        f"cnnkit: error: --csv: Permission denied: {locked / 'new' / 'o.csv'} (the folder {locked} is not writable)"]
    monkeypatch.undo()

    csv_path = tmp_path / "new" / "predictions.csv"  # a missing folder is made
    assert main(["predict", str(run_dir), str(images), str(images / "0.png"), "--top-k", "1", "--csv",
                 str(csv_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(images / "0.png"), str(images / "1.png"),
                                                       f"predictions written to {csv_path}"]
    assert len(csv_path.read_text().splitlines()) == 1 + 2
