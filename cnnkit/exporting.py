"""``cnnkit.export``: SavedModel, TFLite and ONNX exports that are checked in a fresh process.

An export is a directory. Next to the model file(s) it holds ``labels.txt`` (one class name a
line; line ``i`` names class id ``i``), ``README.md`` (a model card: inputs, outputs, how to
load it without cnnkit, the verification) and ``verification.json`` (the report below)::

    savedmodel   saved_model.pb, variables/, assets/ -- signatures:
                   serving_default(images: uint8 [N, H, W, C])
                   serving_bytes(image_bytes: string [N])   encoded JPEG/PNG/GIF/BMP, decoded as
                                                            training does (alpha onto white; no
                                                            EXIF rotation: send upright images)
                                                            and resized to H x W in the graph
                 both return probabilities float32 [N, K], class_id int64 [N], class_name string [N]
    tflite       model.tflite   input [N, H, W, C] raw pixels 0-255, in the dtype of the model's
                                keras.Input (float32 unless it is uint8) -> probabilities [N, K]
    onnx         model.onnx     the same

A model is exported if it takes one image ``(H, W, C)`` and returns one matrix ``(N, K)``.

Every format takes raw pixels: the model's preprocessing is inside it and its training-only
layers (augmentation, dropout) run in inference mode. A model computing in mixed precision is
exported as a float32 copy (same weights), which is also the reference of the verification.

Verification: after writing, a new Python process that imports only TensorFlow (SavedModel),
the LiteRT interpreter (TFLite) or onnxruntime (ONNX) -- never cnnkit -- loads the export and
runs a sample; its outputs are compared with the Keras model's. Float formats must agree to
``tolerance`` (1e-5) max absolute difference, and the bytes signature must give the uint8
signature's classes for the same images sent as PNG; quantised TFLite exports report their
accuracy change on the data's test split instead. The export is written in a temporary
sibling directory and renamed into place only once verified: a failure at any step leaves
nothing at ``path``. A process killed outright (SIGKILL) cannot clean up: the next export to
``path`` from the same host deletes what it left, and puts the earlier export back if it was
killed while replacing it.

Example:
    >>> import cnnkit
    >>> cnnkit.export("runs/lenet-mnist", "exports/lenet", format="savedmodel")  # doctest: +SKIP
    PosixPath('/home/me/exports/lenet')
    >>> cnnkit.export("runs/lenet-mnist", "exports/lenet-int8", format="tflite",
    ...               quantize="int8")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import numbers
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from cnnkit.runs import Run, _default_file_mode, _import_custom_objects, atomic_write_text

__all__ = ["FORMATS", "QUANTIZATIONS", "ExportVerificationError", "export"]

FORMATS = ("savedmodel", "tflite", "onnx")
QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")
LABELS_FILE = "labels.txt"
CARD_FILE = "README.md"
REPORT_FILE = "verification.json"
REPRESENTATIVE_SAMPLES = 256
MODEL_FILES = {"savedmodel": "saved_model.pb", "tflite": "model.tflite", "onnx": "model.onnx"}
BYTES_SIGNATURE = "serving_bytes"
TOLERANCE = 1e-5
PARITY_SAMPLES = 64
_CHUNK = 256

# The fresh-process checks. Each reads the images from argv[2] (.npz), runs the export at
# argv[1] with plain runtime libraries and writes the outputs to argv[3] (.npz).
_SAVEDMODEL_CHECK = """
import sys
import numpy as np
import tensorflow as tf
artifact, inputs, outputs = sys.argv[1:4]
images = np.load(inputs)["images"]
loaded = tf.saved_model.load(artifact)
plain, encoded = loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]
keys = ("probabilities", "class_id", "class_name", "bytes_probabilities", "bytes_class_id")
results = {key: [] for key in keys}
for start in range(0, len(images), 256):
    batch = tf.constant(images[start:start + 256])
    out = plain(images=batch)
    png = tf.map_fn(tf.io.encode_png, batch, fn_output_signature=tf.string)
    via_bytes = encoded(image_bytes=png)
    for key in ("probabilities", "class_id", "class_name"):
        results[key].append(out[key].numpy())
    results["bytes_probabilities"].append(via_bytes["probabilities"].numpy())
    results["bytes_class_id"].append(via_bytes["class_id"].numpy())
results = {key: np.concatenate(values) for key, values in results.items()}
results["class_name"] = np.array([name.decode("utf-8") for name in results["class_name"]], dtype=str)
np.savez(outputs, runtime=f"tensorflow {tf.__version__}", cnnkit_imported="cnnkit" in sys.modules, **results)
"""

_TFLITE_CHECK = """
import sys
import numpy as np
try:
    from ai_edge_litert import __version__ as version
    from ai_edge_litert.interpreter import Interpreter
    runtime = f"ai-edge-litert {version}"
except ImportError:
    import tensorflow as tf
    Interpreter, runtime = tf.lite.Interpreter, f"tf.lite.Interpreter (tensorflow {tf.__version__})"
