"""``cnnkit.tuner.search``: a Keras Tuner search over a search space, resumable, its results on disk.

Keras Tuner does the searching: its oracles (random, grid, Bayesian optimisation, Hyperband)
propose values, its ``Tuner`` runs trials, checkpoints each trial's best epoch and saves its
state after every trial. cnnkit adds what a search of convolutional networks needs around it:

* A space that names a ``backbone`` instead of an ``arch`` fine-tunes it: each trial is the
  model of ``cnnkit.recipes.finetune`` trained in its stages, the head alone on the frozen
  backbone for ``head_epochs``, then the top ``unfreeze_depth`` groups with it at
  ``learning_rate * lr_multiplier`` (see :meth:`cnnkit.tuner.SearchSpace.stages_for`, which
  also says how Hyperband's epoch budget maps onto the stages).
* The planner checks each proposed network before anything is built. One that does not fit the
  input is recorded as an ``INVALID`` trial with the planner's reason, is not trained, and does
  not count towards ``max_trials``.
* A trial that fails (out of memory, a NaN loss, an error in training) is recorded as ``FAILED``
  with its error and the search goes on; ``max_consecutive_failed_trials`` failures in a row
  stop it (something is wrong with every trial, not with one). A setup error (the data cannot
  be read, a missing package, a bad knob value) stops the search at once: the data, the knob
  values and the existence of a network that fits are all checked before the first trial.
* Each trial starts from a cleared Keras session (Keras Tuner clears it before every build), and
  the gradient functions TensorFlow registers for the trial's graphs are dropped when it ends
  (see ``_gradient_registry``), so memory does not grow from trial to trial.
* The same call resumes: with ``overwrite=False`` a search directory is reloaded, finished trials
  are kept and a trial interrupted mid-way (even by SIGKILL) runs again. Keras Tuner's state
  files are written atomically here, so a kill never leaves a half-written one. A call whose
  settings differ from the directory's (``search.yaml``) is refused rather than mixed in, and so is
  a directory that holds something else (a run, other files).
* The same call runs on several processes or hosts: ``role="chief"`` serves the search,
  ``role="worker"`` trains its trials (Keras Tuner's chief/worker mode over gRPC, sharing the
  search directory); a worker that dies has its trial handed to another. See
  :mod:`cnnkit.tuner.distributed` and docs/SCALING.md.

The search directory::

    search.yaml          the settings (space, algorithm, objective, epochs, seed, data fingerprint)
    keras_tuner/         Keras Tuner's project: oracle.json, trial_<id>/ (trial.json, checkpoint,
                         cnnkit.json with the trial's wall time and build/first-step timings)
    trials.csv           one row per trial (rewritten after every trial)
    best_recipe.yaml     the best configuration as a `cnnkit run` recipe
    sensitivity.png      how the objective moves with each hyperparameter (and sensitivity.csv)

Example:
    >>> import cnnkit
    >>> space = {"arch": "{f}C{k}-MP2-FC{units}", "hyperparameters": {
    ...     "f": [8, 16], "k": [3, 5], "units": [32, 64], "learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"}}}
    >>> result = cnnkit.tuner.search(space, "mnist-sample", algorithm="random", max_trials=4, epochs=2,
    ...                              directory="runs/tune-demo")  # doctest: +SKIP
    >>> result.best_arch  # doctest: +SKIP
    '16C5-MP2-FC64'
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import shutil
import time
import traceback
from pathlib import Path

import keras
import keras_tuner as kt
import tensorflow as tf
import yaml
from keras_tuner.src.tuners.gridsearch import LinkedList
from tensorflow.python.framework import ops as tf_ops

import cnnkit
from cnnkit.recipes.finetune import build_finetune_model, finetune_stage
from cnnkit.recipes.optimization import OPTIMIZERS, is_finite_number, loss_scaled, make_optimizer, resolve_precision
from cnnkit.recipes.pipeline import prepare_inputs, resolve_data
from cnnkit.recipes.resume import EpochSeeds
from cnnkit.report import package_versions
from cnnkit.runs import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, atomic_write_text, holding_run_dir
from cnnkit.tuner.distributed import POLL_SECONDS, Heartbeat, LivenessMixin, environment, resolve_role, serve
from cnnkit.tuner.metrics import BalancedAccuracy
from cnnkit.tuner.result import (
    INVALID_PREFIX,
    RECORD_FILE,
    SearchResult,
    TrialRecord,
    _error_line,
    finetune_defaults,
    train_defaults,
)
from cnnkit.tuner.space import KNOBS, SearchSpace

ALGORITHMS = ("random", "grid", "bayesian", "hyperband")
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min", "val_balanced_accuracy": "max"}
"""Objective name -> direction. Balanced accuracy is the mean per-class recall on validation.

