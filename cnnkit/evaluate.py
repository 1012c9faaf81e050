"""Classification metrics computed from predicted probabilities.

Everything here is plain numpy and returns plain Python numbers, so the result can be written
straight to ``metrics.json``. TensorFlow is not imported.

Example:
    >>> import numpy as np
    >>> from cnnkit.evaluate import classification_metrics
    >>> probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> m = classification_metrics([0, 1, 1], probs, ["cat", "dog"])
    >>> round(m["test_accuracy"], 4), m["confusion_matrix"]
    (0.6667, [[1, 0], [1, 1]])
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["LOSS_EPSILON", "classification_metrics"]

#: Probabilities are clipped to ``[LOSS_EPSILON, 1]`` before taking the log for the loss
#: (the same epsilon Keras uses), so one confident mistake gives a large but finite loss.
LOSS_EPSILON = 1e-7

# How far a probability may lie outside [0, 1], and a row's sum from 1 (float16 outputs round that much).
_PROBABILITY_TOLERANCE = 1e-2


def _validate(y_true, probabilities, class_names, split):
    if not isinstance(split, str) or not split:
        raise ValueError(f"`split` must be a non-empty string. Received: split={split!r}")
    try:
        probs = np.asarray(probabilities, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "`probabilities` must be a numeric array of shape (num_examples, num_classes). "
            f"Received: probabilities of type {type(probabilities).__name__}"
        ) from err
    if probs.ndim != 2:
        raise ValueError(
            f"`probabilities` must have shape (num_examples, num_classes). Received: probabilities.shape={probs.shape}"
        )
    labels = class_indices(y_true, probs.shape[1])
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(
            "`y_true` and `probabilities` must have the same number of examples. "
            f"Received: y_true.shape={np.shape(y_true)}, probabilities.shape={probs.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError(f"Cannot compute metrics on zero examples. Received: probabilities.shape={probs.shape}")
    if isinstance(class_names, str) or not isinstance(class_names, Iterable):
        raise ValueError(f"`class_names` must be a sequence of names. Received: class_names={class_names!r}")
    names = [str(name) for name in class_names]
    if len(names) != probs.shape[1]:
        raise ValueError(
            "`class_names` must have one name per column of `probabilities`. "
            f"Received: len(class_names)={len(names)}, probabilities.shape={probs.shape}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`class_names` must be unique. Received: class_names={names}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("`probabilities` contains NaN or infinite values. Received: non-finite probabilities")
    sums = probs.sum(axis=1)
    if (probs.min() < -_PROBABILITY_TOLERANCE or probs.max() > 1 + _PROBABILITY_TOLERANCE
            or np.abs(sums - 1).max() > _PROBABILITY_TOLERANCE):
        raise ValueError(
            "`probabilities` must be class probabilities, each in [0, 1] and each row summing to 1; these look like "
            "logits or scores (apply a softmax first). Received: values in "
            f"[{probs.min():.4g}, {probs.max():.4g}], row sums in [{sums.min():.4g}, {sums.max():.4g}]"
        )
    return labels, probs, names


def class_indices(y_true, num_classes: int, *, name: str = "y_true") -> np.ndarray:
    """``y_true`` as a 1-D int64 array of class indices, each in ``[0, num_classes)``.

    Integer and boolean labels are taken as they are, float labels only when they are whole numbers
    (``1.0``, never ``1.5``); shape ``(N,)`` or ``(N, 1)``. ``name`` is the argument the errors name.

    Raises:
        ValueError: labels that are not a 1-D array of class indices, or lie outside ``[0, num_classes)``.

    Example:
        >>> class_indices([0, 2.0, 1], 3)
        array([0, 2, 1])
    """
    labels = np.asarray(y_true)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D array of integer class indices (or shape (N, 1)). "
            f"Received: {name}.shape={np.shape(y_true)}"
        )
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"`{name}` must hold integer class indices. Received: {name}={labels[:10]}...")
    elif labels.dtype.kind not in "iub":
        raise ValueError(f"`{name}` must hold integer class indices. Received: {name}.dtype={labels.dtype}")
    bad = (labels < 0) | (labels >= num_classes)  # before the cast: a uint64 label above 2**63 is no negative one
    if bad.any():
        raise ValueError(
            f"`{name}` values must lie in [0, {num_classes - 1}] (one per class). "
            f"Received: {name} containing {sorted(set(labels[bad].tolist()))[:10]}"
        )
    return labels.astype(np.int64)


def classification_metrics(y_true, probabilities, class_names, *, split="test") -> dict:
    """Accuracy, error, loss, balanced accuracy, per-class scores and the confusion matrix.

    Conventions:

    * ``{split}_error`` is ``1 - {split}_accuracy`` as a fraction (not a percentage).
    * ``{split}_loss`` is the mean sparse categorical cross-entropy ``-log p[y]`` with ``p``
      clipped to ``[1e-7, 1]``; rows are not renormalised.
    * ``balanced_accuracy`` is the mean recall over the classes that occur in ``y_true``
      (classes absent from ``y_true`` are left out rather than counted as 0).
    * ``precision`` of a class that is never predicted is ``0.0`` (not NaN), and ``f1`` is
      ``0.0`` whenever precision and recall are both 0. ``recall`` of a class with no true
      examples is ``0.0`` too; its ``support`` of 0 tells it apart.
    * ``confusion_matrix[i][j]`` counts examples of true class ``i`` predicted as class ``j``.
    * Ties in the argmax go to the lower class index (``numpy.argmax``).

    Args:
        y_true: Integer class indices, shape ``(N,)`` (or ``(N, 1)``).
        probabilities: Predicted class probabilities, shape ``(N, K)``: each in ``[0, 1]``, each row
            summing to 1 (within 0.01).
        class_names: ``K`` unique names, in column order.
        split: Prefix of the accuracy/error/loss keys (``"test"``, ``"val"``, ...).

    Returns:
        A dict of plain Python ``float``/``int``/``list``/``dict`` values (JSON-serialisable)
        with keys ``f"{split}_accuracy"``, ``f"{split}_error"``, ``f"{split}_loss"``,
        ``"balanced_accuracy"``, ``"per_class"`` (``{name: {"precision", "recall", "f1",
        "support"}}``), ``"confusion_matrix"`` and ``"num_examples"``.

    Raises:
        ValueError: If shapes disagree, labels are out of range, names are not one per column,
            there are no examples, or ``probabilities`` are not probabilities (logits, scores).

    Example:
        >>> import numpy as np
        >>> probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
        >>> m = classification_metrics([0, 1, 2], probs, ["a", "b", "c"], split="val")
        >>> m["val_error"], m["per_class"]["b"]["precision"], m["balanced_accuracy"]
        (0.33333333333333337, 0.0, 0.6666666666666666)
    """
    labels, probs, names = _validate(y_true, probabilities, class_names, split)
    num_examples, num_classes = probs.shape
    predicted = np.argmax(probs, axis=1)

    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)

    correct = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)  # true count per class
    predicted_count = matrix.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, correct / support, 0.0)
        precision = np.where(predicted_count > 0, correct / predicted_count, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2.0 * precision * recall / denom, 0.0)

    accuracy = float(correct.sum() / num_examples)
    picked = np.clip(probs[np.arange(num_examples), labels], LOSS_EPSILON, 1.0)
    loss = float(np.mean(-np.log(picked)))
    present = support > 0
    balanced = float(np.mean(recall[present]))

    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        f"{split}_accuracy": accuracy,
        f"{split}_error": float(1.0 - accuracy),
        f"{split}_loss": loss,
        "balanced_accuracy": balanced,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "num_examples": int(num_examples),
    }
