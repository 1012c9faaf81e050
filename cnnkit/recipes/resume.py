"""Resuming a killed run exactly: epoch-derived randomness, hashed atomic checkpoints, a divergence stop.

Keras's ``BackupAndRestore`` falls short in three known ways (keras 3.15 / TF 2.21): its weights
file is written in place (a failed write truncates the last good one), a resumed run draws other
shuffles and dropout masks than an uninterrupted one (``tf.data`` reshuffles by how many times the
dataset was iterated in this process; ``SeedGenerator`` states are not saved), and a
``TerminateOnNaN`` stop deletes the backup. :class:`EpochCheckpoint` replaces it:

* At the start of epoch ``e`` it sets :func:`training_epoch` to ``e`` (the input pipeline's shuffle
  seed is ``epoch_seed(seed, e)``, read from it) and resets every ``SeedGenerator`` of the model and
  of the augmentation layers to a state derived from ``(seed, e, index)``. What an epoch draws is
  then a function of the seed and the epoch alone, not of the process's history.
* At the end of each epoch it writes the weights and the optimizer state to
  ``epoch<NNN>.weights.h5`` through a temporary file that is flushed and renamed, then records the
  file's SHA-256 and the history so far in ``checkpoints.json`` (also atomically). The two newest
  checkpoints are kept, and the best epoch's while :class:`ResumableEarlyStopping` may restore it.
* On resume it loads the newest checkpoint whose SHA-256 matches, saying so when it falls back to
  an older one.
* A NaN or infinite loss raises :class:`TrainingDiverged` naming the epoch and the step; the
  checkpoint of the last good epoch stays.

:class:`ResumableEarlyStopping` is Keras's ``EarlyStopping`` going on from the restored history
(best value, epochs waited, best epoch's weights), so early stopping resumes exactly too.

Example:
    >>> checkpoint = EpochCheckpoint("runs/x/backup/stage1", seed=0)  # doctest: +SKIP
    >>> model.fit(pipeline, epochs=10, initial_epoch=checkpoint.restore(model), callbacks=[checkpoint])  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import math
import re
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cnnkit.runs import TrainingDiverged, atomic_file, atomic_write_text, file_sha256, read_mapping

CHECKPOINTS_FILE = "checkpoints.json"
KEEP_CHECKPOINTS = 2
_SEED_STRIDE = 1_000_003  # epoch seeds of different seeds do not collide for a million epochs
_epoch = None


class DeterminismError(ValueError):
    """``deterministic=True`` met an op that has no deterministic kernel on this device; names the op."""


def explain_determinism_error(error: Exception) -> Exception:
    """A :class:`DeterminismError` naming the op, for TensorFlow's error about a missing deterministic kernel.

    TensorFlow raises ``UnimplementedError`` when op determinism is enabled and an op has no
    deterministic kernel on the device (GPU kernels of scatter, segment and sparse ops, for
    example; TensorFlow's CPU kernels are all deterministic). Any other error is returned as it is.

    Example:
        >>> error = tf.errors.UnimplementedError(None, None, "A deterministic GPU implementation of "
        ...                                      "SparseTensorDenseMatmulOp is not currently available.")
        >>> str(explain_determinism_error(error)).split(";")[0]
        'deterministic=True: SparseTensorDenseMatmulOp has no deterministic kernel on this device'
    """
    text = str(error)
    named = re.search(r"deterministic (?:\w+ )?implementation of (\w+)", text, re.IGNORECASE)
    if not isinstance(error, tf.errors.OpError) or named is None:  # Unimplemented; Unknown when wrapped
        return error
    node = re.search(r"\{\{node ([^}]+)\}\}", text)
    where = f" (node {node.group(1)})" if node else ""
    return DeterminismError(
        f"deterministic=True: {named.group(1)} has no deterministic kernel on this device{where}; train "
        "without deterministic=True, or on CPU, or replace the layer that uses it")


def training_epoch() -> tf.Variable:
    """The process-wide epoch counter that shuffles read; :class:`EpochCheckpoint` sets it.

    Example:
        >>> int(training_epoch().numpy()) >= 0
        True
    """
    global _epoch
    if _epoch is None:
        with tf.init_scope():
            _epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="cnnkit_training_epoch")
    return _epoch


def epoch_seed(seed, epoch):
    """The seed of epoch ``epoch``'s draws under the run seed ``seed`` (ints or int64 tensors).

    Example:
        >>> epoch_seed(0, 3), epoch_seed(1, 0)
        (3, 1000003)
    """
    return seed * _SEED_STRIDE + epoch


def per_epoch(make_dataset, seed: int, size: int):
    """A dataset that ``make_dataset(epoch_seed)`` builds afresh at the start of every epoch.

    ``epoch_seed`` is an int64 tensor, ``epoch_seed(seed, epoch)`` for the epoch being trained
    (read from :func:`training_epoch` when the epoch's iterator starts); ``size`` is the length of
    one epoch's dataset, kept as the cardinality so Keras knows the steps per epoch.

    Example:
        >>> shuffled = per_epoch(lambda s: tf.data.Dataset.range(4).shuffle(4, seed=s), seed=0, size=4)
        >>> int(shuffled.cardinality())
        4
    """
    epoch = training_epoch()

    def build(_):
        # The graph-level seed of this traced function only: TensorFlow's get_seed compares
        # (global seed, op seed) with (0, 0) in Python, which fails for a tensor op seed when the
        # global seed is 0. The op seeds below carry the run seed and the epoch.
        tf.random.set_seed(1)
        return make_dataset(epoch_seed(seed, epoch.read_value()))

    return tf.data.Dataset.from_tensors(0).flat_map(build).apply(tf.data.experimental.assert_cardinality(size))


def seed_generator_states(*owners) -> list:
    """The ``SeedGenerator`` state variables of Keras layers or models, in a fixed order.

    Example:
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5, seed=1)])
        >>> [state.name for state in seed_generator_states(model)]
        ['seed_generator_state']
    """
    states, seen = [], set()
    for owner in owners:
        for variable in owner.variables:
            if variable.name == "seed_generator_state" and id(variable) not in seen:
                seen.add(id(variable))
                states.append(variable)
    return states


class EpochSeeds(keras.callbacks.Callback):
    """At each epoch's start: set :func:`training_epoch` and reset every ``SeedGenerator`` from the seed and epoch.

    Any ``fit`` of a cnnkit training pipeline needs it (the pipeline's shuffle reads the epoch);
    :class:`EpochCheckpoint` is one, and the tuner's trials use it directly.

    Args:
        seed: the run's seed.
        seeded: further layers whose ``SeedGenerator`` states are reset each epoch (augmentation).

    Example:
        >>> model.fit(pipeline, epochs=3, callbacks=[EpochSeeds(seed=0)])  # doctest: +SKIP
    """

    def __init__(self, *, seed: int, seeded=()):
        super().__init__()
        self.seed = seed
        self.seeded = list(seeded)
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        training_epoch().assign(epoch)
        for index, state in enumerate(seed_generator_states(self.model, *self.seeded)):
            derived = np.random.default_rng([self.seed, epoch, index]).integers(1, 2**31, size=2)
            state.assign(tf.constant(derived, dtype=state.dtype))


class EpochCheckpoint(EpochSeeds):
    """Epoch-derived seeds (:class:`EpochSeeds`), an atomic hashed checkpoint per epoch, a stop on a NaN loss.

    Args:
        directory: where the checkpoints of this stage go.
        seed: the run's seed.
        seeded: further layers whose ``SeedGenerator`` states are reset each epoch (augmentation).

    Attributes:
        history: per-epoch logs of this stage's epochs so far (restored ones included), with
            ``epoch_seconds`` and ``epoch_compiled`` (1.0 for the first epoch of each ``fit``, which
            traces and compiles the training step, so throughput leaves it out; else 0.0).
        keep_epoch: an epoch (1-based) whose checkpoint is kept besides the two newest (the best
            epoch of :class:`ResumableEarlyStopping`), or ``None``.

    Example:
        >>> checkpoint = EpochCheckpoint("runs/x/backup/stage1", seed=0)  # doctest: +SKIP
        >>> first_epoch = checkpoint.restore(model)  # doctest: +SKIP
    """

    def __init__(self, directory, *, seed: int, seeded=()):
        super().__init__(seed=seed, seeded=seeded)
        self.directory = Path(directory)
        self.history: dict = {}
        self.keep_epoch: int | None = None
        self._compiling = True  # the first epoch of each fit traces the training step

    # -- resume
    def _records(self) -> list:
        path = self.directory / CHECKPOINTS_FILE
        if not path.exists():
            return []
        records = read_mapping(path, json.loads, "JSON").get("checkpoints")
        if not isinstance(records, list) or not all(map(_is_record, records)):
            raise ValueError(f"{str(path)!r} is not a cnnkit checkpoint list (expected 'checkpoints': a list of "
                             "records with an int 'epoch', a str 'file' and 'sha256', a dict 'history'); restore it, "
                             f"or delete {self.directory} to fit this stage again from its first epoch")
        return records

    def restore(self, model) -> int | None:
        """Load the newest intact checkpoint into ``model``; the epoch to go on from, or ``None``.

        ``model`` must be compiled. A checkpoint whose SHA-256 does not match its record is
        skipped with a warning naming it, and the one before it is used. Temporary files left by a
        process killed while writing are removed.
        """
        for stale in self.directory.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        for record in reversed(self._records()):
            if self._load(model, record, otherwise="falling back to the checkpoint before it"):
                self.history = record["history"]
                return record["epoch"]
        return None

    def load(self, model, epoch: int, *, otherwise: str) -> bool:
        """Load epoch ``epoch``'s (1-based) checkpoint into ``model``; ``False``, warning ``otherwise``, if it
        is gone or does not match its SHA-256.

        Example:
            >>> checkpoint.load(model, 3, otherwise="going on without it")  # doctest: +SKIP
            True
        """
        name = _checkpoint_name(epoch)
        record = next((record for record in self._records() if record["epoch"] == epoch),
                      {"file": name, "sha256": None})
        return self._load(model, record, otherwise=otherwise)

    def _load(self, model, record, *, otherwise: str) -> bool:
        path = self.directory / record["file"]
        actual = file_sha256(path) if path.exists() else "missing"
        if actual != record["sha256"]:
            warnings.warn(f"checkpoint {path} does not match its SHA-256 in {CHECKPOINTS_FILE} "
                          f"({'file missing' if actual == 'missing' else 'corrupt or changed'}); {otherwise}",
                          stacklevel=3)
            return False
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(path)
        return True

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._started = time.perf_counter()

    # -- divergence
    def _check_loss(self, loss, where: str) -> None:
        if loss is None or math.isfinite(float(loss)):
            return
        records = self._records()
        kept = (f"the checkpoint of epoch {records[-1]['epoch']} is kept in {self.directory / records[-1]['file']}"
                if records else "no epoch had finished, so there is no checkpoint")
        raise TrainingDiverged(f"training diverged: the loss is {float(loss)} at epoch {self._epoch + 1}, {where}; "
                               f"{kept}. Lower the learning rate, or look for NaN or extreme values in the data")

    def on_train_batch_end(self, batch, logs=None):
        self._check_loss((logs or {}).get("loss"), f"step {batch + 1}")

    # -- save
    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        self._check_loss(logs.get("loss"), "end of epoch")
        logs["epoch_seconds"] = time.perf_counter() - self._started
        logs["epoch_compiled"], self._compiling = float(self._compiling), False
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        name = _checkpoint_name(epoch + 1)
        try:
            with atomic_file(self.directory / name, suffix=".tmp.weights.h5") as temporary:
                self.model.save_weights(temporary)
                digest = file_sha256(temporary)
        except Exception as error:
            gc.collect()  # let h5py close the half-written file now, not at interpreter exit
            records = self._records()
            kept = (f"the checkpoint of epoch {records[-1]['epoch']} in {self.directory} is intact"
                    if records else "no earlier checkpoint exists")
            raise OSError(f"could not write the checkpoint of epoch {epoch + 1} to {self.directory / name}: "
                          f"{error}; {kept}") from error
        records = [record for record in self._records() if record["epoch"] < epoch + 1]
        records.append({"epoch": epoch + 1, "file": name, "sha256": digest, "history": self.history})
        kept = {record["epoch"] for record in records[-KEEP_CHECKPOINTS:]} | {self.keep_epoch}
        keep = [record for record in records if record["epoch"] in kept]
        drop = [record for record in records if record["epoch"] not in kept]
        atomic_write_text(self.directory / CHECKPOINTS_FILE, json.dumps({"checkpoints": keep}))
        for record in drop:
            (self.directory / record["file"]).unlink(missing_ok=True)


def _is_record(record) -> bool:
    """Whether ``record`` is an entry of ``checkpoints.json``: ``{"epoch": int, "file": str, "sha256": str,
    "history": dict}``."""
    types = {"epoch": int, "file": str, "sha256": str, "history": dict}  # as json.loads makes them: no bool epoch
    return isinstance(record, dict) and all(type(record.get(key)) is kind for key, kind in types.items())


def _checkpoint_name(epoch: int) -> str:
    return f"epoch{epoch:03d}.weights.h5"


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's ``EarlyStopping`` going on from a stage's restored :class:`EpochCheckpoint` as if never stopped.

    Its state (best value and epoch, epochs waited, a stop already made) is replayed from
    ``checkpoint.history`` through Keras's own ``on_epoch_end``; with ``restore_best_weights`` the
    best epoch's weights are read from its checkpoint, which ``checkpoint`` keeps while it is the
    best; if that checkpoint is lost or corrupt, the run warns and ends with the last epoch's
    weights (``restore_best_weights`` is turned off). Make one per ``fit``: ``on_train_begin`` keeps
    the replayed state. When the replay finds the stop made (``stopped_epoch``), or no epoch is
    left, call ``on_train_end`` instead of ``fit``: it restores the best epoch's weights, as the
    killed run's ``fit`` would have.

    Args:
        checkpoint: the stage's checkpoint, already restored into ``model``.
        model: the compiled model.
        first_epoch: the stage's first epoch (0-based, its ``initial_epoch``).
        **options: ``keras.callbacks.EarlyStopping``'s arguments.

    Example:
        >>> first = checkpoint.restore(model) or 0  # doctest: +SKIP
        >>> stopping = ResumableEarlyStopping(checkpoint, model, first_epoch=0, patience=3,
        ...                                   restore_best_weights=True)  # doctest: +SKIP
        >>> if stopping.stopped_epoch or first == 10:  # doctest: +SKIP
        ...     stopping.on_train_end()
        ... else:
        ...     model.fit(pipeline, epochs=10, initial_epoch=first, callbacks=[stopping, checkpoint])
    """

    def __init__(self, checkpoint: EpochCheckpoint, model, *, first_epoch: int, **options):
        super().__init__(**options)
        self.checkpoint = checkpoint
        self.set_model(model)
        super().on_train_begin()
        history = checkpoint.history
        epochs = len(history.get("loss", []))
        restore, self.restore_best_weights = self.restore_best_weights, False  # the replay reads no weights
        for offset in range(epochs):
            super().on_epoch_end(first_epoch + offset, {key: values[offset] for key, values in history.items()
                                                        if offset < len(values)})  # a key added by a later version
        self.restore_best_weights = restore
        last = first_epoch + epochs  # the epoch (1-based) whose checkpoint the model holds
        if restore and self.best is not None:
            if self.best_epoch + 1 == last:
                self.best_weights = model.get_weights()
            elif checkpoint.load(model, self.best_epoch + 1, otherwise="early stopping cannot restore the best "
                                 f"epoch ({self.best_epoch + 1}): the run ends with the last epoch's weights"):
                self.best_weights = model.get_weights()
                checkpoint.load(model, last, otherwise="the model holds the best epoch's weights")
            else:  # Keras would take the next epoch's weights for the best: keep the last epoch's instead
                self.restore_best_weights = False
        self._keep_best()

    def on_train_begin(self, logs=None):
        pass  # keep the replayed state (Keras's resets it)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        self._keep_best()

    def _keep_best(self):
        if self.restore_best_weights and self.best is not None:
            self.checkpoint.keep_epoch = self.best_epoch + 1
