"""The training machinery the recipes share: staged ``fit`` with resume, the run directory, results.

``train`` fits in one stage (two with Wei's two-stage imbalance schedule); ``finetune`` fits a
frozen-backbone stage and then unfreezing stages. Each stage compiles the model with its own
optimiser (Keras needs a recompile after ``trainable`` changes) and continues the epoch count,
so history, TensorBoard curves and ``history.csv`` run on across stages.

``CNNKIT_EAGER=1`` in the environment compiles with ``run_eagerly=True``: Keras runs each step
as Python, with no graph tracing (for debugging, and for tests of big backbones taking one step,
where tracing costs ten times the step).

Resume: every stage checkpoints each epoch under ``run_dir/backup/stage<i>``
(``cnnkit.recipes.resume.EpochCheckpoint``: atomic, hashed, with epoch-derived seeds, so a resumed
run with a fixed seed and ``deterministic=True`` ends with the weights an uninterrupted one would
have; without op determinism two uninterrupted runs differ already); a finished stage of
a multi-stage run leaves its weights and history there, so a run killed in stage 3 restarts at
stage 3's last completed epoch without redoing stages 1 and 2.

Example:
    >>> stage = Stage("train", epochs=3, optimizer=keras.optimizers.Adam(), train=pipeline)  # doctest: +SKIP
    >>> history, seconds = fit_stages(model, [stage], validation=val, run_dir=Path("runs/x"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import yaml

from cnnkit.html_report import write_report
from cnnkit.recipes.optimization import loss_scaled
from cnnkit.recipes.resume import EpochCheckpoint, ResumableEarlyStopping, explain_determinism_error
from cnnkit.report import package_versions
from cnnkit.runs import (
    BACKUP_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    SKIPPED_FILE,
    Run,
    atomic_file,
    atomic_write_text,
    file_sha256,
    fsync_dir,
    load,
    lock_run_dir,
    read_mapping,
    release_run_dir,
    write_manifest,
    write_run,
)


@dataclasses.dataclass
class Stage:
    """One ``model.fit`` call of a recipe: what trains, on which data, at which rate.

    Attributes:
        name: shown in logs and recorded in ``config.yaml`` (``"train"``, ``"head"``, ...).
        epochs: epochs of this stage.
        optimizer: a fresh ``keras.optimizers.Optimizer`` for this stage.
        train: the batched training ``tf.data.Dataset``.
        class_weight: per-class loss weights for ``fit``, or ``None``.
        prepare: called with the model before compiling (set ``trainable`` flags here).
        images: training images per epoch (a resample's size), for the throughput metric;
            ``None``: the training split's size.

    Example:
        >>> Stage("head", epochs=2, optimizer=keras.optimizers.Adam(1e-3), train=pipeline)  # doctest: +SKIP
    """

    name: str
    epochs: int
    optimizer: keras.optimizers.Optimizer
    train: object
    class_weight: dict | None = None
    prepare: Callable[[keras.Model], None] | None = None
    images: int | None = None


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each epoch (training and validation) in ``seconds``.

    Placed last in the callback list, an epoch's time also covers the work of the callbacks
    before it at the epoch's end (checkpoint backup, TensorBoard).

    Example:
        >>> timer = EpochTimer()
        >>> timer.seconds
        []
    """

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def fit_stages(model, stages, *, validation, run_dir, seed, loss="sparse_categorical_crossentropy",
               steps_per_execution=1, early_stopping=None, callbacks=(), seeded=(), precision="float32", verbose=1):
    """Compile and fit ``model`` stage by stage; return ``(history, fit_seconds, stage_records)``.

    Each stage checkpoints every epoch under ``run_dir/backup/stage<i>`` (``EpochCheckpoint``:
    epoch-derived seeds for the model and the ``seeded`` augmentation layers, hashed atomic
    checkpoints, a stop on a NaN loss). A run killed and started again goes on from the last
    completed epoch; a finished stage of a multi-stage run leaves its final weights there and is
    not fitted again.

    With ``precision="mixed_float16"`` each stage's optimiser is wrapped in Keras's
    ``LossScaleOptimizer`` (``cnnkit.recipes.optimization.loss_scaled``).

    ``history`` holds one list per Keras metric over all stages plus ``epoch_seconds``;
    ``fit_seconds`` is this process's fitting time plus the epoch times of the epochs an earlier,
    interrupted process fitted; ``stage_records`` has each stage's name, epochs run (early
    stopping may end one early) and images per epoch.

    Example:
        >>> history, seconds, records = fit_stages(model, stages, validation=val, run_dir=run_dir, seed=0)  # doctest: +SKIP
        >>> records  # doctest: +SKIP
        [{'name': 'head', 'epochs_run': 2, 'images_per_epoch': 250}, {'name': 'top', 'epochs_run': 3, ...}]
    """
    history, records, fit_seconds, epoch = {}, [], 0.0, 0
    backup = Path(run_dir) / BACKUP_DIR
    for index, stage in enumerate(stages, 1):
        if stage.prepare is not None:
            stage.prepare(model)
        stage_dir = backup / f"stage{index}"
        finished = _finished_stage(stage_dir)
        if finished is not None:
            model.load_weights(stage_dir / FINAL_WEIGHTS)
            stage_history, seconds = finished, sum(finished.get("epoch_seconds", []))  # fitted by an earlier process
        else:
            stage_history, seconds = _fit_stage(
                model, stage, stage_dir, validation=validation, run_dir=run_dir, seed=seed, loss=loss,
                steps_per_execution=steps_per_execution, early_stopping=early_stopping, callbacks=callbacks,
                seeded=seeded, precision=precision, initial_epoch=epoch, verbose=verbose,
            )
            if len(stages) > 1:
                _mark_finished(model, stage_dir, stage_history)
        epochs_run = len(stage_history.get("loss", []))
        for key, values in stage_history.items():
            history.setdefault(key, []).extend(values)
        records.append({"name": stage.name, "epochs_run": epochs_run, "images_per_epoch": stage.images})
        fit_seconds += seconds
        epoch += epochs_run
    return history, fit_seconds, records


FINAL_WEIGHTS, FINISHED_FILE = "final.weights.h5", "finished.json"


def _mark_finished(model, stage_dir: Path, stage_history: dict) -> None:
    with atomic_file(stage_dir / FINAL_WEIGHTS, suffix=".tmp.weights.h5") as temporary:
        model.save_weights(temporary)
    digest = file_sha256(stage_dir / FINAL_WEIGHTS)
    atomic_write_text(stage_dir / FINISHED_FILE, json.dumps({"sha256": digest, "history": stage_history}))


def _finished_stage(stage_dir: Path) -> dict | None:
    """The history of a stage that finished in an earlier process, or ``None`` (also when its weights changed)."""
    marker, weights = stage_dir / FINISHED_FILE, stage_dir / FINAL_WEIGHTS
    if not marker.exists():
        return None
    record = read_mapping(marker, json.loads, "JSON")
    if not isinstance(record.get("sha256"), str) or not isinstance(record.get("history"), dict):
        raise ValueError(f"{str(marker)!r} is not a cnnkit stage marker (no 'sha256' and 'history'); delete it to fit "
                         "the stage again from its last epoch checkpoint")
    if not weights.exists() or file_sha256(weights) != record["sha256"]:
        warnings.warn(f"{weights} does not match its SHA-256 in {marker}; fitting the stage again from its "
                      "last intact epoch checkpoint", stacklevel=3)
        return None
    return record["history"]


def _fit_stage(model, stage, stage_dir, *, validation, run_dir, seed, loss, steps_per_execution, early_stopping,
               callbacks, seeded, precision, initial_epoch, verbose):
    model.compile(optimizer=loss_scaled(stage.optimizer, precision), loss=loss, metrics=["accuracy"], steps_per_execution=steps_per_execution,
                  run_eagerly=os.environ.get("CNNKIT_EAGER") == "1")
    checkpoint = EpochCheckpoint(stage_dir, seed=seed, seeded=seeded)
    restored = checkpoint.restore(model)
    earlier_seconds = sum(checkpoint.history.get("epoch_seconds", []))  # the restored epochs', fitted before
    stage_callbacks = [keras.callbacks.TensorBoard(str(Path(run_dir) / "logs"), write_graph=False)]
    if stage.optimizer.use_ema:  # validate the averaged weights
        stage_callbacks.append(keras.callbacks.SwapEMAWeights())
    stopping = None
    if early_stopping:  # its best, wait and best weights go on from the restored epochs
        stopping = ResumableEarlyStopping(checkpoint, model, first_epoch=initial_epoch, patience=early_stopping,
                                          restore_best_weights=True)
        stage_callbacks.append(stopping)
    stage_callbacks += list(callbacks)
    stage_callbacks.append(checkpoint)  # last: an epoch's time includes the other callbacks' work
    started = time.perf_counter()
    first = restored if restored is not None else initial_epoch
    if first < initial_epoch + stage.epochs and not (stopping and stopping.stopped_epoch):
        try:
            model.fit(stage.train, validation_data=validation, initial_epoch=first,
                      epochs=initial_epoch + stage.epochs, shuffle=False,  # the pipeline shuffles, by seed and epoch
                      class_weight=stage.class_weight, callbacks=stage_callbacks, verbose=verbose)
        except Exception as error:
            explained = explain_determinism_error(error)
            if explained is error:
                raise
            raise explained from error
    elif stopping is not None:  # killed after the stop or the last epoch: fit, which restores the best, did not run
        stopping.on_train_end()
    elif stage.optimizer.use_ema:  # killed after its last epoch's checkpoint: fit, which puts the average in, did not run
        stage.optimizer.finalize_variable_values(model.trainable_weights)
    return checkpoint.history, earlier_seconds + time.perf_counter() - started


_created_here: set[Path] = set()


def _is_run(folder: Path) -> bool:
    """Whether ``folder`` is a cnnkit run: interrupted (``backup/key``) or finished (``metrics.json`` with
    ``manifest.json`` or ``model.keras``)."""
    finished = (folder / METRICS_FILE).is_file() and any((folder / name).is_file()
                                                           for name in (MANIFEST_FILE, "model.keras"))
    return (folder / BACKUP_DIR / "key").is_file() or finished


def _holds_runs(folder: Path) -> bool:
    """Whether ``folder`` holds only folders, one of them a run or a folder of runs: an unfinished ensemble
    (``members/<i>``, ``training``) or transfer (``pretrain``, ...)."""
    entries = list(folder.iterdir())
    return all(entry.is_dir() for entry in entries) and any(
        _is_run(entry) or any(_is_run(inner) for inner in entry.iterdir() if inner.is_dir()) for entry in entries)


def prepare_run_dir(run_dir, label, *, key: str | None = None, overwrite: bool = False) -> Path:
    """The run directory to write, created and locked; a finished run there is refused, an interrupted one resumes.

    Without ``run_dir`` the name is ``runs/<label>-<key[:8]>`` (``key``: a digest of the call's
    arguments and data, see :func:`run_key`), so the same command finds its interrupted run again;
    without ``key`` it is timestamped. A directory holding a finished run, or an interrupted run of
    other arguments, is refused unless ``overwrite=True``, which deletes the run there first (an
    interrupted run of the same arguments too: it starts again). A folder that is not empty and
    holds no cnnkit run (no ``backup/key``, no ``metrics.json`` with ``manifest.json`` or
    ``model.keras``) is refused whatever ``overwrite`` is: nothing else is written into or deleted.
    Without ``key`` (ensembles, transfer) a folder holding only folders of such runs is an unfinished
    run too. If training then fails before its first checkpoint, :func:`remove_if_failed_start`
    takes a directory it created away again.

    The directory is locked (:func:`lock_run_dir`) until :func:`release_run_dir`: a second process
    given the same directory while this one trains or finishes there is refused, instead of
    training the same epochs beside it and overwriting its results.

    Example:
        >>> prepare_run_dir(None, "20C5-MP2-FC64", key="3f2a9c1e77")  # doctest: +SKIP
        PosixPath('runs/20C5-MP2-FC64-3f2a9c1e')
    """
    run_dir = _named_run_dir(run_dir, label, key)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not _is_run(run_dir) \
            and not (key is None and _holds_runs(run_dir)):
        raise ValueError(f"run directory {run_dir} is not empty and holds no cnnkit run (no backup/key, no "
                         "metrics.json with manifest.json or model.keras); pass a new or empty run_dir "
                         "(overwrite=True deletes only a run)")
    if not run_dir.exists():
        _created_here.add(run_dir.resolve())
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(run_dir)
    try:
        recorded = run_dir / BACKUP_DIR / "key"
        finished = _finished(run_dir)
        other = key is not None and recorded.exists() and recorded.read_text() != key
        if finished or other:
            if not overwrite:
                what = "a finished run" if finished else "an interrupted run of other arguments or data"
                raise ValueError(f"run directory {run_dir} already holds {what}; pass overwrite=True (overwrite=true "
                                 "on the command line) to replace it, or another run_dir")
            _empty(run_dir)
        elif overwrite and (_is_run(run_dir) or key is None and _holds_runs(run_dir)):
            _empty(run_dir)
        if key is not None and not recorded.exists():
            atomic_write_text(recorded, key)
    except BaseException:
        release_run_dir(run_dir)
        raise
    return run_dir


def _empty(folder: Path) -> None:
    """Delete what ``folder`` holds, keeping the folder (and so the lock on it)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    _created_here.add(folder.resolve())  # as good as new: a failed start takes it away again


def _finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that has finished: results written, no checkpoints left."""
    return (run_dir / METRICS_FILE).is_file() and not (run_dir / BACKUP_DIR).exists()


def _named_run_dir(run_dir, label, key) -> Path:
    if run_dir is None:
        suffix = key[:8] if key else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)[:60]}-{suffix}"
    return Path(run_dir)


