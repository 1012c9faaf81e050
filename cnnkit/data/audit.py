"""`audit`: what is wrong with an image folder before it is trained on.

Per-class counts, files that cannot be used (with reasons, exactly as `from_folder` would skip
them), files left out by their extension, and exact duplicates: files with the same bytes (SHA-256)
within a class, across classes (conflicting labels) and across the train and test folders (leakage).
PIL and hashlib only, no TensorFlow, so `cnnkit data audit` starts fast.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import NamedTuple

from cnnkit.data.folder import (
    DEFAULT_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    check_dir,
    check_extensions,
    check_max_pixels,
    check_test_dir,
    scan_folder,
)

SPLITS = ("train", "test")
_SHOW = 20  # items per section in str(report)


class AuditedFile(NamedTuple):
    """One usable file of an audited folder."""

    split: str  # "train" (the `path` folder, validation included) or "test"
    class_name: str
    path: str


class DuplicateGroup(NamedTuple):
    """Files with identical bytes (the same SHA-256), in listing order."""

    sha256: str
    files: list[AuditedFile]

    @property
    def within_class(self) -> bool:
        """Two or more copies in the same split and class (counted twice; may land in train and val)."""
        keys = [(f.split, f.class_name) for f in self.files]
        return len(set(keys)) < len(keys)

    @property
    def conflicting_labels(self) -> bool:
        """Copies in two or more classes: the same image carries different labels."""
        return len({f.class_name for f in self.files}) > 1

    @property
    def train_test_leak(self) -> bool:
        """Copies in both the train and the test folder."""
        return {f.split for f in self.files} == set(SPLITS)


@dataclasses.dataclass
class AuditReport:
    """What `audit` found. `str(report)` is a readable report; `to_dict()` is plain JSON data.

    Attributes:
        path: The train folder (resolved).
        test_path: The test folder, or `None`.
        class_names: Sorted class subfolder names of both folders together.
        class_counts: `{"train": {class: usable files}, "test": {...}}` (no "test" without
            a test folder); a class missing from one folder counts 0 there.
        skipped: `(path, reason)` for each file (or unreadable subfolder) `from_folder` would skip.
        left_out: Files in the class folders that are not listed because of their extension, counted
            per lower-case extension (`""` for none), e.g. `{".txt": 1, ".webp": 2}`. Those PIL opens
            as images are a problem (`from_folder` would leave them out silently); others are not.
        duplicates: Every group of two or more usable files with identical bytes.

    Example:
        >>> report = audit("pets/train", test_path="pets/test")  # doctest: +SKIP
        >>> report.clean, len(report.train_test_leaks)  # doctest: +SKIP
        (False, 3)
    """

    path: str
    test_path: str | None
    class_names: list[str]
    class_counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]]
    left_out: dict[str, int]
    duplicates: list[DuplicateGroup]

    @property
    def within_class(self) -> list[DuplicateGroup]:
        """Duplicate groups with two or more copies in one split and class."""
        return [group for group in self.duplicates if group.within_class]

    @property
    def conflicting_labels(self) -> list[DuplicateGroup]:
        """Duplicate groups whose copies are in different classes."""
        return [group for group in self.duplicates if group.conflicting_labels]

    @property
    def train_test_leaks(self) -> list[DuplicateGroup]:
        """Duplicate groups with copies in both the train and the test folder."""
        return [group for group in self.duplicates if group.train_test_leak]

    @property
    def problems(self) -> list[str]:
        """One line per kind of problem found; empty when the folders are clean."""
        problems = []
        if len(self.class_names) < 2:
            problems.append(f"{len(self.class_names)} class ({', '.join(self.class_names)}): a classifier needs at "
                            "least 2 class subfolders")
        for split, counts in self.class_counts.items():
            empty = [name for name, count in counts.items() if count == 0]
            if empty:
                problems.append(f"{len(empty)} class(es) without usable images in {split}: {', '.join(empty)}")
        if self.skipped:
            problems.append(f"{len(self.skipped)} file(s) or folder(s) skipped (cannot be used)")
        images = {ext: count for ext, count in self.left_out.items() if ext in _pil_extensions()}
        if images:
            problems.append(f"{sum(images.values())} image file(s) left out by their extension "
                            f"({', '.join(f'{ext} {count}' for ext, count in images.items())}): "
                            "add their extension to extensions= (--extensions) to use them")
        for groups, what in (
            (self.within_class, "duplicated within a class"),
            (self.conflicting_labels, "duplicated across classes (conflicting labels)"),
            (self.train_test_leaks, "in both train and test (leakage)"),
        ):
            if groups:
                problems.append(f"{len(groups)} image(s) {what}")
        return problems

    @property
    def clean(self) -> bool:
        """True when there is no problem at all."""
        return not self.problems

    def to_dict(self) -> dict:
        """The report as plain, JSON-serialisable data.

        Example:
            >>> json.dumps(report.to_dict(), indent=2)  # doctest: +SKIP
        """
        return {
            "path": self.path,
            "test_path": self.test_path,
            "clean": self.clean,
            "problems": self.problems,
            "class_names": list(self.class_names),
            "class_counts": {split: dict(counts) for split, counts in self.class_counts.items()},
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "left_out": dict(self.left_out),
            "duplicates": [
                {
                    "sha256": group.sha256,
                    "within_class": group.within_class,
                    "conflicting_labels": group.conflicting_labels,
                    "train_test_leak": group.train_test_leak,
                    "files": [file._asdict() for file in group.files],
                }
                for group in self.duplicates
            ],
        }

    def __str__(self) -> str:
        return self.text()

    def text(self, shown=str) -> str:
        """The readable report, `str(report)`, with `shown` applied to each line: the command line gives a
        function that escapes what a terminal cannot print in file and class names (undecodable bytes,
        control characters).

        Example:
            >>> print(report.text(shown=ascii))  # doctest: +SKIP
        """
        roots = {"train": Path(self.path), "test": Path(self.test_path) if self.test_path else None}

        def show(file: AuditedFile) -> str:
            return f"{file.split}:{Path(file.path).relative_to(roots[file.split]).as_posix()}"

        title = f"Audit of {self.path}" + (f" (test: {self.test_path})" if self.test_path else "")
        lines = [title, f"{len(self.class_names)} classes, usable images per class:"]
        splits = list(self.class_counts)
        width = max([5, *(len(name) for name in self.class_names)])
        lines.append("  " + f"{'class':<{width}}" + "".join(f"  {split:>6}" for split in splits))
        for name in self.class_names:
            counts = "".join(f"  {self.class_counts[split][name]:>6}" for split in splits)
            lines.append(f"  {name:<{width}}{counts}")
        totals = "".join(f"  {sum(self.class_counts[split].values()):>6}" for split in splits)
        lines.append(f"  {'total':<{width}}{totals}")
        lines.append(f"skipped files and folders: {len(self.skipped)}")
        lines += [f"  {path}: {reason}" for path, reason in self.skipped[:_SHOW]]
        if len(self.skipped) > _SHOW:
            lines.append(f"  ... and {len(self.skipped) - _SHOW} more (--json lists all)")
        lines.append(f"files left out by their extension: {sum(self.left_out.values())}")
        lines += [f"  {ext or '(none)'}: {count}" for ext, count in self.left_out.items()]
        lines.append(f"exact duplicates (identical file bytes, SHA-256): {len(self.duplicates)} group(s)")
        for title, groups in (
            ("within a class", self.within_class),
            ("across classes, conflicting labels", self.conflicting_labels),
            ("train/test leakage", self.train_test_leaks),
        ):
            lines.append(f"  {title}: {len(groups)}")
            lines += [f"    {' = '.join(show(file) for file in group.files)}" for group in groups[:_SHOW]]
            if len(groups) > _SHOW:
                lines.append(f"    ... and {len(groups) - _SHOW} more (--json lists all)")
        problems = self.problems
        lines.append("result: clean, no problems found" if not problems else f"result: {len(problems)} problem(s):")
        lines += [f"  - {problem}" for problem in problems]
        return "\n".join(map(shown, lines))


def audit(
    path,
    *,
    test_path=None,
    extensions=DEFAULT_EXTENSIONS,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> AuditReport:
    """Audit a class-per-subfolder image folder (and its test folder) for problems.

    Lists files exactly as `cnnkit.data.from_folder` does and checks each one the same way
    (full decode, `verify=True`), so `skipped` is what training would skip. Duplicates are
    exact: files whose bytes have the same SHA-256. The same picture re-encoded (another
    format or quality, resized, with other metadata) is not detected. Duplicates are reported
    within a class (same folder, same class: over-weighted, and may end up in both train and
    validation when `from_folder` splits the train folder), across classes (the same image
    with conflicting labels) and across the train and test folders (test leakage). Unlike
    `from_folder`, differing class folders between train and test, or a class without usable
    images, are reported (class counts of 0) rather than raised. Files left out by their
    extension are counted per extension; those PIL opens as images (`.webp`, `.tif`, ...) are a problem.

    Args:
        path: Train folder with one subfolder per class.
        test_path: Optional test folder with the same layout.
        extensions: File name endings to include, compared case-insensitively.
        max_pixels: Largest `width * height` accepted, as in `from_folder`.

    Returns:
        An `AuditReport`; `report.clean` is True when nothing was found.

    Raises:
        ValueError: If a folder is missing, is not a folder or has no class subfolders, if the test
            folder is the train folder or one is inside the other, or on a bad argument.

    Example:
        >>> from cnnkit.data import audit
        >>> report = audit("pets/train", test_path="pets/test")  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
        >>> report.to_dict()["problems"]  # doctest: +SKIP
        ['1 image(s) in both train and test (leakage)']
    """
    roots = {"train": check_dir(path, "path")}
    if test_path is not None:
        roots["test"] = check_test_dir(test_path, roots["train"], path)
    extensions = check_extensions(extensions)
    max_pixels = check_max_pixels(max_pixels)

    scans = {
        split: scan_folder(root, extensions, max_pixels=max_pixels, verify=True,
                           name="path" if split == "train" else "test_path")
        for split, root in roots.items()
    }
    class_names = sorted({name for scan in scans.values() for name in scan.class_names})
    class_counts, skipped, left_out, by_hash = {}, [], collections.Counter(), {}
    for split, scan in scans.items():
        counts = dict.fromkeys(class_names, 0)
        skipped += scan.skipped
        left_out.update(scan.unlisted)
        for file, label in zip(scan.files, scan.labels):
            try:
                digest = _sha256(file)
            except OSError as exc:  # removed or made unreadable since the scan
                skipped.append((file, f"cannot read the file: {exc.strerror or exc}"))
                continue
            class_name = scan.class_names[label]
            counts[class_name] += 1
            by_hash.setdefault(digest, []).append(AuditedFile(split, class_name, file))
        class_counts[split] = counts
    duplicates = [DuplicateGroup(digest, files) for digest, files in by_hash.items() if len(files) > 1]
    return AuditReport(
        path=str(roots["train"]),
        test_path=str(roots["test"]) if "test" in roots else None,
        class_names=class_names,
        class_counts=class_counts,
        skipped=skipped,
        left_out=dict(sorted(left_out.items())),
        duplicates=duplicates,
    )


@functools.cache
def _pil_extensions() -> frozenset[str]:
    """The file extensions PIL opens as images (`.webp`, `.tif`, ...)."""
    from PIL import Image

    return frozenset(ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