``val_loss`` is scored on plain cross-entropy (the ``cross_entropy`` metric each trial compiles,
logged as ``val_cross_entropy``), not on the trial's training loss: that one includes its
``label_smoothing`` and its ``l2`` penalty, so trials with other values of them would be scored
on different functions."""

_SCORED_ON = {"val_loss": "val_cross_entropy"}
"""Objective -> the logged metric Keras Tuner scores trials on, where the two differ."""

PROJECT = "keras_tuner"
SETTINGS_FILE = "search.yaml"
WORKER_WAIT_SECONDS = 3600.0
"""How long a worker started before its chief waits for the chief's ``search.yaml`` (Keras Tuner's client waits as long)."""
MAX_INVALID_IN_A_ROW = 100
"""The search stops when this many proposed networks in a row do not fit the input."""

_RUN_FILES = (MANIFEST_FILE, MODEL_FILE, CONFIG_FILE)
_OUTPUTS = ("trials.csv", "best_recipe.yaml", "sensitivity.png", "sensitivity.csv", "report.html", SETTINGS_FILE)
_SAMPLE_IMAGES = 256


class SearchError(RuntimeError):
    """A search stopped before its end: a setup error inside a trial, or too many failures in a row.

    The trials finished so far stay in the search directory; the same call resumes after the
    cause is fixed.

    Example:
        >>> raise SearchError("3 trials in a row failed; the last: out of memory")  # doctest: +SKIP
    """


def search(
    space,
    data,
    *,
    algorithm: str = "random",
    objective: str = "val_accuracy",
    max_trials: int | None = 10,
    epochs: int = 3,
    factor: int = 3,
    hyperband_iterations: int = 1,
    executions_per_trial: int = 1,
    max_consecutive_failed_trials: int = 3,
    precision: str = "auto",
    steps_per_execution: int = 16,
    seed: int = 0,
    trust: bool = False,
    callbacks: list | None = None,
    directory=None,
    overwrite: bool = False,
    role: str | None = None,
    oracle_address: str | None = None,
    worker_id: str | None = None,
    worker_timeout: float = 60.0,
    verbose: int = 1,
) -> SearchResult:
    """Search a space of networks and training settings with Keras Tuner.

    Args:
        space: a :class:`cnnkit.tuner.SearchSpace`, or a mapping with ``arch`` (the notation
            template) or ``backbone`` (a fine-tuning space, with optionally ``weights`` and
            ``input_size``), ``hyperparameters`` and optionally ``name`` (see
            :mod:`cnnkit.tuner.space`). A fine-tuning trial's ``epochs`` are split by epoch
            number: the first ``head_epochs`` (default 1) train the head on the frozen
            backbone, the rest also the top ``unfreeze_depth`` groups (default 1) at
            ``learning_rate * lr_multiplier`` (default 0.1); ``unfreeze_depth: 0`` trains the
            head alone throughout.
        data: a ``cnnkit.data.ImageData``, a dataset name ("mnist", "mnist-sample"), or a
            mapping of ``cnnkit.data.from_folder`` arguments with "path". It needs a
            validation split: trials are scored on it.
        algorithm: "random", "grid", "bayesian" (needs scipy and scikit-learn) or "hyperband".
            A grid needs a ``step`` in every range but a linear range of integers (every integer).
        objective: "val_accuracy", "val_loss" or "val_balanced_accuracy"; a trial's score is its
            best epoch's value. "val_loss" is plain validation cross-entropy (logged as
            ``val_cross_entropy``), without a trial's ``label_smoothing`` or ``l2`` penalty.
        max_trials: trials to train at most (invalid ones not counted); ``None``: until the
            algorithm stops (grid: every combination; hyperband: its brackets).
        epochs: epochs per trial; for hyperband, the most epochs one network trains
            (Hyperband's ``max_epochs``: its brackets train for ``epochs / factor**k``). A
            fine-tuning trial's budget counts its head epochs: a budget of at most
            ``head_epochs`` trains the head alone (such a round compares learning rates only),
            and a network continued from a lower round goes on in the stage its next epoch
            falls in.
        factor: Hyperband's reduction factor (ignored by the other algorithms).
        hyperband_iterations: how many times Hyperband sweeps its brackets; one sweep trains
            about ``epochs * log_factor(epochs)**2`` epochs in all.
        executions_per_trial: trainings per trial from different initialisations (seeds
            ``seed``, ``seed + 1``, ...); the score is their mean.
        max_consecutive_failed_trials: stop after this many failed trials in a row.
        precision: as ``cnnkit.recipes.train`` ("auto", "float32", "mixed_bfloat16", ...).
        steps_per_execution: training steps per call into the compiled graph.
        seed: seeds the algorithm's proposals and each trial's weights, shuffling and
            augmentation.
        trust: a fine-tuning space's ``.keras`` file or run directory may hold Python code (a
            Lambda layer): load it anyway. Only for files you trust; refused otherwise.
        callbacks: extra Keras callbacks for every trial's ``fit`` (deep-copied per trial).
        directory: the search directory; default ``runs/tune-<space name>``.
        overwrite: start afresh, deleting an earlier search in ``directory``. With ``False`` an
            earlier search with the same settings is resumed. (On the chief only; a worker
            never deletes.) The chief, or the one process, holds ``directory`` while it runs: a
            second chief or one-process search there is refused.
        role: ``None`` (one process, or the role Keras Tuner's ``KERASTUNER_*`` environment
            variables give), "chief" (serves the search to workers and records it; trains
            nothing) or "worker" (trains the trials the chief hands out). Chief and workers
            share ``directory`` (the same path on a shared filesystem for several hosts) and
            every other argument: a worker waits for the chief's ``search.yaml`` there and
            refuses other settings. A search begun as one process is resumed as one process,
            a distributed one by a chief (a directory of the other kind is refused).
        oracle_address: ``HOST:PORT`` the chief listens on and workers call; default
            ``127.0.0.1:8000`` (this host only). A chief serving other hosts listens on one
            of its addresses (or ``0.0.0.0:PORT``); there is no authentication, so only on a
            private network.
        worker_id: a worker's name, unique in the search; default ``<host>-<pid>``. A worker
            restarted with the same name resumes its unfinished trial.
        worker_timeout: seconds (finite) without a sign of life (workers send one every
            ``worker_timeout / 5`` s while training) after which the chief gives a worker's
            trial to another worker. Give chief and workers the same value.
        verbose: 0 silent, 1 a line per trial and the final table, 2 also Keras progress per epoch.

    Returns:
        A :class:`cnnkit.tuner.SearchResult`; its files are in ``directory`` (the chief writes
        them; a worker's result is the record as it stood when the chief stopped it).

    Raises:
        ValueError: a bad argument, a grid over a range without a step, a space none of whose
            networks fits, a bad knob value (an ``unfreeze_depth`` beyond the backbone's layer
            groups, a ``head_epochs`` that leaves no epoch to unfreeze in), data without a
            validation split, or a directory holding a search with other settings or something
            other than a search (a run).
        ImportError: a package the algorithm or a knob needs is missing.
        SearchError: a setup error inside a trial, or too many failures in a row.

    Example:
        >>> result = search(space, "mnist-sample", algorithm="hyperband", epochs=9, max_trials=None)  # doctest: +SKIP
        >>> print(result.sensitivity.table())  # doctest: +SKIP
    """
    _check_arguments(algorithm=algorithm, objective=objective, max_trials=max_trials, epochs=epochs, factor=factor,
                     hyperband_iterations=hyperband_iterations, executions_per_trial=executions_per_trial,
                     max_consecutive_failed_trials=max_consecutive_failed_trials,
                     steps_per_execution=steps_per_execution, seed=seed, verbose=verbose)
    role, variables = resolve_role(role, oracle_address, worker_id)
    if not is_finite_number(worker_timeout) or not worker_timeout > 0:
        raise ValueError(f"worker_timeout must be a finite number of seconds > 0. Received: "
                         f"worker_timeout={worker_timeout!r}")
    space = SearchSpace.coerce(space)
    if algorithm == "grid":
        space.check_grid()
    data_argument = data
    data = resolve_data(data)
    if data.val is None:
        raise ValueError("a search scores trials on the validation split; the data has none (val_split=0)")
    space.check_fits(data.image_shape, data.num_classes, seed=seed)
    resolved = resolve_precision(precision)
    dtype = None if resolved == "float32" else resolved
    _check_knobs(space, data, dtype)
    groups = None
    if space.kind == "finetune":  # load the backbone once: its groups bound unfreeze_depth
        groups = build_finetune_model(space.backbone, data, weights=space.weights, trust=trust,
                                      input_size=space.input_size, precision=resolved).group_names
        space.check_finetune(groups, epochs)
    oracle = _make_oracle(algorithm, objective=objective, max_trials=max_trials, epochs=epochs, factor=factor,
                          hyperband_iterations=hyperband_iterations, seed=seed,
                          max_consecutive_failed_trials=max_consecutive_failed_trials)
    directory = Path(directory) if directory is not None else Path("runs") / f"tune-{space.name}"
    settings = {"space": space.to_dict(), "data": data.fingerprint, "algorithm": algorithm, "objective": objective,
                "direction": OBJECTIVES[objective], "epochs": epochs,
                "factor": factor if algorithm == "hyperband" else None,
                "hyperband_iterations": hyperband_iterations if algorithm == "hyperband" else None,
                "executions_per_trial": executions_per_trial, "precision": resolved,
                "steps_per_execution": steps_per_execution, "seed": seed}
    if groups is not None:
        settings["groups"] = groups
    if role is not None:
        settings["distributed"] = True  # Keras Tuner resumes a chief's search from other files than one process's
    with _holding(directory, role):
        _prepare_directory(directory, settings, overwrite=overwrite and role != "worker", max_trials=max_trials,
                           source=data.source, write=role != "worker", verbose=verbose)
        common = {"objective": objective, "dtype": dtype, "seed": seed, "steps_per_execution": steps_per_execution,
                  "verbose": verbose}
        hypermodel = (_SpaceHyperModel(space, data, **common) if groups is None
                      else _FinetuneHyperModel(space, data, groups=groups, trust=trust, precision=resolved, **common))
        tuner_class = _HyperbandTuner if algorithm == "hyperband" else _Tuner
        with environment(variables):  # Keras Tuner reads its KERASTUNER_* variables throughout the search
            with contextlib.redirect_stdout(io.StringIO()):  # Keras Tuner's "Reloading Tuner from ..."; we say it below
                tuner = tuner_class(oracle=oracle, hypermodel=hypermodel, directory=str(directory), project_name=PROJECT,
                                    executions_per_trial=executions_per_trial)
            tuner.role, tuner.worker_timeout = role, float(worker_timeout)
            tuner.report = _Reporter(tuner, space, settings, directory, data, data_argument, verbose=verbose,
                                     total=max_trials, trust=trust)
            if role == "chief":
                oracle.distributed, oracle.trial_ended = True, tuner.report.trial_done
            if verbose:
                done = sum(trial.status != "RUNNING" for trial in tuner.report.trials().values())
                resumed = f", resuming after {done} finished trials" if done else ""
                where = f"; {role} {variables['KERASTUNER_TUNER_ID']!r}" if role == "worker" else ""
                print(f"search {space.name!r}: {algorithm}, {objective}, {epochs} epochs{resumed}; directory {directory}"
                      f"{where}", flush=True)
            try:
                tuner.search(epochs=epochs, callbacks=list(callbacks or []), verbose=0)
            except kt.errors.FatalError as error:
                raise SearchError(str(error)) from error
            except RuntimeError as error:
                if "consecutive failures" not in str(error):
                    raise
                _stopped(tuner, error, max_consecutive_failed_trials, directory)
            finally:
                hypermodel.inputs = None
        if role == "chief" and oracle.stop_reason is not None:
            _stopped(tuner, oracle.stop_reason, max_consecutive_failed_trials, directory)
        result = tuner.report.result()
        if role == "worker":
            if verbose:
                print(f"worker {variables['KERASTUNER_TUNER_ID']!r}: the search has ended ({len(result.trials)} trials); "
                      f"the chief writes its results to {directory}", flush=True)
            return result
        result.write()
        if verbose:
            print(result.table())
            print(result.sensitivity.table())
            print("written: " + ", ".join(str(path) for path in result.files.values()))
        return result


@contextlib.contextmanager
def _holding(directory, role):
    """Hold the search directory while the block runs, when this process is the chief or the one process (the
    workers share the chief's): a second chief or one-process search there is refused (``lock_run_dir``)."""
    if role == "worker":
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with holding_run_dir(directory, name="search directory"):
        yield


def _stopped(tuner, error, max_consecutive_failed_trials, directory):
    """Raise the SearchError of a search stopped by failures (its trials so far written first)."""
    if isinstance(error, SearchError) or (isinstance(error, str) and "consecutive failures" not in error):
        raise error if isinstance(error, SearchError) else SearchError(error)
    if tuner.role != "worker":
        tuner.report.result().write()
    last = _error_line(str(error))
    raise SearchError(f"{max_consecutive_failed_trials} trials in a row failed, so the search stopped; the last "
                      f"error: {last}. Finished trials are kept in {directory}")


def _check_arguments(*, algorithm, objective, max_trials, epochs, factor, hyperband_iterations, executions_per_trial,
                     max_consecutive_failed_trials, steps_per_execution, seed, verbose):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}. Received: algorithm={algorithm!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}. Received: objective={objective!r}")
    for name, value, low in [("epochs", epochs, 1), ("factor", factor, 2), ("hyperband_iterations", hyperband_iterations, 1),
                             ("executions_per_trial", executions_per_trial, 1),
                             ("max_consecutive_failed_trials", max_consecutive_failed_trials, 1),
                             ("steps_per_execution", steps_per_execution, 1), ("seed", seed, 0),
                             ("verbose", verbose, 0), ("max_trials", 1 if max_trials is None else max_trials, 1)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}. Received: {name}={value!r}")


def _check_knobs(space, data, dtype):
    """Try every listed value (or range end) of the knobs that name things, before any trial."""
    sample = training = None
    for name, declaration in space.hyperparameters.items():
        if name not in KNOBS:
            continue
        choices = declaration if isinstance(declaration, list) else [declaration]
        for value in choices:
            if isinstance(value, dict):
                continue
            if name == "optimizer" and value not in OPTIMIZERS:
                raise ValueError(f"knob optimizer must be one of {', '.join(OPTIMIZERS)}. Received: optimizer={value!r}")
            if name in ("activation", "padding", "batch_norm"):
                cnnkit.plan("FC2", data.image_shape, data.num_classes, **{name: value})
            if name == "initializer":
                from cnnkit.planner import INITIALIZERS

                if value not in INITIALIZERS:
                    raise ValueError(f"knob initializer must be one of {', '.join(INITIALIZERS)}. "
                                     f"Received: initializer={value!r}")
            if name == "augment" and value not in (None, "none"):
                from cnnkit.recipes.augment import make_augmentation

                sample = sample if sample is not None else _sample(data)
                make_augmentation(value, image_shape=data.image_shape, num_classes=data.num_classes, train_images=sample)
            if name == "preprocess" and value != "scale":  # fitted as a trial fits it (whitening needs the images)
                from cnnkit.recipes.pipeline import training_sample
                from cnnkit.recipes.preprocess import fit_preprocessing

                training = training if training is not None else training_sample(data)
                fit_preprocessing(value, training, dtype=dtype)


def _sample(data):
    return next(iter(data.train.take(_SAMPLE_IMAGES).batch(_SAMPLE_IMAGES).map(lambda images, labels: images))).numpy()


def _prepare_directory(directory, settings, *, overwrite, max_trials, source, write=True, verbose=1):
    """Check ``settings`` against the search in ``directory`` (a worker first waits for the chief to record
    its own), then record them; ``overwrite`` deletes the earlier search instead. A directory that holds
    anything but a search (a run, other files) is refused, with or without ``overwrite``."""
    path = directory / SETTINGS_FILE
    if write and not path.is_file():
        found = sorted(entry.name for entry in directory.iterdir()
                       if not entry.match(".*.tmp"))  # not a write a kill cut short, removed below
        if found:
            what = "a run" if set(found) & set(_RUN_FILES) else "files"
            raise ValueError(f"{directory} holds {what} ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}) "
                             f"and no {SETTINGS_FILE}, so it is not a search directory: give the search an empty or "
                             "new directory")
    if not write and not path.is_file():  # a worker started before its chief
        if verbose:
            print(f"worker: waiting for the chief to write {path}", flush=True)
        deadline = time.monotonic() + WORKER_WAIT_SECONDS
        while not path.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no chief wrote {path} in {WORKER_WAIT_SECONDS:g} s: start the chief with the same "
                                   "directory (a path every worker reaches), or check that it started")
            time.sleep(POLL_SECONDS)
    if overwrite:
        shutil.rmtree(directory / PROJECT, ignore_errors=True)
        for name in _OUTPUTS:
            (directory / name).unlink(missing_ok=True)
    elif path.is_file():
        earlier = yaml.safe_load(path.read_text(encoding="utf-8")).get("settings", {})
        if "distributed" not in earlier and (directory / PROJECT / "chief.json").is_file():
            earlier["distributed"] = True  # a chief's search of an earlier cnnkit, which did not record it
        current = yaml.safe_load(yaml.safe_dump(settings))
        for key in [*current, *(key for key in earlier if key not in current)]:
            if earlier.get(key) != current.get(key):
                raise ValueError(f"{directory} holds a search with {_shown(key, earlier.get(key), 'the data fingerprint')}"
                                 f"; this call has {_shown(key, current.get(key), 'other data')}. Pass overwrite=True "
                                 "to start over, or another directory")
    if write:  # a worker only checks: the chief writes
        for leftover in [*directory.glob(".*.tmp"), *(directory / PROJECT).glob(".*.tmp")]:
            leftover.unlink(missing_ok=True)  # writes a kill cut short, of files only this process writes
        record = {"settings": settings, "max_trials": max_trials, "data_source": source, "versions": package_versions()}
        atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))