artifact, inputs, outputs = sys.argv[1:4]
images = np.load(inputs)["images"]
interpreter = Interpreter(model_path=artifact)
source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
probabilities = []
for start in range(0, len(images), 256):
    batch = images[start:start + 256].astype(source["dtype"])
    interpreter.resize_tensor_input(source["index"], batch.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], batch)
    interpreter.invoke()
    probabilities.append(interpreter.get_tensor(target["index"]).astype(np.float32))
np.savez(outputs, runtime=runtime, cnnkit_imported="cnnkit" in sys.modules, probabilities=np.concatenate(probabilities))
"""

_ONNX_CHECK = """
import sys
import numpy as np
import onnxruntime
artifact, inputs, outputs = sys.argv[1:4]
images = np.load(inputs)["images"]
session = onnxruntime.InferenceSession(artifact, providers=["CPUExecutionProvider"])
name, kind = session.get_inputs()[0].name, session.get_inputs()[0].type  # kind: "tensor(float)", "tensor(uint8)"
dtype = {"tensor(uint8)": np.uint8, "tensor(float16)": np.float16, "tensor(double)": np.float64}.get(kind, np.float32)
probabilities = [session.run(None, {name: images[start:start + 256].astype(dtype)})[0]
                 for start in range(0, len(images), 256)]
np.savez(outputs, runtime=f"onnxruntime {onnxruntime.__version__}", cnnkit_imported="cnnkit" in sys.modules,
         probabilities=np.concatenate(probabilities))
