"""Predict with a trained or exported classifier: ``load_predictor`` and ``Predictor``.

A ``Predictor`` wraps a run directory, a ``.keras`` file or an exported SavedModel (see
``cnnkit.export``) behind one strict interface: uint8 raw pixels in, class probabilities out.
Loading is safe by default: a model that holds code (a Keras ``Lambda`` layer; any SavedModel,
as a TensorFlow graph can run any operation) needs ``trust=True``.
It checks the shape and dtype of what it is given and says what it expected, so a mistake
never reaches the graph as an opaque TensorFlow error. Keras models run through one compiled
``tf.function`` with a fixed input signature (no retracing, none of the set-up that makes
``model.predict`` cost tens of milliseconds per call); SavedModels through their
``serving_default`` signature. Image files are decoded as ``cnnkit.data.from_folder`` decodes
training images (PIL, EXIF orientation, bilinear resize to the model's input).

Example:
    >>> from cnnkit.inference import load_predictor
    >>> predictor = load_predictor("runs/lenet-mnist")             # doctest: +SKIP
    >>> predictor.top_k(image, k=2)                                 # doctest: +SKIP
    [[('7', 0.998), ('1', 0.001)]]
    >>> predictor.predict_files(["digits/"], k=1)                   # doctest: +SKIP
    >>> exported = load_predictor("exports/lenet-mnist", trust=True)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import numbers
import os
import warnings
from pathlib import Path

import numpy as np

from cnnkit.exporting import LABELS_FILE, MODEL_FILES, REPORT_FILE

__all__ = ["DEFAULT_TOP_K", "Predictor", "image_files", "keras_predictor", "load_predictor", "write_csv"]

DEFAULT_TOP_K = 5
SAVED_MODEL_FILE = MODEL_FILES["savedmodel"]
OTHER_EXPORT_FILES = (MODEL_FILES["tflite"], MODEL_FILES["onnx"], REPORT_FILE)  # in cnnkit's TFLite and ONNX exports
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
_PIL_MODES = {1: "L", 3: "RGB"}


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("N" if dim is None else str(dim) for dim in shape) + ")"


def _check_positive(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


class Predictor:
    """Class probabilities and top-k names for uint8 images, from a compiled model call.

    Args:
        forward: A callable taking a uint8 tensor ``(N, H, W, C)`` and returning float
            probabilities ``(N, K)`` (a ``tf.function`` or a SavedModel signature wrapper).
        image_shape: ``(H, W, C)`` of one image.
        class_names: ``K`` names, in output order; ``predict`` refuses probabilities of another width.
        source: What the predictor was loaded from (shown in messages).

    Example:
        >>> predictor = load_predictor("exports/lenet", trust=True)  # doctest: +SKIP
        >>> predictor.predict(np.zeros((28, 28, 1), np.uint8)).shape  # doctest: +SKIP
        (1, 10)
    """

    def __init__(self, forward, *, image_shape, class_names, source: str = "<model>"):
        self._forward = forward
        self.image_shape = tuple(int(dim) for dim in image_shape)
        self.class_names = [str(name) for name in class_names]
        self.source = str(source)

    def _as_batch(self, images) -> np.ndarray:
        expected = self.image_shape
        try:
            array = np.asarray(images)
        except (TypeError, ValueError) as error:
            raise ValueError(f"`images` must be an image or a batch of uint8 images. "
                             f"Received: images of type {type(images).__name__}") from error
        if array.dtype != np.uint8:
            raise ValueError(f"`images` must be uint8 raw pixels (0-255) for {self.source}; convert with "
                             f"np.clip(images, 0, 255).astype('uint8') if that is what they hold. "
                             f"Received: images.dtype={array.dtype}")
        gray = expected[-1] == 1
        if array.shape == expected:
            return array[np.newaxis]
        if array.ndim == 4 and array.shape[1:] == expected:
            return array
        if gray and array.shape == expected[:-1]:
            return array[np.newaxis, ..., np.newaxis]
        if gray and array.ndim == 3 and array.shape[1:] == expected[:-1]:
            return array[..., np.newaxis]
        raise ValueError(f"`images` must be one image {_fmt_shape(expected)} or a batch {_fmt_shape((None, *expected))} "
                         f"for {self.source}. Received: images.shape={_fmt_shape(array.shape)}")

    def predict(self, images, *, batch_size: int = 256) -> np.ndarray:
        """Class probabilities, ``(N, K)`` float32, for one uint8 image or a batch.

        Args:
            images: uint8 ``(H, W, C)`` or ``(N, H, W, C)``; with one channel the channel
                axis may be left out.
            batch_size: Images per call into the model.

        Returns:
            Probabilities with a batch axis (``N = 1`` for one image).

        Raises:
            ValueError: If ``images`` is not uint8 or its shape fits neither one image nor a
                batch of the model's input, or the model's probabilities are not one per class name.

        Example:
            >>> predictor.predict(np.zeros((2, 28, 28), np.uint8)).shape  # doctest: +SKIP
            (2, 10)
        """
        batch_size = _check_positive("batch_size", batch_size)
        batch = self._as_batch(images)
        if len(batch) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        probabilities = np.concatenate([np.asarray(self._forward(batch[start:start + batch_size]), dtype=np.float32)
                                        for start in range(0, len(batch), batch_size)])
        if probabilities.shape[1:] != (len(self.class_names),):
            raise ValueError(f"{self.source} returned probabilities of shape {_fmt_shape((None, *probabilities.shape[1:]))} "
                             f"for {len(self.class_names)} class names")
        return probabilities

    def top_k(self, images, *, k: int = DEFAULT_TOP_K, batch_size: int = 256) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable ``(class name, probability)`` pairs of each image, best first.

        ``k`` larger than the number of classes gives every class.

        Example:
            >>> predictor.top_k(image, k=2)  # doctest: +SKIP
            [[('7', 0.98), ('9', 0.01)]]
        """
        k = _check_positive("k", k)
        probabilities = self.predict(images, batch_size=batch_size)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[i], float(row[i])) for i in best] for row, best in zip(probabilities, order)]

    def load_images(self, paths) -> np.ndarray:
        """Decode image files to a uint8 batch of the model's input shape.

        Files are read as ``cnnkit.data.from_folder`` reads training images: EXIF orientation,
        grayscale (``L``) or RGB by the model's channels, bilinear resize to ``(H, W)``.

        Raises:
            ValueError: If a file cannot be decoded (the message names it), or the model's
                input has neither 1 nor 3 channels.

        Example:
            >>> predictor.load_images(["digit.png"]).shape  # doctest: +SKIP
            (1, 28, 28, 1)
        """
        from cnnkit.data.folder import _load_image

        height, width, channels = self.image_shape
        if channels not in _PIL_MODES:
            raise ValueError(f"Image files can be read for models with 1 or 3 channels. "
                             f"Received: a model input of shape {self.image_shape}")
        images = [_load_image(str(path), (height, width), _PIL_MODES[channels]) for path in paths]
        return np.stack(images) if images else np.zeros((0, *self.image_shape), np.uint8)

    def predict_files(self, paths, *, k: int = DEFAULT_TOP_K, batch_size: int = 256):
        """Top-k predictions of image files, decoded and classified ``batch_size`` at a time.

        ``paths`` are expanded as :func:`image_files` expands them: a folder gives its image files
        (the others named in a warning), and a file named twice is predicted once.

        Returns:
            ``[(path, [(class name, probability), ...]), ...]`` in the order of the expanded ``paths``.

        Raises:
            FileNotFoundError: If a path does not exist.
            ValueError: If no image file is found, or a file cannot be decoded (the message names it).

        Example:
            >>> predictor.predict_files(["a.png", "digits/"], k=1)  # doctest: +SKIP
            [(PosixPath('a.png'), [('7', 0.99)]), (PosixPath('digits/0.png'), [('0', 0.97)])]
        """
        batch_size = _check_positive("batch_size", batch_size)
        paths, skipped = image_files(paths)
        if skipped:
            warnings.warn(f"Skipped {len(skipped)} file(s) not named as images: " + ", ".join(map(str, skipped[:5]))
                          + (", ..." if len(skipped) > 5 else ""), stacklevel=2)
        results = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            results += list(zip(chunk, self.top_k(self.load_images(chunk), k=k, batch_size=batch_size)))
        return results

    def __repr__(self) -> str:
        return f"Predictor(source={self.source!r}, image_shape={self.image_shape}, classes={len(self.class_names)})"


