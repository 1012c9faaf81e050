"""Guarantees 2, 3, 4 and 8: atomic hashed artifacts, the manifest, a NaN stop that keeps the last
good checkpoint, and run directories that are never overwritten by accident nor left by a failed start."""

import fcntl
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.cli import main
from cnnkit.recipes import fitting
from cnnkit.recipes.resume import EpochCheckpoint
from cnnkit.runs import MANIFEST_FILE, TrainingDiverged, file_sha256, verify_manifest


@pytest.fixture(scope="module")
def digits():
    sample = cnnkit.data.load("mnist-sample")
    (x, y), (x_test, y_test) = sample.arrays("train"), sample.arrays("test")
    return cnnkit.data.from_arrays(x[:256], y[:256], x_test=x_test[:64], y_test=y_test[:64], seed=0)


def _train(data, run_dir, **options):
    return cnnkit.recipes.train("4C3-MP2-FC16", data, **{"epochs": 2, "batch_size": 64, "run_dir": run_dir,
                                                          "verbose": 0, **options})


class _Poison(keras.callbacks.Callback):
    """Makes the weights NaN at the start of epoch ``epoch`` (1-based), as a diverging run would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            kernel = [layer for layer in self.model.layers if isinstance(layer, keras.layers.Dense)][-1].kernel
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def test_the_manifest_lists_every_artifact_and_load_checks_it(digits, tmp_path):
    run = _train(digits, tmp_path / "run")
    manifest = json.loads((run.run_dir / MANIFEST_FILE).read_text())["files"]
    assert {"model.keras", "metrics.json", "config.yaml", "history.csv", "README.md", "training_curves.png",
            "confusion_matrix.png"} <= set(manifest)
    assert all(file_sha256(run.run_dir / name) == record["sha256"] for name, record in manifest.items())
    assert verify_manifest(run.run_dir) == []
    with open(run.run_dir / "model.keras", "r+b") as model_file:  # one flipped byte
        model_file.seek(100)
        byte = model_file.read(1)
        model_file.seek(100)
        model_file.write(bytes([byte[0] ^ 0xFF]))
    assert verify_manifest(run.run_dir) == ["model.keras: SHA-256 differs from manifest.json (changed or corrupt)"]
    with pytest.raises(ValueError, match="model.keras: SHA-256 differs"):
        cnnkit.load(run.run_dir)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    checkpoint = EpochCheckpoint(tmp_path / "stage1", seed=0)
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    weights_after = {}

    class Remember(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            weights_after[epoch + 1] = [w.copy() for w in self.model.get_weights()]

    model.fit(x, y, epochs=3, verbose=0, callbacks=[checkpoint, Remember()])
    records = json.loads((tmp_path / "stage1" / "checkpoints.json").read_text())["checkpoints"]
    assert [record["epoch"] for record in records] == [2, 3]  # the two newest are kept
    assert not (tmp_path / "stage1" / "epoch001.weights.h5").exists()
    (tmp_path / "stage1" / "epoch003.weights.h5").write_bytes(b"garbage")

    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    fresh.compile("adam", "mse")
    resumed = EpochCheckpoint(tmp_path / "stage1", seed=0)
    with pytest.warns(UserWarning, match="epoch003.weights.h5 does not match its SHA-256"):
        assert resumed.restore(fresh) == 2
    for restored, expected in zip(fresh.get_weights(), weights_after[2]):
        np.testing.assert_array_equal(restored, expected)
    assert int(fresh.optimizer.iterations.numpy()) == 2  # the optimizer state came back too
    assert len(resumed.history["loss"]) == 2


def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_keeps_the_checkpoint(digits, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step \d+") as error:
        _train(digits, tmp_path / "run", epochs=3, steps_per_execution=1, callbacks=[_Poison(2)])
    assert "the checkpoint of epoch 1 is kept" in str(error.value)
    stage = tmp_path / "run" / "backup" / "stage1"
    (record,) = json.loads((stage / "checkpoints.json").read_text())["checkpoints"]
    assert record["epoch"] == 1 and file_sha256(stage / record["file"]) == record["sha256"]
    assert all(np.isfinite(record["history"]["loss"]))


def test_cnnkit_run_exits_3_on_a_diverged_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "diverge.yaml").write_text(
        "# diverges: a learning rate of 1e12\nrecipe: train\narch: 4C3-MP2-FC16\ndata: mnist-sample\n"
        "optimizer: sgd\nlearning_rate: 1.0e12\nepochs: 1\nsteps_per_execution: 1\nverbose: 0\n")
    assert main(["run", "diverge.yaml", "run_dir=runs/diverged"]) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "training diverged: the loss is" in lines[0] and "at epoch 1, step" in lines[0]
    assert not (tmp_path / "runs" / "diverged").exists()  # diverged before any checkpoint: a failed start


def test_a_finished_run_is_never_overwritten_without_overwrite(digits, tmp_path):
    first = _train(digits, tmp_path / "run", seed=1)
    before = (tmp_path / "run" / "model.keras").read_bytes()
    with pytest.raises(ValueError, match="already holds a finished run; pass overwrite=True"):
        _train(digits, tmp_path / "run", seed=2)
    assert (tmp_path / "run" / "model.keras").read_bytes() == before
    second = _train(digits, tmp_path / "run", seed=2, overwrite=True)
    assert second.run_dir == first.run_dir and (tmp_path / "run" / "model.keras").read_bytes() != before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds no cnnkit run"):
        _train(digits, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "years of work"


def _project(folder):
    """A user's folder with a config.yaml and a backup/ of its own: names a run directory uses too."""
    (folder / "src").mkdir(parents=True)
    (folder / "backup").mkdir()
    files = {"config.yaml": "lr: 0.1\n", "README.md": "# my notes\n", "src/experiment.py": "print('mine')\n",
             "backup/thesis.tex": "months of work\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_holds_no_run_is_never_written_into_nor_deleted(digits, tmp_path, overwrite):
    files = _project(tmp_path / "project")
    with pytest.raises(ValueError, match=re.escape(f"run directory {tmp_path / 'project'} is not empty and holds no "
                                                   "cnnkit run")):
        _train(digits, tmp_path / "project", overwrite=overwrite)
    assert {str(path.relative_to(tmp_path / "project")) for path in (tmp_path / "project").rglob("*")
            if path.is_file()} == set(files)
    assert all((tmp_path / "project" / name).read_text() == text for name, text in files.items())


def test_an_empty_existing_folder_takes_a_run(digits, tmp_path):
    (tmp_path / "empty").mkdir()
    run = _train(digits, tmp_path / "empty", epochs=1, report=False)
    assert (tmp_path / "empty" / "model.keras").exists() and not (tmp_path / "empty" / "backup").exists()
    assert run.metrics["epochs_run"] == 1


def test_a_failed_start_leaves_no_run_directory(digits, tmp_path):
    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("out of memory, say")

    with pytest.raises(RuntimeError, match="out of memory"):
        _train(digits, tmp_path / "run", callbacks=[Crash()])
    assert not (tmp_path / "run").exists()


def test_the_same_call_finds_its_interrupted_run_and_another_call_is_refused(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("killed in epoch 2")

    with pytest.raises(RuntimeError):
        _train(digits, None, callbacks=[Crash()])
    (run_dir,) = (tmp_path / "runs").iterdir()  # runs/4C3-MP2-FC16-<digest of the arguments and data>
    assert (run_dir / "backup" / "stage1" / "checkpoints.json").exists()
    with pytest.raises(ValueError, match="an interrupted run of other arguments"):
        _train(digits, run_dir, epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _train(digits, None)  # the same call: resumes at epoch 2
    assert not [str(w.message) for w in caught if "SHA-256" in str(w.message)]  # nothing was corrupt
    assert run.run_dir == run_dir.relative_to(tmp_path) and len(run.history["loss"]) == 2
    again = _train(digits, None)  # the same call once more: its finished run, loaded
    assert again.run_dir == run.run_dir and again.metrics == run.metrics


class _CrashAt(keras.callbacks.Callback):
    """Raises at the start of the ``epoch``-th epoch (1-based) it sees, once: a run dying mid-way."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.seen, self.fired = epoch, 0, False

    def on_epoch_begin(self, epoch, logs=None):
        self.seen += 1
        if self.seen == self.epoch and not self.fired:
            self.fired = True
            raise RuntimeError("the machine went away")


def test_a_two_stage_run_resumes_in_its_second_stage_without_redoing_the_first(digits, tmp_path):
    options = dict(imbalance={"strategy": "two_stage", "second_stage_epochs": 2}, epochs=2)
    with pytest.raises(RuntimeError, match="went away"):
        _train(digits, tmp_path / "run", callbacks=[_CrashAt(4)], **options)  # the 2nd epoch of stage 2
    assert (tmp_path / "run" / "backup" / "stage1" / "finished.json").exists()

    class Begun(keras.callbacks.Callback):
        epochs = []

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append(epoch)

    run = _train(digits, tmp_path / "run", callbacks=[Begun()], **options)
    assert Begun.epochs == [3]  # stage 1 loaded from its final weights, stage 2 from its epoch-3 checkpoint
    assert len(run.history["loss"]) == 4 and [stage["epochs_run"] for stage in run.config["stages"]] == [2, 2]
    assert not (tmp_path / "run" / "backup").exists()
    assert run.metrics["fit_seconds"] >= sum(run.history["epoch_seconds"])  # the earlier process's epochs count
    assert run.history["epoch_compiled"] == [1.0, 0.0, 1.0, 1.0]  # the resumed fit compiled again: not steady


def test_an_ensemble_killed_in_its_second_member_reuses_the_first_and_resumes_the_second(digits, tmp_path):
    options = {"epochs": 2, "batch_size": 64, "report": False}
    crash = _CrashAt(4)  # member 0 sees epochs 1-2; member 1 dies at the start of its second
    with pytest.raises(RuntimeError, match="went away"):
        cnnkit.recipes.ensemble(2, digits, arch="4C3-MP2-FC16", train_options={**options, "callbacks": [crash]},
                                run_dir=tmp_path / "ensemble", verbose=0)
    first = tmp_path / "ensemble" / "members" / "0" / "model.keras"
    assert first.exists() and (tmp_path / "ensemble" / "members" / "1" / "backup" / "stage1"
                               / "checkpoints.json").exists()
    written = first.stat().st_mtime_ns
    run = cnnkit.recipes.ensemble(2, digits, arch="4C3-MP2-FC16", train_options=options,
                                  run_dir=tmp_path / "ensemble", verbose=0)
    assert first.stat().st_mtime_ns == written  # the finished member was reused
    second = cnnkit.load(tmp_path / "ensemble" / "members" / "1")
    assert len(second.history["loss"]) == 2 and run.metrics["num_members"] == 2
    for folder in (tmp_path / "ensemble", tmp_path / "ensemble" / "members" / "1"):
        _assert_unlocked(folder)


def test_a_transfer_that_fails_leaves_its_folder_unlocked_and_keeps_what_trained(tmp_path):
    sample = cnnkit.data.load("mnist-sample")
    bad_stage = [{"unfreeze": ["no_such_group"], "epochs": 1, "learning_rate": 1e-3}]  # found after pretraining
    with pytest.raises(ValueError, match="no_such_group"):
        cnnkit.recipes.transfer("4C3-MP2-FC16", sample, source_classes=[0, 1], target_classes=[7, 8],
                                labels_per_class=10, val_labels_per_class=2, pretrain={"epochs": 1, "report": False},
                                finetune={"stages": bad_stage}, run_dir=tmp_path / "transfer", verbose=0)
    assert cnnkit.load(tmp_path / "transfer" / "pretrain").metrics["epochs_run"] == 1  # kept, to reuse
    _assert_unlocked(tmp_path / "transfer")
    with pytest.raises(ValueError, match="optimizer"):  # refused before anything trained: no folder left
        cnnkit.recipes.transfer("4C3-MP2-FC16", sample, source_classes=[0, 1], target_classes=[7, 8],
                                pretrain={"optimizer": "no_such_optimizer"}, run_dir=tmp_path / "nothing", verbose=0)
    assert not (tmp_path / "nothing").exists()


def test_a_run_directory_in_use_by_another_process_is_refused_and_released_after(digits, tmp_path):
    (tmp_path / "run").mkdir()
    other = os.open(tmp_path / "run", os.O_RDONLY)  # another open file: flock conflicts as across processes
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(RuntimeError, match=re.escape(f"run directory {tmp_path / 'run'} is in use by another process")):
        _train(digits, tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []  # nothing written beside the other process
    os.close(other)
    _train(digits, tmp_path / "run", epochs=1, report=False)
    _assert_unlocked(tmp_path / "run")  # a finished run leaves the directory unlocked


def test_a_run_that_fails_after_its_fit_leaves_its_folder_unlocked_and_resumes(digits, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise MemoryError("no room for the statistics")

    def train():
        return cnnkit.recipes.train("4C3-BN-MP2-FC16", digits, epochs=1, precise_bn=64, run_dir=tmp_path / "run",
                                    report=False, verbose=0)

    monkeypatch.setattr(sys.modules["cnnkit.recipes.train"], "recalibrate_batch_norm", failing)
    with pytest.raises(MemoryError, match="no room"):
        train()
    _assert_unlocked(tmp_path / "run")  # another process may take it over at once
    assert (tmp_path / "run" / "backup").is_dir() and not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.undo()
    run = train()
    assert run.metrics["epochs_run"] == 1 and verify_manifest(tmp_path / "run") == []


def _assert_unlocked(folder):
    """Another open file takes the folder's lock at once: no process (this one included) holds it."""
    probe = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)


def test_a_kill_while_the_backup_is_deleted_leaves_a_finished_run(digits, tmp_path, monkeypatch):
    remove = shutil.rmtree

    def killed_in_the_middle(path, *args, **kwargs):
        if Path(path).name == fitting.DISCARDED_BACKUP and Path(path).exists():
            raise KeyboardInterrupt("killed while deleting the backup")
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(fitting.shutil, "rmtree", killed_in_the_middle)
    with pytest.raises(KeyboardInterrupt):
        _train(digits, tmp_path / "run", epochs=1, report=False)
    assert (tmp_path / "run" / fitting.DISCARDED_BACKUP).is_dir() and not (tmp_path / "run" / "backup").exists()
    monkeypatch.undo()
    assert verify_manifest(tmp_path / "run") == [] and cnnkit.load(tmp_path / "run").metrics["epochs_run"] == 1
    written = (tmp_path / "run" / "model.keras").stat().st_mtime_ns
    again = _train(digits, tmp_path / "run", epochs=1, report=False)  # the same call: loaded, not trained again
    assert (tmp_path / "run" / "model.keras").stat().st_mtime_ns == written and again.metrics["epochs_run"] == 1


def test_damaged_backup_records_are_refused_naming_the_file(tmp_path):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "checkpoints.json").write_text("")  # truncated to nothing
    with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path / 'stage1' / 'checkpoints.json')!r} is not valid JSON")):
        EpochCheckpoint(tmp_path / "stage1", seed=0)._records()
    (tmp_path / "stage1" / "checkpoints.json").write_text('{"epochs": []}')
    with pytest.raises(ValueError, match="is not a cnnkit checkpoint list"):
        EpochCheckpoint(tmp_path / "stage1", seed=0)._records()
    (tmp_path / "stage1" / "finished.json").write_text('{"history": {}}')
    with pytest.raises(ValueError, match="finished.json' is not a cnnkit stage marker"):
        fitting._finished_stage(tmp_path / "stage1")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="config.yaml' must hold a mapping"):
        fitting.finished_run(tmp_path, "x", key="k")


