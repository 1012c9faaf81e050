"""``report.html``: one self-contained page that shows what a run learned and where it fails.

The page of a run directory holds its metrics and per-class precision/recall/F1, the confusion
matrix, the training curves with a plain-language diagnosis (:func:`diagnose`), the most
confidently wrong test images, the first layer's kernels, the feature maps of one test image
through each convolution, Grad-CAM overlays, the planner's layer table, and for an ensemble how
much its members agree (:func:`member_agreement`). Every image is embedded as a ``data:`` URI,
so the file can be mailed or archived alone; the page has no JavaScript.

Parts that need the test images (mistakes, feature maps, Grad-CAM, metrics of a bare ``.keras``
file) use the data the run was trained on (``config.yaml``: ``arguments.data``, else the dataset
named in ``data.source``) or the ``data`` given; without any, the page still renders the rest
and says what is missing. A part that fails to draw is replaced by a note, never the whole page.

A search directory gets its own page (:func:`write_search_report`): the trials table and the
sensitivity of the objective to each hyperparameter.

Example:
    >>> from cnnkit.html_report import diagnose, write_report
    >>> write_report("runs/mnist")                                        # doctest: +SKIP
    PosixPath('runs/mnist/report.html')
    >>> [f.kind for f in diagnose({"loss": [2.3, 1.0, 0.5], "val_loss": [2.0, 1.1, 0.9]})]
    ['still_improving', 'healthy']
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import datetime
import html
import io
import math
import numbers
import tempfile
import warnings
from pathlib import Path

import numpy as np
import yaml

from cnnkit.runs import MANIFEST_FILE, atomic_write_text, holding_run_dir

__all__ = ["REPORT_FILE", "Finding", "diagnose", "member_agreement", "render_report", "write_report",
           "write_search_report"]

REPORT_FILE = "report.html"
MAX_TEST_BYTES = 256 * 2**20
"""At most this many bytes of test images (uint8) are held to look for mistakes."""

# Diagnosis thresholds (fractions).
RISE = 0.01             # an epoch's training loss "rose" when it is this much above the previous one
SLOW_DROP = 0.25        # "learning rate too low": training loss fell by less than this over the run...
CONFIDENT_ACCURACY = 0.95  # ...unless training accuracy already reached this
OVERFIT_RISE = 0.10     # validation loss this far above its minimum, 2+ epochs after it: over-fitting
GAP = 0.05              # train - validation accuracy above this: a generalisation gap
STILL_FALLING = 0.01    # the last epoch improved the loss by more than this: still improving


# --------------------------------------------------------------------------- diagnosis


@dataclasses.dataclass(frozen=True)
class Finding:
    """One observation about the training curves.

    Attributes:
        kind: "no_history", "diverged", "too_short", "lr_too_high", "lr_too_low", "overfitting",
            "gap", "still_improving" or "healthy".
        severity: "ok", "info", "warning" or "error".
        message: a sentence for the user, with the numbers it rests on and what to do.
    """

    kind: str
    severity: str
    message: str


def _series(history, key):
    """``history[key]`` as a list of floats (a list or a numpy array; missing or ``None``: empty)."""
    values = history.get(key)
    return [] if values is None else [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _train_accuracy_keys(history):
    for name in ("accuracy", "sparse_categorical_accuracy", "categorical_accuracy", "acc"):
        if _series(history, name) or _series(history, "val_" + name):
            return name, "val_" + name
    return None, None


def diagnose(history) -> list[Finding]:
    """Read training curves the way a practitioner would: a pure function of the history dict.

    Rules (``n`` epochs, ``L`` training loss, ``V`` validation loss):

    * ``diverged`` (error): a loss is NaN or infinite: the learning rate is far too high (or the
      data holds bad values). The other rules are skipped.
    * ``too_short`` (info): ``n < 3``; the trend rules (learning rate, over-fitting) need 3 epochs.
    * ``lr_too_high`` (warning): ``L`` ended no lower than it started, or rose (by more than 1%)
      in at least 2 epochs and at least a third of them.
    * ``lr_too_low`` (warning): otherwise, ``L`` fell in every epoch but by less than 25% in all,
      and training accuracy (when recorded) stayed below 95%.
    * ``overfitting`` (warning): ``V`` was lowest 2 or more epochs before the end, ended more than
      10% above that minimum, and ``L`` kept falling meanwhile.
    * ``gap`` (warning above 5 points, else ok): final training minus validation accuracy, from 2 epochs
      (training accuracy is a running mean over the epoch, so one epoch says little).
    * ``still_improving`` (info): the last epoch lowered ``V`` (``L`` without validation) by
      more than 1% to its best value yet: more epochs would probably help.
    * ``healthy`` (ok): 3 or more epochs and no warning or error.

    Args:
        history: ``{"loss": [...], "val_loss": [...], "accuracy": [...], ...}`` per epoch, lists or numpy
            arrays (a ``keras.callbacks.History`` works too).

    Returns:
        A list of :class:`Finding`, in the order above.

    Example:
        >>> [f.kind for f in diagnose({"loss": [1.0, 0.5, 0.3, 0.2, 0.1], "val_loss": [1.0, 0.6, 0.7, 0.8, 0.9]})]
        ['overfitting']
    """
    if hasattr(history, "history") and isinstance(history.history, dict):
        history = history.history
    if not isinstance(history, dict):
        raise ValueError("`history` must be a dict of per-epoch lists. "
                         f"Received: history of type {type(history).__name__}")
    loss, val = _series(history, "loss"), _series(history, "val_loss")
    if not loss and not val:
        return [Finding("no_history", "info", "No training history was recorded (a loaded model or an ensemble): "
                        "nothing to diagnose.")]
    for key, values in (("training loss", loss), ("validation loss", val)):
        bad = [epoch for epoch, value in enumerate(values, start=1) if not math.isfinite(value)]
        if bad:
            return [Finding("diverged", "error", f"The {key} became {values[bad[0] - 1]} at epoch {bad[0]}: training "
                            "diverged. The learning rate is far too high (or the data holds bad values): lower it "
                            "3-10x.")]
    findings = []
    n = len(loss) or len(val)
    if n < 3:
        findings.append(Finding("too_short", "info", f"Only {n} epoch{'s' if n > 1 else ''}: too few to judge "
                                "trends; the learning-rate and over-fitting checks need 3."))
    train_acc_key, val_acc_key = _train_accuracy_keys(history)
    train_acc, val_acc = _series(history, train_acc_key or ""), _series(history, val_acc_key or "")
    if len(loss) >= 3:
        steps = len(loss) - 1
        rises = sum(after > before * (1 + RISE) for before, after in zip(loss, loss[1:]))
        if loss[-1] >= loss[0] or (rises >= 2 and rises >= steps / 3):
            trend = f"rose in {rises} of {steps} epochs" if rises else "did not fall"
            findings.append(Finding("lr_too_high", "warning", f"The training loss {trend} ({loss[0]:.3g} at epoch 1, "
                                    f"{loss[-1]:.3g} at epoch {len(loss)}): the learning rate is probably too high; "
                                    "try it 3-10x lower."))
        else:
            drop = 1 - loss[-1] / loss[0] if loss[0] > 0 else 1.0
            steady = all(after < before for before, after in zip(loss, loss[1:]))
            if steady and drop < SLOW_DROP and (not train_acc or train_acc[-1] < CONFIDENT_ACCURACY):
                findings.append(Finding("lr_too_low", "warning", f"The training loss fell in every epoch but only "
                                        f"{drop:.0%} in all ({loss[0]:.3g} to {loss[-1]:.3g}): the learning rate is "
                                        "probably too low; try it 3-10x higher."))
    if len(val) >= 3 and len(loss) == len(val):
        best = int(np.argmin(val))
        if len(val) - 1 - best >= 2 and val[-1] > val[best] * (1 + OVERFIT_RISE) and loss[-1] < loss[best]:
            rise = f"{val[-1] / val[best] - 1:.0%} higher" if val[best] > 0 else f"above it ({val[-1]:.3g})"
            findings.append(Finding("overfitting", "warning", f"Over-fitting: the validation loss was lowest at epoch "
                                    f"{best + 1} ({val[best]:.3g}) and ended {rise} at epoch {len(val)} while the "
                                    "training loss kept falling. Stop near epoch "
                                    f"{best + 1} (early_stopping), or add augmentation, dropout or weight decay."))
    if len(train_acc) >= 2 and val_acc:
        gap = train_acc[-1] - val_acc[-1]
        if gap > GAP:
            findings.append(Finding("gap", "warning", f"Generalisation gap: training accuracy {train_acc[-1]:.2%} "
                                    f"against validation {val_acc[-1]:.2%} ({100 * gap:.1f} points). More data, "
                                    "augmentation or regularisation narrow it."))
        elif gap >= 0:
            findings.append(Finding("gap", "ok", f"Training and validation accuracy agree ({train_acc[-1]:.2%} and "
                                    f"{val_acc[-1]:.2%}, a gap of {100 * gap:.1f} points)."))
        else:
            findings.append(Finding("gap", "ok", f"Validation accuracy ({val_acc[-1]:.2%}) is above training accuracy "
                                    f"({train_acc[-1]:.2%}): dropout and augmentation act in training only, and "
                                    "training accuracy is averaged over an epoch that started worse; no sign of "
                                    "over-fitting."))
    watched, label = (val, "validation") if val else (loss, "training")
    if len(watched) >= 2 and watched[-1] < watched[-2] * (1 - STILL_FALLING) and watched[-1] <= min(watched):
        findings.append(Finding("still_improving", "info", f"The {label} loss was still falling at the end "
                                f"({1 - watched[-1] / watched[-2]:.0%} lower in the last epoch): more epochs "
                                "would probably help."))
    if n >= 3 and not any(finding.severity in ("warning", "error") for finding in findings):
        findings.append(Finding("healthy", "ok", "No problem found: the losses fell steadily and validation "
                                "followed training."))
    return findings


# --------------------------------------------------------------------------- ensembles


def member_agreement(probabilities, labels, *, combined=None) -> dict:
    """How often ensemble members agree, and whether their disagreements are where the errors are.

    Args:
        probabilities: one ``(N, K)`` array of class probabilities per member, all of one shape.
        labels: the ``N`` true classes: integers (or whole-number floats) in ``[0, K)``.
        combined: the ensemble's own ``(N, K)`` output (a vote or a geometric mean predicts otherwise
            than the mean probability); default the members' mean probability.

    Returns:
        A dict of plain numbers: ``member_accuracy`` (one per member), ``pairwise`` (``M x M``
        fraction of images two members predict the same class for), ``all_agree`` (fraction
        where every member predicts the same class), ``accuracy_when_all_agree`` and
        ``accuracy_when_split`` (of ``combined``; ``None`` when there is no such image),
        ``ensemble_accuracy`` (of ``combined``), ``mean_accuracy`` (of the mean probability) and
        ``oracle_accuracy`` (some member is right).

    Example:
        >>> a = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
        >>> b = np.array([[0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
        >>> m = member_agreement([a, b], [0, 1, 1])
        >>> m["pairwise"][0][1], m["all_agree"], m["oracle_accuracy"]
        (0.6666666666666666, 0.6666666666666666, 1.0)
    """
    from cnnkit.evaluate import class_indices

    shapes = list(dict.fromkeys(np.shape(member) for member in probabilities))
    if len(shapes) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"`probabilities` must be one (N, K) array per member, all of one shape. Received: shapes "
                         f"{shapes}")
    stacked = np.asarray([np.asarray(p, dtype=np.float64) for p in probabilities])
    labels = class_indices(labels, stacked.shape[2], name="labels")
    if stacked.shape[1] != len(labels) or len(labels) == 0:
        raise ValueError("`probabilities` must be one (N, K) array per member with N = len(labels) > 0. Received: "
                         f"shape {stacked.shape} for {len(labels)} labels")
    combined = stacked.mean(axis=0) if combined is None else np.asarray(combined, dtype=np.float64)
    if combined.shape != stacked.shape[1:]:
        raise ValueError(f"`combined` must be the ensemble's (N, K) output, of the members' shape {stacked.shape[1:]}. "
                         f"Received: shape {combined.shape}")
    predicted = stacked.argmax(axis=-1)  # (M, N)
    members = len(stacked)
    pairwise = [[float(np.mean(predicted[i] == predicted[j])) for j in range(members)] for i in range(members)]
    agree = np.all(predicted == predicted[:1], axis=0)
    correct = combined.argmax(axis=-1) == labels
    return {
        "member_accuracy": [float(np.mean(row == labels)) for row in predicted],
        "pairwise": pairwise,
        "all_agree": float(np.mean(agree)),
        "accuracy_when_all_agree": float(np.mean(correct[agree])) if agree.any() else None,
        "accuracy_when_split": float(np.mean(correct[~agree])) if (~agree).any() else None,
        "ensemble_accuracy": float(np.mean(correct)),
        "mean_accuracy": float(np.mean(stacked.mean(axis=0).argmax(axis=-1) == labels)),
        "oracle_accuracy": float(np.mean(np.any(predicted == labels, axis=0))),
    }


def _agreement_png(agreement) -> bytes:
    from cnnkit.visualize import _figure, _png

    pairwise = np.asarray(agreement["pairwise"])
    members = len(pairwise)
    side = min(2.5 + 0.5 * members, 9.0)
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(pairwise, cmap="Greens", vmin=min(0.5, float(pairwise.min())), vmax=1.0)
    figure.colorbar(image, ax=ax, shrink=0.8)
    labels = [f"{i} ({accuracy:.1%})" for i, accuracy in enumerate(agreement["member_accuracy"])]
    ax.set_xticks(range(members), [str(i) for i in range(members)])
    ax.set_yticks(range(members), labels)
    ax.set_xlabel("member")
    ax.set_title("Fraction of test images two members classify alike", fontsize=9)
    if members <= 12:
        for i in range(members):
            for j in range(members):
                ax.text(j, i, f"{pairwise[i, j]:.3f}", ha="center", va="center", fontsize=8)
    return _png(figure)


# --------------------------------------------------------------------------- HTML pieces

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;
color:#1f2328;line-height:1.45;background:#fff}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#57606a;margin-top:0}
table{border-collapse:collapse;margin:.6em 0}th,td{padding:.25em .7em;border-bottom:1px solid #e5e8eb;text-align:right}
th{background:#f6f8fa}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:.5em 1em;min-width:9em}
.card b{display:block;font-size:1.5em}
.note{background:#fff8c5;border-left:4px solid #d4a72c;padding:.4em .9em;margin:.6em 0}
.finding{padding:.35em .9em;margin:.4em 0;border-left:4px solid}
.ok{border-color:#1a7f37;background:#dafbe1}.info{border-color:#0969da;background:#ddf4ff}
.warning{border-color:#d4a72c;background:#fff8c5}.error{border-color:#cf222e;background:#ffebe9}
figure{margin:.8em 0}figcaption{color:#57606a;font-size:.9em}img{max-width:100%;height:auto;display:block}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
.bar{display:inline-block;height:.7em;background:#54aeff;vertical-align:middle;margin-right:.4em}
.row{display:flex;flex-wrap:wrap;gap:2.5em;align-items:flex-start}
nav{font-size:.9em;color:#57606a}nav a{margin-right:.8em;color:#0969da;text-decoration:none}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _image(png: bytes, alt: str, caption: str = "", *, width: int | None = None) -> str:
    """A figure with the PNG embedded as a data: URI; ``width`` CSS pixels at most (default its own)."""
    data = base64.b64encode(png).decode("ascii")
    caption_html = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    style = f' style="width:{width}px"' if width else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"{style}>{caption_html}</figure>'


def _table(header, rows, *, left=(0,)) -> str:
    def cell(tag, index, value):
        return f'<{tag}{" class=l" if index in left else ""}>{value}</{tag}>'

    head = "".join(cell("th", i, _e(h)) for i, h in enumerate(header or ()))
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _note(text) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _page(title, subtitle, body, sections=()) -> str:
    nav = "<nav>" + "".join(f'<a href="#{_e(anchor)}">{_e(name)}</a>' for anchor, name in sections) + "</nav>" \
        if sections else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1><p class=\"sub\">{_e(subtitle)}</p>"
            f"{nav}{body}</body></html>\n")


def _number(value, digits=4) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _e(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def _run_png(run_dir, name, plot, *args) -> bytes:
    """The run directory's PNG ``name`` when it has one, else what ``plot(*args, path)`` draws
    (a ``cnnkit.report.plot_*`` function)."""
    if run_dir is not None and (run_dir / name).is_file():
        return (run_dir / name).read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        plot(*args, path)
        return path.read_bytes()


class _Parts:
    """Sections of a page; a section that fails becomes a note instead."""

    def __init__(self):
        self.html, self.sections = [], []

    def add(self, title, build, *, anchor=None):
        try:
            content = build()
        except Exception as error:  # noqa: BLE001  (one failing part must not cost the page)
            content = _note(f"Could not draw this part: {type(error).__name__}: {error}")
        if content:
            anchor = anchor or title.lower().replace(" ", "-")
            self.sections.append((anchor, title))
            self.html.append(f'<h2 id="{_e(anchor)}">{_e(title)}</h2>{content}')


# --------------------------------------------------------------------------- the run's inputs


def _read_run(path, model):
    """``(name, model, config, metrics, history, run_dir)`` of a run directory or ``.keras`` file.

    A run directory's files are read as ``cnnkit.load`` reads them, ``model`` given or not: checked against
    ``manifest.json``, and a file that does not parse (or a config that is not a mapping) is an error naming it."""
    from cnnkit import runs

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No run directory or .keras file at {str(path)!r}. Received: path={str(path)!r}")
    if not path.is_dir():
        return path.stem, runs.load(path).model if model is None else model, {}, {}, {}, None
    if model is None:
        run = runs.load(path)
        model, config, metrics, history = run.model, run.config, run.metrics, run.history
    else:
        config, metrics, history = runs.read_run_files(path)
    return str(config.get("name") or path.name), model, config, metrics, history, path


def _no_config(run_dir) -> str:
    """Why nothing about a run's arguments is known: its ``config.yaml`` is missing (a ``.keras`` file has none)."""
    return f"{run_dir} has no config.yaml (or an empty one)" if run_dir else "a .keras file has no config.yaml"


def _resolve_run_data(data, config, notes, run_dir):
    """The ``ImageData`` to show test images from: ``data``, else the run's own; ``None`` with a note.

    ``data`` given is used or refused (``ValueError``), never passed over for the run's own."""
    from cnnkit.data import list_datasets
    from cnnkit.data.imagedata import class_list
    from cnnkit.recipes.pipeline import resolve_data

    recorded = (config.get("arguments") or {}).get("data")
    source = str((config.get("data") or {}).get("source") or "")
    fingerprint = (config.get("data") or {}).get("fingerprint")
    classes = [str(name) for name in config.get("class_names") or ()]
    if data is not None:
        resolved = resolve_data(data)
        given = [str(name) for name in resolved.class_names]
        if classes and given != classes:
            raise ValueError(f"data: {resolved.source} has other classes than the run: {class_list(given)} against "
                             f"{class_list(classes)}")
        _note_other_data(resolved, fingerprint, notes)
        return resolved
    candidates = []
    if isinstance(recorded, (str, dict)) and not str(recorded).startswith("<"):
        candidates.append(("the run's arguments.data", recorded))
    name = source.split(" ", 1)[0]
    if name in list_datasets():
        candidates.append(("the dataset named in the run's data.source", name))
    errors = []
    for origin, candidate in candidates:
        try:
            resolved = resolve_data(candidate)
        except Exception as error:  # noqa: BLE001  (missing files, no network: say so and go on)
            errors.append(f"{origin} ({candidate!r}): {error}")
            continue
        if classes and list(resolved.class_names) != classes:
            errors.append(f"{origin} ({resolved.source}) has other classes than the run")
            continue
        _note_other_data(resolved, fingerprint, notes)
        return resolved
    if errors:
        why = "; ".join(errors)
    elif config:
        why = f"the run's data ({recorded or source or 'unknown'}) cannot be loaded again (in-memory arrays)"
    else:
        why = f"{_no_config(run_dir)} to say what data the run used"
    notes.append(f"No test images: {why}. Mistakes, feature maps and Grad-CAM need them: "
                 "pass data= (cnnkit report RUN --data NAME).")
    return None


def _note_other_data(data, fingerprint, notes):
    if fingerprint and data.fingerprint != fingerprint:
        notes.append(f"The data used here ({data.source}) is not the data the run was trained on "
                     "(its fingerprint differs): the images below may include training images.")


def _test_images(data, model, limit, notes):
    """``(images, labels, split)`` to show: the test split (else validation), at most ``limit`` images
    and 256 MiB of them; ``(None, None, None)`` with a note when there are none that fit the model."""
    split = "test" if data.test is not None else "val" if data.val is not None else None
    if split is None:
        notes.append(f"The data ({data.source}) has no test or validation split: no images to show.")
        return None, None, None
    expected = tuple(model.inputs[0].shape[1:])
    if tuple(data.image_shape) != expected:
        notes.append(f"The data's images are {tuple(data.image_shape)} but the model takes {expected}: "
                     "no images shown.")
        return None, None, None
    limit = min(limit, max(1, MAX_TEST_BYTES // math.prod(data.image_shape)))
    if data.sizes[split] <= limit:
        images, labels = data.arrays(split)
    else:  # every stride-th image: a class-sorted split (from_folder) still gives every class
        stride = math.ceil(data.sizes[split] / limit)
        dataset = (getattr(data, split).enumerate().filter(lambda index, _: index % stride == 0)
                   .map(lambda _, example: example).batch(limit))
        images, labels = (np.asarray(array) for array in next(iter(dataset)))
        notes.append(f"One {split} image in {stride} is used ({len(images):,} of {data.sizes[split]:,}, "
                     f"max_test_images={limit:,}).")
    if split == "val":
        notes.append("The data has no test split: the validation split is shown instead.")
    return images, np.asarray(labels).astype(np.int64), split


# --------------------------------------------------------------------------- run sections


def _summary_html(metrics, config, model):
    cards = []
    for key, label in (("test_accuracy", "test accuracy"), ("test_error", "test error"),
                       ("balanced_accuracy", "balanced accuracy"), ("test_loss", "test loss")):
        value = metrics.get(key)
        if isinstance(value, numbers.Real):
            text = f"{value:.2%}" if key != "test_loss" else f"{value:.4f}"
            cards.append(f'<div class="card">{_e(label)}<b>{_e(text)}</b></div>')
    cards.append(f'<div class="card">parameters<b>{model.count_params():,}</b></div>')
    arguments = config.get("arguments") or {}
    facts = [
        ("recipe", config.get("recipe")),
        ("architecture", config.get("arch") or arguments.get("arch") or arguments.get("backbone")),
        ("data", (config.get("data") or {}).get("source")),
        ("epochs", metrics.get("epochs_run")),
        ("precision", config.get("precision")),
        ("seed", config.get("seed")),
    ]
    rows = [[_e(label), _e(value)] for label, value in facts if value not in (None, "")]
    return f'<div class="cards">{"".join(cards)}</div>' + (_table(None, rows, left=(0, 1)) if rows else "")


def _metrics_html(metrics):
    scalar = [(key, value) for key, value in metrics.items()
              if isinstance(value, numbers.Real) and not isinstance(value, bool)]
    parts = [_table(["metric", "value"], [[_e(key), _number(value)] for key, value in scalar])] if scalar else []
    text = ""
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class:
        rows = []
        for name, row in per_class.items():
            f1 = row.get("f1", 0.0)
            bar = f'<span class="bar" style="width:{max(0.0, min(1.0, f1)) * 6:.2f}em"></span>'
            rows.append([_e(name), _number(row.get("precision")), _number(row.get("recall")),
                         bar + _number(f1), _number(row.get("support"))])
        # the weakest among classes with test images (one without has F1 0 by convention, which says nothing)
        tested = [name for name, row in per_class.items()
                  if isinstance(row.get("support"), numbers.Real) and row["support"] > 0]
        weakest = ""
        if tested:
            worst = min(tested, key=lambda name: per_class[name].get("f1", 0.0))
            weakest = f"The weakest class: <b>{_e(worst)}</b> (F1 {per_class[worst].get('f1', 0.0):.3f}). "
        text = (f"<p>{weakest}Precision: of the images predicted as a class, the fraction that are; recall: of a "
                "class's images, the fraction found; F1: their harmonic mean.</p>")
        parts.append(_table(["class", "precision", "recall", "F1", "support"], rows))
    if not parts:
        return _note("No metrics were recorded and there is no test data to compute them.")
    return text + '<div class="row">' + "".join(f"<div>{part}</div>" for part in parts) + "</div>"


def _confusion_html(metrics, class_names, run_dir):
    from cnnkit import report

    if metrics.get("confusion_matrix") is None:
        return _note("No confusion matrix: the run has no test metrics.")
    png = _run_png(run_dir, "confusion_matrix.png", report.plot_confusion_matrix, metrics["confusion_matrix"],
                   class_names)
    return _image(png, "confusion matrix", "Rows: true class; columns: predicted. The diagonal is each class's recall.",
                  width=640)


def _training_html(history, run_dir):
    from cnnkit import report

    findings = diagnose(history)
    items = "".join(f'<p class="finding {_e(f.severity)}"><b>{_e(f.severity)}</b> {_e(f.message)}</p>'
                    for f in findings)
    if not report.has_curves(history):
        return items
    png = _run_png(run_dir, "training_curves.png", report.plot_training_curves, history)
    caption = "Loss and accuracy per epoch, training (solid) and validation (dashed)."
    return _image(png, "training curves", caption) + items


def _plan_html(config, model, num_classes, run_dir):
    import cnnkit
    from cnnkit.planner import DEFAULT_OPTIONS

    if not config:
        return _note(f"No layer table: {_no_config(run_dir)} to name the architecture for the planner.")
    arguments = config.get("arguments") or {}
    arch = config.get("arch") if isinstance(config.get("arch"), str) else arguments.get("arch")
    if not isinstance(arch, str) or arch.startswith("<"):
        what = arch or arguments.get("backbone") or config.get("recipe") or "a model given as an object"
        return _note(f"No layer table: the planner needs a notation string or a registered name, and this run's "
                     f"model is {what}. Keras's summary is in README.md.")
    options = {key: value for key, value in (arguments.get("model_options") or {}).items()
               if key in DEFAULT_OPTIONS and key not in ("dtype", "preprocessing")}
    shape = tuple(model.inputs[0].shape[1:])
    table = str(cnnkit.plan(arch, shape, num_classes, **options))
    return f"<p>The network <code>{_e(arch)}</code> as <code>cnnkit plan</code> resolves it:</p><pre>{_e(table)}</pre>"


def _mistakes_html(model, images, labels, probabilities, class_names, examples):
    from cnnkit import visualize

    worst = visualize.top_losses(model, images, labels, k=examples, probabilities=probabilities)
    if not len(worst.indices):
        return "<p>No test image is misclassified.</p>"
    png = visualize._top_losses_png(images.astype(np.float32), worst, class_names)
    return _image(png, "most confidently wrong test images",
                  f"The {len(worst.indices)} misclassified test images with the highest loss: true class, predicted "
                  "class and the probability the model gave it.")


def _kernels_html(model):
    from cnnkit import visualize

    layer = visualize._first_conv(model)
    png = visualize._kernels_png(layer, *visualize._kernel_tiles(layer), scale=1.0)
    return _image(png, "first-layer kernels",
                  "Weights of the first convolution, one tile per filter (and input channel), each scaled to its "
                  "largest weight: mid-grey is 0, light positive, dark negative. Learned kernels look like edge, "
                  "stroke and colour detectors; kernels that look like noise have barely moved from their random "
                  "start (usual for He-initialised 5x5 kernels after a few epochs), which the layers above can "
                  "make up for.")


def _features_html(model, image, label, class_names):
    from cnnkit import visualize

    maps = visualize.feature_maps(model, image)
    return _image(visualize._feature_png(maps), "feature maps",
                  f"One test image (class {class_names[label]}) through each convolution, after its activation; "
                  "each tile is one channel, scaled to its own range (bright: strong response).")


def _cams_html(model, images, labels, probabilities, class_names, examples):
    from cnnkit import visualize

    predicted = probabilities.argmax(axis=1)
    right = [int(i) for i in np.flatnonzero(predicted == labels)]
    wrong = [int(i) for i in np.flatnonzero(predicted != labels)]
    chosen, seen = [], set()
    for index in right:  # one correct image per class first, then the worst mistakes
        if labels[index] not in seen and len(chosen) < examples - min(2, len(wrong)):
            chosen.append(index)
            seen.add(labels[index])
    chosen += sorted(wrong, key=lambda i: probabilities[i, labels[i]])[:examples - len(chosen)]
    if not chosen:
        return ""
    cams = visualize.grad_cam(model, images[chosen])
    titles = [f"true {class_names[labels[i]]}, pred {class_names[predicted[i]]}" for i in chosen]
    return _image(visualize._cams_png(images[chosen].astype(np.float32), cams, titles), "Grad-CAM overlays",
                  "Grad-CAM at the last convolution: red marks where the evidence for the predicted class lies, blue "
                  "none; an all-blue map means this layer holds no positive evidence for the class.")


def _members_html(model, images, labels):
    import keras

    from cnnkit.visualize import _output

    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not members:
        return _note("The ensemble model holds no member sub-models to compare.")
    if images is None:
        return _note("Member agreement needs test images.")
    # the ensemble's own output and all members', one pass
    probe = keras.Model(model.inputs[0], [model.outputs[0], *(_output(model, member) for member in members)])
    combined, *outputs = probe.predict(images.astype(np.float32), batch_size=256, verbose=0)
    agreement = member_agreement(outputs, labels, combined=combined)
    combine = getattr(model.layers[-1], "mode", None)  # CombineProbabilities: "mean", "geometric" or "vote"
    rows = [["images all members classify alike", f"{agreement['all_agree']:.2%}"],
            ["ensemble accuracy where they all agree", _percent(agreement["accuracy_when_all_agree"])],
            ["ensemble accuracy where they split", _percent(agreement["accuracy_when_split"])],
            [f"ensemble accuracy{f' (combine={combine})' if combine else ''}",
             _percent(agreement["ensemble_accuracy"])],
            ["some member right (oracle)", _percent(agreement["oracle_accuracy"])]]
    return (_table(None, rows, left=(0,)) + _image(_agreement_png(agreement), "member agreement",
            "Pairwise agreement of the members' predicted classes; row labels give each member's accuracy. "
            "Members that agree less err on different images, which is what averaging gains from."))


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def render_report(path, *, model=None, data=None, examples: int = 8, max_test_images: int = 10_000) -> str:
    """The HTML of a run's report (see the module docstring for its parts).

    Args:
        path: a run directory or a ``.keras`` file.
        model: the run's ``keras.Model``, when already in memory (else loaded from ``path``).
        data: the test data (``ImageData``, a dataset name or ``from_folder`` arguments); default
            the run's own data when it can be loaded again.
        examples: how many mistakes and Grad-CAM images to show.
        max_test_images: search mistakes among at most this many test images (and at most
            ``MAX_TEST_BYTES`` of them).

    Returns:
        The page, one self-contained HTML string.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no model.
        ValueError: the run directory's files do not match its ``manifest.json`` or do not parse (as
            ``cnnkit.load`` refuses them, ``model`` given or not); ``data`` was given and does not load, or its
            classes are not the run's.

    Example:
        >>> html_text = render_report("runs/mnist", data="mnist")  # doctest: +SKIP
    """
    from cnnkit.evaluate import classification_metrics
    from cnnkit.runs import Run

    for name, value in (("examples", examples), ("max_test_images", max_test_images)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    name, model, config, metrics, history, run_dir = _read_run(path, model)
    notes = []
    resolved = _resolve_run_data(data, config, notes, run_dir)
    images = labels = probabilities = None
    if resolved is not None:
        images, labels, split = _test_images(resolved, model, max_test_images, notes)
    class_names = [str(c) for c in (config.get("class_names") or (resolved.class_names if resolved else None)
                                    or range(int(model.outputs[0].shape[-1])))]
    if images is not None:
        probabilities = Run(model, class_names=class_names).predict(images)
        if "confusion_matrix" not in metrics:
            metrics = {**classification_metrics(labels, probabilities, class_names, split=split), **metrics}
            notes.append(f"The run recorded no test metrics: those shown are computed now on the {split} split.")
    ensemble = config.get("recipe") == "ensemble"

    parts = _Parts()
    parts.add("Summary", lambda: _summary_html(metrics, config, model))
    parts.add("Metrics", lambda: _metrics_html(metrics))
    parts.add("Confusion matrix", lambda: _confusion_html(metrics, class_names, run_dir))
    parts.add("Training", lambda: _training_html(history, run_dir))
    if images is not None:
        parts.add("Most confident mistakes", lambda: _mistakes_html(model, images, labels, probabilities, class_names,
                                                                     examples), anchor="mistakes")
    if ensemble:
        parts.add("Member agreement", lambda: _members_html(model, images, labels), anchor="members")
        notes.append("Kernels, feature maps and Grad-CAM are shown per member, in each member's own report.")
    else:
        parts.add("First-layer kernels", lambda: _kernels_html(model), anchor="kernels")
        if images is not None:
            parts.add("Feature maps", lambda: _features_html(model, images[0], labels[0], class_names),
                      anchor="feature-maps")
            parts.add("Grad-CAM", lambda: _cams_html(model, images, labels, probabilities, class_names, examples),
                      anchor="grad-cam")
    parts.add("Layers", lambda: _plan_html(config, model, len(class_names), run_dir), anchor="layers")
    if config:
        dumped = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        parts.html.append(f"<h2 id=\"configuration\">Configuration</h2><details><summary>config.yaml</summary>"
                          f"<pre>{_e(dumped)}</pre></details>")
    missing = "".join(_note(text) for text in notes)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = f"cnnkit report of {run_dir or path}, written {stamp}"
    return _page(f"Report: {name}", subtitle, missing + "".join(parts.html), parts.sections)


def write_report(path, *, model=None, data=None, out=None, strict: bool = False, **options) -> Path | None:
    """Write ``report.html`` into a run directory (or ``<name>.html`` beside a ``.keras`` file), atomically.

    Meant to end every training run: by default a failure is a warning, never an exception, so a
    report can never cost the run it reports on.

    Args:
        path: a run directory or a ``.keras`` file.
        model: the run's ``keras.Model`` when in memory (saves loading it again).
        data: the test data (default: the run's own, when it can be loaded again).
        out: the file to write (default ``<run>/report.html``).
        strict: raise errors instead of warning and returning ``None``.
        **options: ``examples`` and ``max_test_images`` of :func:`render_report`.

    Returns:
        The path written, or ``None`` when it failed and ``strict`` is false.

    Example:
        >>> write_report(run.run_dir, model=run.model, data=data)  # doctest: +SKIP
        PosixPath('runs/mnist/report.html')
    """
    try:
        target = Path(out) if out is not None else (
            Path(path) / REPORT_FILE if Path(path).is_dir() else Path(path).with_suffix(".html"))
        page = render_report(path, model=model, data=data, **options)
        # held while it is written: its manifest.json entry is read, changed and written again
        with holding_run_dir(target.parent) if (target.parent / MANIFEST_FILE).is_file() else contextlib.nullcontext():
            return atomic_write_text(target, page)
    except Exception as error:
        if strict:
            raise
        warnings.warn(f"cnnkit: could not write the report of {path}: {type(error).__name__}: {error}", stacklevel=2)
        return None


# --------------------------------------------------------------------------- searches


def _read_csv(path) -> list[dict]:
    if not path.is_file():
        return []
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def write_search_report(directory, *, out=None, strict: bool = False) -> Path | None:
    """Write ``report.html`` of a ``cnnkit.tuner.search`` directory: its trials and the sensitivity plot.

    Reads what the search wrote: ``search.yaml``, ``trials.csv``, ``sensitivity.png``,
    ``sensitivity.csv`` and ``best_recipe.yaml``.

    Args:
        directory: the search directory.
        out: the file to write (default ``<directory>/report.html``).
        strict: raise errors instead of warning and returning ``None``.

    Returns:
        The path written, or ``None`` when it failed and ``strict`` is false.

    Example:
        >>> write_search_report("runs/tune-mnist")  # doctest: +SKIP
        PosixPath('runs/tune-mnist/report.html')
    """
    try:
        directory = Path(directory)
        settings_path = directory / "search.yaml"
        if not settings_path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not a search directory: it has no search.yaml. "
                                    f"Received: directory={str(directory)!r}")
        record = yaml.safe_load(settings_path.read_text(encoding="utf-8")) or {}
        settings = record.get("settings") or {}
        target = Path(out) if out is not None else directory / REPORT_FILE
        return atomic_write_text(target, _search_page(directory, record, settings))
    except Exception as error:
        if strict:
            raise
        warnings.warn(f"cnnkit: could not write the search report of {directory}: {type(error).__name__}: {error}",
                      stacklevel=2)
        return None


def _score(trial):
    return float(trial["score"]) if trial.get("score") else None


def _search_page(directory, record, settings) -> str:
    space = settings.get("space") or {}
    objective, direction = settings.get("objective", "score"), settings.get("direction", "max")

    def rank(trial):  # completed trials best first, then the rest
        score = _score(trial)
        done = trial.get("status") == "COMPLETED" and score is not None
        return (0, -score if direction == "max" else score) if done else (1, 0.0)

    trials = sorted(_read_csv(directory / "trials.csv"), key=rank)
    best = trials[0] if trials and rank(trials[0])[0] == 0 else None
    better = "higher" if direction == "max" else "lower"
    facts = [
        ("space", f"{space.get('name', '')}: {space.get('arch') or space.get('backbone') or ''}"),
        ("algorithm", settings.get("algorithm")),
        ("objective", f"{objective} ({better} is better)"),
        ("epochs", settings.get("epochs")),
        ("data", record.get("data_source")),
        ("trials", len(trials)),
    ]
    summary = _table(None, [[_e(k), _e(v)] for k, v in facts if v not in (None, "")], left=(0, 1))
    if best is None:
        summary += _note("No trial completed yet.")
    else:
        recipe = directory / "best_recipe.yaml"
        command = f". Train it: <code>{_e(f'cnnkit run {recipe}')}</code>" if recipe.is_file() else ""
        summary += (f'<p class="finding ok">Best: trial {_e(best["trial_id"])}, {_e(objective)} '
                    f'<b>{_score(best):.4f}</b>, <code>{_e(best.get("arch", ""))}</code>{command}</p>')
    parts = _Parts()
    parts.html.append(summary)
    parts.add("Trials", lambda: _trials_table(trials, best, space, objective))
    parts.add("Sensitivity", lambda: _sensitivity_html(directory, objective))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return _page(f"Search: {space.get('name', directory.name)}", f"cnnkit search report of {directory}, written "
                 f"{stamp}", "".join(parts.html), parts.sections)


def _trials_table(trials, best, space, objective) -> str:
    """One row per trial, best first; the hyperparameters that took more than one value get a column each."""
    names = [name for name in space.get("hyperparameters") or {} if trials and name in trials[0]]
    varying = [name for name in names if len({trial[name] for trial in trials}) > 1]
    header = ["trial", "status", objective, "epoch", "seconds", "arch", *varying, "note"]
    rows = []
    for trial in trials:
        score = _score(trial)
        rows.append([
            _e(trial["trial_id"] + (" *" if trial is best else "")),
            _e(trial.get("status", "")),
            "" if score is None else f"{score:.4f}",
            f"{trial['best_epoch']}/{trial.get('epochs', '')}" if trial.get("best_epoch") else "",
            f"{float(trial['seconds']):.1f}" if trial.get("seconds") else "",
            _e(trial.get("arch", "")),
            *(_e(trial.get(name, "")) for name in varying),
            _e(trial.get("error", "")),
        ])
    return _table(header, rows, left=(0, 1, 5, len(header) - 1))


def _sensitivity_html(directory, objective) -> str:
    """The search's sensitivity.png and sensitivity.csv."""
    png = directory / "sensitivity.png"
    if png.is_file():
        html_text = _image(png.read_bytes(), "sensitivity", f"How {objective} moves with each hyperparameter: "
                           "importance (share of the variance it explains alone), then mean +- std per value.")
    else:
        html_text = _note("No sensitivity.png in the search directory.")
    rows = [[_e(r["hyperparameter"]), _number(float(r["importance"])) if r["importance"] else "n/a", _e(r["value"]),
             _e(r["count"]), _number(float(r["mean"])), _number(float(r["std"])) if r["std"] else ""]
            for r in _read_csv(directory / "sensitivity.csv")]
    if rows:
        html_text += _table(["hyperparameter", "importance", "value", "trials", "mean", "std"], rows, left=(0, 2))
    return html_text
