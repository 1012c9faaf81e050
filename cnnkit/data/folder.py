"""`from_folder`: images in one subfolder per class, checked when listed, decoded with PIL inside tf.data.

A folder of real-world files holds surprises: zero-byte and truncated files, text named `.png`,
16-bit, CMYK, palette and transparent images, EXIF-rotated photos, decompression bombs. None of
them may crash a pipeline, and none may be dropped silently: every listed file is checked once
when the folder is scanned (`scan_folder`, shared with `cnnkit.data.audit`), the usable ones are
converted the same documented way every time (`convert_image`), and each excluded file is
recorded with its reason in `ImageData.skipped` and named in a warning, as is a subfolder that
cannot be read. Symlinked subfolders are followed, each real folder once in the whole folder: a
second way into one (a link back up, a loop, a link into another class's folder) is left out with a
reason, so no image gets two labels. A class folder that cannot be listed (unreadable, a broken
symlink, another name for a class folder: a symlink to it or into it) is refused by `from_folder`,
naming it and why, rather than dropped, which would shift the labels of the classes after it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import numbers
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnnkit.data.imagedata import (
    ImageData,
    check_seed,
    check_val_split,
    count_classes,
    stratified_split,
)

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")

MAX_IMAGE_PIXELS = 89_478_485
"""Default `max_pixels` (width * height): PIL's own default `PIL.Image.MAX_IMAGE_PIXELS`, about
9459 x 9459, i.e. 256 MiB once decoded to 8-bit RGB. Larger files are skipped as possible
decompression bombs, judged from the header before any pixel is decoded."""

ALPHA_BACKGROUND = (255, 255, 255)
"""Colour that transparent pixels are composited onto: white. Transparent regions of cut-out
photos, icons, logos and line art are made to be seen on a (white) page, as viewers and browsers
show them; dark content stays visible on white but would vanish on black. Merely dropping the
alpha channel (what `Image.convert("RGB")` or `tf.io.decode_png(channels=3)` do) would instead
expose whatever colour the invisible pixels happen to store."""

_COLOR_MODES = {"rgb": ("RGB", 3), "grayscale": ("L", 1)}
_SHOW_SKIPPED = 5  # paths named in the warning
_SCAN_THREADS = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding


class FolderScan(NamedTuple):
    """What `scan_folder` found in a class-per-subfolder tree.

    Attributes:
        root: The folder scanned (resolved).
        class_names: Sorted names of the class subfolders, those that cannot be listed included.
        files: Paths of the usable images, in class order then sorted relative path.
        labels: Class index of each file in `files`.
        sizes: Size in bytes of each file in `files`.
        skipped: `(path, reason)` for each class folder that cannot be listed (a broken symlink,
            another name for a class folder), each subfolder that cannot be read or is a second
            way into a folder listed once in the scan (a symlink, also into another class's
            folder), then each listed file that cannot be used, in listing order.
        unlisted: The files not listed for their name (not ending in one of `extensions`),
            counted per lower-case extension (`""` for none), e.g. `{".txt": 1, ".webp": 2}`.
    """

    root: Path
    class_names: list[str]
    files: list[str]
    labels: list[int]
    sizes: list[int]
    skipped: list[tuple[str, str]]
    unlisted: dict[str, int]


def from_folder(
    path,
    *,
    image_size,
    color_mode: str = "rgb",
    val_split: float = 0.1,
    test_path=None,
    seed: int = 0,
    shuffle: bool = True,
    extensions=DEFAULT_EXTENSIONS,
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify: bool = True,
) -> ImageData:
    """Images stored one subfolder per class, as an `ImageData`.

    Layout: `path/<class name>/**/<image>`; the sorted subfolder names are the class names
    (hidden entries, starting with `.`, are ignored). Files are listed recursively with the
    given extensions (case-insensitive), sorted by relative path, so the same folder always
    gives the same datasets. Symlinks are followed, each real folder once in the whole tree, so
    an image never gets two labels: a second way into a folder already listed (a link back up,
    a loop, a link from one class into another class's folder) is skipped with a reason. A class
    entry that is a symlink leading to no folder (an unmounted disk), or to or into another class
    folder, is refused, as is a class folder that cannot be read: dropping it would shift the
    labels of the classes after it. The extension only selects files: the format is detected from
    the content, so a PNG named `.jpg` is read as the PNG it is.

    Every listed file is checked when the folder is scanned, and a file is skipped when it is
    empty, not an image PIL can identify, larger than `max_pixels` (judged from the header,
    before anything is decoded: a decompression bomb costs nothing), or, with `verify=True`,
    fails to decode (truncated or corrupt data). Skipped files are named in one warning (the
    count and the first few) and listed with their reasons in `ImageData.skipped`; PIL's own
    `DecompressionBombWarning`/`Error` never escape. Verifying means decoding every file once
    at scan time (in a thread pool; JPEGs at 1/8 scale, which still reads every byte), so that
    iterating the datasets cannot fail on a bad file halfway through training. Measured on 2,000
    JPEGs (busy 2-core machine, best of 5): `from_folder` takes 0.18 s with `verify=False` and
    0.47 s with `verify=True` at 128x96 pixels, 0.12 s and 2.2 s at 500x375, a third to a half
    of what one epoch of pipeline decoding costs (1.0 s and 6-7.5 s, resizing to 64x64). Pass
    `verify=False` for very large folders you trust: then a file that passes the header check
    but fails to decode raises an error naming it while iterating, as does a file that
    changes after the scan.

    Decoding happens in the tf.data pipeline (`tf.numpy_function`, parallel `map`, AUTOTUNE)
    with `convert_image`: EXIF orientation applied; 16-bit grayscale images scaled to 8 bits
    (`round(v / 257)`: 65535 -> 255, 32896 -> 128), not clipped (16-bit RGB: PIL keeps the high byte); transparency composited onto
    white (`ALPHA_BACKGROUND`); CMYK, palette and other modes converted to RGB or L by PIL;
    the first frame of an animation. Images are then resized to `image_size` with bilinear
    resampling; elements are `uint8` `[H, W, C]` images with `int32` labels.

    Args:
        path: Folder with one subfolder per class.
        image_size: `(height, width)` every image is resized to (an int means square).
        color_mode: `"rgb"` (3 channels) or `"grayscale"` (1 channel).
        val_split: Fraction of each class's files moved to validation, in `[0, 1)`,
            stratified and seeded as in `from_arrays`; `0` means `val` is `None`.
        test_path: Optional folder with the same layout and the same class names, used as
            the test split; neither `path` nor inside it nor holding it (after resolving links).
        seed: Non-negative integer seed of the validation split and of `shuffle`.
        shuffle: Store the training split in a seeded random order, as Keras's
            `image_dataset_from_directory` does, rather than class by class and sorted: a
            shuffle buffer smaller than the split, or a sample from its head, then still sees
            every class. Validation and test splits keep the sorted order.
        extensions: File name endings to include, compared case-insensitively.
        max_pixels: Largest `width * height` accepted; larger files are skipped unread.
            PIL's own `PIL.Image.MAX_IMAGE_PIXELS` applies too where it is lower (the reason
            names the limit; raise PIL's to go beyond it).
        verify: Decode every file once at scan time (`True`) or only read headers (`False`).

    Returns:
        An `ImageData` with `source="folder PATH"` (plus the test folder), a fingerprint of
        the sorted relative paths and sizes of the files used, the class names, and the
        decoding and split options (`image_size`, `color_mode`, `val_split`, `seed`, `shuffle`),
        and
        `skipped` listing `(path, reason)` for every file left out (train folder first).

    Raises:
        ValueError: If a folder is missing or is not a folder, has no class subfolders, or a
            class has no usable images or cannot be listed (unreadable, a broken symlink, another
            name for a class folder: the message says which); if the test folder is the train
            folder or one is inside the other, or the test folder's classes differ; or on a bad
            argument. The message names the path or the argument.

    Example:
        >>> from cnnkit.data import from_folder
        >>> data = from_folder("flowers/train", image_size=(64, 64),
        ...                    test_path="flowers/test")  # doctest: +SKIP
        >>> print(data.summary())  # doctest: +SKIP
        >>> data.skipped  # doctest: +SKIP
        [('/data/flowers/train/rose/0042.jpg', 'cannot decode: OSError: image file is truncated ...')]
    """
    root = check_dir(path, "path")
    test_root = check_test_dir(test_path, root, path) if test_path is not None else None
    height, width = _check_image_size(image_size)
    if color_mode not in _COLOR_MODES:
        raise ValueError(
            f"color_mode must be one of {sorted(_COLOR_MODES)}. Received: color_mode={color_mode!r}"
        )
    pil_mode, channels = _COLOR_MODES[color_mode]
    val_split = check_val_split(val_split)
    seed = check_seed(seed)
    extensions = check_extensions(extensions)
    max_pixels = check_max_pixels(max_pixels)
    if not isinstance(verify, bool):
        raise ValueError(f"verify must be True or False. Received: verify={verify!r}")
    scan_options = {"max_pixels": max_pixels, "verify": verify, "pil_mode": pil_mode}

    train_scan = scan_folder(root, extensions, name="path", **scan_options)
    _require_images(train_scan, extensions, "path")
    skipped = list(train_scan.skipped)
    test_scan = None
    if test_root is not None:
        test_scan = scan_folder(test_root, extensions, name="test_path", **scan_options)
        if test_scan.class_names != train_scan.class_names:
            raise ValueError(
                f"The test folder's class subfolders must match the train folder's. "
                f"Train folder {root} has {train_scan.class_names}; test folder {test_root} has "
                f"{test_scan.class_names}. Received: path={str(path)!r}, test_path={str(test_path)!r}"
            )
        _require_images(test_scan, extensions, "test_path")
        skipped += test_scan.skipped
    if skipped:
        warnings.warn(_skipped_message(skipped), stacklevel=2)

    class_names, files = train_scan.class_names, train_scan.files
    labels = np.asarray(train_scan.labels, np.int32)
    num_classes = len(class_names)
    train_idx, val_idx = stratified_split(labels, num_classes, val_split, seed)
    if shuffle:
        train_idx = np.random.default_rng(seed).permutation(train_idx)
    splits = {"train": ([files[i] for i in train_idx], labels[train_idx])}
    if val_idx is not None:
        splits["val"] = ([files[i] for i in val_idx], labels[val_idx])
    if test_scan is not None:
        splits["test"] = (test_scan.files, np.asarray(test_scan.labels, np.int32))

    datasets = {
        split: _make_dataset(split_files, split_labels, (height, width), pil_mode, channels)
        for split, (split_files, split_labels) in splits.items()
    }

    listing = {"train": _listing(root, files, train_scan.sizes)}
    source = f"folder {root}"
    if test_scan is not None:
        listing["test"] = _listing(test_root, test_scan.files, test_scan.sizes)
        source += f" (test: folder {test_root})"
    options = {"image_size": [height, width], "color_mode": color_mode, "val_split": val_split,
               "shuffle": bool(shuffle), "seed": seed if val_split or shuffle else None}
    digest = hashlib.sha256(b"cnnkit.data.from_folder/v2\n")
    digest.update(json.dumps({"class_names": class_names, "files": listing, "options": options}).encode())

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


def scan_folder(
    root: Path, extensions, *, max_pixels: int, verify: bool, pil_mode: str = "RGB", name: str = "path"
) -> FolderScan:
    """List a class-per-subfolder tree and check every listed file with `check_image`.

    Arguments are taken as already checked (`from_folder` and `audit` do that). Empty classes
    are not an error here: callers decide. One set of real folders serves the whole scan, so a
    symlink into another class's folder lists nothing twice. A class entry that is a broken
    symlink or another name for a class folder stays a class, empty, with its reason in `skipped`.

    Args:
        root: Resolved folder with one subfolder per class.
        extensions: Lower-case file endings to list.
        max_pixels: Largest `width * height` accepted.
        verify: Whether to decode each file (else the header only).
        pil_mode: `"RGB"` or `"L"`, the mode verification converts to.
        name: Argument name used in the error message.

    Returns:
        A `FolderScan`.

    Raises:
        ValueError: If `root` has no class subfolders.

    Example:
        >>> scan = scan_folder(Path("pets").resolve(), (".jpg",), max_pixels=MAX_IMAGE_PIXELS,
        ...                    verify=True)  # doctest: +SKIP
        >>> scan.class_names, len(scan.files), scan.skipped  # doctest: +SKIP
        (['cat', 'dog'], 200, [])
    """
    from PIL import Image

    class_dirs, unusable = _class_folders(root)
    if not class_dirs:
        raise ValueError(
            f"No class subfolders in {root}: expected one subfolder of images per class "
            f"(e.g. {root / 'cats'}/1.jpg). Received: {name}={str(root)!r}"
        )
    names = [p.name for p in class_dirs]
    if len(names) > 1 and {folder.lower() for folder in names} <= SPLIT_NAMES:
        train = next((folder for folder in names if folder.lower() in ("train", "training")), names[0])
        warnings.warn(f"the class subfolders of {root} are {names}: that looks like a dataset's splits, not its "
                      f"classes; give {name}={str(root / train)!r} (and test_path= the other split) for a "
                      "folder of class subfolders", stacklevel=3)
    listed, left_out, walked = [], [(str(entry), reason) for entry, reason in unusable.items()], set()
    unlisted = collections.Counter()
    reals = {class_dir: os.path.realpath(class_dir) for class_dir in class_dirs if class_dir not in unusable}
    for label, class_dir in enumerate(class_dirs):
        if class_dir not in reals:
            continue
        elsewhere = [real for other, real in reals.items() if other != class_dir]
        files, folders = walk_files(class_dir, walked, elsewhere)
        for file in files:
            if file.name.lower().endswith(extensions):
                listed.append((str(file), label))
            else:
                unlisted[file.suffix.lower()] += 1
        left_out += folders
    check = functools.partial(check_image, max_pixels=max_pixels, verify=verify, pil_mode=pil_mode)
    with warnings.catch_warnings():
        # PIL warns on opening a file above its limit; such a file is skipped with a reason here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if verify and len(listed) > 1 and _SCAN_THREADS > 1:
            with ThreadPoolExecutor(_SCAN_THREADS) as pool:
                results = list(pool.map(check, [file for file, _ in listed]))
        else:
            results = [check(file) for file, _ in listed]
    scan = FolderScan(root, names, [], [], [], left_out, dict(sorted(unlisted.items())))
    for (file, label), (size, reason) in zip(listed, results):
        if reason is not None:
            scan.skipped.append((file, reason))
            continue
        scan.files.append(file)
        scan.labels.append(label)
        scan.sizes.append(size)
    return scan


def check_image(path, *, max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = True, pil_mode: str = "RGB"):
    """Whether one file can be used as an image, and if not, why.

    Order of the checks: the file's size (empty files), PIL's header parse (format from the
    content), `width * height` against `max_pixels` or PIL's own `PIL.Image.MAX_IMAGE_PIXELS`,
    whichever is lower (before any decoding), then with `verify` a full decode, EXIF
    orientation and `convert_image` (JPEGs decoded at 1/8 scale with `Image.draft`, which
    still reads and checks every byte). Never raises.

    Args:
        path: File to check.
        max_pixels: Largest `width * height` accepted.
        verify: Decode the pixels (`True`) or stop after the header (`False`).
        pil_mode: `"RGB"` or `"L"`, the mode to convert to when verifying.

    Returns:
        `(size_in_bytes, reason)`: `reason` is `None` for a usable file, else one line.

    Example:
        >>> check_image("cats/empty.jpg")  # doctest: +SKIP
        (0, 'empty file (0 bytes)')
    """
    from PIL import Image, ImageOps

    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return 0, f"cannot read the file: {exc.strerror or exc}"
    if size == 0:
        return 0, "empty file (0 bytes)"
    stage = "cannot read the header"
    limit, limit_name = max_pixels, "max_pixels"
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        limit, limit_name = Image.MAX_IMAGE_PIXELS, "PIL.Image.MAX_IMAGE_PIXELS"  # PIL would warn above it
    try:
        with Image.open(path) as image:  # parses the header only; no pixels decoded yet
            width, height = image.size
            if width * height > limit:
                return size, (
                    f"too many pixels, possible decompression bomb: {width}x{height} = {width * height:,} "
                    f"> {limit_name}={limit:,} (judged from the header; nothing decoded)"
                )
            if verify:
                stage = "cannot decode"
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))  # JPEG only; others ignore it
                convert_image(ImageOps.exif_transpose(image), pil_mode)
    except Image.DecompressionBombError as exc:  # over PIL's own hard limit (2 x its MAX_IMAGE_PIXELS)
        return size, f"too many pixels, possible decompression bomb: {exc}"
    except Image.UnidentifiedImageError:
        return size, "cannot identify image file: not an image, or a format PIL cannot read"
    except Exception as exc:  # noqa: BLE001  (PIL raises many types for bad files)
        return size, f"{stage}: {type(exc).__name__}: {exc}"
    return size, None


def convert_image(image, pil_mode: str):
    """Convert a PIL image to `"RGB"` or `"L"` without losing what PIL's `convert` loses.

    16-bit and 32-bit integer modes (`I;16`, `I;16B`, `I`) are scaled as 16-bit data with
    `round(v / 257)` (65535 -> 255, 32896 -> 128; values outside 0..65535 clipped) where
    `convert("L")` would clip everything above 255 to white. Images with transparency (an
    alpha channel, or a transparent palette entry or colour) are composited onto
    `ALPHA_BACKGROUND` (white). Everything else (CMYK, palette, 1-bit, YCbCr, ...) uses
    PIL's `convert`; CMYK uses PIL's plain formula, without an ICC profile.

    Args:
        image: A PIL image (EXIF orientation already applied if wanted).
        pil_mode: `"RGB"` or `"L"`.

    Returns:
        A PIL image in `pil_mode`.

    Example:
        >>> from PIL import Image
        >>> from cnnkit.data.folder import convert_image
        >>> convert_image(Image.new("I;16", (1, 1), 32896), "L").getpixel((0, 0))
        128
        >>> convert_image(Image.new("RGBA", (1, 1), (9, 9, 9, 0)), "RGB").getpixel((0, 0))
        (255, 255, 255)
    """
    from PIL import Image

    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    elif image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == pil_mode else image.convert(pil_mode)


def check_max_pixels(max_pixels) -> int:
    """Return `max_pixels` as a positive int, or raise ValueError."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise ValueError(
            f"max_pixels must be a positive integer (width * height). Received: max_pixels={max_pixels!r}"
        )
    return int(max_pixels)


