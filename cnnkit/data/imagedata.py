"""`ImageData`, the object every data source returns, and `from_arrays`.

An `ImageData` holds UNBATCHED `tf.data.Dataset`s of `(image, label)` pairs (image `uint8`
`[H, W, C]`, label `int32` scalar) for the train/val/test splits, plus what a recipe needs to
know about them without iterating: class names, image shape, per-class counts, a source line
and a content fingerprint. Decoding, preprocessing, augmentation, batching and prefetching are
the recipe's job, not the source's.

TensorFlow is imported on first use, so `import cnnkit.data` stays cheap.
"""

from __future__ import annotations

import collections.abc
import csv
import dataclasses
import hashlib
import io
import json
import numbers
import warnings
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(repr=False)
class ImageData:
    """Train/val/test image datasets plus what is known about them.

    Attributes:
        train: Unbatched `tf.data.Dataset` of `(image, label)`: image `uint8` `[H, W, C]`,
            label `int32` scalar.
        val: Same, or `None` when there is no validation split.
        test: Same, or `None` when there is no test split.
        class_names: Name of each class, indexed by label.
        image_shape: `(H, W, C)` with `C` 1 (grayscale) or 3 (RGB).
        class_counts: `{"train": [...], "val": [...], "test": [...]}`, examples per class
            index, for the splits that exist only.
        source: Human description, e.g. `"mnist (/data/mnist.npz)"` or `"folder /x/y"`.
        fingerprint: sha256 hex digest identifying the data as a recipe sees it: the content
            (pixel and label bytes for arrays; sorted relative paths and sizes for folders)
            and how it was split and decoded (validation fraction and seed; a folder's image
            size, colour mode and order). Equal fingerprints mean the same training data.
        skipped: `(path, reason)` (plain strings) for each file (or subfolder) a folder source
            excluded because it cannot be used as an image (empty, not an image, too many pixels,
            truncated or corrupt), kept by `subset`. Empty for other sources. `skipped_csv()`
            formats it.

    Example:
        >>> import numpy as np
        >>> from cnnkit.data import from_arrays
        >>> x = np.zeros((20, 8, 8), np.uint8)
        >>> y = np.arange(20) % 2
        >>> data = from_arrays(x, y, val_split=0.2)
        >>> data.image_shape, data.num_classes, data.sizes
        ((8, 8, 1), 2, {'train': 16, 'val': 4})
        >>> images, labels = data.arrays("val")
        >>> images.shape, labels.dtype
        ((4, 8, 8, 1), dtype('int32'))
    """

    train: tf.data.Dataset
    val: tf.data.Dataset | None
    test: tf.data.Dataset | None
    class_names: list[str]
    image_shape: tuple[int, int, int]
    class_counts: dict[str, list[int]]
    source: str
    fingerprint: str
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # split -> (dataset object, images, labels): read-only numpy arrays an in-memory source
    # already holds (its own, never the caller's), so `arrays()` need not iterate. Keyed by the
    # dataset object so a replaced split never returns stale arrays; not an init field, so
    # `dataclasses.replace` drops it.
    _arrays: dict[str, tuple[Any, np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, init=False, compare=False
    )

    @property
    def num_classes(self) -> int:
        """Number of classes (`len(class_names)`)."""
        return len(self.class_names)

    @property
    def sizes(self) -> dict[str, int]:
        """Number of examples per existing split, from `class_counts`."""
        return {split: int(sum(counts)) for split, counts in self.class_counts.items()}

    def summary(self) -> str:
        """A few lines: source, image shape, classes, per-split counts.

        Returns:
            The summary as one string (no trailing newline).

        Example:
            >>> print(data.summary())  # doctest: +SKIP
            ImageData from mnist (/data/mnist.npz)
              images: 28x28x1 uint8, 10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
              train: 54000 (per class 4879-6068)
              val: 6000 (per class 542-674)
              test: 10000 (per class 892-1135)
              fingerprint: 0123456789ab
        """
        h, w, c = self.image_shape
        names = ", ".join(self.class_names[:10])
        if self.num_classes > 10:
            names += f", ... (+{self.num_classes - 10} more)"
        lines = [
            f"ImageData from {self.source}",
            f"  images: {h}x{w}x{c} uint8, {self.num_classes} classes: {names}",
        ]
        for split, counts in self.class_counts.items():
            per_class = f"per class {min(counts)}-{max(counts)}" if counts else "no classes"
            lines.append(f"  {split}: {sum(counts)} ({per_class})")
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)} unreadable file(s), see .skipped")
        lines.append(f"  fingerprint: {self.fingerprint[:12]}")
        return "\n".join(lines)

    def skipped_csv(self) -> str:
        r"""`skipped` as CSV text: a `path,reason` header, then one row per skipped file.

        Returns:
            The CSV text (just the header when nothing was skipped), e.g. for a run directory's
            `skipped_files.csv`.

        Example:
            >>> data.skipped_csv()  # doctest: +SKIP
            'path,reason\n/data/x/cat/empty.jpg,empty file (0 bytes)\n'
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "reason"])
        writer.writerows(self.skipped)
        return buffer.getvalue()

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Materialise one split as numpy arrays.

        Args:
            split: `"train"`, `"val"` or `"test"`.

        Returns:
            `(images, labels)`: `uint8` `[N, H, W, C]` and `int32` `[N]`, in dataset order, read-only
            (they may be the arrays this `ImageData` keeps; `np.array(images)` gives a copy to change).

        Raises:
            ValueError: If `split` is not a split name or that split does not exist.

        Example:
            >>> x_test, y_test = data.arrays("test")  # doctest: +SKIP
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}. Received: split={split!r}")
        dataset = getattr(self, split)
        if dataset is None:
            raise ValueError(
                f"This ImageData has no {split!r} split (it has {list(self.class_counts)}). "
                f"Received: split={split!r}"
            )
        cached = self._arrays.get(split)
        if cached is not None and cached[0] is dataset:
            return cached[1], cached[2]
        images, labels = [], []
        for x, y in dataset.batch(256).as_numpy_iterator():
            images.append(x)
            labels.append(y)
        if not images:
            return _read_only(np.zeros((0, *self.image_shape), np.uint8)), _read_only(np.zeros((0,), np.int32))
        return (
            _read_only(np.concatenate(images).astype(np.uint8, copy=False)),
            _read_only(np.concatenate(labels).astype(np.int32, copy=False)),
        )

    def subset(self, *, classes=None, per_class=None, val_per_class=None, seed: int = 0) -> ImageData:
        """A smaller `ImageData`: some classes (relabelled in the order given), few images per class.

        Args:
            classes: class names (or label indices) to keep, in their new label order (a list or
                another ordered sequence, not a set); a single name or index is one class (`"10"` is
                class 10, not 1 and 0); `None` keeps every class.
            per_class: at most this many training images per class, drawn with `seed`
                (`None`: all). Validation and test splits are not cut by it.
            val_per_class: at most this many validation images per class (`None`: all).
            seed: seed of the draw.

        Returns:
            An `ImageData` whose source says what was taken (a fingerprint of the new content),
            with this one's `skipped` list (the files its source left out).

        Raises:
            ValueError: an unknown class, a label index that is also another class's name (folders
                named 0, 1, ..., 10 sort as 0, 1, 10, 2...), classes given as a set or dict view (no
                fixed order), a count below 1 or not an integer (`True` included), or a bad seed.

        Example:
            >>> digits = cnnkit.data.load("mnist-sample").subset(classes=["5", "6", "7", "8", "9"],
            ...                                                  per_class=50)  # doctest: +SKIP
            >>> digits.class_counts["train"]  # doctest: +SKIP
            [50, 50, 50, 50, 50]
        """
        if isinstance(classes, (str, numbers.Integral)):
            classes = [classes]
        _check_ordered(classes, "classes")
        keep = list(range(self.num_classes)) if classes is None else [self._class_index(c) for c in classes]
        if not keep:
            raise ValueError(f"classes must name at least one class (None keeps them all). Received: classes={classes!r}")
        if len(set(keep)) != len(keep):
            raise ValueError(f"classes must not repeat a class. Received: classes={classes!r}")
        for name, value in (("per_class", per_class), ("val_per_class", val_per_class)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer or None. Received: {name}={value!r}")
        per_class, val_per_class = (None if value is None else int(value) for value in (per_class, val_per_class))
        seed = check_seed(seed)
        rng = np.random.default_rng(seed)
        relabel = np.full(self.num_classes, -1, np.int32)
        relabel[keep] = np.arange(len(keep), dtype=np.int32)
        splits = {}
        for split, limit in (("train", per_class), ("val", val_per_class), ("test", None)):
            if getattr(self, split) is None:
                continue
            images, labels = self.arrays(split)
            chosen = []
            for old in keep:
                where = np.flatnonzero(labels == old)
                if limit is not None and len(where) > limit:
                    where = np.sort(rng.choice(where, limit, replace=False))
                chosen.append(where)
            index = np.sort(np.concatenate(chosen))
            splits[split] = (images[index], relabel[labels[index]])
        class_names = [self.class_names[i] for i in keep]
        described = f"{self.source}, classes {', '.join(class_names)}"
        if per_class is not None:
            taken = [int(np.sum(splits["train"][1] == label)) for label in range(len(keep))]
            described += f", {per_class} training images per class (seed {seed})" if min(taken) == per_class else \
                f", at most {per_class} training images per class: {taken} (seed {seed})"
        digest = hashlib.sha256(json.dumps([self.fingerprint, keep, per_class, val_per_class, seed]).encode())
        return from_splits(splits, class_names, source=described, fingerprint=digest.hexdigest(), skipped=self.skipped)

    def _class_index(self, name) -> int:
        if isinstance(name, numbers.Integral) and not isinstance(name, bool) and 0 <= name < self.num_classes:
            if str(name) in self.class_names and self.class_names[name] != str(name):
                raise ValueError(f"class {name!r} is ambiguous: label index {name} is class "
                                 f"{self.class_names[name]!r}, and another class is named {str(name)!r}; give "
                                 f"the name as a string ({str(name)!r}, quoted in YAML)")
            return int(name)
        if str(name) in self.class_names:
            return self.class_names.index(str(name))
        raise ValueError(f"unknown class {name!r}; the classes are {self.class_names}")

    def __repr__(self) -> str:
        return (
            f"ImageData(source={self.source!r}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, sizes={self.sizes})"
        )


def from_arrays(
    x,
    y,
    *,
    x_test=None,
    y_test=None,
    val_split: float = 0.1,
    class_names=None,
    seed: int = 0,
) -> ImageData:
    """Wrap in-memory images and integer labels as an `ImageData`.

    The validation split is taken from `(x, y)`, stratified by class: each class with at
    least 2 examples gives `val_split * count` of them, rounded half up (at least 1, and never
    all), to validation, chosen with `seed`. Within each split the original order is kept;
    shuffling is the input pipeline's job. The images are copied where they would otherwise be
    the caller's array, so changing `x` or `x_test` afterwards does not change the `ImageData`.

    Args:
        x: Training images, shape `(N, H, W)` (a channel axis is added) or `(N, H, W, C)`
            with `C` in {1, 3}; raw 0-255 pixel values as `uint8` or another integer dtype
            (cast to `uint8` after a range check). Float arrays are refused: convert them
            yourself so it is explicit whether they were in [0, 1] or [0, 255].
        y: Integer labels `0..K-1`, shape `(N,)` or `(N, 1)`.
        x_test: Optional test images, same rules and image shape as `x`.
        y_test: Test labels; required exactly when `x_test` is given.
        val_split: Fraction of each class moved to validation, in `[0, 1)`; `0` means no
            validation split (`val` is `None`).
        class_names: Names by label, a list (or another ordered sequence, not a set). Defaults
            to `["0", ..., "K-1"]` with `K` one more than the largest label in `y` and `y_test`.
        seed: Non-negative integer seed of the validation split.

    Returns:
        An `ImageData` with `source="arrays"` and a fingerprint of the pixel and label bytes,
        class names and the split (the same arrays split the same way always give the same
        fingerprint; another `val_split` or `seed` gives another).

    Raises:
        ValueError: On a bad shape, dtype, pixel range, label, length mismatch, empty array,
            or argument, naming the argument and the value received.

    Example:
        >>> import numpy as np
        >>> from cnnkit.data import from_arrays
        >>> x = np.random.default_rng(0).integers(0, 256, (100, 28, 28), dtype=np.uint8)
        >>> y = np.arange(100) % 10
        >>> data = from_arrays(x, y, val_split=0.2, class_names=list("abcdefghij"))
        >>> data.sizes
        {'train': 80, 'val': 20}
        >>> data.class_counts["val"]
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    """
    val_split = check_val_split(val_split)
    seed = check_seed(seed)
    given_x, given_x_test = x, x_test
    x = _check_images(x, "x")
    y = _check_labels(y, "y", len(x), "x")
    if (x_test is None) != (y_test is None):
        raise ValueError(
            "Pass x_test and y_test together, or neither. Received: "
            f"x_test={'None' if x_test is None else 'array'}, "
            f"y_test={'None' if y_test is None else 'array'}"
        )
    if x_test is not None:
        x_test = _check_images(x_test, "x_test")
        y_test = _check_labels(y_test, "y_test", len(x_test), "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                "x_test must have the same image shape as x "
                f"({x.shape[1:]}). Received: x_test.shape={x_test.shape}"
            )
    max_label = int(y.max())
    if y_test is not None:
        max_label = max(max_label, int(y_test.max()))
    if class_names is None:
        class_names = [str(i) for i in range(max_label + 1)]
    else:
        class_names = check_class_names(class_names)
        for name, labels in (("y", y), ("y_test", y_test)):
            if labels is not None and int(labels.max()) >= len(class_names):
                raise ValueError(
                    f"{name} holds labels beyond the {len(class_names)} class_names "
                    f"(labels must be 0..{len(class_names) - 1}). "
                    f"Received: {name}.max()={int(labels.max())}"
                )
    num_classes = len(class_names)

    train_idx, val_idx = stratified_split(y, num_classes, val_split, seed)
    if val_idx is None:
        splits = {"train": (_unshared(x, given_x), y)}
    else:
        splits = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx])}
    if x_test is not None:
        splits["test"] = (_unshared(x_test, given_x_test), y_test)

    return from_splits(splits, class_names, source="arrays",
                       fingerprint=_fingerprint_arrays(x, y, x_test, y_test, class_names, val_split, seed))


def from_splits(splits: dict, class_names, *, source: str, fingerprint: str, skipped=()) -> ImageData:
    """An `ImageData` from `{split: (uint8 images NHWC, int32 labels)}` already checked and split,
    with the source's `skipped` list (a copy). The arrays are kept for `arrays()` and made read-only,
    so they must be the source's own, not the caller's.

    Example:
        >>> data = from_splits({"train": (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 0, 1], np.int32))},
        ...                    ["a", "b"], source="arrays", fingerprint="0" * 64)
        >>> data.class_counts
        {'train': [2, 2]}
    """
    import tensorflow as tf

    datasets = {split: tf.data.Dataset.from_tensor_slices(arrays) for split, arrays in splits.items()}
    images = splits["train"][0]
    data = ImageData(
        train=datasets["train"],
        val=datasets.get("val"),
        test=datasets.get("test"),
        class_names=list(class_names),
        image_shape=tuple(int(d) for d in images.shape[1:]),
        class_counts={split: count_classes(labels, len(class_names)) for split, (_, labels) in splits.items()},
        source=source,
        fingerprint=fingerprint,
        skipped=list(skipped),
    )
    for split, (split_images, labels) in splits.items():
        data._arrays[split] = (datasets[split], _read_only(split_images), _read_only(labels))
    return data


# --- helpers shared by the sources (not public API) --------------------------------------


def check_val_split(val_split) -> float:
    """Return `val_split` as a float in [0, 1), or raise ValueError."""
    if (
        isinstance(val_split, bool)
        or not isinstance(val_split, numbers.Real)
        or not 0 <= val_split < 1
    ):
        raise ValueError(
            f"val_split must be a number in [0, 1) (0 = no validation split). "
            f"Received: val_split={val_split!r}"
        )
    return float(val_split)


def check_seed(seed) -> int:
    """Return `seed` as a non-negative int, or raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer. Received: seed={seed!r}")
    return int(seed)


