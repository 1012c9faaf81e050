"""The training machinery the recipes share: staged ``fit`` with resume, the run directory, results.

``train`` fits in one stage (two with Wei's two-stage imbalance schedule); ``finetune`` fits a
frozen-backbone stage and then unfreezing stages. Each stage compiles the model with its own
optimiser (Keras needs a recompile after ``trainable`` changes) and continues the epoch count,
so history, TensorBoard curves and ``history.csv`` run on across stages.

``CNNKIT_EAGER=1`` in the environment compiles with ``run_eagerly=True``: Keras runs each step
as Python, with no graph tracing (for debugging, and for tests of big backbones taking one step,
where tracing costs ten times the step).

Resume: every stage keeps a ``BackupAndRestore`` backup under ``run_dir/backup/stage<i>``; a
finished stage of a multi-stage run leaves its weights and history there, so a run killed in
stage 3 restarts at stage 3's last completed epoch without redoing stages 1 and 2.

Example:
    >>> stage = Stage("train", epochs=3, optimizer=keras.optimizers.Adam(), train=pipeline)  # doctest: +SKIP
    >>> history, seconds = fit_stages(model, [stage], validation=val, run_dir=Path("runs/x"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from cnnkit.report import package_versions
from cnnkit.runs import Run, atomic_write_text, write_run


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

    Example:
        >>> Stage("head", epochs=2, optimizer=keras.optimizers.Adam(1e-3), train=pipeline)  # doctest: +SKIP
    """

    name: str
    epochs: int
    optimizer: keras.optimizers.Optimizer
    train: object
    class_weight: dict | None = None
    prepare: Callable[[keras.Model], None] | None = None


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


def fit_stages(model, stages, *, validation, run_dir, loss="sparse_categorical_crossentropy",
               steps_per_execution=1, early_stopping=None, callbacks=(), verbose=1):
    """Compile and fit ``model`` stage by stage; return ``(history, fit_seconds, stage_records)``.

    ``history`` holds one list per Keras metric over all stages plus ``epoch_seconds``;
    ``stage_records`` has each stage's name and epochs run (early stopping may end one early).

    Example:
        >>> history, seconds, records = fit_stages(model, stages, validation=val, run_dir=run_dir)  # doctest: +SKIP
        >>> records
        [{'name': 'head', 'epochs_run': 2}, {'name': 'top', 'epochs_run': 3}]
    """
    history, records, fit_seconds, epoch = {}, [], 0.0, 0
    backup = Path(run_dir) / "backup"
    for index, stage in enumerate(stages, 1):
        if stage.prepare is not None:
            stage.prepare(model)
        finished_weights = backup / f"stage{index}.weights.h5"
        finished_history = backup / f"stage{index}.history.json"
        if finished_weights.exists() and finished_history.exists():
            model.load_weights(finished_weights)
            stage_history, seconds = json.loads(finished_history.read_text()), 0.0
        else:
            stage_history, seconds = _fit_stage(
                model, stage, backup / f"stage{index}", validation=validation, run_dir=run_dir, loss=loss,
                steps_per_execution=steps_per_execution, early_stopping=early_stopping, callbacks=callbacks,
                initial_epoch=epoch, verbose=verbose,
            )
            if len(stages) > 1:
                model.save_weights(finished_weights)
                atomic_write_text(finished_history, json.dumps(stage_history))
        epochs_run = len(stage_history.get("loss", []))
        for key, values in stage_history.items():
            history.setdefault(key, []).extend(values)
        records.append({"name": stage.name, "epochs_run": epochs_run})
        fit_seconds += seconds
        epoch += epochs_run
    return history, fit_seconds, records


def _fit_stage(model, stage, backup_dir, *, validation, run_dir, loss, steps_per_execution, early_stopping,
               callbacks, initial_epoch, verbose):
    model.compile(optimizer=stage.optimizer, loss=loss, metrics=["accuracy"], steps_per_execution=steps_per_execution,
                  run_eagerly=os.environ.get("CNNKIT_EAGER") == "1")
    timer = EpochTimer()
    stage_callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir)),
        keras.callbacks.TensorBoard(str(Path(run_dir) / "logs"), write_graph=False),
    ]
    if early_stopping:
        stage_callbacks.append(keras.callbacks.EarlyStopping(patience=early_stopping, restore_best_weights=True))
    stage_callbacks += list(callbacks)
    stage_callbacks.append(timer)  # last, so each epoch's time includes the other callbacks' work
    started = time.perf_counter()
    history = model.fit(
        stage.train,
        validation_data=validation,
        initial_epoch=initial_epoch,
        epochs=initial_epoch + stage.epochs,
        shuffle=False,  # the pipeline shuffles
        class_weight=stage.class_weight,
        callbacks=stage_callbacks,
        verbose=verbose,
    ).history
    seconds = time.perf_counter() - started
    history = {key: [float(value) for value in values] for key, values in history.items()}
    history["epoch_seconds"] = timer.seconds[-len(history.get("loss", [])):]
    return history, seconds


def prepare_run_dir(run_dir, label) -> Path:
    """The run directory to write, created; a finished run there is refused, an interrupted one resumes.

    Example:
        >>> prepare_run_dir(None, "20C5-MP2-FC64")  # doctest: +SKIP
        PosixPath('runs/20C5-MP2-FC64-20261123-101500')
    """
    if run_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)[:60]}-{stamp}"
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists() and not (run_dir / "backup").exists():
        raise ValueError(f"run directory {run_dir} already holds a finished run; pass another run_dir or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_config(recipe, arguments, data, *, seed, **details) -> dict:
    """A run's ``config.yaml`` content: the recipe and its arguments, ``details`` (what the recipe
    resolved: arch, precision, stages...), then the data, class names, image shape, seed and versions.

    Example:
        >>> run_config("train", {"epochs": 3}, data, seed=0, precision="float32")["recipe"]  # doctest: +SKIP
        'train'
    """
    return {
        "recipe": recipe,
        "arguments": arguments,
        **details,
        "data": {"source": data.source, "fingerprint": data.fingerprint, "class_counts": data.class_counts},
        "class_names": list(data.class_names),
        "image_shape": list(data.image_shape),
        "seed": seed,
        "versions": package_versions(),
    }


def finish_run(model, data, *, history, fit_seconds, config, run_dir, verbose=1, extra_metrics=None) -> Run:
    """Evaluate on the test split, write the run directory, drop the resume backup, return the ``Run``.

    Example:
        >>> run = finish_run(model, data, history=h, fit_seconds=12.5, config=config, run_dir=run_dir)  # doctest: +SKIP
    """
    run = Run(model, history=history, run_dir=run_dir, class_names=data.class_names, config=config)
    metrics = run.evaluate(data, split="test") if data.test is not None else {}
    steady = history["epoch_seconds"][1:] or history["epoch_seconds"]
    metrics.update(
        epochs_run=len(history.get("loss", [])),
        fit_seconds=round(fit_seconds, 3),
        train_images_per_second=round(data.sizes["train"] / float(np.median(steady)), 1) if steady else None,
    )
    if "val_accuracy" in history:
        metrics["best_val_accuracy"] = max(history["val_accuracy"])
    metrics.update(extra_metrics or {})
    run.metrics = metrics
    write_run(run_dir, model=model, history=history, metrics=metrics, config=config, class_names=data.class_names)
    shutil.rmtree(Path(run_dir) / "backup", ignore_errors=True)
    if verbose:
        print(result_line(run))
    return run


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
