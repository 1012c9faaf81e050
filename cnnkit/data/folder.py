"""`from_folder`: images in one subfolder per class, decoded with PIL inside tf.data."""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import warnings
from pathlib import Path

import numpy as np

from cnnkit.data.imagedata import (
    ImageData,
    check_seed,
    check_val_split,
    count_classes,
    stratified_split,
)

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
_COLOR_MODES = {"rgb": ("RGB", 3), "grayscale": ("L", 1)}
_SHOW_SKIPPED = 5  # paths named in the warning


def from_folder(
    path,
    *,
    image_size,
    color_mode: str = "rgb",
    val_split: float = 0.1,
    test_path=None,
    seed: int = 0,
    extensions=DEFAULT_EXTENSIONS,
) -> ImageData:
    """Images stored one subfolder per class, as an `ImageData`.

    Layout: `path/<class name>/**/<image>`; the sorted subfolder names are the class names
    (hidden entries, starting with `.`, are ignored). Files are listed recursively with the
    given extensions (case-insensitive), sorted by relative path, so the same folder always
    gives the same datasets.

    Every listed file's header is opened with PIL at scan time (format and size only, no
    pixel decoding). Files PIL cannot open are excluded, named in a warning and recorded in
    `ImageData.skipped` as `(path, reason)`; nothing is dropped silently. A file that passes
    the header check but fails to decode later (e.g. truncated data) raises an error naming
    it while iterating.

    Decoding happens in the tf.data pipeline (`tf.numpy_function`, parallel `map`, AUTOTUNE):
    PIL opens the file, applies the EXIF orientation (`ImageOps.exif_transpose`), converts
    to RGB or L (alpha is dropped, palettes expanded) and resizes to `image_size` with
    bilinear resampling; elements are `uint8` `[H, W, C]` images with `int32` labels.

    Args:
        path: Folder with one subfolder per class.
        image_size: `(height, width)` every image is resized to (an int means square).
        color_mode: `"rgb"` (3 channels) or `"grayscale"` (1 channel).
        val_split: Fraction of each class's files moved to validation, in `[0, 1)`,
            stratified and seeded as in `from_arrays`; `0` means `val` is `None`.
        test_path: Optional folder with the same layout and the same class names, used as
            the test split.
        seed: Non-negative integer seed of the validation split.
        extensions: File name endings to include, compared case-insensitively.

    Returns:
        An `ImageData` with `source="folder PATH"` (plus the test folder) and a fingerprint of
        the sorted relative paths and sizes of the files used, with the class names.

    Raises:
        ValueError: If a folder is missing or is not a folder, has no class subfolders, or a
            class has no readable images; if the test folder's classes differ; or on a bad
            argument. The message names the path or the argument.

    Example:
        >>> from cnnkit.data import from_folder
        >>> data = from_folder("flowers/train", image_size=(64, 64),
        ...                    test_path="flowers/test")  # doctest: +SKIP
        >>> print(data.summary())  # doctest: +SKIP
    """
    root = _check_dir(path, "path")
    test_root = _check_dir(test_path, "test_path") if test_path is not None else None
    height, width = _check_image_size(image_size)
    if color_mode not in _COLOR_MODES:
        raise ValueError(
            f"color_mode must be one of {sorted(_COLOR_MODES)}. Received: color_mode={color_mode!r}"
        )
    pil_mode, channels = _COLOR_MODES[color_mode]
    val_split = check_val_split(val_split)
    seed = check_seed(seed)
    extensions = _check_extensions(extensions)

    class_names, files, labels, sizes, skipped = _scan(root, extensions, "path")
    test = None
    if test_root is not None:
        test_classes, t_files, t_labels, t_sizes, t_skipped = _scan(
            test_root, extensions, "test_path"
        )
        if test_classes != class_names:
            raise ValueError(
                f"The test folder's class subfolders must match the train folder's. "
                f"Train folder {root} has {class_names}; test folder {test_root} has "
                f"{test_classes}. Received: path={str(path)!r}, test_path={str(test_path)!r}"
            )
        test = (t_files, t_labels)
        skipped += t_skipped
    if skipped:
        shown = "; ".join(f"{p} ({reason})" for p, reason in skipped[:_SHOW_SKIPPED])
        more = (
            f"; ... and {len(skipped) - _SHOW_SKIPPED} more" if len(skipped) > _SHOW_SKIPPED else ""
        )
        warnings.warn(
            f"from_folder skipped {len(skipped)} file(s) that PIL cannot open: {shown}{more}. "
            "The full list is in ImageData.skipped.",
            stacklevel=2,
        )

    labels = np.asarray(labels, np.int32)
    num_classes = len(class_names)
    train_idx, val_idx = stratified_split(labels, num_classes, val_split, seed)
    splits = {"train": ([files[i] for i in train_idx], labels[train_idx])}
    if val_idx is not None:
        splits["val"] = ([files[i] for i in val_idx], labels[val_idx])
    if test is not None:
        splits["test"] = (test[0], np.asarray(test[1], np.int32))

    datasets = {
        split: _make_dataset(split_files, split_labels, (height, width), pil_mode, channels)
        for split, (split_files, split_labels) in splits.items()
    }

    listing = {"train": _listing(root, files, sizes)}
    source = f"folder {root}"
    if test_root is not None:
        listing["test"] = _listing(test_root, test[0], t_sizes)
        source += f" (test: folder {test_root})"
    digest = hashlib.sha256(b"cnnkit.data.from_folder/v1\n")
    digest.update(json.dumps({"class_names": class_names, "files": listing}).encode())

    return ImageData(
        train=datasets["train"],
        val=datasets.get("val"),
        test=datasets.get("test"),
        class_names=class_names,
        image_shape=(height, width, channels),
        class_counts={
            split: count_classes(split_labels, num_classes)
            for split, (_, split_labels) in splits.items()
        },
        source=source,
        fingerprint=digest.hexdigest(),
        skipped=skipped,
    )


