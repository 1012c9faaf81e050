"""What a search leaves: one ``TrialRecord`` per trial and the ``SearchResult`` with the best configuration.

"Best model" and "retrained" mean two different things here:

* :meth:`SearchResult.best_model` is the best trial's own network, with the weights of its best
  epoch. It was trained on the training split only and chosen because its validation score was
  the highest of all trials, so that validation score is optimistic: judge it on a test split.
* :meth:`SearchResult.retrain` trains the best configuration again from scratch on the training
  and validation splits together, for the best trial's number of epochs, and evaluates it on the
  test split only (it has no validation split left to report).

``best_recipe.yaml`` is the first of these as a ``cnnkit run`` recipe: the same network and
settings, trained on the training split with validation, so its record of the objective should
come back within noise of the search's score; the file's header says where the run records it
(``best_val_accuracy`` in ``metrics.json``, the lowest ``val_loss`` in ``history.csv``). For a
fine-tuning space it is a ``finetune`` recipe whose ``stages:`` are the best trial's (the head on
the frozen backbone, then the top ``unfreeze_depth`` groups with ``lr_multipliers``), and
``retrain()`` runs ``finetune``.

Example:
    >>> result = cnnkit.tuner.search(space, "mnist-sample", algorithm="hyperband", epochs=9)  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
    >>> model = result.best_model()  # doctest: +SKIP
    >>> run = result.retrain(run_dir="runs/best-retrained")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import math
import os
import shlex
import textwrap
from pathlib import Path

import numpy as np
import yaml

from cnnkit.html_report import write_search_report
from cnnkit.runs import atomic_write_text
from cnnkit.tuner.sensitivity import sensitivity

TRIALS_FILE = "trials.csv"
RECIPE_FILE = "best_recipe.yaml"
SENSITIVITY_PNG = "sensitivity.png"
SENSITIVITY_CSV = "sensitivity.csv"
RECORD_FILE = "cnnkit.json"
"""Per trial, beside Keras Tuner's ``trial.json``: wall time and build/first-step timings."""

INVALID_PREFIX = "invalid: "
"""How a trial the planner rejected is marked in its Keras Tuner message."""

_TIMING_KEYS = ("build_seconds", "first_step_seconds", "step_seconds", "overhead_seconds")


def train_defaults() -> dict:
    """The train recipe's defaults for the knobs a space may leave out (optimizer, learning_rate, ...).

    Example:
        >>> train_defaults()["optimizer"]
        'adam'
    """
    from cnnkit.recipes.train import train

    names = ("optimizer", "learning_rate", "momentum", "weight_decay", "label_smoothing", "batch_size", "augment",
             "preprocess")
    parameters = inspect.signature(train).parameters
    return {name: parameters[name].default for name in names}


def finetune_defaults() -> dict:
    """The finetune recipe's defaults and ``FINETUNE_DEFAULTS`` for the knobs a fine-tuning space may leave out.

    Example:
        >>> finetune_defaults()["learning_rate"], finetune_defaults()["unfreeze_depth"]
        (0.001, 1)
    """
    from cnnkit.recipes.finetune import finetune
    from cnnkit.tuner.space import FINETUNE_DEFAULTS

    parameters = inspect.signature(finetune).parameters
    names = ("optimizer", "learning_rate", "weight_decay", "label_smoothing", "batch_size", "augment")
    return {**{name: parameters[name].default for name in names}, **FINETUNE_DEFAULTS}