def finished_run(run_dir, label, *, key: str, overwrite: bool = False, verbose: int = 1) -> Run | None:
    """The finished run of this very call, loaded, when its run directory holds one; else ``None``.

    "This call" is the ``key`` (:func:`run_key`: arguments, data, and the files the call reads) that
    ``config.yaml`` recorded as ``run_key``. So making a finished call again returns its run instead
    of training again, as an interrupted one resumes; ``overwrite=True`` trains again. Only for calls
    whose key holds all they depend on: ``train`` of notation or a registered name (not of a model
    object), ``finetune`` with the digests of its saved backbone and weights file.

    Example:
        >>> finished_run(None, "lenet", key=run_key(arguments, data))  # doctest: +SKIP
    """
    run_dir = _named_run_dir(run_dir, label, key)
    config = run_dir / "config.yaml"
    if overwrite or not _finished(run_dir) or not config.is_file():
        return None
    if read_mapping(config, yaml.safe_load, "YAML").get("run_key") != key:
        return None
    if verbose:
        print(f"{run_dir} holds this call's finished run (same arguments and data): loaded, not trained again; "
              "overwrite=True trains again")
    return load(run_dir)


def run_key(arguments: dict, data, *, files: dict | None = None) -> str:
    """A digest of a recipe call's recorded arguments, its data's fingerprint and ``files``: the
    digests of files the call reads whose contents its arguments do not hold (a saved backbone).

    Example:
        >>> run_key({"arch": "lenet", "epochs": 3}, data)[:8]  # doctest: +SKIP
        '3f2a9c1e'
    """
    plain = {key: value for key, value in arguments.items() if key not in ("run_dir", "verbose", "overwrite", "callbacks", "report")}
    text = json.dumps([plain, data.fingerprint, *([files] if files else [])], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def released_on_failure(run_dir):
    """On an exception in the block, :func:`remove_if_failed_start` (release the lock; drop a folder
    that got nowhere), then re-raise: wraps a recipe from its fit to its finished run directory.

    Example:
        >>> with released_on_failure(run_dir):  # doctest: +SKIP
        ...     history, seconds, records = fit_stages(model, stages, validation=val, run_dir=run_dir, seed=0)
    """
    try:
        yield
    except BaseException:
        remove_if_failed_start(run_dir)
        raise


def remove_if_failed_start(run_dir) -> None:
    """Release ``run_dir``'s lock; delete it if this process created it and no epoch has been checkpointed in it yet.

    Called when a run fails, so that a failed start leaves no directory behind while a run that
    got somewhere keeps what it needs to resume.

    Example:
        >>> remove_if_failed_start(Path("runs/x"))  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    release_run_dir(run_dir)
    if run_dir.resolve() in _created_here and not any(run_dir.glob("**/checkpoints.json")) \
            and not any(run_dir.glob("**/metrics.json")):
        shutil.rmtree(run_dir, ignore_errors=True)
        _created_here.discard(run_dir.resolve())


def run_config(recipe, arguments, data, *, seed, key: str | None = None, **details) -> dict:
    """A run's ``config.yaml`` content: the recipe and its arguments, its ``run_key`` (``key``, by default
    :func:`run_key` of the arguments and data), ``details`` (what the recipe resolved: arch, precision,
    stages...), then the data, class names, image shape, seed and versions.

    Example:
        >>> run_config("train", {"epochs": 3}, data, seed=0, precision="float32")["recipe"]  # doctest: +SKIP
        'train'
    """
    return {
        "recipe": recipe,
        "arguments": arguments,
        "run_key": key or run_key(arguments, data),
        **details,
        "data": {"source": data.source, "fingerprint": data.fingerprint, "class_counts": data.class_counts,
                 "skipped_files": len(data.skipped)},
        "class_names": list(data.class_names),
        "image_shape": list(data.image_shape),
        "seed": seed,
        "versions": package_versions(),
    }


def _epoch_images(config, data) -> list:
    """Training images of each epoch run, from the stage records (a resample's size where recorded)."""
    return [stage.get("images_per_epoch") or data.sizes["train"]
            for stage in config.get("stages") or [] for _ in range(stage["epochs_run"])]


def finish_run(model, data, *, history, fit_seconds, config, run_dir, verbose=1, extra_metrics=None,
               report=True) -> Run:
    """Evaluate on the test split, write the run directory (with ``report.html`` when ``report``), drop the
    resume backup, return the ``Run``.

    Example:
        >>> run = finish_run(model, data, history=h, fit_seconds=12.5, config=config, run_dir=run_dir)  # doctest: +SKIP
    """
    try:
        run = _finish(model, data, history=history, fit_seconds=fit_seconds, config=config, run_dir=run_dir,
                      extra_metrics=extra_metrics, report=report)
    finally:
        release_run_dir(run_dir)
    if verbose:
        print(result_line(run))
    return run


def _finish(model, data, *, history, fit_seconds, config, run_dir, extra_metrics, report) -> Run:
    run = Run(model, history=history, run_dir=run_dir, class_names=data.class_names, config=config)
    metrics = run.evaluate(data, split="test") if data.test is not None else {}
    rates = [images / seconds for images, seconds in zip(_epoch_images(config, data), history["epoch_seconds"])]
    compiled = history.get("epoch_compiled", [])  # the first epoch of each fit (each stage, each resumed process)
    if len(compiled) != len(rates):  # epochs from before the flag was recorded: only the first is known to compile
        compiled = [1.0] + [0.0] * (len(rates) - 1)
    steady = [rate for rate, first in zip(rates, compiled) if not first] or rates
    metrics.update(
        epochs_run=len(history.get("loss", [])),
        fit_seconds=round(fit_seconds, 3),
        train_images_per_second=round(float(np.median(steady)), 1) if steady else None,
    )
    if "val_accuracy" in history:
        metrics["best_val_accuracy"] = max(history["val_accuracy"])
    metrics.update(extra_metrics or {})
    run.metrics = metrics
    write_run(run_dir, model=model, history=history, metrics=metrics, config=config, class_names=data.class_names)
    if data.skipped:  # the files from_folder left out, with reasons
        atomic_write_text(Path(run_dir) / SKIPPED_FILE, data.skipped_csv())
    if report:
        write_report(run_dir, model=model, data=data)  # a failure only warns: the run is saved
    write_manifest(run_dir)
    discard_backup(run_dir)
    return run


def discard_backup(run_dir) -> None:
    """Delete a finished run's resume backup: renamed away in one step (from then on the run is finished,
    :func:`_finished`), then removed, so a kill part-way through cannot leave a run that seems interrupted.

    Example:
        >>> discard_backup(Path("runs/x"))  # doctest: +SKIP
    """
    backup, discarded = Path(run_dir) / BACKUP_DIR, Path(run_dir) / DISCARDED_BACKUP
    shutil.rmtree(discarded, ignore_errors=True)  # left by a kill during an earlier removal
    if backup.exists():
        os.replace(backup, discarded)
        fsync_dir(Path(run_dir))
    shutil.rmtree(discarded, ignore_errors=True)


DISCARDED_BACKUP = ".backup-discarded"  # hidden: the manifest and load skip it


def result_line(run) -> str:
    """One line summing up a finished run.

    Example:
        >>> result_line(run)  # doctest: +SKIP
        'test accuracy 98.20% (error 1.80%, balanced accuracy 98.18%) on 1000 test images; run saved to runs/x'
    """
    metrics = run.metrics
    if "test_accuracy" in metrics:
        return (f"test accuracy {metrics['test_accuracy']:.2%} (error {metrics['test_error']:.2%}, balanced accuracy "
                f"{metrics['balanced_accuracy']:.2%}) on {metrics['num_examples']} test images; run saved to {run.run_dir}")
    return f"trained {metrics['epochs_run']} epochs; run saved to {run.run_dir}"


def recorded_arguments(function, values) -> dict:
    """A recipe call's arguments as plain data for ``config.yaml``.

    Example:
        >>> def recipe(arch, *, epochs=3): ...
        >>> recorded_arguments(recipe, {"arch": "lenet", "epochs": 3})
        {'arch': 'lenet', 'epochs': 3}
    """
    recorded = {}
    for name in inspect.signature(function).parameters:
        value = values[name]
        if isinstance(value, keras.Model):
            value = f"<keras.Model {value.name}>"
        elif name == "data" and not isinstance(value, (str, dict)):
            value = f"<{type(value).__name__}>"
        elif isinstance(value, Path):
            value = str(value)
        elif name == "callbacks" and value:
            value = [type(callback).__name__ for callback in value]
        recorded[name] = value
    return recorded