def _shown(key, value, data_text):
    if key == "data":
        return data_text
    if key == "distributed":
        return "a chief and workers" if value else "one process"
    return f"{key}={value!r}"


# ----------------------------------------------------------------------------- the hypermodel


class _TrialTimer(keras.callbacks.Callback):
    """Times the start of fit: to the end of the first training call, then later calls of the first epoch.

    Only a trial's first ``fit`` counts (a fine-tuning trial fits once per stage).
    """

    calls = None

    def on_train_begin(self, logs=None):
        if self.calls is None:
            self.begin, self.calls, self.recording = time.perf_counter(), [], True

    def on_train_batch_end(self, batch, logs=None):
        if self.recording:
            self.calls.append((batch, time.perf_counter()))

    def on_epoch_end(self, epoch, logs=None):
        self.recording = False

    def timing(self, build_seconds) -> dict:
        if not self.calls:
            return {"build_seconds": build_seconds}
        (first_batch, first_time), (last_batch, last_time) = self.calls[0], self.calls[-1]
        timing = {"build_seconds": build_seconds, "first_step_seconds": first_time - self.begin}
        if last_batch > first_batch:
            step = (last_time - first_time) / (last_batch - first_batch)
            timing["step_seconds"] = step
            timing["overhead_seconds"] = build_seconds + timing["first_step_seconds"] - (first_batch + 1) * step
        return timing