def _check_dir(path, name: str) -> Path:
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name} must be a folder path. Received: {name}={path!r}")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"Folder not found: {folder}. Received: {name}={str(path)!r}")
    if not folder.is_dir():
        raise ValueError(f"Not a folder: {folder}. Received: {name}={str(path)!r}")
    return folder.resolve()


def _check_image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        height, width = image_size
        ok = all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
            for v in (height, width)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "image_size must be (height, width) with two positive integers. "
            f"Received: image_size={image_size!r}"
        )
    return int(height), int(width)


def _check_extensions(extensions) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        result = tuple(e.lower() for e in extensions)
    except (TypeError, AttributeError):
        result = ()
    if not result or not all(isinstance(e, str) and e for e in result):
        raise ValueError(
            "extensions must be a non-empty sequence of file endings such as '.png'. "
            f"Received: extensions={extensions!r}"
        )
    return result


def _scan(root: Path, extensions, name: str):
    """List a class-per-subfolder tree: (class_names, files, labels, sizes, skipped)."""
    from PIL import Image

    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not class_dirs:
        raise ValueError(
            f"No class subfolders in {root}: expected one subfolder of images per class "
            f"(e.g. {root / 'cats'}/1.jpg). Received: {name}={str(root)!r}"
        )
    class_names = [p.name for p in class_dirs]
    files, labels, sizes, skipped = [], [], [], []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for file in _list_images(class_dir, extensions):
            try:
                with Image.open(file):  # parses the header only; no pixels decoded
                    pass
            except Exception as exc:  # noqa: BLE001  (PIL raises many types for bad files)
                skipped.append((str(file), f"{type(exc).__name__}: {exc}"))
                continue
            files.append(str(file))
            labels.append(label)
            sizes.append(file.stat().st_size)
            found += 1
        if not found:
            unreadable = [item for item in skipped if Path(item[0]).is_relative_to(class_dir)]
            detail = (
                f" ({len(unreadable)} file(s) could not be opened, e.g. "
                f"{unreadable[0][0]}: {unreadable[0][1]})"
                if unreadable
                else ""
            )
            raise ValueError(
                f"Class folder {class_dir} has no readable images with extensions "
                f"{list(extensions)}{detail}. Received: {name}={str(root)!r}"
            )
    return class_names, files, labels, sizes, skipped


def _list_images(folder: Path, extensions) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and filename.lower().endswith(extensions):
                found.append(Path(dirpath, filename))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _listing(root: Path, files, sizes) -> list[list]:
    root_str = str(root)
    return sorted(
        [Path(os.path.relpath(f, root_str)).as_posix(), int(s)] for f, s in zip(files, sizes)
    )


def _make_dataset(files, labels, size, pil_mode, channels):
    import tensorflow as tf

    height, width = size

    def decode(path: bytes) -> np.ndarray:
        return _load_image(os.fsdecode(path), (height, width), pil_mode)

    def load(path, label):
        image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
        image.set_shape((height, width, channels))
        return image, label

    paths = np.array([os.fsencode(f) for f in files], dtype=object)
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32))
    )
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _load_image(path: str, size: tuple[int, int], pil_mode: str) -> np.ndarray:
    """Decode one file with PIL: EXIF orientation, mode conversion, bilinear resize."""
    from PIL import Image, ImageOps

    height, width = size
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode != pil_mode:
                if image.mode == "P" and "transparency" in image.info:
                    image = image.convert("RGBA")  # avoids PIL's palette-transparency warning
                image = image.convert(pil_mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as exc:
        raise ValueError(f"cnnkit.data.from_folder cannot decode {path}: {exc}") from exc
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return array
