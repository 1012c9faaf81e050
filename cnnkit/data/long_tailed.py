"""Long-tailed subsets: training counts falling geometrically over the classes.

``long_tailed(data)`` cuts an ``ImageData`` to a long tail, the standard testbed of the
class-imbalance literature (Cao et al. 2019's long-tailed CIFAR); ``load("mnist-long-tailed")``
is real MNIST cut this way, 5,000 images of class 0 down to 50 of class 9.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers

import numpy as np

from cnnkit.data.imagedata import ImageData, check_seed, count_classes

__all__ = ["long_tailed"]


def long_tailed(data: ImageData, *, largest: int = 5000, smallest: int = 50, seed: int = 0) -> ImageData:
    """A long-tailed version of ``data``: training counts falling geometrically over the classes.

    Class ``c`` of ``K`` keeps ``round(largest * (smallest / largest) ** (c / (K - 1)))`` of its
    training examples, chosen at random with ``seed`` (class 0 keeps ``largest``, class ``K-1``
    keeps ``smallest``). The validation split is thinned by the same per-class fractions (at
    least one example a class), so model selection sees the distribution training does; the test
    split is kept whole, so it stays as balanced as it was.

    Args:
        data: a ``cnnkit.data.ImageData`` with at least ``largest`` training examples of class
            0, and as many as each class's target of the others (its validation split does not count:
            the error says when it holds the ones missing).
        largest: examples kept of class 0.
        smallest: examples kept of the last class (at most ``largest``).
        seed: seeds the choice of examples.

    Returns:
        A new ``ImageData`` (source and fingerprint say how it was made).

    Raises:
        ValueError: bad counts, fewer than 2 classes, or a class with too few examples.

    Example:
        >>> import cnnkit
        >>> data = long_tailed(cnnkit.data.load("mnist-sample"), largest=400, smallest=40)
        >>> data.class_counts["train"]
        [400, 310, 240, 186, 144, 111, 86, 67, 52, 40]
    """
    import tensorflow as tf

    for name, value in (("largest", largest), ("smallest", smallest)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
    seed = check_seed(seed)
    if smallest > largest:
        raise ValueError(f"smallest must not exceed largest. Received: largest={largest}, smallest={smallest}")
    if data.num_classes < 2:
        raise ValueError(f"A long tail needs at least 2 classes. Received: {data.num_classes} class(es)")
    last = data.num_classes - 1
    targets = [round(largest * (smallest / largest) ** (c / last)) for c in range(data.num_classes)]
    available = data.class_counts["train"]
    short = [c for c in range(data.num_classes) if available[c] < targets[c]]
    if short:
        c = short[0]
        val = data.class_counts["val"][c] if data.val is not None else 0
        held = (f" (the validation split holds another {val} of them: split off less, e.g. val_split=0, or give a "
                "smaller largest)" if available[c] + val >= targets[c] else "")
        raise ValueError(f"Class {data.class_names[c]!r} has {available[c]} training examples; the long tail needs "
                         f"{targets[c]}{held}. Received: largest={largest}, smallest={smallest}")
    x, y = data.arrays("train")
    keep = _per_class_sample(y, targets, seed)
    splits = {"train": (x[keep], y[keep])}
    if data.val is not None:
        x_val, y_val = data.arrays("val")
        val_counts = data.class_counts["val"]
        val_targets = [min(n, max(1, round(n * targets[c] / available[c]))) for c, n in enumerate(val_counts)]
        keep = _per_class_sample(y_val, val_targets, seed + 1)
        splits["val"] = (x_val[keep], y_val[keep])
    datasets = {split: tf.data.Dataset.from_tensor_slices(arrays) for split, arrays in splits.items()}
    counts = {split: count_classes(labels, data.num_classes) for split, (_, labels) in splits.items()}
    if data.test is not None:
        counts["test"] = list(data.class_counts["test"])
    fingerprint = hashlib.sha256(f"{data.fingerprint}/long_tailed/{largest}/{smallest}/{seed}".encode()).hexdigest()
    return dataclasses.replace(
        data, train=datasets["train"], val=datasets.get("val"), class_counts=counts, fingerprint=fingerprint,
        source=f"{data.source}, long-tailed {largest}->{smallest} (seed {seed})",
    )


def _per_class_sample(labels, targets, seed) -> np.ndarray:
    """Sorted indices of ``targets[c]`` examples of each class ``c``, chosen with ``seed``."""
    chosen = [np.random.default_rng([seed, c]).choice(np.flatnonzero(labels == c), n, replace=False)
              for c, n in enumerate(targets)]
    return np.sort(np.concatenate(chosen))