class _SpaceHyperModel(kt.HyperModel):
    """Builds a trial's network with ``cnnkit.build`` and trains it with Keras ``fit`` on the recipe pipeline."""

    def __init__(self, space, data, *, objective, dtype, seed, steps_per_execution, verbose):
        super().__init__(name=space.name)
        self.space, self.data, self.objective, self.dtype = space, data, objective, dtype
        self.seed, self.steps_per_execution, self.verbose = seed, steps_per_execution, verbose
        self.inputs, self.execution, self.timing = None, 0, {}

    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def start_trial(self):
        self.execution, self.timing = 0, {}

    def settings(self, hp) -> dict:
        return {**train_defaults(), **self.space.values(hp.values)}

    def build(self, hp):
        started = time.perf_counter()
        values = self.settings(hp)
        seed = self.seed + self.execution
        keras.utils.set_random_seed(seed)
        self.inputs = prepare_inputs(self.data, augment=values["augment"], preprocess=values["preprocess"],
                                     label_smoothing=values["label_smoothing"], seed=seed, dtype=self.dtype)
        options = self.space.model_options(values)
        if self.inputs.preprocessing is not None:
            options["preprocessing"] = self.inputs.preprocessing
        model = cnnkit.build(self.space.arch_for(values), self.data.image_shape, self.data.num_classes,
                             dtype=self.dtype, **options)
        optimizer = make_optimizer(values["optimizer"], learning_rate=values["learning_rate"],
                                   momentum=values["momentum"], weight_decay=values["weight_decay"],
                                   steps_per_epoch=math.ceil(self.inputs.train_size / values["batch_size"]), epochs=1)
        self.compile(model, optimizer)
        self.build_seconds = time.perf_counter() - started
        return model

    def compile(self, model, optimizer):
        """Compile with the trial's loss and the metrics its objective is scored on."""
        metrics = ["accuracy"]
        if self.objective == "val_balanced_accuracy":
            metrics.append(BalancedAccuracy(self.data.num_classes))
        if self.objective == "val_loss":  # unsmoothed and without penalties: comparable across trials
            metric = (keras.metrics.CategoricalCrossentropy if self.inputs.soft_labels
                      else keras.metrics.SparseCategoricalCrossentropy)
            metrics.append(metric(name="cross_entropy"))
        model.compile(optimizer=loss_scaled(optimizer, self.dtype), loss=self.inputs.loss, metrics=metrics,
                      steps_per_execution=self.steps_per_execution)

    def fit(self, hp, model, *args, **kwargs):
        values = self.settings(hp)
        seed = self.seed + self.execution
        timer = _TrialTimer()
        initial_epoch = kwargs.get("initial_epoch", 0)
        callbacks = [EpochSeeds(seed=seed, seeded=self.inputs.augmentation.layers if self.inputs.augmentation else ()),
                     keras.callbacks.TerminateOnNaN(), timer, *kwargs.get("callbacks", [])]
        history = self.train(model, values, self.inputs.train_pipeline(values["batch_size"], seed),
                             initial_epoch, kwargs["epochs"], callbacks)
        if self.execution == 0:
            self.timing = timer.timing(self.build_seconds)
        self.execution += 1
        self.inputs = None
        losses = history.history.get("loss", [])
        bad = [epoch for epoch, value in enumerate(losses, initial_epoch + 1) if not math.isfinite(value)]
        if bad:
            raise kt.errors.FailedTrialError(f"the training loss became {losses[bad[0] - initial_epoch - 1]} in epoch "
                                             f"{bad[0]}")
        return history

    def train(self, model, values, pipeline, start, end, callbacks):
        """Fit epochs ``start`` to ``end`` of a trial; returns the Keras ``History``."""
        return model.fit(pipeline, validation_data=self.inputs.validation_pipeline(), epochs=end, initial_epoch=start,
                         class_weight=self.inputs.class_weight, shuffle=False,  # the pipeline shuffles
                         callbacks=callbacks, verbose=2 if self.verbose >= 2 else 0)


