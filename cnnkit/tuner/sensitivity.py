"""How a search's objective moves with each hyperparameter: marginal means, spread and importance.

For every hyperparameter that took more than one value among the completed trials, the trials
are grouped by its value (numeric ones with many distinct values into quantile bins) and each
group's mean, standard deviation, minimum and maximum of the objective are listed. The
importance of a hyperparameter is the share of the objective's variance its groups explain on
their own, beyond what chance differences between that many groups explain: epsilon squared,
``(SS_between - (k - 1) * SS_within / (n - k)) / SS_total`` for ``k`` groups of ``n`` trials,
clipped at 0. It ranks hyperparameters without assuming a linear effect, and unlike the plain
share (eta squared) it does not call a hyperparameter decisive just because every trial had a
value of its own; when every value was tried once it is ``None`` (n/a). With few trials it is a
rough guide: hyperparameters vary together, so shares can overlap.

Example:
    >>> trials = [({"k": 3, "lr": 0.01}, 0.97), ({"k": 5, "lr": 0.01}, 0.95), ({"k": 3, "lr": 0.1}, 0.96),
    ...           ({"k": 5, "lr": 0.1}, 0.94)]
    >>> result = sensitivity(trials, objective="val_accuracy")
    >>> [(name, round(share, 2)) for name, share in result.importance]
    [('k', 0.7), ('lr', 0.0)]
    >>> result.plot("runs/demo/sensitivity.png")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

import numpy as np

from cnnkit.report import _new_figure, _save_figure

DEFAULT_BINS = 4


@dataclasses.dataclass
class Sensitivity:
    """Marginal statistics of the objective per hyperparameter value, and an importance ranking.

    Attributes:
        objective: the objective's name (``"val_accuracy"``, ...).
        direction: ``"max"`` or ``"min"``: which way is better.
        rows: one dict per (hyperparameter, value or bin): ``hyperparameter``, ``value`` (a label),
            ``count``, ``mean``, ``std`` (sample standard deviation; ``None`` for one trial),
            ``min``, ``max``.
        importance: ``(name, share)`` pairs, highest first; ``share`` is epsilon squared in
            [0, 1], or ``None`` (last) when each value of the hyperparameter was tried once.
        trials: how many trials the statistics rest on.
        note: which trials were used, when not all of them (a hyperband budget, say).
        points: name -> ``[(value label, score), ...]``, one pair per trial, for the plot.

    Example:
        >>> print(sensitivity([({"k": 3}, 0.9), ({"k": 5}, 0.8)], objective="val_accuracy").table())  # doctest: +SKIP
    """

    objective: str
    direction: str
    rows: list
    importance: list
    trials: int
    note: str = ""
    points: dict = dataclasses.field(default_factory=dict)

    def table(self) -> str:
        """The statistics as a text table, importance first.

        Example:
            >>> print(result.table())  # doctest: +SKIP
            Sensitivity of val_accuracy (higher is better) over 4 completed trials
            importance (share of the variance explained by the hyperparameter alone): k 0.70, lr 0.00
            ...
        """
        better = "higher" if self.direction == "max" else "lower"
        lines = [f"Sensitivity of {self.objective} ({better} is better) over {self.trials} completed trials"]
        if self.note:
            lines.append(self.note)
        if not self.rows:
            lines.append("(no hyperparameter took two values in two or more completed trials: nothing to compare)")
            return "\n".join(lines)
        ranking = ", ".join(f"{name} {_share(share)}" for name, share in self.importance)
        lines.append(f"importance (share of the variance explained by the hyperparameter alone): {ranking}")
        header = ["hyperparameter", "value", "trials", "mean", "std", "min", "max"]
        cells = [[row["hyperparameter"], row["value"], str(row["count"]), _number(row["mean"]), _number(row["std"]),
                  _number(row["min"]), _number(row["max"])] for row in self.rows]
        widths = [max(len(header[i]), *(len(cell[i]) for cell in cells)) for i in range(len(header))]
        lines.append("  ".join(title.ljust(width) for title, width in zip(header, widths)).rstrip())
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(cell_row, widths)).rstrip() for cell_row in cells]
        return "\n".join(lines)

    def to_csv(self) -> str:
        """The rows as CSV text, with each hyperparameter's importance on its rows.

        Example:
            >>> result.to_csv().splitlines()[0]  # doctest: +SKIP
            'hyperparameter,importance,value,count,mean,std,min,max'
        """
        shares = dict(self.importance)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["hyperparameter", "importance", "value", "count", "mean", "std", "min", "max"])
        for row in self.rows:
            share = shares[row["hyperparameter"]]
            writer.writerow([row["hyperparameter"], "" if share is None else repr(share), row["value"], row["count"],
                             *("" if row[key] is None else repr(row[key]) for key in ("mean", "std", "min", "max"))])
        return out.getvalue()

    def plot(self, path) -> Path:
        """Write a PNG: the importance ranking, then one panel per hyperparameter (mean +- std, every trial).

        Example:
            >>> result.plot("runs/tune-mnist/sensitivity.png")  # doctest: +SKIP
            PosixPath('runs/tune-mnist/sensitivity.png')
        """
        names = [name for name, _ in self.importance]
        columns = min(3, len(names) + 1)
        rows = math.ceil((len(names) + 1) / columns)
        figure = _new_figure(4.2 * columns, 3.2 * rows)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        ranking = axes[0]
        if names:
            shares = [share or 0.0 for _, share in self.importance]
            ranking.barh(range(len(names)), shares, color="tab:blue")
            ranking.set_yticks(range(len(names)), [f"{name} ({_share(share)})" for name, share in self.importance])
            ranking.invert_yaxis()
            ranking.set_xlim(0, 1)
            ranking.set_xlabel("share of variance explained")
        else:
            ranking.text(0.5, 0.5, "fewer than two completed trials\nwith differing values", ha="center", va="center")
            ranking.set_axis_off()
        ranking.set_title(f"importance ({self.trials} trials)")
        for axis, name in zip(axes[1:], names):
            levels = [row for row in self.rows if row["hyperparameter"] == name]
            labels = [row["value"] for row in levels]
            index = {label: position for position, label in enumerate(labels)}
            points = self.points.get(name, [])
            axis.scatter([index[label] for label, _ in points], [score for _, score in points], s=12, alpha=0.35,
                         color="gray", label="trials")
            means = [row["mean"] for row in levels]
            spread = [row["std"] or 0.0 for row in levels]
            axis.errorbar(range(len(levels)), means, yerr=spread, fmt="o-", capsize=4, color="tab:orange",
                          label="mean +- std")
            axis.set_xticks(range(len(levels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0)
            axis.set_title(name)
            axis.set_ylabel(self.objective)
            axis.grid(True, alpha=0.3)
        for axis in axes[len(names) + 1:]:
            axis.set_axis_off()
        return _save_figure(figure, path)


def sensitivity(trials, *, objective: str, direction: str = "max", bins: int = DEFAULT_BINS,
                note: str = "") -> Sensitivity:
    """Marginal means, spread and importance of each hyperparameter over completed trials.

    Args:
        trials: ``(values, score)`` pairs: a dict of hyperparameter values and the objective's
            value; pairs with a missing or non-finite score are left out.
        objective: the objective's name, for the table and plot.
        direction: ``"max"`` or ``"min"``.
        bins: numeric hyperparameters with more than ``bins + 1`` distinct values are grouped
            into this many quantile bins.
        note: a line saying which trials these are, shown under the title.

    Returns:
        A :class:`Sensitivity`.

    Raises:
        ValueError: a bad ``direction`` or ``bins``.

    Example:
        >>> sensitivity([({"k": 3}, 0.9), ({"k": 5}, 0.7), ({"k": 5}, 0.8)], objective="acc").rows[1]["mean"]
        0.75
    """
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min'. Received: direction={direction!r}")
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2. Received: bins={bins!r}")
    usable = [(dict(values), float(score)) for values, score in trials
              if score is not None and math.isfinite(float(score))]
    names = []
    for values, _ in usable:
        names += [name for name in values if name not in names]
    rows, importance, points = [], [], {}
    for name in names:
        observed = [(values[name], score) for values, score in usable if name in values]
        if len({_key(value) for value, _ in observed}) < 2 or len(observed) < 2:
            continue
        levels, labels = _levels([value for value, _ in observed], bins)
        scores = np.array([score for _, score in observed])
        groups = [scores[levels == level] for level in range(len(labels))]
        grand = scores.mean()
        total = float(((scores - grand) ** 2).sum())
        between = float(sum(len(group) * (group.mean() - grand) ** 2 for group in groups))
        importance.append((name, _epsilon_squared(between, total, len(scores), len(groups))))
        points[name] = [(labels[level], score) for level, score in zip(levels, scores.tolist())]
        for label, group in zip(labels, groups):
            rows.append({"hyperparameter": name, "value": label, "count": len(group), "mean": float(group.mean()),
                         "std": float(group.std(ddof=1)) if len(group) > 1 else None,
                         "min": float(group.min()), "max": float(group.max())})
    importance.sort(key=lambda pair: (pair[1] is None, -(pair[1] or 0.0)))
    rank = {name: position for position, (name, _) in enumerate(importance)}
    rows.sort(key=lambda row: rank[row["hyperparameter"]])
    return Sensitivity(objective, direction, rows, importance, len(usable), note, points)


def _epsilon_squared(between, total, count, groups):
    """Epsilon squared of a one-way grouping; ``None`` when no group has two trials."""
    if count == groups:
        return None
    if total <= 0:
        return 0.0
    within = (total - between) / (count - groups)
    return min(1.0, max(0.0, (between - (groups - 1) * within) / total))


def _share(share) -> str:
    return "n/a" if share is None else f"{share:.2f}"


def _key(value):
    return (type(value).__name__, value)


def _levels(values, bins):
    """Each value's level (an index array) and the levels' distinct labels, in display order: the distinct
    values, or the quantile bins of numbers that hold some value."""
    numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
    distinct = sorted({_key(value) for value in values}, key=lambda key: (key[1] if numeric else str(key[1]), key[0]))
    if not numeric or len(distinct) <= bins + 1:
        position = {key: level for level, key in enumerate(distinct)}
        return np.array([position[_key(value)] for value in values]), _labels([key[1] for key in distinct], 6)
    array = np.array(values, dtype=float)
    edges = np.unique(np.quantile(array, np.linspace(0, 1, bins + 1)))
    index = np.clip(np.searchsorted(edges, array, side="right") - 1, 0, len(edges) - 2)
    used, levels = np.unique(index, return_inverse=True)
    names = _labels(edges.tolist(), 3)
    return levels, [f"{names[i]}-{names[i + 1]}" for i in used]


def _labels(values, digits) -> list:
    """Labels of distinct values: floats to ``digits`` significant digits, or as many more as tell them apart."""
    numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
    for precision in range(digits, 18):
        labels = [_label(value, precision) for value in values]
        if len(set(map(float, labels) if numeric else labels)) == len(labels):  # "1e+03" reads as 1000
            return labels
    return [repr(value) for value in values]  # 3 and 3.0, or 3 and "3"


def _label(value, digits=6) -> str:
    """A value as shown: whole numbers as integers, other floats to ``digits`` significant digits."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.{digits}g}"
    return str(value)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


__all__ = ["Sensitivity", "sensitivity"]
