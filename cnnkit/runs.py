"""The run directory: a trained model with its history, metrics and config, written atomically.

A run directory (``runs/<name>/``) holds::

    model.keras            the trained model (Keras 3 format)
    history.csv            one row per epoch: ``epoch`` (from 1), then one column per history key
    metrics.json           evaluation metrics (see ``cnnkit.evaluate.classification_metrics``)
    config.yaml            resolved arguments, versions, seed, data fingerprint, ``class_names``
    training_curves.png    loss / accuracy (/ learning rate) per epoch
    confusion_matrix.png   when the metrics include a confusion matrix
    README.md              a model card

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed
over the target (``os.replace``), so a crash never leaves a half-written file in place: readers
see either the old file or the new one.

TensorFlow and Keras are imported only by the functions that need them, so the atomic writers
can be used (by ``cnnkit.report``) without loading TensorFlow.

Example:
    >>> import cnnkit
    >>> run = cnnkit.load("runs/lenet5-mnist")          # doctest: +SKIP
    >>> run.predict_classes(image)                      # doctest: +SKIP
    ['7']
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import importlib.util
import io
import json
import numbers
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None

import numpy as np
import yaml

__all__ = [
    "CONFIG_FILE",
    "CONFUSION_FILE",
    "CURVES_FILE",
    "HISTORY_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "README_FILE",
    "Run",
    "atomic_save_model",
    "atomic_write_bytes",
    "atomic_write_text",
    "load",
    "write_run",
]

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
README_FILE = "README.md"
RUN_FILES = (MODEL_FILE, HISTORY_FILE, METRICS_FILE, CONFIG_FILE)  # what write_run always writes
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
MANIFEST_FILE = "manifest.json"
BACKUP_DIR = "backup"  # the resume backup of a run still training (recipes.fitting); the manifest leaves it out
SKIPPED_FILE = "skipped_files.csv"  # the image files a folder dataset left out, with reasons

# Modules whose import registers cnnkit's custom layers with Keras serialization. They are
# imported (when they exist) before a model is loaded.
_CUSTOM_OBJECT_MODULES = (
    "cnnkit.models.layers",
    "cnnkit.models.backbones",
    "cnnkit.recipes.preprocess",
    "cnnkit.recipes.ensemble",
    "cnnkit.recipes.imbalance",  # LogitAdjustedCrossentropy, the compiled loss of a "logit_adjusted" run
)


# --------------------------------------------------------------------------- atomic writes


def _default_file_mode() -> int:
    """``0o666`` minus the process umask, read without changing it (Linux), else ``0o644``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so that a rename into it is durable (POSIX only).

    Example:
        >>> os.replace("runs/x/backup", "runs/x/.backup-discarded"); fsync_dir(Path("runs/x"))  # doctest: +SKIP
    """
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return _default_file_mode()


@contextlib.contextmanager
def _temp_beside(path: Path, suffix: str = ".tmp"):
    """Yield the path of an empty temp file beside ``path``; rename it over ``path`` on success.

    The caller writes (and fsyncs) the temp file. On any exception, including one in
    ``os.replace``, the temp file is removed and ``path`` is left as it was; an ``OSError`` about
    the temp file (it cannot be created or written) is raised naming ``path``. A ``manifest.json``
    beside it records the new content before the rename, keeping the old as ``previous_sha256``
    (``null`` for a new file) until ``path`` is in place (:func:`_record_in_manifest`), so a kill
    in between leaves a run that still loads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix="." + path.name + ".",
                                         suffix=suffix) as tmp:
            tmp_path = Path(tmp.name)
    except OSError as err:  # name the file the caller asked for, not a random temp name beside it
        raise OSError(err.errno, err.strerror, str(path)) from err
    try:
        yield tmp_path
        os.chmod(tmp_path, _target_mode(path))
        manifest_files = _record_in_manifest(path, written=tmp_path)
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(err, OSError) and err.errno is not None and str(err.filename) == str(tmp_path):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    fsync_dir(path.parent)
    if manifest_files is not None:  # in place: the manifest forgets the file's previous content
        manifest_files[path.name].pop("previous_sha256", None)
        _write_manifest_files(path.parent, manifest_files)


def _write_synced(path: Path, data) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory (``.<name>.<random>.tmp``), which is
    flushed, fsynced and renamed over ``path`` with ``os.replace``. If anything fails the
    temporary file is removed and an existing ``path`` is left untouched. Missing parent
    directories are created. An existing file's permission bits are kept; a new file gets
    ``0o666`` minus the umask. An error about the temporary file names ``path``. In a finished run
    directory (one with ``manifest.json``) the file's manifest entry is refreshed too.

    Args:
        path: Destination file.
        data: The complete new contents.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        TypeError: If ``data`` is not bytes-like.

    Example:
        >>> atomic_write_bytes("runs/demo/blob.bin", b"\\x00\\x01")  # doctest: +SKIP
        PosixPath('runs/demo/blob.bin')
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"`data` must be bytes. Received: data of type {type(data).__name__}")
    path = Path(path)
    with _temp_beside(path) as tmp_path:
        _write_synced(tmp_path, data)
    return path