class _FinetuneHyperModel(_SpaceHyperModel):
    """Fine-tunes the space's backbone: ``finetune``'s model, trained in the stages of ``SearchSpace.stages_for``.

    Each stage sets its trainable groups and per-group rates (``finetune_stage``) and recompiles;
    the stages' histories join into one, so Keras Tuner scores the trial's best epoch over both.
    """

    def __init__(self, space, data, *, groups, trust, precision, **kwargs):
        super().__init__(space, data, **kwargs)
        self.groups, self.trust, self.precision, self.built = groups, trust, precision, None

    def settings(self, hp) -> dict:
        return {**finetune_defaults(), **self.space.values(hp.values)}

    def build(self, hp):
        started = time.perf_counter()
        values = self.settings(hp)
        seed = self.seed + self.execution
        keras.utils.set_random_seed(seed)
        self.inputs = prepare_inputs(self.data, augment=values["augment"], label_smoothing=values["label_smoothing"],
                                     seed=seed)
        self.built = build_finetune_model(self.space.backbone, self.data, weights=self.space.weights, trust=self.trust,
                                          input_size=self.space.input_size, precision=self.precision)
        # Compiled as its head stage (a model best_model() loads weights into); fit recompiles per stage.
        head = {"name": "head", "unfreeze": 0, "epochs": 1, "learning_rate": values["learning_rate"]}
        stage = self.stage(values, head, pipeline=None)
        stage.prepare(self.built.model)
        self.compile(self.built.model, stage.optimizer)
        self.build_seconds = time.perf_counter() - started
        return self.built.model

    def stage(self, values, spec, pipeline):
        return finetune_stage(self.built, spec, train=pipeline, optimizer=values["optimizer"],
                              weight_decay=values["weight_decay"], class_weight=self.inputs.class_weight,
                              steps_per_epoch=math.ceil(self.inputs.train_size / values["batch_size"]))

    def train(self, model, values, pipeline, start, end, callbacks):
        logs, history = {}, None
        for spec in self.space.stages_for(values, self.groups, end, initial_epoch=start):
            stage = self.stage(values, spec, pipeline)
            stage.prepare(model)
            self.compile(model, stage.optimizer)
            history = super().train(model, values, stage.train, start, start + stage.epochs, callbacks)
            for name, series in history.history.items():
                logs.setdefault(name, []).extend(series)
            start += stage.epochs
            if model.stop_training:  # a NaN loss (TerminateOnNaN) or a user's early stopping
                break
        self.built = None
        history.history = logs
        return history