def check_class_names(class_names) -> list[str]:
    """Return `class_names` as a list of unique non-empty strings, or raise ValueError."""
    _check_ordered(class_names, "class_names")
    if not isinstance(class_names, str) and hasattr(class_names, "__iter__"):
        class_names = list(class_names)  # a generator is read once
    if not isinstance(class_names, list) or not all(isinstance(n, str) and n for n in class_names):
        raise ValueError(
            f"class_names must be a list of non-empty strings. Received: class_names={class_names!r}"
        )
    if not class_names:
        raise ValueError("class_names must not be empty. Received: class_names=[]")
    duplicates = sorted({n for n in class_names if class_names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"class_names must be unique; repeated: {duplicates}. Received: class_names={class_names!r}"
        )
    return class_names


def stratified_split(labels: np.ndarray, num_classes: int, val_split: float, seed: int):
    """Split example indices into train and validation, per class.

    A class with `n >= 2` examples gives `k = round_half_up(val_split * n)` examples to
    validation, computed exactly on the decimal `val_split` as written (`0.29 * 50 = 14.5 -> 15`,
    where binary floating point gives 14.499...), clipped to `[1, n - 1]`; a class with one
    example stays in train. Each class draws from its own generator seeded with `(seed, class)`,
    so the split of one class does not depend on the others.

    Returns:
        `(train_idx, val_idx)`, sorted `int64` arrays; `(all, None)` when `val_split == 0`
        or no example goes to validation (the latter with a warning).
    """
    labels = np.asarray(labels)
    if val_split == 0:
        return np.arange(len(labels)), None
    fraction = Fraction(str(val_split))  # the shortest decimal that reads back as val_split
    val_parts = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n = idx.size
        if n < 2:
            continue
        k = min(max(int(fraction * n + Fraction(1, 2)), 1), n - 1)
        rng = np.random.default_rng([seed, c])
        val_parts.append(rng.permutation(idx)[:k])
    if not val_parts:
        warnings.warn(
            f"val_split={val_split} but no class has 2 or more examples, so there is no "
            "validation split (val is None).",
            stacklevel=3,
        )
        return np.arange(len(labels)), None
    val_idx = np.sort(np.concatenate(val_parts))
    is_val = np.zeros(len(labels), bool)
    is_val[val_idx] = True
    return np.flatnonzero(~is_val), val_idx


def class_list(names, most: int = 6) -> str:
    """Class names for a message: how many, and the first ``most``.

    Example:
        >>> class_list(["cat", "dog", "fox"], most=2)
        '3 classes [cat, dog, ...]'
    """
    names = [str(name) for name in names]
    return f"{len(names)} classes [{', '.join(names[:most])}{', ...' if len(names) > most else ''}]"


def count_classes(labels, num_classes: int) -> list[int]:
    """Examples per class index, as a list of Python ints."""
    return [int(n) for n in np.bincount(np.asarray(labels, np.int64), minlength=num_classes)]


def _check_ordered(values, name: str) -> None:
    """Raise ValueError if `values` is a set or a dict view: an order it happens to have would set the
    labels, and a set's changes from one process to the next (string hashing is randomised)."""
    if isinstance(values, (collections.abc.Set, collections.abc.MappingView)):
        raise ValueError(f"{name} must be a list, in label order, not a {type(values).__name__} (a set's order, and "
                         f"so the labels, can change from one process to the next). Received: {name}={values!r}")


def _unshared(images: np.ndarray, given) -> np.ndarray:
    """`images`, copied if it shares memory with `given`, the caller's argument (a cast is a copy already)."""
    return images.copy() if np.may_share_memory(images, given) else images


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _check_images(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (N, H, W) or (N, H, W, C) with C in {{1, 3}}. "
            f"Received: {name}.shape={x.shape}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must not be empty. Received: {name}.shape={x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        raise ValueError(
            f"{name} must hold raw 0-255 pixel values with an integer dtype (uint8). "
            f"Float images are refused because [0, 1] and [0, 255] cannot be told apart; "
            f"convert them first, e.g. (x * 255).round().astype('uint8') for [0, 1] floats "
            f"or x.round().astype('uint8') for [0, 255] floats. Received: {name}.dtype={x.dtype}"
        )
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
        raise ValueError(
            f"{name} must hold pixel values in 0..255. "
            f"Received: {name}.min()={lo}, {name}.max()={hi} ({name}.dtype={x.dtype})"
        )
    return x.astype(np.uint8)


def _check_labels(y, name: str, n: int, x_name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"{name} must hold integer labels, shape (N,) or (N, 1). Received: {name}.shape={y.shape}"
        )
    if y.shape[0] != n:
        raise ValueError(
            f"{x_name} and {name} must have the same length. "
            f"Received: len({x_name})={n}, len({name})={y.shape[0]}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise ValueError(
            f"{name} must hold integer class labels 0..K-1 (not one-hot, not float). "
            f"Received: {name}.dtype={y.dtype}"
        )
    if int(y.min()) < 0:
        raise ValueError(f"{name} must hold labels 0..K-1. Received: {name}.min()={int(y.min())}")
    if int(y.max()) > np.iinfo(np.int32).max:
        raise ValueError(f"{name} labels are too large. Received: {name}.max()={int(y.max())}")
    return y.astype(np.int32)


def _fingerprint_arrays(x, y, x_test, y_test, class_names, val_split, seed) -> str:
    h = hashlib.sha256(b"cnnkit.data.from_arrays/v2\n")
    for name, arr in (("x", x), ("y", y), ("x_test", x_test), ("y_test", y_test)):
        if arr is None:
            h.update(f"{name}:none\n".encode())
            continue
        arr = np.ascontiguousarray(arr)
        h.update(f"{name}:{arr.dtype.str}:{arr.shape}\n".encode())
        h.update(memoryview(arr).cast("B"))
    h.update(json.dumps(list(class_names)).encode())
    h.update(json.dumps({"val_split": val_split, "seed": seed if val_split else None}).encode())
    return h.hexdigest()