"""

_CHECKS = {"savedmodel": _SAVEDMODEL_CHECK, "tflite": _TFLITE_CHECK, "onnx": _ONNX_CHECK}
_FORMAT_TITLES = {"savedmodel": "TensorFlow SavedModel", "tflite": "TFLite (LiteRT)", "onnx": "ONNX"}


class ExportVerificationError(RuntimeError):
    """The fresh-process check of an export failed; nothing was left at the target path.

    Example:
        >>> try:
        ...     cnnkit.export(run, "exports/demo")  # doctest: +SKIP
        ... except ExportVerificationError as error:
        ...     print(error)
    """


def export(
    run_or_model,
    path,
    *,
    format: str = "savedmodel",
    quantize: str | None = None,
    data=None,
    representative_data=None,
    representative_samples: int | None = None,
    class_names=None,
    tolerance: float = TOLERANCE,
    verify: bool = True,
    overwrite: bool = False,
    trust: bool = False,
    verbose: int = 1,
):
    """Export a trained classifier as a SavedModel, TFLite or ONNX directory, and verify it.

    Args:
        run_or_model: A ``cnnkit.Run``, a ``keras.Model`` taking raw pixels, or the path of a
            run directory or ``.keras`` file (loaded with ``cnnkit.load``).
        path: The export directory to create. Its parent is created if missing.
        format: ``"savedmodel"``, ``"tflite"`` or ``"onnx"`` (needs the ``onnx`` extra:
            tf2onnx, onnx, onnxruntime).
        quantize: TFLite only: ``None``/``"float32"`` (no quantisation), ``"float16"``
            (float16 weights), ``"dynamic"`` (int8 weights, float activations) or ``"int8"``
            (integer kernels throughout, calibrated on a representative sample; float32
            input and output).
        data: Where the sample images come from: a ``cnnkit.data.ImageData``, a dataset name
            (``"mnist"``) or a mapping of ``cnnkit.data.from_folder`` arguments. Defaults to
            the data recorded in the run's config.yaml. Its training split gives the int8
            representative sample; its test split (else validation) the parity sample and the
            accuracy of quantised exports.
        representative_data: int8 only: uint8 images ``(N, H, W, C)`` to calibrate with,
            instead of a sample of ``data``'s training split.
        representative_samples: int8 only: how many training images calibrate it (default
            ``REPRESENTATIVE_SAMPLES``, 256); not with ``representative_data``.
        class_names: One name per output; defaults to the run's (``"0".."K-1"`` for a bare
            model).
        tolerance: Largest max absolute difference of probabilities allowed for the float
            formats (SavedModel, TFLite float32, ONNX).
        verify: Run the fresh-process check. Without it the report says it was skipped.
        overwrite: Replace an earlier export (a directory holding its ``verification.json``)
            or an empty directory at ``path``. Anything else there is refused, never deleted.
        trust: Load a ``run_or_model`` path with ``cnnkit.load(..., trust=True)``: a model whose
            custom code Keras's safe mode blocks, from a source you trust.
        verbose: ``0`` silent; ``1`` prints the verification report.

    Returns:
        ``path`` as an absolute ``pathlib.Path``.

    Raises:
        ValueError: On a bad argument, an existing ``path`` without ``overwrite=True`` (or with
            it, when ``path`` is not an earlier export or an empty directory), a ``path`` that is
            or holds the run being exported, a model whose input is not one image ``(H, W, C)`` or
            whose output is not one matrix ``(N, K)``, int8 without sample data, representative
            arguments without int8, or ONNX without its packages.
        ExportVerificationError: If the export cannot be loaded in a fresh process or a float
            format differs from the Keras model by more than ``tolerance``.

    Example:
        >>> run = cnnkit.recipes.train("20C5-MP2-50C5-MP2-FC256", "mnist-sample", epochs=2)  # doctest: +SKIP
        >>> out = cnnkit.export(run, "exports/lenet-int8", format="tflite", quantize="int8")  # doctest: +SKIP
        >>> json.loads((out / "verification.json").read_text())["accuracy_change_points"]  # doctest: +SKIP
        -0.1
    """
    quantize = _check_arguments(format, quantize, representative_data, representative_samples, tolerance, verbose)
    run = _resolve_run(run_or_model, class_names, trust)
    path = _check_target(path, overwrite, run_or_model, run)
    model, reference_note = _float32_copy(run.model)
    image_shape = _image_shape(model)
    _check_output(model)
    names = _check_class_names(run.class_names)
    quantised = format == "tflite" and quantize != "float32"
    source_data, data_note = _resolve_data(data, run, names, required=quantize == "int8" and representative_data is None)
    calibration = None
    if quantize == "int8":
        calibration = _representative_images(representative_data, source_data, image_shape,
                                             representative_samples or REPRESENTATIVE_SAMPLES)
    images, labels, sample_note = _check_images(source_data, image_shape, whole_split=quantised)
    info = {
        "format": format,
        "quantize": quantize if format == "tflite" else None,
        "image_shape": list(image_shape),
        "input_dtype": str(model.inputs[0].dtype),
        "class_names": names,
        "source": str(run.run_dir) if run.run_dir is not None else f"<keras.Model {run.model.name}>",
        "source_metrics": _source_metrics(run.metrics),
        "reference": reference_note,
        "data": data_note,
        "sample": sample_note,
        "calibration_images": None if calibration is None else len(calibration),
    }
    with _staging_dir(path, overwrite) as staging:
        artifact = _write_artifact(model, staging, format, quantize, calibration, names, image_shape)
        atomic_write_text(staging / LABELS_FILE, "".join(f"{name}\n" for name in names))
        report = {**info, "file": MODEL_FILES[format], "size_bytes": _size(artifact)}
        if verify:
            report.update(_verify(model, artifact, path, format, images, labels, quantised, tolerance, names))
        else:
            report["verified"] = "skipped (verify=False)"
        atomic_write_text(staging / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        atomic_write_text(staging / CARD_FILE, _card(path.name, report))
    if verbose:
        print(report_text(report, path))
    return path


# --------------------------------------------------------------------------- arguments


def _check_arguments(format, quantize, representative_data, representative_samples, tolerance, verbose) -> str:
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}. Received: format={format!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"`quantize` must be None or one of {list(QUANTIZATIONS)}. Received: quantize={quantize!r}")
    if quantize not in (None, "float32") and format != "tflite":
        raise ValueError(f"`quantize` applies to format='tflite' only. Received: format={format!r}, quantize={quantize!r}")
    if representative_samples is not None and (not isinstance(representative_samples, int)
                                               or isinstance(representative_samples, bool) or representative_samples < 1):
        raise ValueError(f"`representative_samples` must be a positive integer. "
                         f"Received: representative_samples={representative_samples!r}")
    for name, value in (("representative_data", representative_data), ("representative_samples", representative_samples)):
        if value is not None and quantize != "int8":
            raise ValueError(f"`{name}` calibrates quantize='int8' only. Received: format={format!r}, "
                             f"quantize={quantize!r}")
    if representative_samples is not None and representative_data is not None:
        raise ValueError("`representative_samples` counts the training images sampled when no `representative_data` "
                         f"is given. Received: representative_samples={representative_samples!r} and representative_data")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"`tolerance` must be a number >= 0. Received: tolerance={tolerance!r}")
    if verbose not in (0, 1, True, False):
        raise ValueError(f"`verbose` must be 0 or 1. Received: verbose={verbose!r}")
    if format == "onnx":
        missing = [name for name in ("tf2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"format='onnx' needs the packages {missing}: pip install 'cnnkit[onnx]'. "
                             f"Received: format={format!r}")
    return quantize or "float32"


def _check_target(path, overwrite, run_or_model, run) -> Path:
    """``path`` as an absolute ``Path`` (the check process runs in another directory), if it may be written."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"`path` must be a directory path. Received: path={path!r}")
    path = Path(path).absolute()
    _check_not_source(path, run_or_model, run)
    _recover_killed_export(path)
    _check_replaceable(path, overwrite)
    return path


