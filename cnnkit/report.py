"""Plots and the model card of a run.

Figures are drawn with ``matplotlib.figure.Figure`` on an Agg canvas: pyplot and its global
backend state are never touched, so this is safe to call from scripts, notebooks and threads
that use pyplot themselves. Every file is rendered to memory and written atomically
(``cnnkit.runs.atomic_write_bytes``). matplotlib is imported only when a plot is drawn.

Example:
    >>> from cnnkit import report
    >>> report.plot_training_curves({"loss": [0.9, 0.5], "val_loss": [1.0, 0.7]},
    ...                             "runs/demo/training_curves.png")  # doctest: +SKIP
    PosixPath('runs/demo/training_curves.png')
"""

from __future__ import annotations

import io
import numbers
import platform
from pathlib import Path

import numpy as np
import yaml

from cnnkit.runs import _plain, atomic_write_bytes

__all__ = ["has_curves", "model_card", "plot_confusion_matrix", "plot_training_curves"]

_LOSS_KEYS = ("loss", "val_loss")
_ACCURACY_NAMES = ("accuracy", "sparse_categorical_accuracy", "categorical_accuracy", "acc")
_LR_KEYS = ("learning_rate", "lr")
MAX_ANNOTATED_CLASSES = 20
_MAX_LABELLED_CLASSES = 60


# --------------------------------------------------------------------------- helpers


def _filled(history: dict, key) -> bool:
    """Whether ``history[key]`` holds values: a non-empty list or numpy array (``None`` or missing: no)."""
    return history.get(key) is not None and np.size(history[key]) > 0


def _accuracy_keys(history: dict) -> tuple[str | None, str | None]:
    for name in _ACCURACY_NAMES:
        train, val = (key if _filled(history, key) else None for key in (name, "val_" + name))
        if train or val:
            return train, val
    return None, None


def has_curves(history: dict) -> bool:
    """Whether ``history`` holds anything :func:`plot_training_curves` can draw.

    Example:
        >>> has_curves({"loss": [1.0]}), has_curves({})
        (True, False)
    """
    if not isinstance(history, dict):
        return False
    keys = (*_LOSS_KEYS, *_LR_KEYS, *_ACCURACY_NAMES, *("val_" + n for n in _ACCURACY_NAMES))
    return any(_filled(history, key) for key in keys)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, path) -> Path:
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    supported = figure.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"Cannot save a figure as {fmt!r}; use one of {sorted(supported)}. Received: path={str(path)!r}"
        )
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt)
    return atomic_write_bytes(path, buffer.getvalue())


def _series(history: dict, key: str) -> np.ndarray:
    values = np.asarray(history[key], dtype=np.float64).reshape(-1)
    return values