@dataclasses.dataclass
class TrialRecord:
    """One trial of a search.

    Attributes:
        trial_id: Keras Tuner's id (``"03"``); the trial's files are in ``keras_tuner/trial_<id>/``.
        status: ``"COMPLETED"``, ``"FAILED"`` (trained and failed: out of memory, NaN loss, an
            error), ``"INVALID"`` (the planner rejected the network; not trained) or
            ``"RUNNING"`` (interrupted; a resumed search runs it again).
        values: the space's hyperparameter values.
        arch: the network's notation string (``None`` in a fine-tuning search).
        score: the objective at the best epoch (mean over executions), ``None`` unless completed.
        epochs: epochs the network had trained for at the end of the trial (hyperband: its budget).
        best_epoch: the epoch (from 1) the score comes from.
        seconds: the trial's wall time (``None`` when not recorded).
        error: why it failed or was rejected, one line; ``None`` otherwise.
        metrics: every logged metric at the best epoch (``loss``, ``val_accuracy``, ...).
        timing: ``build_seconds`` (data inputs, model build, compile), ``first_step_seconds``
            (start of fit to the end of the first training call, with tracing), ``step_seconds``
            (one later training step), ``overhead_seconds`` (build + first call - its steps'
            share of steady time): the first execution's.
        initial_epoch: the epochs the network had already trained when the trial began (a
            Hyperband trial can continue an earlier trial's network); 0 otherwise.

    Example:
        >>> TrialRecord("0", "INVALID", {"k": 9}, "4C9", None, None, None, 0.01, "4C9: too big", {}, {}).status
        'INVALID'
    """

    trial_id: str
    status: str
    values: dict
    arch: str | None
    score: float | None
    epochs: int | None
    best_epoch: int | None
    seconds: float | None
    error: str | None
    metrics: dict
    timing: dict
    initial_epoch: int = 0

    @classmethod
    def from_trial(cls, trial, space, trial_dir, *, epochs) -> TrialRecord:
        """The record of a Keras Tuner ``Trial`` (and the ``cnnkit.json`` in its folder).

        Example:
            >>> TrialRecord.from_trial(tuner.oracle.trials["00"], space, "runs/x/keras_tuner/trial_00", epochs=3)  # doctest: +SKIP
        """
        tuner_values = trial.hyperparameters.values
        values = space.values(tuner_values)
        record_path = Path(trial_dir) / RECORD_FILE
        extra = json.loads(record_path.read_text()) if record_path.is_file() else {}
        initial = int(tuner_values.get("tuner/initial_epoch", 0))
        completed = trial.status == "COMPLETED" and trial.score is not None
        metrics = {name: float(trial.metrics.get_best_value(name)) for name in trial.metrics.metrics} if completed else {}
        return cls(
            trial_id=trial.trial_id,
            status=trial.status,
            values=values,
            arch=space.arch_for(values) if space.arch is not None and set(space.placeholders) <= set(values) else None,
            score=float(trial.score) if completed else None,
            epochs=int(tuner_values.get("tuner/epochs", epochs)),
            best_epoch=initial + int(trial.best_step) + 1 if completed and trial.best_step is not None else None,
            seconds=extra.get("seconds"),
            error=_error_line(trial.message) if trial.status in ("FAILED", "INVALID") else None,
            metrics=metrics,
            timing={key: extra[key] for key in _TIMING_KEYS if key in extra},
            initial_epoch=initial,
        )

    def line(self, objective: str, *, progress: str = "", best=None, placeholders=()) -> str:
        """One progress line: ``trial 03 [4/10]  COMPLETED  val_accuracy 0.9712 (best 0.9750)  epoch 3/3  12.3 s  ...``.

        Args:
            objective: the objective's name.
            progress: shown in brackets after the id (``"4/10"``: trials counted towards max_trials).
            best: the best score so far.
            placeholders: the template's names (their values show in the arch, not again).

        Example:
            >>> TrialRecord("1", "FAILED", {}, "8C3", None, 2, None, 1.5, "out of memory", {}, {}).line("val_accuracy")
            'trial 1  FAILED     1.5 s  8C3  out of memory'
        """
        parts = [f"trial {self.trial_id}" + (f" [{progress}]" if progress else ""), f"{self.status:<9}"]
        if self.score is not None:
            parts.append(f"{objective} {self.score:.4f}" + (f" (best {best:.4f})" if best is not None else ""))
            parts.append(f"epoch {self.best_epoch}/{self.epochs}")
        if self.seconds is not None:
            parts.append(f"{self.seconds:.1f} s")
        if self.arch:
            parts.append(self.arch)
        knobs = {name: value for name, value in self.values.items() if name not in placeholders}
        if knobs:
            parts.append(" ".join(f"{name}={_short(value)}" for name, value in knobs.items()))
        if self.error:
            parts.append(self.error)
        return "  ".join(parts)


