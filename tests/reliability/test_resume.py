"""Guarantees 1, 2 and 9: a run killed at any moment resumes to the weights of an uninterrupted run;
a failed checkpoint write keeps the previous one; two runs with one seed are identical. And the
stated limit of early stopping whose best checkpoint is lost.

Each run is a separate process (``train_job.py``): SIGKILL, a file-size limit and TensorFlow's
process-wide determinism switch must not touch the test process. The tests share one xdist
worker so the reference run is made once. The early-stopping test drives the callbacks in process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("train_job.py")
pytestmark = pytest.mark.xdist_group("resume")


def _job(run_dir, *faults):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(JOB), str(run_dir), *faults], capture_output=True, text=True,
                          timeout=300, env=env)
    weights = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("WEIGHTS ")]
    return done, (weights[0] if weights else None)


def _checkpoints(run_dir):
    path = Path(run_dir) / "backup" / "stage1" / "checkpoints.json"
    return json.loads(path.read_text())["checkpoints"] if path.exists() else []


def _metrics(run_dir):
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if "seconds" not in key and "per_second" not in key}


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done, weights = _job(run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir, weights


@pytest.mark.parametrize("kill", ["kill@1.3", "kill@3.6"])  # before any checkpoint; with two kept (one: below)
def test_a_killed_run_resumes_to_the_uninterrupted_weights(reference, tmp_path, kill):
    run_dir = tmp_path / "run"
    done, weights = _job(run_dir, kill)
    assert done.returncode == -9 and weights is None  # SIGKILL: no cleanup ran
    epoch = int(kill[5])
    assert [record["epoch"] for record in _checkpoints(run_dir)] == list(range(1, epoch))[-2:]
    done, weights = _job(run_dir)  # the same command again
    assert done.returncode == 0, done.stderr[-2000:]
    assert weights == reference[1]
    assert _metrics(run_dir) == _metrics(reference[0])
    assert not (run_dir / "backup").exists()


def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    done, _ = _job(run_dir, "kill-in-save@2")
    assert done.returncode == -9
    assert [record["epoch"] for record in _checkpoints(run_dir)] == [1]
    stage = run_dir / "backup" / "stage1"
    assert not (stage / "epoch002.weights.h5").exists()  # the half-written file never took the name
    assert list(stage.glob(".epoch002*"))  # it is a temporary file beside it
    done, weights = _job(run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert weights == reference[1]


def test_a_failed_checkpoint_write_surfaces_and_keeps_the_previous_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    done, _ = _job(run_dir, "fsize@2")  # RLIMIT_FSIZE: epoch 2's checkpoint cannot be written
    assert done.returncode != 0
    assert "could not write the checkpoint of epoch 2" in done.stderr
    assert "the checkpoint of epoch 1" in done.stderr and "is intact" in done.stderr
    (record,) = _checkpoints(run_dir)
    from cnnkit.runs import file_sha256

    assert record["epoch"] == 1 and file_sha256(run_dir / "backup" / "stage1" / record["file"]) == record["sha256"]
    done, weights = _job(run_dir)  # loadable: the run goes on from it
    assert done.returncode == 0, done.stderr[-2000:]
    assert weights == reference[1]


def test_two_deterministic_runs_with_one_seed_are_identical(reference, tmp_path):
    done, weights = _job(tmp_path / "again")
    assert done.returncode == 0, done.stderr[-2000:]
    assert weights == reference[1]
    assert _metrics(tmp_path / "again") == _metrics(reference[0])


def test_augmentation_and_balanced_batches_resume_identically(tmp_path):
    done, uninterrupted = _job(tmp_path / "whole", "augment", "balanced")
    assert done.returncode == 0, done.stderr[-2000:]
    done, _ = _job(tmp_path / "killed", "augment", "balanced", "kill@2.2")
    assert done.returncode == -9
    done, resumed = _job(tmp_path / "killed", "augment", "balanced")
    assert done.returncode == 0, done.stderr[-2000:]
    assert resumed == uninterrupted


def test_an_op_without_a_deterministic_kernel_is_named(tmp_path):
    # TensorFlow's CPU kernels are all deterministic; its GPU error for one that is not is raised
    # here from inside the graph, as a GPU kernel raises it.
    script = """
