"""``cnnkit.recipes.train``: train a classifier from scratch and write its run directory.

Example:
    >>> import cnnkit
    >>> run = cnnkit.recipes.train("20C5-MP2-50C5-MP2-FC256", "mnist-sample", epochs=3)  # doctest: +SKIP
    >>> run.metrics["test_accuracy"]  # doctest: +SKIP
    0.968
"""

from __future__ import annotations

import datetime
import inspect
import math
import re
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import cnnkit
from cnnkit.recipes.optimization import make_optimizer, resolve_precision
from cnnkit.recipes.pipeline import input_pipeline, resolve_data
from cnnkit.report import package_versions
from cnnkit.runs import Run, write_run


def train(
    arch,
    data,
    *,
    model_options: dict | None = None,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule="constant",
    epochs: int = 10,
    batch_size: int = 128,
    early_stopping: int | None = None,
    precision: str = "auto",
    steps_per_execution: int = 16,
    seed: int = 0,
    deterministic: bool = False,
    callbacks: list | None = None,
    run_dir=None,
    verbose: int = 1,
) -> Run:
    """Train a network from scratch, evaluate it on the test split, and write its run directory.

    Args:
        arch: notation (``"20C5-MP2-50C5-MP2-FC256"``), a registered name (``"lenet"``), or a
            ``keras.Model`` taking raw pixels (then ``model_options`` and ``precision`` do not
            apply: the model is used as built).
        data: a ``cnnkit.data.ImageData``, a dataset name for ``cnnkit.data.load`` ("mnist",
            "mnist-sample"), or a mapping of ``cnnkit.data.from_folder`` arguments with "path".
        model_options: build options for ``cnnkit.build`` (activation, padding, batch_norm,
            initializer, l2, max_norm, preprocessing).
        optimizer: "sgd", "momentum", "nesterov", "adam", "adamw" or "rmsprop".
        learning_rate: peak learning rate.
        momentum: for momentum, nesterov and rmsprop.
        weight_decay: decoupled weight decay, not applied to biases and batch-norm parameters.
        schedule: "constant", "step", "cosine", "onecycle", or a dict (see
            ``cnnkit.recipes.optimization.make_schedule``).
        epochs: passes over the training split.
        batch_size: images per step.
        early_stopping: stop when validation loss has not improved for this many epochs and
            restore the best weights; ``None`` trains all epochs.
        precision: "auto" (mixed_bfloat16 where the CPU or GPU computes bf16 fast, else
            float32), "float32", "mixed_bfloat16" or "mixed_float16". Variables and the softmax
            output stay float32.
        steps_per_execution: training steps run per call into the compiled graph; more
            amortises Python overhead on small networks (callbacks then see every N-th batch).
        seed: seeds weights, shuffling and dropout.
        deterministic: also make TensorFlow's kernels deterministic (slower, process-wide).
        callbacks: extra ``keras.callbacks.Callback`` objects, run after cnnkit's own (resume
            backup, TensorBoard, early stopping).
        run_dir: where to write the run; default ``runs/<arch>-<timestamp>``. A directory
            that already holds a finished run is refused rather than overwritten; one holding
            an interrupted run (``backup/``) resumes from its last completed epoch.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.

    Returns:
        A ``cnnkit.Run`` with ``metrics`` holding ``test_accuracy``, ``test_error``,
        ``balanced_accuracy``, per-class precision/recall/F1 and the confusion matrix (when
        the data has a test split), plus ``epochs_run`` and training throughput.

    Example:
        >>> run = train("lenet", "mnist-sample", optimizer="momentum", learning_rate=0.05,
        ...             schedule="cosine", epochs=5, run_dir="runs/lenet-sample")  # doctest: +SKIP
    """
    arguments = _recorded_arguments(train, locals())
    for name, value, low in [("epochs", epochs, 1), ("batch_size", batch_size, 1),
                             ("steps_per_execution", steps_per_execution, 1)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}. Received: {name}={value!r}")
    if early_stopping is not None and (not isinstance(early_stopping, int) or early_stopping < 1):
        raise ValueError(f"early_stopping must be a patience in epochs (>= 1) or None. Received: "
                         f"early_stopping={early_stopping!r}")
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    data = resolve_data(data)
    if early_stopping and data.val is None:
        raise ValueError("early_stopping needs a validation split; the data has none (val_split=0)")
    precision = resolve_precision(precision) if not isinstance(arch, keras.Model) else "as built"
    model = _make_model(arch, data, precision, model_options or {})
    steps_per_epoch = math.ceil(data.sizes["train"] / batch_size)
    keras_optimizer = make_optimizer(optimizer, learning_rate=learning_rate, schedule=schedule, momentum=momentum,
                                     weight_decay=weight_decay, steps_per_epoch=steps_per_epoch, epochs=epochs)
    run_dir = _prepare_run_dir(run_dir, arch)  # only once every argument has been checked
    model.compile(
        optimizer=keras_optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    timer = EpochTimer()
    user_callbacks = list(callbacks or [])
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
        keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False),
    ]
    if early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(patience=early_stopping, restore_best_weights=True))
    callbacks += user_callbacks
    callbacks.append(timer)  # last, so each epoch's time includes the other callbacks' work
    if verbose:
        print(data.summary())
    started = time.perf_counter()
    history = model.fit(
        input_pipeline(data, "train", batch_size=batch_size, shuffle=True, seed=seed),
        validation_data=input_pipeline(data, "val", batch_size=1024),
        epochs=epochs,
        shuffle=False,  # the pipeline shuffles
        callbacks=callbacks,
        verbose=verbose,
    ).history
    fit_seconds = time.perf_counter() - started
    history = {key: [float(value) for value in values] for key, values in history.items()}
    history["epoch_seconds"] = timer.seconds[-len(history.get("loss", [])):]

    config = {
        "recipe": "train",
        "arguments": arguments,
        "arch": arch if isinstance(arch, str) else f"<keras.Model {arch.name}>",
        "precision": precision,
        "data": {"source": data.source, "fingerprint": data.fingerprint, "class_counts": data.class_counts},
        "class_names": list(data.class_names),
        "image_shape": list(data.image_shape),
        "seed": seed,
        "versions": package_versions(),
    }
    run = Run(model, history=history, run_dir=run_dir, class_names=data.class_names, config=config)
    run.metrics = _metrics(run, data, history, fit_seconds)
    write_run(run_dir, model=model, history=history, metrics=run.metrics, config=config,
              class_names=data.class_names)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    if verbose:
        print(_result_line(run))
    return run


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each epoch (training and validation) in ``seconds``.

    Placed last in the callback list, an epoch's time also covers the work of the callbacks
    before it at the epoch's end (checkpoint backup, TensorBoard).
    """

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def _make_model(arch, data, precision, model_options):
    if isinstance(arch, keras.Model):
        if model_options:
            raise ValueError("model_options apply when arch is notation or a registered name, not a keras.Model")
        return arch
    dtype = None if precision == "float32" else precision
    return cnnkit.build(arch, data.image_shape, data.num_classes, dtype=dtype, **model_options)


def _prepare_run_dir(run_dir, arch) -> Path:
    if run_dir is None:
        label = arch if isinstance(arch, str) else arch.name
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)[:60]}-{stamp}"
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists() and not (run_dir / "backup").exists():
        raise ValueError(f"run directory {run_dir} already holds a finished run; pass another run_dir or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _metrics(run, data, history, fit_seconds) -> dict:
    metrics = run.evaluate(data, split="test") if data.test is not None else {}
    epochs_run = len(history.get("loss", []))
    steady = history["epoch_seconds"][1:] or history["epoch_seconds"]
    metrics.update(
        epochs_run=epochs_run,
        fit_seconds=round(fit_seconds, 3),
        train_images_per_second=round(data.sizes["train"] / float(np.median(steady)), 1) if steady else None,
    )
    if "val_accuracy" in history:
        metrics["best_val_accuracy"] = max(history["val_accuracy"])
    return metrics


def _result_line(run) -> str:
    metrics = run.metrics
    if "test_accuracy" in metrics:
        return (f"test accuracy {metrics['test_accuracy']:.2%} (error {metrics['test_error']:.2%}, balanced accuracy "
                f"{metrics['balanced_accuracy']:.2%}) on {metrics['num_examples']} test images; run saved to {run.run_dir}")
    return f"trained {metrics['epochs_run']} epochs; run saved to {run.run_dir}"


def _recorded_arguments(function, values) -> dict:
    """The call's arguments as plain data for config.yaml."""
    recorded = {}
    for name in inspect.signature(function).parameters:
        value = values[name]
        if name == "data" and not isinstance(value, (str, dict)):
            value = f"<{type(value).__name__}>"
        elif name == "arch" and not isinstance(value, str):
            value = f"<keras.Model {value.name}>"
        elif isinstance(value, Path):
            value = str(value)
        elif name == "callbacks" and value:
            value = [type(callback).__name__ for callback in value]
        recorded[name] = value
    return recorded