def load_predictor(path, *, trust: bool = False) -> Predictor:
    """A :class:`Predictor` for a run directory, a ``.keras`` file or an exported SavedModel.

    Loading is safe by default. A Keras file holding Python code (a ``Lambda`` layer) is
    refused, as by ``cnnkit.load``. A SavedModel is a TensorFlow graph, and a graph can run
    any operation it holds (read or write files, for one), so every SavedModel, cnnkit's own
    exports included, is loaded only with ``trust=True`` (``--trust-model`` for ``cnnkit
    predict``): pass it for models you exported or otherwise trust.

    Args:
        path: A run directory (``model.keras`` + ``config.yaml`` class names), a ``.keras``
            file (class names ``"0".."K-1"``), or a SavedModel directory written by
            ``cnnkit.export`` (class names from its ``labels.txt``).
        trust: Load code the model holds: any SavedModel, or a Keras file with ``Lambda``
            layers (Keras ``safe_mode=False``).

    Raises:
        FileNotFoundError: If ``path`` does not exist or holds no model.
        ValueError: If ``path`` is a TFLite or ONNX model or export, or a SavedModel's ``saved_model.pb``
            (pass its directory); if the model holds code and ``trust`` is False (one line naming the path
            and ``trust=True`` / ``--trust-model``), the model does not take one image, or a
            SavedModel lacks the uint8 ``serving_default`` signature returning ``probabilities``.

    Example:
        >>> load_predictor("runs/lenet-mnist").class_names[:3]                # doctest: +SKIP
        ['0', '1', '2']
        >>> load_predictor("exports/lenet-mnist", trust=True).image_shape     # doctest: +SKIP
        (28, 28, 1)
    """
    path = Path(path)
    if path.is_dir() and (path / SAVED_MODEL_FILE).is_file():
        if not trust:
            raise ValueError(
                f"Refusing to load the SavedModel {str(path)!r}: a SavedModel is a TensorFlow graph that can run "
                "any operation (read or write files, for one), even one exported by cnnkit. If you trust where it "
                "came from, pass trust=True (command line: --trust-model)."
            )
        return _saved_model_predictor(path)
    _refuse_other_exports(path)
    import cnnkit

    run = cnnkit.load(path, trust=trust)
    return keras_predictor(run.model, class_names=run.class_names, source=str(path))