import numpy as np, tensorflow as tf, keras, cnnkit

def gpu_only_kernel(x):
    raise tf.errors.UnimplementedError(None, None, "A deterministic GPU implementation of "
                                       "SparseTensorDenseMatmulOp is not currently available.")

class Sparse(keras.layers.Layer):
    def call(self, x):
        y = tf.py_function(gpu_only_kernel, [x], tf.float32)
        y.set_shape(x.shape)
        return y

inputs = keras.Input((8, 8, 1))
model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(Sparse()(inputs))))
data = cnnkit.data.from_arrays(np.zeros((16, 8, 8), np.uint8), np.arange(16) % 2, val_split=0)
try:
    cnnkit.recipes.train(model, data, epochs=1, deterministic=True, run_dir=RUN_DIR, verbose=0)
except ValueError as error:
    print("ERROR", type(error).__name__, error)
""".replace("RUN_DIR", repr(str(tmp_path / "run")))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    line = next(line for line in done.stdout.splitlines() if line.startswith("ERROR"))
    assert "DeterminismError" in line and "SparseTensorDenseMatmulOp has no deterministic kernel" in line
    assert not (tmp_path / "run").exists()  # a failed start leaves no run directory


def test_early_stopping_whose_best_checkpoint_is_lost_ends_with_the_last_epochs_weights(tmp_path):
    """Killed after epoch 4 (best: epoch 2), its checkpoint then corrupt: the resumed run warns, ends with epoch 6's."""
    import keras
    import numpy as np

    from cnnkit.recipes.resume import EpochCheckpoint, ResumableEarlyStopping

    val_loss = {1: 1.0, 2: 0.5, 3: 0.8, 4: 0.9, 5: 0.95, 6: 0.97, 7: 0.99}

    def process():
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        checkpoint = EpochCheckpoint(tmp_path / "stage1", seed=0)
        checkpoint.set_model(model)
        first = checkpoint.restore(model) or 0
        stopping = ResumableEarlyStopping(checkpoint, model, first_epoch=0, monitor="val_loss", patience=4,
                                          restore_best_weights=True)
        return model, checkpoint, stopping, first

    def fit(model, checkpoint, stopping, epochs):  # as Keras's fit calls them; the weights are the epoch's number
        for epoch in epochs:
            checkpoint.on_epoch_begin(epoch - 1)
            model.set_weights([np.full(w.shape, float(epoch), w.dtype) for w in model.get_weights()])
            logs = {"loss": val_loss[epoch], "val_loss": val_loss[epoch]}
            stopping.on_epoch_end(epoch - 1, logs)
            checkpoint.on_epoch_end(epoch - 1, logs)
            if model.stop_training:
                break
        stopping.on_train_end()

    model, checkpoint, stopping, _ = process()
    fit(model, checkpoint, stopping, [1, 2, 3, 4])  # then killed
    with open(tmp_path / "stage1" / "epoch002.weights.h5", "ab") as best:
        best.write(b"corrupt")
    with pytest.warns(UserWarning, match=r"epoch002.weights.h5 does not match its SHA-256 .*early stopping cannot "
                                         r"restore the best epoch \(2\): the run ends with the last epoch's weights"):
        model, checkpoint, stopping, first = process()
    assert first == 4
    fit(model, checkpoint, stopping, range(5, 8))
    assert stopping.stopped_epoch + 1 == 6 and stopping.best_epoch + 1 == 2 and stopping.best == 0.5
    assert model.get_weights()[0][0, 0] == 6.0  # the last epoch's weights, not epoch 5's taken for the best