def _check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` and it is an earlier export or an empty directory."""
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"`path` exists and is not a directory; an export is a directory. Received: path={str(path)!r}")
    if not overwrite:
        raise ValueError(f"`path` already exists; pass overwrite=True (cnnkit export --overwrite) to replace it. Received: path={str(path)!r}")
    if not _is_export(path) and any(path.iterdir()):
        raise ValueError(f"overwrite=True replaces only an earlier cnnkit export (a directory with its {REPORT_FILE}) "
                         f"or an empty directory; `path` holds other files, which it would delete. "
                         f"Received: path={str(path)!r}")


def _is_export(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``export``: its report names a format and that format's file."""
    try:
        report = json.loads((path / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("format") in FORMATS \
        and report.get("file") == MODEL_FILES[report["format"]]


def _check_not_source(path: Path, run_or_model, run) -> None:
    """Refuse a target that is, or holds, the run directory (or model file) being exported."""
    sources = [run.run_dir] + ([Path(run_or_model)] if isinstance(run_or_model, (str, os.PathLike)) else [])
    for source in filter(None, sources):
        source = source.resolve()
        if path.resolve() in (source, *source.parents):
            raise ValueError(f"`path` is or holds the run being exported ({source}); export elsewhere. "
                             f"Received: path={str(path)!r}")


def _resolve_run(run_or_model, class_names, trust):
    import keras

    import cnnkit

    if isinstance(run_or_model, (str, os.PathLike)):
        run = cnnkit.load(run_or_model, trust=trust)
    elif isinstance(run_or_model, Run):
        run = run_or_model
    elif isinstance(run_or_model, keras.Model):
        run = Run(run_or_model)
    else:
        raise ValueError("`run_or_model` must be a cnnkit.Run, a keras.Model, or the path of a run directory or "
                         f".keras file. Received: run_or_model of type {type(run_or_model).__name__}")
    if class_names is not None:
        run = Run(run.model, metrics=run.metrics, run_dir=run.run_dir, config=run.config, class_names=class_names)
    return run


def _check_class_names(names) -> list[str]:
    for name in names:
        if not name or name.splitlines() != [name] or name != name.strip():  # no \n, \r, \f, \x1c-\x1e, \x85, \u2028...
            raise ValueError("Class names must be non-empty single lines without surrounding spaces (they become "
                             f"lines of labels.txt). Received: class name {name!r}")
    return list(names)


def _image_shape(model) -> tuple[int, int, int]:
    if len(model.inputs) != 1:
        raise ValueError(f"Only models with one image input can be exported. Received: {len(model.inputs)} inputs")
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or any(dim is None for dim in shape):
        raise ValueError(f"The model input must be one image of known shape (H, W, C). Received: input shape "
                         f"{tuple(model.inputs[0].shape)}")
    return tuple(int(dim) for dim in shape)


def _check_output(model) -> None:
    """Refuse a model whose output is not one ``(N, K)`` matrix (class maps, several heads)."""
    shapes = [tuple(output.shape) for output in model.outputs]
    if len(shapes) != 1 or len(shapes[0]) != 2 or shapes[0][1] is None:
        raise ValueError(f"Only models with one output of class probabilities (N, K) can be exported. Received: "
                         f"output shape(s) {', '.join(map(str, shapes))}")


def _source_metrics(metrics: dict) -> dict:
    """The run's test accuracy and error as floats, leaving out values that are not finite numbers."""
    return {key: float(value) for key, value in metrics.items() if key in ("test_accuracy", "test_error")
            and isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)}


def _float32_copy(model):
    """``(model, note)``: the model itself when it computes in float32, else a float32 copy."""
    import keras

    policies = {layer.dtype_policy.name for layer in model._flatten_layers() if hasattr(layer, "dtype_policy")}
    if policies <= {"float32"}:
        return model, "the Keras model (float32)"

    def to_float32(value):
        if isinstance(value, dict):
            if value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(value.get("config"), dict):
                return {**value, "config": {**value["config"], "name": "float32"}}
            return {key: to_float32(item) for key, item in value.items()}
        if isinstance(value, list):
            return [to_float32(item) for item in value]
        return value

    _import_custom_objects()
    copy = keras.saving.deserialize_keras_object(to_float32(keras.saving.serialize_keras_object(model)))
    copy.set_weights(model.get_weights())
    copy(np.zeros((1, *model.inputs[0].shape[1:]), dtype=model.inputs[0].dtype), training=False)  # built and called
    mixed = ", ".join(sorted(policies - {"float32"}))
    return copy, f"a float32 copy of the Keras model (which computes in {mixed}; same weights)"


# --------------------------------------------------------------------------- data


def _resolve_data(data, run, names, *, required):
    """``(ImageData or None, note)``: ``data``, else the run's recorded data when it loads.

    Data whose class names (in order) are not the model's is refused: its labels would mean other
    outputs, so accuracies and int8 calibration would be wrong."""
    from cnnkit.data.imagedata import class_list
    from cnnkit.recipes.pipeline import resolve_data

    if data is not None:
        resolved = resolve_data(data)
        if list(resolved.class_names) != names:
            raise ValueError(f"The data's classes are not the model's: data {resolved.source} has "
                             f"{class_list(resolved.class_names)}, the model {class_list(names)} (pass class_names= if the "
                             "model's are only unnamed)")
        return resolved, resolved.source
    recorded = _recorded_data(run.config)
    if recorded is None:
        if required:
            raise ValueError("quantize='int8' needs sample images: pass data= (an ImageData, a dataset name or "
                             "from_folder arguments) or representative_data=; the model has no recorded data. "
                             "Received: data=None")
        return None, "none recorded with the model (parity uses random pixels)"
    try:
        resolved = resolve_data(recorded)
    except (ValueError, OSError) as error:
        if required:
            raise ValueError(f"quantize='int8' needs the run's data {recorded!r}, which does not load: {error} "
                             "Pass data= or representative_data=. Received: data=None") from error
        return None, f"the run's data {recorded!r} does not load here ({error}); parity uses random pixels"
    if list(resolved.class_names) != names:
        if required:
            raise ValueError(f"quantize='int8' needs sample images, and the run's data {recorded!r} now has other "
                             f"classes than the model ({class_list(resolved.class_names)}). Pass data= or "
                             "representative_data=. Received: data=None")
        return None, f"the run's data {recorded!r} now has other classes than the model; parity uses random pixels"
    return resolved, resolved.source


def _recorded_data(config: dict):
    """The data a run's config recorded, as ``resolve_data`` takes it (a name or a mapping), else ``None``."""
    arguments = config.get("arguments") if isinstance(config.get("arguments"), dict) else {}
    for value in (arguments.get("data"), config.get("data")):
        if isinstance(value, str) and not value.startswith("<"):
            return value
        if isinstance(value, dict) and ("name" in value or "path" in value):
            return value  # cnnkit.data.load options with "name", from_folder ones with "path"
    return None


def _representative_images(representative_data, data, image_shape, count) -> np.ndarray:
    if representative_data is not None:
        images = np.asarray(representative_data)
        if images.dtype != np.uint8 or images.shape[1:] != image_shape or len(images) == 0:
            raise ValueError(f"`representative_data` must be uint8 images of shape (N, {', '.join(map(str, image_shape))}) "
                             f"with N >= 1. Received: dtype={images.dtype}, shape={images.shape}")
        return images
    images, _ = data.arrays("train")
    _check_data_shape(images, image_shape)
    chosen = np.random.default_rng(0).choice(len(images), size=min(count, len(images)), replace=False)
    return images[np.sort(chosen)]


def _check_data_shape(images, image_shape) -> None:
    if images.shape[1:] != image_shape:
        raise ValueError(f"The data's images do not fit the model input {image_shape}. "
                         f"Received: data images of shape {images.shape[1:]}")


def _check_images(data, image_shape, *, whole_split):
    """``(images, labels or None, note)``: the images the export is checked on."""
    if data is not None:
        split = next((name for name in ("test", "val", "train") if getattr(data, name) is not None), None)
        images, labels = data.arrays(split)
        _check_data_shape(images, image_shape)
        if not whole_split and len(images) > PARITY_SAMPLES:  # evenly spaced: a class-sorted split gives every class
            chosen = np.linspace(0, len(images) - 1, PARITY_SAMPLES).round().astype(int)
            images, labels = images[chosen], labels[chosen]
            return images, labels, f"{len(images)} evenly spaced images of the {split} split"
        return images, labels, f"{len(images)} images of the {split} split"
    images = np.random.default_rng(0).integers(0, 256, (PARITY_SAMPLES, *image_shape), dtype=np.uint8)
    return images, None, f"{PARITY_SAMPLES} random uint8 images"


# --------------------------------------------------------------------------- writing


def _staging_prefix(path: Path) -> str:
    """The start of the hidden names beside ``path`` that an export by this process stages in.

    They name the host and the process, so that a later export can tell what a killed one left.
    """
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _recover_killed_export(path: Path) -> None:
    """Clear what an export to ``path`` killed on this host left beside it (SIGKILL runs no cleanup).

    Its staging directory (``.partial``) is deleted. If it was killed between moving the earlier export
    aside (``.old``) and renaming the new one into place, the earlier export is put back at ``path``.
    A process still alive is left alone: it may be exporting there now.

    Example:
        >>> _recover_killed_export(Path("exports/lenet").absolute())  # doctest: +SKIP
    """
    leftover = re.compile(rf"\.{re.escape(path.name)}\.{_host_tag()}-(\d+)\.\w+\.(partial|old)")
    for entry in path.parent.iterdir() if path.parent.is_dir() else ():
        match = leftover.fullmatch(entry.name)
        if match is None or _process_alive(int(match[1])):
            continue
        if match[2] == "old" and (entry / path.name).exists() and not (path.exists() or path.is_symlink()):
            os.replace(entry / path.name, path)
            warnings.warn(f"an export to {path} was killed while it replaced the earlier one; the earlier export "
                          f"is back in place", stacklevel=4)
        shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _staging_dir(path: Path, overwrite: bool):
    """A temporary sibling of ``path`` that becomes ``path`` when the block succeeds.

    On any exception the staging directory is removed and ``path`` is left as it was. With
    ``overwrite`` an existing ``path`` (checked again: an earlier export or an empty directory)
    is moved aside, replaced, then deleted; if the replacing rename fails, it is moved back.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=_staging_prefix(path), suffix=".partial"))
    except OSError as err:  # name the export the caller asked for, not a random staging name beside it
        raise OSError(err.errno, err.strerror, str(path)) from err
    try:
        file_mode = _default_file_mode()
        os.chmod(staging, file_mode | (file_mode & 0o444) >> 2)  # mkdtemp's 0o700 -> as mkdir would
        yield staging
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise ValueError(f"`path` was created while exporting; pass overwrite=True to replace it. "
                             f"Received: path={str(path)!r}")
        _check_replaceable(path, overwrite)
        previous = Path(tempfile.mkdtemp(dir=path.parent, prefix=_staging_prefix(path), suffix=".old"))
        try:
            if path.exists():
                os.replace(path, previous / path.name)
            os.replace(staging, path)
        except BaseException:  # the second rename failed (or a signal came between): put the old export back
            if (previous / path.name).exists() and not path.exists():
                os.replace(previous / path.name, path)
            shutil.rmtree(previous, ignore_errors=True)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _size(artifact: Path) -> int:
    if artifact.is_file():
        return artifact.stat().st_size
    return sum(file.stat().st_size for file in artifact.rglob("*") if file.is_file())


def _write_artifact(model, staging: Path, format, quantize, calibration, names, image_shape) -> Path:
    """Write the model; return what its runtime loads (the SavedModel directory or the file)."""
    if format == "savedmodel":
        archive = _serving_archive(model, names, image_shape)
        archive.write_out(str(staging), verbose=False)
        return staging
    artifact = staging / MODEL_FILES[format]
    if format == "onnx":
        model(np.zeros((1, *image_shape), model.inputs[0].dtype), training=False)  # a loaded model: Keras needs a call
        with warnings.catch_warnings():  # keras's tf2onnx patch for numpy 2 probes np.object
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(artifact), format="onnx", verbose=False)
    else:
        model.export(str(artifact), format="litert", verbose=False, **_converter_options(quantize, calibration))
    return artifact


def _serving_archive(model, names, image_shape):
    """A ``keras.export.ExportArchive`` with the uint8 and the encoded-bytes signatures.

    ``serving_bytes`` decodes each image in its own channels and converts it as training does
    (``_training_pixels``: transparent pixels onto white, grayscale as PIL's ``L``; JPEG with
    PIL's accurate DCT; a 32-bit BMP's fourth byte ignored, as PIL does), then resizes it to
    ``(H, W)`` (TensorFlow's antialiased bilinear, where ``from_folder`` uses PIL's: a resized
    image can differ by a level or so). What the graph cannot match: EXIF orientation is not
    applied (clients should send upright images), 16-bit grayscale PNGs keep their high byte (PIL
    rounds ``v / 257``: at most one level apart), a BMP with an alpha mask (PIL: RGBA) is read as
    RGB, an 8-bit palette BMP as its palette indices, GIF transparency decodes as black, and the
    colour-key transparency of an RGB or grayscale PNG (a ``tRNS`` chunk naming one colour) is
    ignored, where PIL composites that colour onto white.
    """
    import keras
    import tensorflow as tf

    height, width, channels = image_shape
    input_dtype = model.inputs[0].dtype

    def classify(images):
        probabilities = tf.cast(model(tf.cast(images, input_dtype), training=False), tf.float32)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {"probabilities": probabilities, "class_id": class_id,
                "class_name": tf.gather(tf.constant(names), class_id)}

    def decode_as_pil(data):  # JPEG with PIL's accurate DCT; BMP's 4th byte is padding to PIL, not alpha
        return tf.case([(tf.io.is_jpeg(data), lambda: tf.io.decode_jpeg(data, dct_method="INTEGER_ACCURATE")),
                        (tf.equal(tf.strings.substr(data, 0, 2), b"BM"), lambda: tf.io.decode_bmp(data, channels=3))],
                       default=lambda: tf.io.decode_image(data, expand_animations=False))

    def decode(data):
        if channels in (1, 3):
            image = _training_pixels(decode_as_pil(data), channels)
        else:  # no training decode to match (from_folder reads L or RGB): TensorFlow's own
            image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        image = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)

    def classify_bytes(image_bytes):
        return classify(tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(image_shape, tf.uint8)))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", classify,
                         input_signature=[tf.TensorSpec((None, *image_shape), tf.uint8, name="images")])
    archive.add_endpoint(BYTES_SIGNATURE, classify_bytes,
                         input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")])
    return archive


def _training_pixels(image, channels: int):
    """A decoded image (1-4 channels) as ``cnnkit.data.folder.convert_image`` makes training's.

    Alpha (LA, RGBA) is composited onto ``ALPHA_BACKGROUND`` (white) with PIL's
    ``alpha_composite`` rounding, then the image becomes RGB, or for ``channels=1`` PIL's ``L``
    (ITU-R 601-2 luma in PIL's integer arithmetic), so both agree with PIL pixel for pixel.
    """
    import tensorflow as tf

    from cnnkit.data.folder import ALPHA_BACKGROUND

    image = tf.cast(image, tf.int32)
    count = tf.shape(image)[-1]
    has_alpha = tf.equal(count % 2, 0)
    alpha = tf.where(has_alpha, image[..., -1:], 255)
    color = image[..., :count - tf.cast(has_alpha, tf.int32)]
    rgb = tf.broadcast_to(color, tf.concat([tf.shape(color)[:2], [3]], axis=0))
    rgb = (rgb * alpha + tf.constant(ALPHA_BACKGROUND) * (255 - alpha) + 127) // 255
    if channels == 3:
        return rgb
    return (tf.reduce_sum(rgb * [19595, 38470, 7471], axis=-1, keepdims=True) + 0x8000) // 0x10000


def _converter_options(quantize, calibration) -> dict:
    """``tf.lite.TFLiteConverter`` settings of a quantisation mode (``model.export`` kwargs)."""
    import tensorflow as tf

    if quantize == "float32":
        return {}
    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "float16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    elif quantize == "int8":
        def representative_dataset():
            for image in calibration:
                yield [image[np.newaxis].astype(np.float32)]

        options["representative_dataset"] = representative_dataset
        options["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
    return options


# --------------------------------------------------------------------------- verification


def _keras_probabilities(model, images) -> np.ndarray:
    """The reference: the model in inference mode, compiled, on the CPU (as the fresh process runs it)."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(tf.cast(x, model.inputs[0].dtype), training=False),
                          input_signature=[tf.TensorSpec((None, *images.shape[1:]), tf.uint8)], autograph=False)
    with tf.device("/CPU:0"):
        return np.concatenate([np.asarray(forward(images[start:start + _CHUNK]), dtype=np.float32)
                               for start in range(0, len(images), _CHUNK)])


def _fresh_process(format, artifact: Path, path: Path, images: np.ndarray) -> dict:
    """Run ``artifact`` (in its staging directory) in a new process; errors name ``path``, where it was to go."""
    with tempfile.TemporaryDirectory(prefix="cnnkit-verify-") as scratch:
        inputs, outputs = Path(scratch) / "inputs.npz", Path(scratch) / "outputs.npz"
        np.savez(inputs, images=images)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run([sys.executable, "-c", _CHECKS[format], str(artifact), str(inputs), str(outputs)],
                              cwd=scratch, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not outputs.is_file():
            tail = " | ".join(line for line in done.stderr.strip().splitlines()[-6:])
            raise ExportVerificationError(f"The {format} export for {path} did not run in a fresh process "
                                          f"(exit {done.returncode}): {tail}")
        with np.load(outputs) as results:
            return {key: results[key] for key in results.files}


def _verify(model, artifact, path, format, images, labels, quantised, tolerance, names) -> dict:
    expected = _keras_probabilities(model, images)
    results = _fresh_process(format, artifact, path, images)
    got = results["probabilities"]
    if got.shape != expected.shape:
        raise ExportVerificationError(f"The {format} export returned probabilities of shape {got.shape}; the Keras "
                                      f"model {expected.shape}")
    report = {
        "verified": "in a fresh process",
        "runtime": str(results["runtime"]),
        "cnnkit_imported": bool(results["cnnkit_imported"]),
        "examples": len(images),
        "max_abs_diff": _max_abs_diff(got, expected),
        "class_agreement": float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1))),
        "tolerance": None if quantised else tolerance,
    }
    if labels is not None:
        keras_accuracy = float(np.mean(expected.argmax(axis=1) == labels))
        export_accuracy = float(np.mean(got.argmax(axis=1) == labels))
        report.update(keras_accuracy=keras_accuracy, export_accuracy=export_accuracy,
                      accuracy_change_points=round(100.0 * (export_accuracy - keras_accuracy), 4))
    problems = []
    if report["cnnkit_imported"]:
        problems.append("the check imported cnnkit")
    not_finite = {side: int(np.sum(~np.isfinite(values).all(axis=1))) for side, values in (("export", got),
                                                                                       ("keras", expected))}
    if any(not_finite.values()):  # NaN compares as within any tolerance: refused on its own
        report["images_with_non_finite_probabilities"] = not_finite
        problems.append(f"probabilities that are NaN or infinite on {not_finite['export']} image(s) from the export "
                        f"and {not_finite['keras']} from the Keras model")
    elif not quantised and report["max_abs_diff"] > tolerance:
        problems.append(f"max abs difference {report['max_abs_diff']:.3g} > tolerance {tolerance:.3g}")
    if format == "savedmodel":
        report.update(_signature_checks(results, got, names))
        if report["bytes_class_agreement"] != 1.0:
            problems.append(f"the bytes signature agrees with the uint8 one on {report['bytes_class_agreement']:.2%} "
                            "of the PNG-encoded images")
        if report["bytes_max_abs_diff"] is None:
            problems.append("the bytes signature's probabilities are NaN or infinite")
        if report["class_name_agreement"] != 1.0:
            problems.append("class_id/class_name do not match the probabilities and labels")
    report["passed"] = not problems
    if problems:
        raise ExportVerificationError(f"The {format} export failed its check ({'; '.join(problems)}); nothing was "
                                      f"written. Report: {json.dumps(report)}")
    return report


def _max_abs_diff(got, expected) -> float | None:
    """The largest absolute difference of two arrays; ``None`` (JSON null) where either holds NaN or infinity."""
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        return None
    return float(np.max(np.abs(got - expected), initial=0.0))


def _signature_checks(results, probabilities, names) -> dict:
    """How the SavedModel's class outputs and its bytes signature agree with its probabilities."""
    class_id = results["class_id"]
    consistent = (class_id == probabilities.argmax(axis=1)) & (results["class_name"] == np.asarray(names)[class_id])
    return {
        "bytes_class_agreement": float(np.mean(results["bytes_class_id"] == class_id)),
        "bytes_max_abs_diff": _max_abs_diff(results["bytes_probabilities"], probabilities),
        "class_name_agreement": float(np.mean(consistent)),
    }


# --------------------------------------------------------------------------- report and card


def report_text(report: dict, path) -> str:
    """The verification report as printed after an export.

    Example:
        >>> print(report_text({"format": "onnx", "file": "model.onnx", "size_bytes": 10,
        ...                    "verified": "skipped (verify=False)"}, "exports/x"))
        onnx export: exports/x/model.onnx (10 bytes)
          verified: skipped (verify=False)
    """
    title = report["format"] + (f" ({report['quantize']})" if report.get("quantize") not in (None, "float32") else "")
    location = Path(path) if report["format"] == "savedmodel" else Path(path) / report["file"]
    lines = [f"{title} export: {location} ({report['size_bytes']:,} bytes)", f"  verified: {report['verified']}"]
    if "runtime" in report:
        lines.append(f"  runtime: {report['runtime']} on {report['sample']}")
        line = f"  max |export - keras| = {report['max_abs_diff']:.3g}"
        if report.get("tolerance") is not None:
            line += f" (tolerance {report['tolerance']:g}: {'ok' if report['passed'] else 'FAILED'})"
        lines.append(line + f"; same class on {report['class_agreement']:.2%}")
        if "keras_accuracy" in report:
            lines.append(f"  accuracy: keras {report['keras_accuracy']:.2%}, export {report['export_accuracy']:.2%} "
                         f"(change {report['accuracy_change_points']:+.2f} points)")
        if "bytes_class_agreement" in report:
            lines.append(f"  serving_bytes (PNG) vs serving_default: same class on {report['bytes_class_agreement']:.2%}, "
                         f"max diff {report['bytes_max_abs_diff']:.3g}")
    return "\n".join(lines)


def _card(name: str, report: dict) -> str:
    height, width, channels = report["image_shape"]
    names = report["class_names"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    title = _FORMAT_TITLES[report["format"]] + (f", {report['quantize']}" if report.get("quantize") else "")
    lines = [f"# {name}", "", f"A {title} export of a cnnkit image classifier.", "",
             "| | |", "|---|---|",
             f"| Source | `{report['source']}` |",
             f"| Exported model | {report['reference']} |",
             f"| Classes | {len(names)}: {shown} (`labels.txt`: line i names class id i) |"]
    for key, value in report["source_metrics"].items():
        lines.append(f"| Source {key.replace('_', ' ')} | {value:.4f} |")
    lines += ["", "## Inputs and outputs", ""]
    if report["format"] == "savedmodel":
        lines += [f"- `serving_default(images)`: uint8 `[N, {height}, {width}, {channels}]` raw pixels.",
                  f"- `{BYTES_SIGNATURE}(image_bytes)`: string `[N]` of encoded JPEG/PNG/GIF/BMP images, decoded to "
                  f"{channels} channel(s) as in training (transparency onto white) and resized to {height}x{width} "
                  "(bilinear) in the graph. EXIF orientation is not applied: send upright images.",
                  "- Both return `probabilities` float32 `[N, K]`, `class_id` int64 `[N]`, `class_name` string `[N]`.",
                  "", "```python", "import tensorflow as tf", "",
                  f'model = tf.saved_model.load("{name}")',
                  'out = model.signatures["serving_default"](images=tf.constant(images_uint8))',
                  'out["class_name"]',
                  "```"]
    else:
        dtype = report["input_dtype"]
        lines += [f"Input {dtype} `[N, {height}, {width}, {channels}]` raw pixels 0-255 (the model scales them); "
                  "output probabilities float32 `[N, K]`; class id = argmax, its name = that line of `labels.txt`.",
                  "", "```python"]
        if report["format"] == "tflite":
            lines += ["from ai_edge_litert.interpreter import Interpreter", "",
                      f'interpreter = Interpreter(model_path="{name}/{report["file"]}")',
                      'source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]',
                      'interpreter.resize_tensor_input(source["index"], images.shape)',
                      "interpreter.allocate_tensors()",
                      f'interpreter.set_tensor(source["index"], images.astype("{dtype}"))',
                      "interpreter.invoke()",
                      'probabilities = interpreter.get_tensor(target["index"])']
        else:
            lines += ["import onnxruntime", "",
                      f'session = onnxruntime.InferenceSession("{name}/{report["file"]}")',
                      'probabilities = session.run(None, {session.get_inputs()[0].name: '
                      f'images.astype("{dtype}")}})[0]']
        lines.append("```")
    lines += ["", "Preprocessing is inside the model and training-only layers (augmentation, dropout) are inactive.",
              "", "## Verification", "", "```text", report_text(report, name), "```", "",
              f"The full report is `{REPORT_FILE}`.", ""]
    return "\n".join(lines)