def _refuse_other_exports(path: Path) -> None:
    """Refuse a SavedModel's graph file, or a TFLite or ONNX model or export, saying what can be loaded."""
    if path.name == SAVED_MODEL_FILE and path.is_file():
        raise ValueError(f"{str(path)!r} is the graph file of a SavedModel: pass its directory {str(path.parent)!r}. "
                         f"Received: path={str(path)!r}")
    if path.is_file() and path.suffix in (".tflite", ".onnx") \
            or path.is_dir() and any((path / name).is_file() for name in OTHER_EXPORT_FILES):
        raise ValueError(f"{str(path)!r} is a TFLite or ONNX model or export, which cannot be used for prediction: only "
                         "SavedModel exports (format='savedmodel'), run directories and .keras files can. "
                         f"Received: path={str(path)!r}")


def keras_predictor(model, *, class_names=None, source: str | None = None) -> Predictor:
    """A :class:`Predictor` over a Keras model taking raw pixels, through one compiled call.

    Raises:
        ValueError: If the model does not take one image ``(H, W, C)`` and return one matrix
            ``(N, K)``, or ``class_names`` does not name ``K`` classes.

    Example:
        >>> keras_predictor(cnnkit.build("FC16", (28, 28, 1), 10)).image_shape  # doctest: +SKIP
        (28, 28, 1)
    """
    import tensorflow as tf

    shape = tuple(model.inputs[0].shape[1:]) if len(getattr(model, "inputs", []) or []) == 1 else ()
    if len(shape) != 3 or None in shape:
        raise ValueError(f"A predictor needs a model with one image input of known shape (H, W, C). "
                         f"Received: model inputs {[tuple(t.shape) for t in model.inputs]}")
    outputs = [tuple(t.shape) for t in model.outputs]
    if len(outputs) != 1 or len(outputs[0]) != 2 or outputs[0][1] is None:
        raise ValueError(f"A predictor needs a model with one output of class probabilities (N, K). "
                         f"Received: model outputs {outputs}")
    classes = outputs[0][1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    if len(names) != classes:
        raise ValueError(f"`class_names` must name the model's {classes} outputs. Received: {len(names)} class names "
                         f"{names}")
    dtype = model.inputs[0].dtype
    forward = tf.function(lambda images: tf.cast(model(tf.cast(images, dtype), training=False), tf.float32),
                          input_signature=[tf.TensorSpec((None, *shape), tf.uint8)], autograph=False)
    return Predictor(forward, image_shape=shape, class_names=names, source=source or f"<keras.Model {model.name}>")


def _saved_model_predictor(path: Path) -> Predictor:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    specs = list(signature.structured_input_signature[1].values()) if signature is not None else []
    outputs = signature.structured_outputs if signature is not None else {}
    probabilities = outputs.get("probabilities")
    if len(specs) != 1 or specs[0].dtype != tf.uint8 or specs[0].shape.rank != 4 \
            or not specs[0].shape[1:].is_fully_defined() or probabilities is None \
            or probabilities.shape.rank != 2 or probabilities.shape[-1] is None:
        raise ValueError(f"{str(path)!r} is not a SavedModel exported by cnnkit: expected a serving_default signature "
                         f"taking uint8 images (N, H, W, C) of known H, W, C and returning 'probabilities' (N, K) of "
                         f"known K. Received: inputs {specs}, outputs {outputs}")
    (name,) = signature.structured_input_signature[1]
    image_shape = tuple(specs[0].shape[1:])
    labels, classes = path / LABELS_FILE, probabilities.shape[-1]
    if labels.is_file():
        class_names = labels.read_text(encoding="utf-8").removesuffix("\n").split("\n")  # as export writes it
        if len(class_names) != classes:
            raise ValueError(f"{str(labels)!r} names {len(class_names)} classes, one a line; the model has {classes} "
                             "outputs")
    else:
        class_names = [str(i) for i in range(classes)]
    return Predictor(lambda images: signature(**{name: tf.constant(images)})["probabilities"],
                     image_shape=image_shape, class_names=class_names, source=str(path))


def image_files(inputs, *, extensions=IMAGE_EXTENSIONS) -> tuple[list[Path], list[Path]]:
    """Expand files and folders into image files.

    A file is taken as given (whatever its name); a folder contributes, recursively and
    sorted, the files whose names end in one of ``extensions`` (case-insensitive; hidden
    entries skipped; symlinked subfolders followed, as ``cnnkit.data.from_folder`` does). Other
    files are returned separately, and subfolders left out (unreadable, or a second way into a
    folder: a symlink loop) are named with their reason in a warning: none is dropped silently.
    A file reached twice (a folder and a file in it) is listed once, where it is first reached.

    Args:
        inputs: A file or folder, or an iterable of them.
        extensions: A file ending such as ``".png"``, or a sequence of them.

    Returns:
        ``(images, skipped)``: lists of paths; ``skipped`` holds the files not named as images.

    Raises:
        FileNotFoundError: If an input does not exist.
        ValueError: If ``extensions`` is not one or more file endings, or no image file is found.

    Example:
        >>> image_files(["digits/", "extra.png"])  # doctest: +SKIP
        ([PosixPath('digits/0.png'), PosixPath('extra.png')], [PosixPath('digits/notes.txt')])
    """
    from cnnkit.data.folder import check_extensions, walk_files

    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    suffixes = check_extensions(extensions)
    images, skipped, left_out = [], [], []
    for item in inputs:
        item = Path(item)
        if item.is_file():
            images.append(item)
        elif item.is_dir():
            files, folders = walk_files(item)  # symlinked subfolders followed; unreadable ones and loops returned
            for file in files:
                (images if file.name.lower().endswith(suffixes) else skipped).append(file)
            left_out += folders
        else:
            raise FileNotFoundError(f"No image file or folder at {str(item)!r}. Received: {str(item)!r}")
    if left_out:
        warnings.warn(f"Skipped {len(left_out)} folder(s): " + "; ".join(f"{folder} ({reason})" for folder, reason in left_out),
                      stacklevel=2)
    if not images:
        raise ValueError(f"No image files ({', '.join(suffixes)}) found. Received: inputs={[str(i) for i in inputs]}")
    seen = set()
    return _first_of_each(images, seen), _first_of_each(skipped, seen)


def _first_of_each(paths, seen: set) -> list[Path]:
    """``paths`` less those whose real path is in ``seen`` (which grows as they are kept): each file once.

    ``os.path.realpath``, unlike ``Path.resolve``, does not raise on a symlink loop (its reader names it)."""
    unique = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def write_csv(predictions, path) -> Path:
    """Write ``predict_files`` results as CSV, one row per image and rank, atomically.

    Columns: ``path, rank, class_name, probability`` (rank 1 is the most probable class).

    Example:
        >>> write_csv(predictor.predict_files(["a.png"]), "predictions.csv")  # doctest: +SKIP
        PosixPath('predictions.csv')
    """
    from cnnkit.runs import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "rank", "class_name", "probability"])
    for file, ranked in predictions:
        for rank, (name, probability) in enumerate(ranked, start=1):
            writer.writerow([str(file), rank, name, f"{probability:.6g}"])
    return atomic_write_text(path, buffer.getvalue())