def _plot_pair(ax, history, train_key, val_key, title):
    for key, label, style in ((train_key, "train", "-"), (val_key, "val", "--")):
        if not _filled(history, key):
            continue
        values = _series(history, key)
        epochs = np.arange(1, len(values) + 1)
        ax.plot(epochs, values, style, marker="o" if len(values) <= 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    ax.legend()


# --------------------------------------------------------------------------- plots


def plot_training_curves(history: dict, path) -> Path:
    """Plot loss and accuracy per epoch (train vs. validation) and write a PNG.

    Panels: loss (``loss``/``val_loss``), accuracy (``accuracy``/``val_accuracy``, or
    ``sparse_categorical_accuracy``/...) and, when ``learning_rate`` (or ``lr``) is in the
    history, the learning rate on a log scale. Panels with no data are left out. The x axis is
    the epoch number, starting at 1.

    Args:
        history: ``{"loss": [...], "val_loss": [...], ...}``, lists or numpy arrays (e.g.
            ``keras.callbacks.History.history``).
        path: Output file; the format comes from the suffix (``.png`` normally).

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``history`` has none of the keys above.

    Example:
        >>> plot_training_curves({"loss": [0.9, 0.5], "accuracy": [0.6, 0.8]},
        ...                      "curves.png")  # doctest: +SKIP
        PosixPath('curves.png')
    """
    if hasattr(history, "history") and isinstance(history.history, dict):
        history = history.history
    if not has_curves(history):
        raise ValueError(
            "`history` has nothing to plot: expected a dict with 'loss', 'val_loss', 'accuracy', "
            f"'val_accuracy' or 'learning_rate'. Received: history keys={sorted(history) if isinstance(history, dict) else type(history).__name__}"
        )
    panels = []
    if any(_filled(history, k) for k in _LOSS_KEYS):
        panels.append(("loss", "loss", "val_loss"))
    train_acc, val_acc = _accuracy_keys(history)
    if train_acc or val_acc:
        panels.append(("accuracy", train_acc, val_acc))
    lr_key = next((k for k in _LR_KEYS if _filled(history, k)), None)
    if lr_key:
        panels.append(("learning rate", lr_key, None))

    figure = _new_figure(4.2 * len(panels), 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, train_key, val_key) in zip(axes, panels):
        if title == "learning rate":
            values = _series(history, train_key)
            ax.plot(np.arange(1, len(values) + 1), values, marker="o" if len(values) <= 30 else None, markersize=3)
            if np.all(values > 0):
                ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        else:
            _plot_pair(ax, history, train_key, val_key, title)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save_figure(figure, path)


def plot_confusion_matrix(matrix, class_names, path, *, normalize: bool = True) -> Path:
    """Draw a confusion matrix (rows = true class, columns = predicted) and write a PNG.

    With ``normalize=True`` each row is divided by its total, so the diagonal is the recall of
    each class (rows with no examples stay 0). Cells are annotated with their value when there
    are at most 20 classes; tick labels are dropped above 60 classes. Class names are drawn as
    written: a ``$`` in a name is a dollar sign, not matplotlib mathtext; a character that is not text (a
    surrogate escape, which an undecodable byte of a folder name gives: ``"caf\\udce9"``) is drawn as its escape.

    Args:
        matrix: Square ``(K, K)`` array-like of non-negative counts.
        class_names: ``K`` names.
        path: Output file; the format comes from the suffix (``.png`` normally).
        normalize: Show row fractions instead of counts.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: If the matrix is not square, has negative entries, or does not match
            ``class_names``.

    Example:
        >>> plot_confusion_matrix([[5, 1], [2, 7]], ["cat", "dog"], "cm.png")  # doctest: +SKIP
        PosixPath('cm.png')
    """
    try:
        counts = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`matrix` must be a square numeric array. Received: matrix={matrix!r}") from err
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"`matrix` must be square (K, K) with K >= 1. Received: matrix.shape={counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("`matrix` must hold finite, non-negative counts. Received: negative or non-finite entries")
    if isinstance(class_names, str):
        raise ValueError(f"`class_names` must be a list of names. Received: class_names={class_names!r}")
    names = [str(n) for n in class_names]
    if len(names) != counts.shape[0]:
        raise ValueError(
            "`class_names` must have one name per row of `matrix`. "
            f"Received: len(class_names)={len(names)}, matrix.shape={counts.shape}"
        )
    # matplotlib refuses text with surrogates: drawn as their escapes, in the labels only
    names = [name.encode("utf-8", "backslashreplace").decode("utf-8") for name in names]
    k = counts.shape[0]
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        vmax = 1.0
    else:
        values = counts
        vmax = max(float(counts.max()), 1.0)

    side = min(max(4.0, 0.45 * k + 2.5), 24.0)
    figure = _new_figure(side + 1.0, side)
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    if k <= _MAX_LABELLED_CLASSES:
        ax.set_xticks(np.arange(k))
        ax.set_yticks(np.arange(k))
        # parse_math=False: a name is drawn as written, "$" and all, never as mathtext.
        ax.set_xticklabels(
            names,
            rotation=45 if k > 5 or max(map(len, names)) > 6 else 0,
            ha="right" if k > 5 else "center",
            parse_math=False,
        )
        ax.set_yticklabels(names, parse_math=False)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if k <= MAX_ANNOTATED_CLASSES:
        fontsize = 9 if k <= 10 else 7
        for i in range(k):
            for j in range(k):
                value = values[i, j]
                text = f"{value:.2f}" if normalize else f"{round(value)}"
                colour = "white" if value > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    return _save_figure(figure, path)


# --------------------------------------------------------------------------- model card

_ARCH_KEYS = ("arch", "architecture", "arch_or_model", "backbone", "model", "spec", "members")
_DATA_KEYS = ("data", "dataset", "data_source", "source")
_FINGERPRINT_KEYS = ("data_fingerprint", "fingerprint")
_HYPER_KEYS = (
    "epochs",
    "batch_size",
    "optimizer",
    "learning_rate",
    "lr",
    "weight_decay",
    "momentum",
    "schedule",
    "lr_schedule",
    "label_smoothing",
    "dropout",
    "augment",
    "augmentation",
    "preprocess",
    "preprocessing",
    "resample",
    "imbalance",
    "class_weight",
    "freeze_epochs",
    "stages",
    "unfreeze",
    "base_lr",
    "lr_mult",
    "early_stopping",
    "patience",
    "image_size",
    "input_shape",
    "val_split",
    "seed",
)


def _md(value) -> str:
    """Render a value for a Markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _first(config: dict, keys):
    for key in keys:
        if config.get(key) not in (None, "", [], {}):
            return key, config[key]
    return None, None


def package_versions() -> dict:
    """Versions of Python, cnnkit, Keras, TensorFlow and NumPy, for config.yaml and model cards."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("cnnkit", "keras", "tensorflow", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package == "cnnkit":
                import cnnkit

                versions[package] = getattr(cnnkit, "__version__", "unknown")
    return versions


def _metric_label(key: str) -> str:
    pretty = {"balanced_accuracy": "Balanced accuracy", "num_examples": "Examples evaluated"}
    if key in pretty:
        return pretty[key]
    return key.replace("_", " ").capitalize()


def _metric_value(key: str, value) -> str:
    if isinstance(value, bool) or not _is_number(value):
        return _md(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if key.endswith(("accuracy", "_error", "error")) and 0.0 <= value <= 1.0:
        return f"{value:.4f} ({100 * value:.2f}%)"
    return f"{value:.4f}"


def _headline_order(metrics: dict) -> list[str]:
    scalar = [k for k, v in metrics.items() if _is_number(v)]
    first = [
        k for k in ("test_accuracy", "test_error", "balanced_accuracy", "test_loss", "num_examples") if k in scalar
    ]
    return first + [k for k in scalar if k not in first]


def model_card(*, name, config: dict, metrics: dict, class_names, summary: str, run_dir=None, history=None) -> str:
    """The Markdown model card (``README.md``) of a run directory.

    Sections: what was trained (architecture, data source and fingerprint, key
    hyperparameters, classes), results (test accuracy / error / balanced accuracy / loss and
    any other scalar metrics, a per-class precision/recall/F1/support table, plot links), how
    to load it with ``cnnkit.load``, the model summary, package versions (``config["versions"]``
    when recorded, else the running ones) and the full config.

    Args:
        name: Title of the card (normally the run name).
        config: The run's plain-data config.
        metrics: The run's metrics (``cnnkit.evaluate.classification_metrics`` output and more).
        class_names: Class names in output order.
        summary: Text of ``model.summary()``.
        run_dir: Path shown in the loading example (defaults to ``runs/<name>``).
        history: When given and plottable, the card links ``training_curves.png``.

    Returns:
        The Markdown text.

    Example:
        >>> card = model_card(name="demo", config={"arch": "lenet5", "epochs": 2},
        ...                   metrics={"test_accuracy": 0.9, "test_error": 0.1},
        ...                   class_names=["a", "b"], summary="")
        >>> "0.9000 (90.00%)" in card and 'cnnkit.load("runs/demo")' in card
        True
    """
    config = _plain(dict(config or {}))
    metrics = _plain(dict(metrics or {}))
    names = [str(n) for n in class_names]
    load_path = str(run_dir) if run_dir is not None else f"runs/{name}"
    lines = [f"# {name}", ""]

    # -- what was trained
    lines += ["A convolutional image classifier trained with cnnkit.", ""]
    lines += ["## What was trained", "", "| | |", "|---|---|"]
    shown = set()
    key, arch = _first(config, _ARCH_KEYS)
    if key is None and isinstance(config.get("arguments"), dict):
        key, arch = _first(config["arguments"], _ARCH_KEYS)
    if key:
        lines.append(f"| Architecture | `{_md(arch)}` |")
        shown.add(key)
    if config.get("recipe"):
        lines.append(f"| Recipe | `{_md(config['recipe'])}` |")
        shown.add("recipe")
    key, data = _first(config, _DATA_KEYS)
    fingerprint = None
    if key:
        shown.add(key)
        if isinstance(data, dict):
            source = data.get("name") or data.get("source") or data.get("path") or data
            fingerprint = data.get("fingerprint")
            lines.append(f"| Data | {_md(source)} |")
        else:
            lines.append(f"| Data | {_md(data)} |")
    fkey, fvalue = _first(config, _FINGERPRINT_KEYS)
    if fkey:
        fingerprint = fvalue
        shown.add(fkey)
    if fingerprint is not None:
        lines.append(f"| Data fingerprint | `{_md(fingerprint)}` |")
    preview = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    lines.append(f"| Classes | {len(names)}: {_md(preview)} |")
    lines.append("")

    # Recipes record their call under config["arguments"]; top-level keys win.
    arguments = config.get("arguments") if isinstance(config.get("arguments"), dict) else {}
    merged = {**arguments, **config}
    if isinstance(merged.get("stages"), list):  # staged fine-tuning: each stage has its epochs and rate
        shown |= {"epochs", "learning_rate"}
    hyper = [(k, merged[k]) for k in _HYPER_KEYS if k in merged and k not in shown]
    if hyper:
        lines += ["Key hyperparameters:", "", "| Parameter | Value |", "|---|---|"]
        lines += [f"| `{k}` | {_md(v)} |" for k, v in hyper]
        lines.append("")

    # -- results
    lines += ["## Results", ""]
    order = _headline_order(metrics)
    if order:
        lines += ["| Metric | Value |", "|---|---|"]
        lines += [f"| {_metric_label(k)} | {_metric_value(k, metrics[k])} |" for k in order]
        lines += [
            "",
            ("Error is `1 - accuracy`. Balanced accuracy is the mean recall over the classes present in the test set."),
            "",
        ]
    else:
        lines += ["No evaluation metrics were recorded for this run.", ""]
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class:
        lines += ["### Per class", "", "| Class | Precision | Recall | F1 | Support |", "|---|---:|---:|---:|---:|"]
        for cls, row in per_class.items():
            row = row or {}
            cells = [f"{row[m]:.4f}" if _is_number(row.get(m)) else "-" for m in ("precision", "recall", "f1")]
            support = row.get("support", "-")
            lines.append(f"| {_md(cls)} | {' | '.join(cells)} | {support} |")
        lines += ["", "A class that is never predicted has precision 0.", ""]
    if history is not None and has_curves(history):
        lines += ["![Training curves](training_curves.png)", ""]
    if metrics.get("confusion_matrix") is not None:
        lines += ["![Confusion matrix](confusion_matrix.png)", ""]

    # -- how to load
    lines += [
        "## How to use",
        "",
        "```python",
        "import cnnkit",
        "",
        f'run = cnnkit.load("{load_path}")  # this directory; safe by default (trust=True loads Lambda layers)',
        "probabilities = run.predict(images)    # raw pixels 0-255, one image or a batch",
        "labels = run.predict_classes(images)   # class names",
        "```",
        "",
        (
            'The Keras model alone: `keras.saving.load_model("model.keras")` (import '
            "`cnnkit.models.layers` first if the model uses cnnkit's custom layers)."
        ),
        "",
    ]

    # -- summary
    if summary and summary.strip():
        lines += ["## Model", "", "```text", summary.rstrip(), "```", ""]

    # -- versions
    versions = config.get("versions") if isinstance(config.get("versions"), dict) else None
    source = "recorded at training time" if versions else "of the environment that wrote this card"
    versions = versions or package_versions()
    lines += ["## Versions", "", f"Package versions {source}:", "", "| Package | Version |", "|---|---|"]
    lines += [f"| {_md(k)} | {_md(v)} |" for k, v in versions.items()]
    lines.append("")

    # -- full config
    if config:
        dumped = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip()
        lines += [
            "## Configuration",
            "",
            "<details><summary>config.yaml</summary>",
            "",
            "```yaml",
            dumped,
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)