@pytest.mark.parametrize("record", [
    {"epoch": 1, "sha256": "0" * 64, "history": {}},
    {"epoch": 1, "file": "epoch001.weights.h5", "sha256": "0" * 64},
    {"epoch": 1, "file": None, "sha256": "0" * 64, "history": {}},
    {"epoch": "1", "file": "epoch001.weights.h5", "sha256": "0" * 64, "history": {}},
    {"epoch": True, "file": "epoch001.weights.h5", "sha256": "0" * 64, "history": {}},
], ids=["no-file", "no-history", "file-null", "epoch-text", "epoch-bool"])
def test_a_damaged_checkpoint_record_is_refused_naming_the_file(tmp_path, record):
    path = tmp_path / "stage1" / "checkpoints.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"checkpoints": [record]}))
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} is not a cnnkit checkpoint list (expected "
                                                   "'checkpoints': a list of records with an int 'epoch', a str 'file' "
                                                   "and 'sha256', a dict 'history'); restore it, or delete")):
        EpochCheckpoint(path.parent, seed=0).restore(None)


def test_a_nested_hold_of_a_directory_leaves_the_release_to_the_outer_one(tmp_path):
    from cnnkit.runs import lock_run_dir, release_run_dir

    assert lock_run_dir(tmp_path) is True
    assert lock_run_dir(tmp_path) is False  # held already by this process: the caller must not release it
    with pytest.raises(BlockingIOError):
        _assert_unlocked(tmp_path)
    release_run_dir(tmp_path)
    _assert_unlocked(tmp_path)