def atomic_write_text(path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`).

    Args:
        path: Destination file.
        text: The complete new contents.
        encoding: Text encoding, UTF-8 by default. Lone surrogates (what ``os.fsdecode`` makes of
            file-name bytes that are not valid in the file-system encoding, e.g. ``"caf\\udce9.png"``)
            are written back as the original bytes (``errors="surrogateescape"``), as Python does
            for file names, so a text listing such names never fails.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Example:
        >>> atomic_write_text("runs/demo/notes.txt", "hello\\n")  # doctest: +SKIP
        PosixPath('runs/demo/notes.txt')
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str. Received: text of type {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding, errors="surrogateescape"))


@contextlib.contextmanager
def atomic_file(path, *, suffix: str = ".tmp"):
    """A temporary path beside ``path`` for writers that take a file name; renamed over ``path`` at the end.

    The block writes the temporary file (``suffix`` keeps the extension a writer checks, such as
    ``.weights.h5``); when it ends without error the file is fsynced and renamed over ``path``.
    On any error the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_file("runs/demo/epoch001.weights.h5", suffix=".tmp.weights.h5") as temporary:  # doctest: +SKIP
        ...     model.save_weights(temporary)
    """
    with _temp_beside(Path(path), suffix=suffix) as tmp_path:
        yield tmp_path
        with open(tmp_path, "rb+") as written:
            os.fsync(written.fileno())


def atomic_save_model(model, path) -> Path:
    """Save a Keras model to ``path`` atomically.

    ``model.save`` writes to a temporary ``.keras`` file in the same directory, which is then
    renamed over ``path``; a failed save leaves an existing ``path`` intact and no temp file.

    Args:
        model: A ``keras.Model``.
        path: Destination; must end in ``.keras``.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``path`` does not end in ``.keras``.

    Example:
        >>> atomic_save_model(model, "runs/demo/model.keras")  # doctest: +SKIP
        PosixPath('runs/demo/model.keras')
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"A model file must end in '.keras'. Received: path={str(path)!r}")
    with atomic_file(path, suffix=".tmp.keras") as tmp_path:
        model.save(tmp_path)
    return path


# --------------------------------------------------------------------------- plain data


def _plain(value):
    """Convert numpy scalars/arrays, tuples and paths into YAML/JSON-safe Python data."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        "Run data must be plain data (dict, list, str, numbers, bool, None). "
        f"Received: value={value!r} of type {type(value).__name__}"
    )


def _history_to_csv(history: dict) -> str:
    keys = list(history)
    length = max((len(v) for v in history.values()), default=0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for epoch in range(length):
        row = [epoch + 1]
        for key in keys:
            values = history[key]
            row.append(repr(float(values[epoch])) if epoch < len(values) else "")
        writer.writerow(row)
    return out.getvalue()


def _history_from_csv(text: str) -> dict:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        return {}
    keys = header[1:] if header[0] == "epoch" else header
    offset = 1 if header[0] == "epoch" else 0
    history = {key: [] for key in keys}
    for row in reader:
        for key, cell in zip(keys, row[offset:]):
            if cell != "":
                history[key].append(float(cell))
    return history


def _normalise_history(history) -> dict:
    if history is None:
        return {}
    if hasattr(history, "history") and isinstance(history.history, dict):  # keras History
        history = history.history
    if not isinstance(history, dict):
        raise ValueError(
            "`history` must be a dict mapping metric names to per-epoch values. "
            f"Received: history of type {type(history).__name__}"
        )
    result = {}
    for key, values in history.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        result[str(key)] = [float(v) for v in values]
    return result


def _model_summary(model) -> str:
    lines = []
    try:
        model.summary(print_fn=lambda text, *args, **kwargs: lines.append(str(text)))
    except Exception as err:  # noqa: BLE001  (a summary is nice to have, never worth failing a save)
        return f"(model summary unavailable: {err})"
    return "\n".join(lines).rstrip()


def _model_name(model) -> str:
    return str(getattr(model, "name", type(model).__name__))


# --------------------------------------------------------------------------- Run


def _shape_matches(shape, expected) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class DirectoryInUse(RuntimeError):
    """Another process holds the run (or search) directory (:func:`lock_run_dir`); the message names it.

    ``cnnkit`` prints it as one line and exits with status 2.

    Example:
        >>> raise DirectoryInUse("run directory runs/x is in use by another process")  # doctest: +SKIP
    """


class TrainingDiverged(RuntimeError):
    """A run's loss became NaN or infinite; the message names the epoch, the step and the checkpoint kept.

    ``cnnkit run`` prints it as one line and exits with status 3.

    Example:
        >>> raise TrainingDiverged("training diverged: the loss is nan at epoch 3, step 40")  # doctest: +SKIP
    """


class Run:
    """A trained classifier with its history, metrics, config and (optional) run directory.

    Attributes:
        model: The ``keras.Model`` (its output is class probabilities).
        history: Per-epoch values, ``{"loss": [...], "val_accuracy": [...], ...}``.
        metrics: Evaluation results, e.g. ``test_accuracy``, ``test_error``,
            ``balanced_accuracy``, ``per_class``, ``confusion_matrix``.
        run_dir: The directory the run was written to / loaded from, or ``None``.
        class_names: One name per model output, in output order.
        config: The resolved configuration (plain data).

    Args:
        model: A ``keras.Model`` with one input and a ``(None, K)`` probability output.
        history: A dict of lists of floats or a ``keras.callbacks.History``.
        metrics: A dict of metrics.
        run_dir: Where the run lives on disk, if anywhere.
        class_names: ``K`` names; defaults to ``config["class_names"]`` or ``"0".."K-1"``.
        config: Plain-data configuration.

    Example:
        >>> run = cnnkit.load("runs/lenet5-mnist")        # doctest: +SKIP
        >>> run.predict(images).shape                      # doctest: +SKIP
        (32, 10)
        >>> run.evaluate(data)["test_accuracy"]            # doctest: +SKIP
        0.9912
    """

    def __init__(self, model, *, history=None, metrics=None, run_dir=None, class_names=None, config=None):
        self.model = model
        self.history = _normalise_history(history)
        self.metrics = dict(metrics or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = dict(config or {})
        if class_names is None:
            class_names = self.config.get("class_names")
        if class_names is None:
            class_names = [str(i) for i in range(self._num_outputs() or 0)]
        if isinstance(class_names, str) or not isinstance(class_names, Iterable):
            raise ValueError(f"`class_names` must be a list of names. Received: class_names={class_names!r}")
        self.class_names = [str(name) for name in class_names]
        num_outputs = self._num_outputs()
        if num_outputs is not None and len(self.class_names) != num_outputs:
            raise ValueError(
                f"`class_names` must have one name per model output ({num_outputs}). "
                f"Received: class_names={self.class_names} (length {len(self.class_names)})"
            )
        self._compiled = None  # (model, tf.function) built on first predict

    # -- helpers
    def _num_outputs(self):
        try:
            shape = self.model.output_shape
        except (AttributeError, ValueError):
            return None
        if isinstance(shape, list):
            return None
        return shape[-1]

    def _predict_fn(self):
        if self._compiled is None or self._compiled[0] is not self.model:
            import tensorflow as tf

            model = self.model
            self._compiled = (model, tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False))
        return self._compiled[1]

    def _as_batch(self, x) -> np.ndarray:
        expected = tuple(self.model.input_shape[1:])
        try:
            array = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`x` must be an image or a batch of images. Received: x of type {type(x).__name__}"
            ) from err
        if array.dtype.kind not in "uifb":
            raise ValueError(
                f"`x` must hold numeric pixel values (uint8 or numbers 0-255). Received: x.dtype={array.dtype}"
            )
        shape = array.shape
        has_single_channel = len(expected) >= 2 and expected[-1] == 1
        if _shape_matches(shape, expected):  # one image, all axes
            array = array[np.newaxis]
        elif len(shape) == len(expected) + 1 and _shape_matches(shape[1:], expected):  # a batch
            pass
        elif has_single_channel and _shape_matches(shape, expected[:-1]):  # one image, no channel
            array = array[np.newaxis, ..., np.newaxis]
        elif has_single_channel and len(shape) == len(expected) and _shape_matches(shape[1:], expected[:-1]):
            array = array[..., np.newaxis]  # a batch without the channel axis
        else:
            raise ValueError(
                f"`x` does not match the model input shape {_fmt_shape(expected)} "
                f"(one image) or {_fmt_shape((None, *expected))} (a batch). Received: x.shape={_fmt_shape(shape)}"
            )
        dtype = getattr(self.model.inputs[0], "dtype", "float32") if getattr(self.model, "inputs", None) else "float32"
        try:
            dtype = np.dtype(getattr(dtype, "name", dtype))
        except TypeError:
            dtype = np.dtype("float32")
        if array.dtype.kind == "f" and array.size and array.any() and array.max() <= 1.0:
            warnings.warn(f"cnnkit: `x` holds floats in 0-1 (max {array.max():.3g}), but the model takes raw 0-255 "
                          "pixels (it scales them itself): pass the uint8 images, or x * 255", stacklevel=3)
        return array.astype(dtype, copy=False)

    # -- public API
    def predict(self, x, *, batch_size: int = 256) -> np.ndarray:
        """Class probabilities for one image or a batch of raw images.

        ``x`` is raw pixels (uint8, or numbers in 0-255; the model scales inside): one image
        ``(H, W)`` or ``(H, W, C)``, or a batch ``(N, H, W)`` or ``(N, H, W, C)``. Missing batch
        and (single-)channel axes are added. The model runs through one compiled
        ``tf.function`` per Run (not ``model.predict``, which costs tens of milliseconds of
        set-up per call), ``batch_size`` images at a time. A float ``x`` all in 0-1 (not all
        zeros) looks scaled already: it is used as given, with a ``UserWarning``.

        Args:
            x: Image(s) as described above.
            batch_size: Images per forward pass.

        Returns:
            A float ``np.ndarray`` of shape ``(N, K)`` -- always with a batch axis, ``N = 1``
            for a single image.

        Raises:
            ValueError: If the shape matches neither the model input nor a batch of it.

        Example:
            >>> run.predict(np.zeros((28, 28), np.uint8)).shape  # doctest: +SKIP
            (1, 10)
        """
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}")
        batch = self._as_batch(x)
        fn = self._predict_fn()
        outputs = [
            np.asarray(fn(batch[start : start + batch_size])) for start in range(0, batch.shape[0], int(batch_size))
        ]
        if not outputs:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return np.concatenate(outputs, axis=0)

    def predict_classes(self, x, *, batch_size: int = 256) -> list[str]:
        """Names of the most probable class for one image or a batch (see :meth:`predict`).

        Returns:
            A list of class names, one per image (a list of one for a single image).

        Example:
            >>> run.predict_classes(image)  # doctest: +SKIP
            ['7']
        """
        probs = self.predict(x, batch_size=batch_size)
        return [self.class_names[i] for i in np.argmax(probs, axis=1)]

    def evaluate(self, data, *, split: str = "test") -> dict:
        """Metrics of this model on a data split.

        ``self.metrics`` is not changed; assign the result if you want to keep it.

        Args:
            data: An object with ``.arrays(split) -> (x_uint8, y_int)`` (``cnnkit.data.ImageData``)
                or a tuple ``(x, y)`` of raw images and integer labels.
            split: Split to evaluate; also the prefix of the accuracy/error/loss keys.

        Returns:
            The dict from ``cnnkit.evaluate.classification_metrics``.

        Raises:
            ValueError: If ``data`` has ``class_names`` other than this run's, in its order (its
                labels would be scored against other outputs).

        Example:
            >>> run.evaluate(data)["test_accuracy"]  # doctest: +SKIP
            0.9912
        """
        from cnnkit.evaluate import classification_metrics

        if hasattr(data, "arrays"):
            names = getattr(data, "class_names", None)
            if names is not None and [str(name) for name in names] != self.class_names:
                raise ValueError("The data's classes are not this run's (in order): its labels would be scored "
                                 f"against other outputs. Received: data.class_names={list(names)}, "
                                 f"run class_names={self.class_names}")
            x, y = data.arrays(split)
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            x, y = data
        else:
            raise ValueError(
                "`data` must have an `.arrays(split)` method (cnnkit.data.ImageData) or be a tuple (x, y). "
                f"Received: data of type {type(data).__name__}"
            )
        return classification_metrics(np.asarray(y), self.predict(x), self.class_names, split=split)

    def save(self, run_dir) -> Path:
        """Write this run to ``run_dir`` with :func:`write_run` and remember the directory.

        Saved into the directory it was loaded from, the run keeps its ``skipped_files.csv`` (the
        data is unchanged), but ``report.html`` is removed, as it may no longer match: write it
        again with ``cnnkit report``. The directory is held (:func:`holding_run_dir`) while it is
        written: one that another process holds, training or finishing a run there, is refused.

        Raises:
            DirectoryInUse: Another process holds ``run_dir``.

        Example:
            >>> run.save("runs/my-run")  # doctest: +SKIP
            PosixPath('runs/my-run')
        """
        run_dir = Path(run_dir)
        made = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)  # to lock it
        try:
            with holding_run_dir(run_dir):
                self.run_dir = write_run(
                    run_dir,
                    model=self.model,
                    history=self.history,
                    metrics=self.metrics,
                    config=self.config,
                    class_names=self.class_names,
                    keep_skipped=self.run_dir is not None and Path(self.run_dir).resolve() == run_dir.resolve(),
                )
        except BaseException:
            if made and not any(run_dir.iterdir()):  # refused before writing (config not plain data): no trace
                run_dir.rmdir()
            raise
        return self.run_dir

    def __repr__(self) -> str:
        parts = [f"model={_model_name(self.model)!r}", f"classes={len(self.class_names)}"]
        for key in ("test_accuracy", "balanced_accuracy"):
            value = self.metrics.get(key)
            if isinstance(value, numbers.Real):
                parts.append(f"{key}={value:.4f}")
        if self.history:
            parts.append(f"epochs={max(len(v) for v in self.history.values())}")
        parts.append(f"run_dir={str(self.run_dir) if self.run_dir else None!r}")
        return f"Run({', '.join(parts)})"


# --------------------------------------------------------------------------- write / load


def write_run(run_dir, *, model, history, metrics, config, class_names, keep_skipped: bool = False) -> Path:
    """Write a complete run directory, every file atomically.

    Writes ``model.keras``, ``history.csv`` (``epoch`` from 1, one column per history key),
    ``metrics.json`` (indent 2), ``config.yaml`` (``config`` plus ``class_names``,
    ``yaml.safe_dump`` with ``sort_keys=False``), ``training_curves.png`` (when the history has
    something to plot), ``confusion_matrix.png`` (when ``metrics`` has ``"confusion_matrix"``)
    and ``README.md`` (the model card). A folder without ``manifest.json`` gets an empty one first,
    and each file is recorded in it as it lands, so a writer killed part way leaves a folder
    :func:`load` refuses rather than a run with made-up class names. Existing files are replaced; an earlier run's figures,
    ``report.html`` and ``skipped_files.csv`` are removed (the caller writes the last two anew
    where they apply), and dropped from ``manifest.json`` first. A figure that fails to draw
    only warns, naming it and the error, and is left out (and unlinked from the README): the
    model and the other files are written all the same.

    Args:
        run_dir: Directory to create or update.
        model: The trained ``keras.Model``.
        history: Dict of per-epoch lists (or a ``keras.callbacks.History``).
        metrics: Dict of metrics (plain data).
        config: Plain-data config. ``class_names`` is added to it if missing; the caller's
            dict is not modified.
        class_names: One name per model output.
        keep_skipped: Keep an existing ``skipped_files.csv`` (the same run written again: its data is unchanged).

    Returns:
        ``run_dir`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``config["class_names"]`` exists and differs from ``class_names``.
        TypeError: If ``config`` or ``metrics`` contain values that are not plain data.

    Example:
        >>> write_run("runs/demo", model=model, history=fit.history, metrics=m,
        ...           config={"arch": "lenet5", "epochs": 3}, class_names=names)  # doctest: +SKIP
        PosixPath('runs/demo')
    """
    from cnnkit import report
    from cnnkit.html_report import REPORT_FILE

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"`run_dir` must be a directory. Received: run_dir={str(run_dir)!r} (an existing file)")
    names = [str(name) for name in class_names]
    config = _plain(dict(config or {}))
    if "class_names" in config:
        if [str(n) for n in config["class_names"]] != names:
            raise ValueError(
                "config['class_names'] disagrees with `class_names`. "
                f"Received: config['class_names']={config['class_names']}, class_names={names}"
            )
    else:
        config["class_names"] = names
    metrics = _plain(dict(metrics or {}))
    history = _normalise_history(history)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MANIFEST_FILE).exists():  # each file is recorded as it lands: a kill leaves a run load refuses
        _write_manifest_files(run_dir, {})

    atomic_save_model(model, run_dir / MODEL_FILE)
    atomic_write_text(run_dir / HISTORY_FILE, _history_to_csv(history))
    atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    atomic_write_text(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    stale = [CURVES_FILE, CONFUSION_FILE, REPORT_FILE] + ([] if keep_skipped else [SKIPPED_FILE])
    _drop_from_manifest(run_dir, stale)  # first, so that a kill in between leaves a run that loads
    for file in stale:  # an earlier run's, if this write makes none
        (run_dir / file).unlink(missing_ok=True)
    figures = {}
    if report.has_curves(history):
        figures[CURVES_FILE] = lambda path: report.plot_training_curves(history, path)
    if metrics.get("confusion_matrix") is not None:
        figures[CONFUSION_FILE] = lambda path: report.plot_confusion_matrix(metrics["confusion_matrix"], names, path)
    for file, plot in figures.items():
        try:
            plot(run_dir / file)
        except Exception as error:  # a figure is not worth the trained model: warn and write the rest
            warnings.warn(f"cnnkit: could not draw {run_dir / file}: {type(error).__name__}: {error}", stacklevel=2)
    drawn = {file: (run_dir / file).exists() for file in (CURVES_FILE, CONFUSION_FILE)}
    card = report.model_card(  # links only the figures that were drawn
        name=str(config.get("name") or run_dir.name),
        config=config,
        metrics={k: v for k, v in metrics.items() if k != "confusion_matrix" or drawn[CONFUSION_FILE]},
        class_names=names,
        summary=_model_summary(model),
        run_dir=run_dir,
        history=history if drawn[CURVES_FILE] else None,
    )
    atomic_write_text(run_dir / README_FILE, card)
    write_manifest(run_dir)
    return run_dir


_locks: dict[Path, int] = {}


def lock_run_dir(run_dir, *, name: str = "run directory") -> bool:
    """Hold an exclusive lock on ``run_dir`` for this process, until :func:`release_run_dir` or exit.

    An advisory ``flock`` on the directory itself (no lock file is left behind, and the operating
    system drops it when the process dies); taking it again in the same process is a no-op. Where
    ``fcntl`` is missing (Windows) nothing is locked.

    Returns:
        Whether this call took the lock (``False``: this process held it already, or no ``fcntl``),
        so that a caller nested in another's hold leaves the release to it.

    Raises:
        DirectoryInUse: Another process holds the lock: it is training or finishing a run there (a
            search, for a search directory: ``name`` says which in the message).

    Example:
        >>> lock_run_dir(Path("runs/x"))  # doctest: +SKIP
    """
    path = Path(run_dir).resolve()
    if fcntl is None or path in _locks:
        return False
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise DirectoryInUse(f"{name} {run_dir} is in use by another process (training or finishing there); wait for "
                             "it to end, or give another directory") from None
    _locks[path] = descriptor
    return True


def release_run_dir(run_dir) -> None:
    """Release this process's lock on ``run_dir`` (:func:`lock_run_dir`), if it holds one.

    Example:
        >>> release_run_dir(Path("runs/x"))  # doctest: +SKIP
    """
    descriptor = _locks.pop(Path(run_dir).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)

@contextlib.contextmanager
def holding_run_dir(run_dir, *, name: str = "run directory"):
    """Hold ``run_dir``'s lock (:func:`lock_run_dir`) while the block runs; within an outer hold of
    this process, leave it to that one.

    Example:
        >>> with holding_run_dir(Path("runs/x")):  # doctest: +SKIP
        ...     write_report("runs/x")
    """
    taken = lock_run_dir(run_dir, name=name)
    try:
        yield
    finally:
        if taken:
            release_run_dir(run_dir)


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks.

    Example:
        >>> file_sha256("runs/demo/model.keras")  # doctest: +SKIP
        '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _nested_runs(run_dir: Path) -> set[Path]:
    """The subfolders of ``run_dir`` with a manifest of their own (an ensemble's members): each checks its own files."""
    return {manifest.parent for manifest in run_dir.rglob(MANIFEST_FILE) if manifest.parent != run_dir}


def _artifacts(run_dir: Path) -> list[Path]:
    """The run's files, without the TensorBoard logs (``logs/`` at any depth), the resume backup, hidden files and
    folders, the manifest, and subfolders with a manifest of their own (:func:`_nested_runs`)."""
    def kept(parts):
        return (parts[-1] != MANIFEST_FILE and parts[0] != BACKUP_DIR and "logs" not in parts[:-1]
                and not any(part.startswith(".") for part in parts))

    nested = _nested_runs(run_dir)
    return sorted(path for path in run_dir.rglob("*") if path.is_file() and kept(path.relative_to(run_dir).parts)
                  and nested.isdisjoint(path.parents))


def _parse_error(err: Exception) -> str:
    """One line for a JSON / YAML / CSV / decoding error: YAML's problem and position, else the message."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        return err.problem + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")
    return " ".join(str(err).split())


def _read_file(path: Path, parse, kind: str):
    """``parse`` of a run file's UTF-8 text; a file that does not parse is a ``ValueError`` naming it.

    Example:
        >>> _read_file(Path("runs/demo/metrics.json"), json.loads, "JSON")  # doctest: +SKIP
        ValueError: 'runs/demo/metrics.json' is not valid JSON: Expecting value (line 1 column 1 (char 0))
    """
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, csv.Error) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{str(path)!r} is not valid {kind}: {_parse_error(err)}") from err


def read_mapping(path: Path, parse, kind: str) -> dict:
    """:func:`_read_file` of a file that must hold a mapping (an empty file is ``{}``).

    Example:
        >>> read_mapping(Path("runs/demo/config.yaml"), yaml.safe_load, "YAML")["recipe"]  # doctest: +SKIP
        'train'
    """
    value = _read_file(path, parse, kind)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a mapping. Received: {type(value).__name__}")
    return value


def _manifest_record(path: Path) -> dict:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _manifest_files(run_dir: Path) -> dict:
    """The ``files`` mapping of a run's ``manifest.json``; a ``ValueError`` naming it if it is malformed."""
    path = run_dir / MANIFEST_FILE
    files = read_mapping(path, json.loads, "JSON").get("files")
    if not isinstance(files, dict) or not all(isinstance(record, dict) for record in files.values()):
        raise ValueError(f"{str(path)!r} is not a cnnkit manifest: expected {{\"files\": {{name: {{\"sha256\": ...}}}}}}")
    return files


def write_manifest(run_dir) -> Path:
    """Write ``manifest.json``: the SHA-256 and size of every artifact in the run directory.

    Example:
        >>> write_manifest("runs/demo")  # doctest: +SKIP
        PosixPath('runs/demo/manifest.json')
    """
    run_dir = Path(run_dir)
    return _write_manifest_files(run_dir, {path.relative_to(run_dir).as_posix(): _manifest_record(path)
                                           for path in _artifacts(run_dir)})


def _record_in_manifest(path: Path, *, written: Path) -> dict | None:
    """Record ``written`` (about to replace ``path``) in the ``manifest.json`` beside ``path``; its ``files``.

    A finished run directory is not frozen: ``cnnkit report RUN [--data X]`` (``html_report.write_report``)
    writes ``report.html`` again, possibly on other data. Rather than make :func:`load` check only the
    files it reads, every atomic write into a directory that has a manifest updates that one file's
    entry (adding it if it is a new artifact), itself atomically. The entry keeps the content it
    replaces as ``previous_sha256`` (``None``, JSON ``null``, for a new artifact: absent before)
    until the caller has renamed ``written`` into place, and :func:`verify_manifest` accepts either
    (or, for ``None``, no file). So the manifest stays a true record of every artifact as cnnkit last
    wrote it, and a file changed any other way (corrupt, truncated, edited) is still refused by name
    (an HTML report excepted: a derived file). Files in subfolders, hidden files and the manifest itself are not recorded, and a
    manifest that cannot be read is left for :func:`load` to name (``None`` is returned for all these).
    """
    manifest = path.parent / MANIFEST_FILE
    if path.name == MANIFEST_FILE or path.name.startswith(".") or not manifest.is_file():
        return None
    try:
        files = _manifest_files(path.parent)
    except ValueError:
        return None
    files[path.name] = {**_manifest_record(written), "previous_sha256": files.get(path.name, {}).get("sha256")}
    _write_manifest_files(path.parent, files)
    return files


def _drop_from_manifest(run_dir: Path, names) -> None:
    """Drop ``names`` from the ``manifest.json`` of ``run_dir``, if it has a readable one (else left for :func:`load`)."""
    try:
        files = _manifest_files(run_dir)
    except (OSError, ValueError):
        return
    kept = {name: record for name, record in files.items() if name not in names}
    if kept != files:
        _write_manifest_files(run_dir, kept)


def _write_manifest_files(run_dir: Path, files: dict) -> Path:
    return atomic_write_text(run_dir / MANIFEST_FILE, json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n")


def verify_manifest(run_dir) -> list[str]:
    """The problems found checking a run directory against its ``manifest.json`` (empty: intact).

    Each problem names the file: changed (SHA-256 differs) or missing. A file being replaced when its
    writer was killed may match its ``previous_sha256``, and one being written anew (``previous_sha256``
    ``null``) may be missing. A run directory without a manifest (written before cnnkit had one) has
    nothing to check. A file in a subfolder with a manifest of its own (an ensemble member, which
    ``cnnkit report`` may write again) is left to that manifest, though an older ensemble's manifest
    may list it too. HTML reports (``report.html``, ``model.html``) are derived files, which ``cnnkit
    report`` writes again from the rest: listed, but a missing or changed one is not a problem.

    Raises:
        ValueError: If ``manifest.json`` is not valid JSON or not a manifest (naming it and the problem).

    Example:
        >>> verify_manifest("runs/demo")  # doctest: +SKIP
        ['model.keras: SHA-256 differs from manifest.json (changed or corrupt)']
    """
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST_FILE).exists():
        return []
    problems = []
    nested = _nested_runs(run_dir)
    for name, record in _manifest_files(run_dir).items():
        file = run_dir / name
        if not nested.isdisjoint(file.parents) or file.suffix == ".html":
            continue
        if not file.is_file():
            if record.get("previous_sha256", "") is not None:  # None: a new file, killed before its rename
                problems.append(f"{name}: missing (listed in {MANIFEST_FILE})")
        elif file_sha256(file) not in (record.get("sha256"), record.get("previous_sha256")):
            problems.append(f"{name}: SHA-256 differs from {MANIFEST_FILE} (changed or corrupt)")
    return problems


def _import_custom_objects() -> None:
    """Import the modules that register cnnkit's custom layers, if they exist yet."""
    for module_name in _CUSTOM_OBJECT_MODULES:
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:  # a parent package is missing
            spec = None
        if spec is not None:
            importlib.import_module(module_name)


def _load_model(path: Path, trust: bool):
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a truncated file
        raise ValueError(f"{str(path)!r} is not a valid .keras file: not a zip archive (truncated or corrupt)")
    _import_custom_objects()
    import keras

    if trust:
        return keras.saving.load_model(path, safe_mode=False)
    try:
        with _safe_mode_scope():
            return keras.saving.load_model(path, safe_mode=True)
    except ValueError as err:
        if "safe_mode" not in str(err):
            raise
        raise ValueError(
            f"Refusing to load {str(path)!r}: it contains Python code (a Lambda layer or another object Keras "
            "safe mode blocks) that would run on this machine. If you trust where it came from, pass trust=True "
            "(command line: --trust-model)."
        ) from err


def _safe_mode_scope():
    """Keras's safe-mode scope, so ``keras.config.enable_unsafe_deserialization()`` elsewhere cannot lift it."""
    try:
        from keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # a Keras without it: load_model(safe_mode=True) alone
        return contextlib.nullcontext()
    return SafeModeScope(True)


def read_run_files(run_dir) -> tuple[dict, dict, dict]:
    """``(config, metrics, history)`` of a run directory, checked against its ``manifest.json`` first;
    a missing file reads as empty.

    Raises:
        ValueError: a file does not match the manifest, or does not parse (naming the file).

    Example:
        >>> config, metrics, history = read_run_files("runs/mnist_lenet")  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    problems = verify_manifest(run_dir)
    if problems:
        raise ValueError(f"run directory {str(run_dir)!r} does not match its {MANIFEST_FILE}: {'; '.join(problems)}. "
                         "Restore the files, or train again")
    history_path, metrics_path, config_path = run_dir / HISTORY_FILE, run_dir / METRICS_FILE, run_dir / CONFIG_FILE
    history = _read_file(history_path, _history_from_csv, "CSV") if history_path.is_file() else {}
    metrics = read_mapping(metrics_path, json.loads, "JSON") if metrics_path.is_file() else {}
    config = read_mapping(config_path, yaml.safe_load, "YAML") if config_path.is_file() else {}
    return config, metrics, history


def load(path, *, trust: bool = False) -> Run:
    """Load a run directory or a ``.keras`` file as a :class:`Run`.

    A run directory holds ``model.keras``, ``history.csv``, ``metrics.json`` and ``config.yaml``
    (class names come from ``config.yaml``), and ``manifest.json``, which :func:`write_run` starts
    first and completes last. One with a manifest but without all four files was stopped while
    being written, and is refused; so is a folder with a resume backup (``backup/``) and no
    finished results: an interrupted run. A run written before cnnkit had a manifest (no backup)
    loads unchecked, its missing files read as empty. A ``.keras`` file gives a Run with empty history,
    metrics and config, and class names from the ``config.yaml`` beside it when it is a run's own
    model (listed in the folder's ``manifest.json``), else ``"0".."K-1"`` from the model's output size.

    Loading is safe by default: Keras safe mode refuses to deserialise Python code such as a
    ``Lambda`` layer, so a model file from someone else cannot run code on this machine (even
    where ``keras.config.enable_unsafe_deserialization()`` was called). Pass ``trust=True``
    (``--trust-model`` on the command line) only for files you trust.

    cnnkit's custom layers (``cnnkit.models.layers``) are imported first so their
    serialisation is registered.

    Args:
        path: A run directory or a ``.keras`` file.
        trust: Load Python code in the file too (Keras ``safe_mode=False``).

    Returns:
        A :class:`Run` with ``run_dir`` set for a directory (``None`` for a bare file).

    Raises:
        FileNotFoundError: If ``path`` does not exist, or is a directory without ``model.keras``.
        ValueError: If ``path`` is a file that is not ``.keras``, an interrupted or incomplete run
            (naming the folder and the missing files), a run directory whose files do not match the SHA-256s in its ``manifest.json``
            (naming each file), whose ``manifest.json``, ``metrics.json``, ``config.yaml`` or
            ``history.csv`` does not parse, or whose ``config.yaml`` has ``class_names`` that are not
            one name per model output (naming the file and the problem), or the model holds code and
            ``trust`` is False (one line naming the file and ``trust=True``).

    Example:
        >>> run = cnnkit.load("runs/lenet5-mnist")             # doctest: +SKIP
        >>> run.metrics["test_accuracy"]                        # doctest: +SKIP
        0.9912
        >>> cnnkit.load("from-a-colleague.keras", trust=True)   # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No run directory or .keras file at {str(path)!r}. Received: path={str(path)!r}")
    if path.is_dir():
        missing = [name for name in RUN_FILES if not (path / name).is_file()]
        if (path / BACKUP_DIR).is_dir() and (missing or not (path / MANIFEST_FILE).exists()):
            raise ValueError(f"{str(path)!r} holds an interrupted run (a resume backup, {BACKUP_DIR}/, and no "
                             "finished results): run the same call again to resume it (an ensemble or transfer: "
                             "with the same run_dir)")
        if (path / MANIFEST_FILE).exists() and missing:
            raise ValueError(f"{str(path)!r} is not a complete run: {', '.join(missing)} missing beside its "
                             f"{MANIFEST_FILE} (its writing was stopped before the end, or they were deleted); "
                             "write the run again")
        model_path = path / MODEL_FILE
        if not model_path.is_file():
            hint = ("; it is a SavedModel: use cnnkit.inference.load_predictor(path, trust=True)"
                    if (path / "saved_model.pb").is_file() else "")
            raise FileNotFoundError(
                f"{str(path)!r} is not a run directory: expected a {MODEL_FILE!r} file in it{hint}. "
                f"Received: path={str(path)!r}"
            )
        config, metrics, history = read_run_files(path)
        model, config_path = _load_model(model_path, trust), path / CONFIG_FILE
        parts = dict(history=history, metrics=metrics, config=config, run_dir=path, class_names=config.get("class_names"))
    else:
        if path.suffix != ".keras":
            raise ValueError(f"Expected a run directory or a '.keras' model file. Received: path={str(path)!r}")
        model, config_path = _load_model(path, trust), path.parent / CONFIG_FILE
        parts = dict(class_names=_run_class_names(path))
    try:
        return Run(model, **parts)
    except ValueError as err:  # the class names of config.yaml: not a list, or not one per model output
        raise ValueError(f"{str(config_path)!r}: {err}") from err


def _run_class_names(model_path: Path) -> list | None:
    """The ``class_names`` in ``config.yaml`` beside ``model_path`` if its folder is a run directory whose
    ``manifest.json`` lists it (``RUN/model.keras``), else ``None``."""
    try:
        listed = model_path.name in _manifest_files(model_path.parent)
        config = read_mapping(model_path.parent / CONFIG_FILE, yaml.safe_load, "YAML")
    except (OSError, ValueError):
        return None
    return config.get("class_names") if listed else None