# ----------------------------------------------------------------------------- oracle and tuner


def _all_trained(trials, budget) -> bool:
    """Whether a search has trained all of its ``budget`` (``max_trials``) trials, the planner's rejects not
    counted, and none is running; ``False`` without a budget (Hyperband's brackets decide when it ends)."""
    trials = list(trials)
    return budget is not None and all(trial.status not in ("RUNNING", "IDLE") for trial in trials) and sum(
        not _rejected(trial) for trial in trials) >= budget


def _rejected(trial) -> bool:
    """Whether the planner rejected this trial's network (then it stays INVALID and is not counted)."""
    return trial.status == "INVALID" and (trial.message or "").startswith(INVALID_PREFIX)


class _Oracle(LivenessMixin, kt.Oracle):
    """Keras Tuner's oracle, with trials the planner rejects kept INVALID (no retry, not a failure, not
    counted towards ``budget``) and its state files written atomically. On a chief (``distributed``)
    it also keeps track of its workers (:class:`cnnkit.tuner.distributed.LivenessMixin`)."""

    budget = None
    distributed = False

    @kt.synchronized
    def create_trial(self, tuner_id):
        if not self.distributed:
            return self._create(tuner_id)
        try:
            return self._create_trial(tuner_id, self._create)
        except SearchError as error:  # too many misfits in a row: every worker is told to stop
            self.stop_reason = error
            return self._create_trial(tuner_id, self._create)

    def reload(self):
        """Reload, mending what Keras Tuner's order of writes leaves after a kill or at the end of a search.

        A trial whose ``trial.json`` was written but not yet the oracle's state is dropped: the
        oracle's own state (its random state, Hyperband's brackets) never moved on, so it proposes
        the same trial again under the same id (it would stay RUNNING for good). A trial that had
        ended is not run again: Keras Tuner saves the oracle's state before it takes an ended trial
        off the running ones, so the last trial of a search reloads as interrupted (a chief's worker
        would then train it over and over, its reports dropped as late duplicates).
        """
        super().reload()
        for trial_id in [trial_id for trial_id in self.trials if trial_id not in self.start_order]:
            del self.trials[trial_id]
        self._retry_queue = [trial_id for trial_id in self._retry_queue if trial_id not in self.end_order]

    @kt.synchronized
    def get_trial(self, trial_id):
        if self.distributed:
            self._seen_trial(trial_id)  # a worker's heartbeat
        return super().get_trial(trial_id)

    @kt.synchronized
    def update_trial(self, trial_id, metrics, step=0):
        if self.distributed:
            self._seen_trial(trial_id)
        return super().update_trial(trial_id, metrics, step=step)

    @kt.synchronized
    def end_trial(self, trial):
        if not self.distributed:
            return super().end_trial(trial)
        if trial.message is None:  # Keras Tuner's gRPC message has no field for it: the worker left it on disk
            record = Path(self._get_trial_dir(trial.trial_id)) / RECORD_FILE
            with contextlib.suppress(OSError, ValueError):
                trial.message = json.loads(record.read_text()).get("message")
        self._end_trial(trial, super().end_trial)

    def _create(self, tuner_id):
        if tuner_id not in self.ongoing_trials:
            streak = 0
            for trial_id in reversed(self.end_order):
                if not _rejected(self.trials[trial_id]):
                    break
                streak += 1
            if streak >= MAX_INVALID_IN_A_ROW:
                last = self.trials[self.end_order[-1]].message[len(INVALID_PREFIX):]
                raise SearchError(f"{streak} proposed networks in a row do not fit the input (the last: {last}); "
                                  "narrow the search space")
            if self.budget is not None:
                self.max_trials = self.budget + sum(_rejected(trial) for trial in self.trials.values())
        return super().create_trial(tuner_id)

    def _retry(self, trial):
        return False if _rejected(trial) else super()._retry(trial)

    def save(self):
        atomic_write_text(self._get_oracle_fname(), json.dumps(self.get_state()))

    def _save_trial(self, trial):
        atomic_write_text(Path(self._get_trial_dir(trial.trial_id)) / "trial.json", json.dumps(trial.get_state()))