def _require_images(scan: FolderScan, extensions, name: str) -> None:
    """Raise ValueError naming the first class folder of `scan` without a usable image."""
    counts = count_classes(scan.labels, len(scan.class_names))
    for class_name, count in zip(scan.class_names, counts):
        if count:
            continue
        class_dir = scan.root / class_name
        reason = next((reason for folder, reason in scan.skipped if folder == str(class_dir)), None)
        if reason is not None:
            raise ValueError(f"Class folder {class_dir} cannot be listed: {reason}. "
                             f"Received: {name}={str(scan.root)!r}")
        unusable = [item for item in scan.skipped if Path(item[0]).is_relative_to(class_dir)]
        detail = (
            f" ({len(unusable)} file(s) were skipped, e.g. {unusable[0][0]}: {unusable[0][1]})"
            if unusable
            else ""
        )
        raise ValueError(
            f"Class folder {class_dir} has no readable images with extensions "
            f"{list(extensions)}{detail}. Received: {name}={str(scan.root)!r}"
        )


def _skipped_message(skipped) -> str:
    shown = "; ".join(f"{p} ({reason})" for p, reason in skipped[:_SHOW_SKIPPED])
    more = f"; ... and {len(skipped) - _SHOW_SKIPPED} more" if len(skipped) > _SHOW_SKIPPED else ""
    return (
        f"from_folder skipped {len(skipped)} file(s) or folder(s) that cannot be used: {shown}{more}. "
        "The full list is in ImageData.skipped."
    )