class SearchResult:
    """The trials of a search, its best configuration, and the sensitivity of its objective.

    "Best model" vs "retrained": :meth:`best_model` gives the best trial's network with the
    weights of its best epoch (trained on the training split only; its validation score, which
    picked it, is optimistic). :meth:`retrain` trains the same configuration from scratch on
    training + validation and judges it on the test split only.

    Attributes:
        trials: a :class:`TrialRecord` per trial, in the order they started.
        objective: the objective's name; ``direction`` is ``"max"`` or ``"min"``.
        best_trial: the completed trial with the best score, or ``None``.
        best_hyperparameters: its values (``{}`` when there is none): in a fine-tuning search
            the knobs (``unfreeze_depth``, ``lr_multiplier``, ``learning_rate``, ...).
        best_arch: its notation string (``None`` in a fine-tuning search).
        best_backbone: the backbone a fine-tuning search fine-tuned (``None`` otherwise or
            when no trial completed); ``best_recipe()["stages"]`` are the best trial's stages.
        best_score: its score.
        sensitivity: a :class:`cnnkit.tuner.Sensitivity` over the completed trials (for
            hyperband, those trained for the epoch budget most trials reached).
        directory: the search directory.
        settings: the search's settings as written to ``search.yaml``.
        files: name -> path of what :meth:`write` wrote.

    Example:
        >>> result.best_arch, round(result.best_score, 4)  # doctest: +SKIP
        ('32C5-MP2-64C3-MP2-FC256-D0.25', 0.9876)
    """

    def __init__(self, *, trials, space, settings, directory, data, data_argument, tuner=None, trust=False):
        self.trials = list(trials)
        self.space = space
        self.settings = dict(settings)
        self.objective = settings["objective"]
        self.direction = settings["direction"]
        self.directory = Path(directory)
        self.files = {}
        self._data = data
        self._data_argument = data_argument
        self._tuner = tuner
        self._trust = trust
        completed = [trial for trial in self.trials if trial.status == "COMPLETED" and trial.score is not None]
        better = max if self.direction == "max" else min
        self.best_trial = better(completed, key=lambda trial: trial.score) if completed else None
        self.best_hyperparameters = dict(self.best_trial.values) if self.best_trial else {}
        self.best_arch = self.best_trial.arch if self.best_trial else None
        self.best_backbone = space.backbone if self.best_trial else None
        self.best_score = self.best_trial.score if self.best_trial else None
        self.sensitivity = self._sensitivity(completed)

    def _sensitivity(self, completed):
        budgets = {}
        for trial in completed:
            budgets.setdefault(trial.epochs, []).append(trial)
        note = ""
        if len(budgets) > 1:
            epochs = max(budgets, key=lambda budget: (len(budgets[budget]), budget))
            note = (f"trials trained for {epochs} epochs only ({len(budgets[epochs])} of {len(completed)}): "
                    "scores after other epoch budgets are not comparable")
            completed = budgets[epochs]
        return sensitivity([(trial.values, trial.score) for trial in completed], objective=self.objective,
                           direction=self.direction, note=note)

    # -- the best configuration

    def best_model(self):
        """The best trial's network with the weights of its best epoch (see the class docstring).

        Returns:
            A ``keras.Model`` taking raw pixels, compiled as in the search.

        Raises:
            ValueError: no trial completed, or the result was not made by a search in this process.

        Example:
            >>> model = result.best_model()  # doctest: +SKIP
            >>> model.evaluate(test_images, test_labels)  # doctest: +SKIP
        """
        if self.best_trial is None:
            raise ValueError(f"no trial of the search in {self.directory} completed, so there is no best model")
        if self._tuner is None:
            raise ValueError("best_model needs the tuner of a search run in this process; run cnnkit.tuner.search "
                             f"again with directory={str(self.directory)!r} (it resumes and returns at once)")
        return self._tuner.load_model(self._tuner.oracle.trials[self.best_trial.trial_id])

    def best_recipe(self) -> dict:
        """The best configuration as the keyword arguments of its recipe (with ``recipe: train`` or ``finetune``).

        A search over an ``arch`` template gives ``train`` arguments; a fine-tuning search gives
        ``finetune`` arguments whose ``stages`` are the best trial's, for its number of epochs
        (:meth:`cnnkit.tuner.SearchSpace.stages_for`).
        ``data`` is the search's data argument when it was a name or a ``from_folder`` mapping
        (its paths as strings), else ``None`` (set it when running the file:
        ``cnnkit run best_recipe.yaml data=...``).

        Raises:
            ValueError: no trial completed.

        Example:
            >>> result.best_recipe()["arch"]  # doctest: +SKIP
            '32C5-MP2-64C3-MP2-FC256-D0.25'
        """
        best = self.best_trial
        if best is None:
            raise ValueError(f"no trial of the search in {self.directory} completed, so there is no best configuration")
        data = _path_text(self._data_argument) if isinstance(self._data_argument, (str, dict)) else None
        if self.space.kind == "finetune":
            return self._finetune_recipe(best, data)
        values = {**train_defaults(), **best.values}
        recipe = {"recipe": "train", "arch": best.arch, "data": data}
        options = self.space.model_options(best.values)
        if options:
            recipe["model_options"] = options
        for name in ("augment", "preprocess"):
            if name in best.values:
                recipe[name] = None if best.values[name] == "none" and name == "augment" else best.values[name]
        recipe.update(optimizer=values["optimizer"], learning_rate=values["learning_rate"])
        for name in ("momentum", "weight_decay", "label_smoothing"):
            if name in best.values:
                recipe[name] = best.values[name]
        recipe.update(schedule="constant", epochs=best.epochs, batch_size=values["batch_size"],
                      precision=self.settings["precision"], steps_per_execution=self.settings["steps_per_execution"],
                      seed=self.settings["seed"])
        return recipe

    def _finetune_recipe(self, best, data) -> dict:
        from cnnkit.recipes.finetune import finetune, is_saved_model

        values = {**finetune_defaults(), **best.values}
        defaults = inspect.signature(finetune).parameters
        recipe = {"recipe": "finetune", "backbone": self.space.backbone}
        if not is_saved_model(self.space.backbone):
            recipe["weights"] = self.space.weights
        if self.space.input_size is not None:
            recipe["input_size"] = list(self.space.input_size)
        if self._trust:
            recipe["trust"] = True
        recipe["data"] = data
        recipe["stages"] = self.space.stages_for(values, self.settings["groups"], best.epochs)
        recipe.update(batch_norm=defaults["batch_norm"].default, head_dropout=defaults["head_dropout"].default)
        if "augment" in best.values:
            recipe["augment"] = None if best.values["augment"] == "none" else best.values["augment"]
        recipe.update(optimizer=values["optimizer"], learning_rate=values["learning_rate"])
        for name in ("weight_decay", "label_smoothing"):
            if name in best.values:
                recipe[name] = best.values[name]
        recipe.update(batch_size=values["batch_size"], precision=self.settings["precision"],
                      steps_per_execution=self.settings["steps_per_execution"], seed=self.settings["seed"])
        return recipe

    def recipe_text(self, path=None) -> str:
        """``best_recipe()`` as a recipe file: a header with the score and the command, then the keys.

        Example:
            >>> print(result.recipe_text("runs/tune-mnist/best_recipe.yaml"))  # doctest: +SKIP
        """
        recipe = self.best_recipe()
        best = self.best_trial
        path = path or self.directory / RECIPE_FILE
        trade_offs = (f"trains on the training split and validates as the search did, so {self._score_note(recipe)}; "
                      "SearchResult.retrain() trains the same configuration on training + validation and reports the "
                      "test split only.")
        lines = [
            f"# Best configuration of search {self.space.name!r} ({self.settings['algorithm']}, trial {best.trial_id}): "
            f"{self.objective} {best.score:.4f} at epoch {best.best_epoch} of {best.epochs}.",
            f"# Run:        cnnkit run {shlex.quote(str(path))}",
            *(line.replace("\xa0", " ") for line in textwrap.wrap(
                trade_offs, 100, initial_indent="# Trade-offs: ", subsequent_indent="#" + " " * 13)),
        ]
        if recipe["data"] is None:
            lines.append(f"# Data:       the search ran on in-memory data ({self._data.source}); "
                         "give it when running: data=NAME or data.path=FOLDER")
        body = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)
        return "\n".join(lines) + "\n" + body

    def _score_note(self, recipe) -> str:
        """Where the recipe's run records the search's objective, and how it compares with the score."""
        if self.objective == "val_accuracy":
            return ("its best_val_accuracy in metrics.json (the highest val_accuracy in history.csv) should match the "
                    "search's val_accuracy within noise")
        if self.objective == "val_balanced_accuracy":
            return ("its validation balanced accuracy should match the search's val_balanced_accuracy within noise; "
                    "a run does not log it per epoch: cnnkit.load(RUN_DIR).evaluate(data,\xa0split=\"val\")"
                    "[\"balanced_accuracy\"] gives its last epoch's")  # a no-break space: the code on one line
        note = "the lowest val_loss in its history.csv should match the search's val_loss (plain cross-entropy) within noise"
        added = [name for name, value in (("label_smoothing", recipe.get("label_smoothing")),
                                          ("the l2 penalty", recipe.get("model_options", {}).get("l2"))) if value]
        if added:
            note += f", but that val_loss includes {' and '.join(added)} (the search's score does not), so the two differ"
        return note

    def retrain(self, *, run_dir=None, verbose: int = 1):
        """Train the best configuration from scratch on training + validation; evaluate on the test split.

        A fine-tuning search's best configuration is fine-tuned again from the backbone with
        ``cnnkit.recipes.finetune`` and the best trial's stages.

        Args:
            run_dir: the run directory (default ``runs/<arch>-<timestamp>``, or
                ``runs/finetune-<backbone>-<key>``).
            verbose: as ``cnnkit.recipes.train``.

        Returns:
            The ``cnnkit.Run``; its metrics hold ``test_accuracy`` etc. when the data has a test
            split, and no validation numbers (validation images were trained on).

        Example:
            >>> run = result.retrain(run_dir="runs/best-retrained")  # doctest: +SKIP
            >>> run.metrics["test_accuracy"]  # doctest: +SKIP
            0.991
        """
        from cnnkit.data import from_arrays
        from cnnkit.recipes.finetune import finetune
        from cnnkit.recipes.train import train

        kwargs = self.best_recipe()
        recipe = finetune if kwargs.pop("recipe") == "finetune" else train
        data = self._data
        images, labels = zip(data.arrays("train"), data.arrays("val"))
        test = data.arrays("test") if data.test is not None else (None, None)
        kwargs["data"] = from_arrays(np.concatenate(images), np.concatenate(labels), x_test=test[0], y_test=test[1],
                                     val_split=0, class_names=list(data.class_names))
        return recipe(**kwargs, run_dir=run_dir, verbose=verbose)

    # -- tables and files

    def table(self) -> str:
        """The trials as a text table, best first, then failed and invalid ones; the best is starred.

        Example:
            >>> print(result.table())  # doctest: +SKIP
        """
        order = {"COMPLETED": 0, "FAILED": 1, "RUNNING": 2, "INVALID": 3}
        sign = -1 if self.direction == "max" else 1
        trials = sorted(self.trials, key=lambda trial: (order.get(trial.status, 4),
                                                        sign * trial.score if trial.score is not None else 0.0))
        knobs = [name for name in self.space.hyperparameters if name not in self.space.placeholders]
        arch = ["arch"] if self.space.kind == "train" else []
        header = ["", "trial", "status", self.objective, "epoch", "seconds", *arch, *knobs, "note"]
        rows = []
        for trial in trials:
            star = "*" if trial is self.best_trial else ""
            rows.append([star, trial.trial_id, trial.status, "" if trial.score is None else f"{trial.score:.4f}",
                         "" if trial.best_epoch is None else f"{trial.best_epoch}/{trial.epochs}",
                         "" if trial.seconds is None else f"{trial.seconds:.1f}", *([trial.arch or ""] if arch else []),
                         *(_short(trial.values.get(name, "")) for name in knobs), trial.error or ""])
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i])
                  for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        counts = {status: sum(trial.status == status for trial in self.trials) for status in order}
        summary = ", ".join(f"{count} {status.lower()}" for status, count in counts.items() if count)
        lines.append(f"{len(self.trials)} trials ({summary or 'none'}); search directory {self.directory}")
        if self.best_trial is not None:
            lines.append(f"best: trial {self.best_trial.trial_id}, {self.objective} {self.best_score:.4f}, "
                         f"{self._best_label()} (best_model(): its weights, trained on the training split; "
                         "retrain(): trained again on training + validation)")
        return "\n".join(lines)

    def trials_csv(self) -> str:
        """One row per trial: id, status, score, epochs, timings, arch, hyperparameters, metrics, error.

        Example:
            >>> result.trials_csv().splitlines()[0]  # doctest: +SKIP
            'trial_id,status,score,best_epoch,epochs,seconds,build_seconds,...'
        """
        names = list(self.space.hyperparameters)
        metrics = sorted({name for trial in self.trials for name in trial.metrics})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["trial_id", "status", "score", "best_epoch", "initial_epoch", "epochs", "seconds", *_TIMING_KEYS, "arch",
                         *names, *metrics, "error"])
        for trial in self.trials:
            writer.writerow([trial.trial_id, trial.status, _cell(trial.score), _cell(trial.best_epoch),
                             _cell(trial.initial_epoch), _cell(trial.epochs), _cell(trial.seconds), *(_cell(trial.timing.get(key)) for key in _TIMING_KEYS),
                             trial.arch or "", *(_cell(trial.values.get(name)) for name in names),
                             *(_cell(trial.metrics.get(name)) for name in metrics), trial.error or ""])
        return out.getvalue()

    def write(self) -> dict:
        """Write trials.csv, sensitivity.csv and .png, (when a trial completed) best_recipe.yaml, and report.html.

        Returns:
            name -> path of each file written (also kept in ``files``).

        Example:
            >>> sorted(result.write())  # doctest: +SKIP
            ['best_recipe', 'report', 'sensitivity_csv', 'sensitivity_png', 'trials']
        """
        files = {"trials": atomic_write_text(self.directory / TRIALS_FILE, self.trials_csv())}
        files["sensitivity_csv"] = atomic_write_text(self.directory / SENSITIVITY_CSV, self.sensitivity.to_csv())
        files["sensitivity_png"] = self.sensitivity.plot(self.directory / SENSITIVITY_PNG)
        if self.best_trial is not None:
            files["best_recipe"] = atomic_write_text(self.directory / RECIPE_FILE, self.recipe_text())
        report = write_search_report(self.directory)  # a failure warns: the search's own files come first
        if report is not None:
            files["report"] = report
        self.files = files
        return files

    def _best_label(self) -> str:
        """The best arch, or the backbone with the best trial's fine-tuning knobs."""
        if self.space.kind == "train":
            return self.best_arch
        knobs = " ".join(f"{name}={_short(value)}" for name, value in self.best_hyperparameters.items())
        return f"{self.best_backbone} {knobs}".strip()

    def __repr__(self):
        best = f"{self.objective}={self.best_score:.4f} {self._best_label()}" if self.best_trial else "no completed trial"
        return f"SearchResult({len(self.trials)} trials, best: {best}, directory={str(self.directory)!r})"


def _error_line(message) -> str:
    """The reason in a Keras Tuner trial message: the planner's text, or a traceback's last line."""
    if not message:
        return "no error message recorded"
    if message.startswith(INVALID_PREFIX):
        return message[len(INVALID_PREFIX):]
    last = [line.strip() for line in message.strip().splitlines() if line.strip()][-1]
    name, separator, text = last.partition(": ")
    short = name.rsplit(".", 1)[-1]
    if not separator or " " in name:
        return last
    return text if short == "FailedTrialError" else f"{short}: {text}"


def _path_text(value):
    """``value`` with every path (``pathlib.Path``, ...) in it, however nested, as a string (YAML holds no paths)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {key: _path_text(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_path_text(item) for item in value]
    return value


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


__all__ = ["INVALID_PREFIX", "RECORD_FILE", "SearchResult", "TrialRecord", "finetune_defaults", "train_defaults"]