class _RandomOracle(_Oracle, kt.oracles.RandomSearchOracle):
    pass


class _GridOracle(_Oracle, kt.oracles.GridSearchOracle):
    """Grid search that keeps its place in the grid across a restart.

    Keras Tuner's grid oracle keeps the trials in grid order (``_ordered_ids``) and the trials
    whose next combination is still to be proposed (``_populate_next``) in memory only, so a
    reloaded search failed (``KeyError``) after rerunning the interrupted trial, or stopped with
    most of the grid untrained. ``reload`` rebuilds both from the saved trials.
    """

    def reload(self):
        """Reload, then put every trial (completed, failed, invalid or interrupted) in grid order.

        Every trial is queued: proposing skips one whose next combination is already a trial, so
        the search goes on with the first combination not tried. An interrupted trial runs again
        (Keras Tuner's retry queue); one whose ``trial.json`` was written but not yet the oracle's
        state was dropped (:meth:`_Oracle.reload`) and is proposed again.
        """
        super().reload()
        order = functools.cmp_to_key(lambda a, b: self._compare(a.hyperparameters.values, b.hyperparameters.values))
        trials = sorted(self.trials.values(), key=order)
        self._ordered_ids = LinkedList()
        for trial in trials:
            self._ordered_ids.insert(trial.trial_id)
            if trial.status == "RUNNING" and trial.trial_id not in self._retry_queue:
                self._retry_queue.append(trial.trial_id)
        self._populate_next = [trial.trial_id for trial in trials]


class _BayesianOracle(_Oracle, kt.oracles.BayesianOptimizationOracle):
    pass


class _HyperbandOracle(_Oracle, kt.oracles.HyperbandOracle):
    """Hyperband whose brackets do not keep a slot for a network the planner rejected (a new one fills it)."""

    @kt.synchronized
    def end_trial(self, trial):
        super().end_trial(trial)
        if _rejected(self.trials[trial.trial_id]):
            for bracket in self._brackets:
                bracket["rounds"][0] = [info for info in bracket["rounds"][0] if info["id"] != trial.trial_id]
            self.save()