def check_dir(path, name: str) -> Path:
    """Return `path` as a resolved existing folder, or raise ValueError naming the argument `name`.

    An empty or blank path (an unset shell variable) is refused, not read as the current folder.
    """
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name} must be a folder path. Received: {name}={path!r}")
    if not str(path).strip():
        raise ValueError(f"{name} is empty: expected a folder path. Received: {name}={path!r}")
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


def check_test_dir(test_path, root: Path, path) -> Path:
    """The resolved test folder, refused when it is the train folder ``root`` or one is inside the other.

    Example:
        >>> check_test_dir("pets/train", Path("pets/train").resolve(), "pets/train")  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        ValueError: The test folder /home/me/pets/train is the train folder /home/me/pets/train: ...
    """
    test_root = check_dir(test_path, "test_path")
    if test_root.is_relative_to(root) or root.is_relative_to(test_root):
        where = "the train folder" if test_root == root else "nested with the train folder"
        raise ValueError(
            f"The test folder {test_root} is {where} {root}: every test image would also be a training "
            f"image. Give a separate folder. Received: path={str(path)!r}, test_path={str(test_path)!r}"
        )
    return test_root


def check_extensions(extensions) -> tuple[str, ...]:
    """Return `extensions` as a tuple of lower-case endings, or raise ValueError."""
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


SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


def _class_folders(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """The class subfolders of ``root`` sorted by name (hidden entries and files ignored), and the
    reason each one that cannot be listed cannot: a symlink leading to no folder (dangling, a loop),
    or another name for a class folder (the same real folder, or one inside it). Real folders claim
    their real path before symlinks do, then in name order.
    """
    class_dirs, unusable, owners = [], {}, {}
    for entry in sorted(root.iterdir(), key=lambda p: (p.is_symlink(), p.name)):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.is_symlink() and not entry.exists():
                class_dirs.append(entry)
                unusable[entry] = f"a broken symlink (to {os.readlink(entry)}), not a folder that can be listed"
            continue
        class_dirs.append(entry)
        real = os.path.realpath(entry)
        owner = next((owners[r] for r in owners if Path(real).is_relative_to(r)), None)
        if owner is not None:
            unusable[entry] = f"another name for the class folder {owner} (a symlink to {real}), not a class of its own"
        else:
            owners[real] = entry
    class_dirs.sort(key=lambda p: p.name)
    return class_dirs, dict(sorted(unusable.items()))


def walk_files(folder, listed=None, elsewhere=()) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file under ``folder`` (hidden entries skipped), sorted by relative path, and
    ``(folder, reason)`` for each subfolder left out.

    Symlinked subfolders are followed, each real folder listed once: a second way into one (a
    link back up, a loop) is left out with a reason, as is a folder that cannot be read. A
    dangling link is listed as a file, for its reader to report. To list each real folder once
    over several calls (the class folders of one tree), pass them one ``listed`` set, and the
    real paths of the other calls' folders as ``elsewhere``: a way into one of them, or into a
    folder inside one, is left out as a second way in too.

    Example:
        >>> walk_files(Path("pets/cat"))  # doctest: +SKIP
        ([PosixPath('pets/cat/1.jpg'), PosixPath('pets/cat/more/2.jpg')], [])
    """
    folder = Path(folder)
    found, left_out = [], []
    listed = set() if listed is None else listed

    def unreadable(error):
        left_out.append((str(error.filename), f"cannot read the folder: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in listed or any(Path(real).is_relative_to(other) for other in elsewhere):
            dirnames[:] = []
            left_out.append((dirpath, f"a second way into the folder {real}, listed once (a symlink)"))
            continue
        listed.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, filename) for filename in filenames if not filename.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix()), left_out


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
    """Decode one file with PIL: EXIF orientation, `convert_image`, bilinear resize."""
    from PIL import Image, ImageOps

    height, width = size
    try:
        with Image.open(path) as image:
            image = convert_image(ImageOps.exif_transpose(image), pil_mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as exc:
        raise ValueError(f"cannot decode image file {path}: {exc}") from exc
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return array