class _Tuner(kt.Tuner):
    """Keras Tuner's ``Tuner`` with the planner's check before each trial and a record after it.

    As a distributed search's chief it serves the oracle (:func:`cnnkit.tuner.distributed.serve`);
    as a worker it sends heartbeats while a trial trains and waits between ``IDLE`` answers.
    """

    report = None
    role = None
    worker_timeout = 60.0
    _waiting = False
    _heartbeat = None

    def search(self, *fit_args, **fit_kwargs):
        if self.role == "worker" and _all_trained(self.report.trials().values(), self.report.total):
            return  # the chief's search is over (the chief, called again, returns at once): nothing to ask for
        if self.role != "chief":
            try:
                return super().search(*fit_args, **fit_kwargs)
            finally:  # a trial cut short (an interrupt, a setup error) never reaches on_trial_end
                self._stop_heartbeat()
        self.oracle.verbose = 0  # Keras Tuner's own display; the reporter prints a line per trial
        self.save()
        if _all_trained(self.oracle.trials.values(), self.oracle.budget):
            return  # the same search called again once finished: nothing to hand out, no worker to wait for
        address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"  # IPv4 or a name
        serve(self.oracle, address, worker_timeout=self.worker_timeout, verbose=self.hypermodel.verbose)

    def pre_create_trial(self):
        if self._waiting:  # the last answer was IDLE (other trials still run): ask again in a moment
            time.sleep(POLL_SECONDS)
        self._waiting = True

    def _populate_initial_space(self):
        # The space has no conditional hyperparameters, so declaring them is enough; Keras Tuner's
        # default would also build a model to discover hyperparameters declared while building.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def on_trial_begin(self, trial):
        self._waiting = False
        if self.role == "worker":
            self._heartbeat = Heartbeat(self.oracle, trial.trial_id, interval=self.worker_timeout / 5).__enter__()
        super().on_trial_begin(trial)
        self._started = time.perf_counter()
        self._gradients_before = set(_gradient_registry())
        self.hypermodel.start_trial()

    def _try_run_and_update_trial(self, trial, *args, **kwargs):
        # The planner's check comes first: a network that does not fit is marked INVALID with the
        # reason, without raising. A trial that fails as trials do (a NaN loss, out of memory) is
        # FAILED with its one line; Keras Tuner would print a traceback for either. Other errors
        # keep Keras Tuner's handling, traceback included.
        hypermodel = self.hypermodel
        values = hypermodel.space.values(trial.hyperparameters.values)
        reason = hypermodel.space.invalid_reason(values, hypermodel.data.image_shape, hypermodel.data.num_classes)
        if reason is not None:
            trial.status, trial.message = kt.engine.trial.TrialStatus.INVALID, INVALID_PREFIX + reason
            return
        self._failure = None
        super()._try_run_and_update_trial(trial, *args, **kwargs)
        if self._failure is not None:
            trial.status, trial.message = kt.engine.trial.TrialStatus.FAILED, self._failure

    def _run_and_update_trial(self, trial, *args, **kwargs):
        try:
            super()._run_and_update_trial(trial, *args, **kwargs)
        except kt.errors.FailedTrialError as error:  # _try_run_and_update_trial marks the trial FAILED
            self._failure = "".join(traceback.format_exception_only(error)).strip()

    def run_trial(self, trial, *args, **kwargs):
        try:
            return super().run_trial(trial, *args, **kwargs)
        except (tf.errors.ResourceExhaustedError, MemoryError) as error:
            raise kt.errors.FailedTrialError(f"out of memory: {_first_line(error)}") from error
        except (ImportError, OSError, tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as error:
            raise kt.errors.FatalError(f"trial {trial.trial_id} hit a setup error, so the search stopped: "
                                       f"{type(error).__name__}: {_first_line(error)}") from error

    def _stop_heartbeat(self):
        if self._heartbeat is not None:
            self._heartbeat.__exit__(None, None, None)
            self._heartbeat = None

    def on_trial_end(self, trial):
        self._stop_heartbeat()
        record = {"seconds": time.perf_counter() - self._started, **self.hypermodel.timing}
        if trial.message:  # for a chief, which gets the trial over gRPC without it
            record["message"] = trial.message
        atomic_write_text(Path(self.get_trial_dir(trial.trial_id)) / RECORD_FILE, json.dumps(record))
        super().on_trial_end(trial)
        registry = _gradient_registry()
        for name in set(registry) - self._gradients_before:
            if name.startswith("CustomGradient-"):
                del registry[name]
        if self.role is None:
            self.report.trial_done(trial.trial_id)
        elif self.hypermodel.verbose:
            print(f"worker {self.tuner_id!r}: trial {trial.trial_id} {trial.status}", flush=True)

    def save(self):
        if not self._is_worker():
            self.oracle.save()
        atomic_write_text(self._get_tuner_fname(), json.dumps(self.get_state()))


class _HyperbandTuner(_Tuner, kt.Hyperband):
    """``keras_tuner.Hyperband`` (epochs per round, weights carried from the previous round) on our oracle."""

    def __init__(self, oracle, **kwargs):
        kt.Tuner.__init__(self, oracle=oracle, **kwargs)  # Hyperband's own __init__ makes its own oracle


def _make_oracle(algorithm, *, objective, max_trials, epochs, factor, hyperband_iterations, seed,
                 max_consecutive_failed_trials):
    common = {"objective": kt.Objective(_SCORED_ON.get(objective, objective), OBJECTIVES[objective]),
              "seed": seed + 1,  # Keras Tuner draws a random seed for 0
              "max_consecutive_failed_trials": max_consecutive_failed_trials}
    if algorithm == "hyperband":
        oracle = _HyperbandOracle(max_epochs=epochs, factor=factor, hyperband_iterations=hyperband_iterations, **common)
    elif algorithm == "bayesian":
        try:
            oracle = _BayesianOracle(max_trials=max_trials, **common)
        except ImportError as error:
            raise ImportError(f"algorithm='bayesian' needs scipy and scikit-learn: pip install 'cnnkit[bayesian]' "
                              f"({error})") from None
    else:
        oracle = (_GridOracle if algorithm == "grid" else _RandomOracle)(max_trials=max_trials, **common)
    oracle.budget = max_trials
    return oracle


class _Reporter:
    """Turns the oracle's trials into records: a progress line and trials.csv after each trial."""

    def __init__(self, tuner, space, settings, directory, data, data_argument, *, verbose, total, trust=False):
        self.tuner, self.space, self.settings, self.directory = tuner, space, settings, directory
        self.data, self.data_argument, self.verbose, self.total = data, data_argument, verbose, total
        self.trust = trust

    def trials(self) -> dict:
        """trial id -> Keras Tuner ``Trial``: the oracle's, or on a worker (no oracle) the chief's files."""
        if isinstance(self.tuner.oracle, kt.Oracle):
            return self.tuner.oracle.trials
        loaded = (kt.engine.trial.Trial.load(str(path)) for path in Path(self.tuner.project_dir).glob("trial_*/trial.json"))
        return {trial.trial_id: trial for trial in loaded}

    def result(self) -> SearchResult:
        trials = self.trials()
        records = [TrialRecord.from_trial(trials[trial_id], self.space, self.tuner.get_trial_dir(trial_id),
                                          epochs=self.settings["epochs"])
                   for trial_id in sorted(trials, key=int)]
        return SearchResult(trials=records, space=self.space, settings=self.settings, directory=self.directory,
                            data=self.data, data_argument=self.data_argument, trust=self.trust,
                            tuner=self.tuner if isinstance(self.tuner.oracle, kt.Oracle) else None)

    def trial_done(self, trial_id):
        result = self.result()
        atomic_write_text(self.directory / "trials.csv", result.trials_csv())
        if self.verbose:
            record = next(trial for trial in result.trials if trial.trial_id == trial_id)
            counted = sum(trial.status not in ("INVALID", "RUNNING") for trial in result.trials)
            progress = f"{counted}/{self.total}" if self.total else str(counted)
            print(record.line(result.objective, progress=progress, best=result.best_score,
                              placeholders=self.space.placeholders), flush=True)


def _gradient_registry() -> dict:
    """TensorFlow's process-wide registry of gradient functions, by name (empty if its layout changed).

    TensorFlow 2.21 registers a new gradient function there (``CustomGradient-<n>``) every time a
    graph calls a ``tf.custom_gradient`` function, which Keras's optimizer step does through the
    distribution strategy's all-reduce, and never removes it. The function keeps its graph
    alive, and the graph keeps the trial's variables: weights and optimizer slots, about three
    times the model's size, leaked per trial. The search drops a trial's entries when the trial
    ends, when nothing can run its graphs any more.
    """
    registry = getattr(getattr(tf_ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else {}


def _first_line(error) -> str:
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["ALGORITHMS", "OBJECTIVES", "SearchError", "search"]
