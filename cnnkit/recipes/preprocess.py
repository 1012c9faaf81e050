"""Input preprocessing fitted on the training split and kept inside the model as layers.

``fit_preprocessing`` turns a name (or a list of names) into Keras layers holding statistics
fitted on the training images, scaled to [0, 1]. The layers go first in the model
(``cnnkit.build(..., preprocessing=layers)``), so a saved or exported model still takes raw
0-255 pixels and applies exactly what it was trained with.

The choices, after CS231n ("Data preprocessing"):

* ``"scale"`` (the default): pixels / 255, to [0, 1]. This layer, ``Rescaling(1/255)`` named
  ``"rescale"``, starts every preprocessing.
* ``"center_pixel"``: subtract the mean image (one mean per pixel and channel).
* ``"center_channel"``: subtract one mean per channel (the VGG way).
* ``"standardize"``: subtract the per-channel mean and divide by the per-channel standard
  deviation (``sqrt(variance + 1e-5)``); a channel whose variance is below ``1e-5`` (constant
  images) warns, as a new image that varies in it is scaled up by as much as ``1/sqrt(1e-5) = 316``.
* ``"pca"``: PCA whitening, ``(x - mean) U / sqrt(S + 1e-5)`` with ``U, S`` the eigenvectors
  and eigenvalues of the training covariance ``X^T X / N`` (components in decreasing order of
  variance, laid out in the image's shape, so the output is no longer spatially arranged).
* ``"zca"``: ZCA whitening, the PCA-whitened data rotated back by ``U^T``: it decorrelates the
  pixels while keeping the result looking like an image, so convolutions still make sense.

A list applies its steps in order, each fitted on the output of the ones before it
(``["center_pixel", "standardize"]``). Whitening stores a ``d x d`` matrix for ``d = H*W*C``
and needs many more than ``d`` images to estimate it, so it is refused above
``MAX_WHITENING_DIM`` (64x64 grayscale) and on ``d`` images or fewer, and warns below ``5 d``
and when directions of the training images have a variance below ``1e-5``: a direction the
training images barely vary in is scaled up by as much as ``1/sqrt(1e-5) = 316``, and new images
do vary in it (ZCA fitted on 1,000 MNIST digits gives training inputs of standard deviation 0.83
and test inputs of 2.6; on 4,000, 0.88 and 1.08).

Example:
    >>> import numpy as np, cnnkit
    >>> images = np.random.default_rng(0).integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    >>> layers = fit_preprocessing("zca", images)
    >>> [layer.name for layer in layers]
    ['rescale', 'whiten']
    >>> model = cnnkit.build("FC16", (8, 8, 1), 3, preprocessing=layers)
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterator

import keras
import numpy as np
from keras import ops

__all__ = ["PREPROCESSORS", "Standardization", "Whitening", "fit_preprocessing", "parse_preprocess"]

PREPROCESSORS = ("scale", "center_pixel", "center_channel", "standardize", "pca", "zca")
EPSILON = 1e-5  # added to the eigenvalues (whitening) and variances (standardize), as in CS231n
MAX_WHITENING_DIM = 4096  # 64x64x1: a 16M-entry matrix (64 MiB float32)
CHUNK_VALUES = 2**22  # statistics are summed over chunks of this many pixel values (32 MiB as float64)
_LAYER_NAMES = {"center_pixel": "center", "center_channel": "center", "standardize": "standardize",
                "pca": "whiten", "zca": "whiten"}


def fit_preprocessing(preprocess, train_images, *, dtype=None) -> list[keras.layers.Layer]:
    """Fit preprocessing on training images and return it as the model's first layers.

    Statistics are computed on all the training images, scaled to [0, 1] a chunk of
    ``CHUNK_VALUES`` pixel values at a time and summed in float64, so no float copy of them all
    is made: the images passed are the sample (``train`` and ``finetune`` pass
    ``pipeline.training_sample``: the training split, or 256 MiB of it).

    Args:
        preprocess: one of ``PREPROCESSORS`` or a list of them, applied in order; ``"scale"``
            may only come first (every preprocessing starts by scaling). Two steps making
            layers of the same name (both centrings, both whitenings) are refused.
        train_images: the training split as raw pixels, ``(N, H, W, C)`` integers in 0-255
            (``ImageData.arrays("train")[0]``).
        dtype: the model's dtype policy (``"mixed_bfloat16"``, a ``keras.DTypePolicy``, or
            ``None`` for Keras's default). The layers compute at its *variable* precision
            (float32 under the mixed policies): whitening multiplies low-variance directions
            by up to ``1/sqrt(1e-5) = 316``, which would blow bfloat16's rounding of the
            input up into the signal. The network's first layer casts their float32 output
            to its own compute dtype.

    Returns:
        Layers mapping raw 0-255 pixels to what the network should see: ``Rescaling``
        (``"rescale"``), then ``Standardization`` (``"center"``, ``"standardize"``) and/or
        :class:`Whitening` (``"whiten"``) with the fitted statistics as non-trainable weights.

    Raises:
        ValueError: an unknown or misplaced name, images that are not raw integer pixels,
            or whitening of images with more than ``MAX_WHITENING_DIM`` values or of no more
            images than values per image (a warning below 5 times as many; see the module).

    Warns:
        UserWarning: whitening fitted on fewer than 5 images per value, or a channel
            (``"standardize"``) or whitening direction whose training variance is below ``EPSILON``.

    Example:
        >>> x_train, _ = cnnkit.data.load("mnist-sample").arrays("train")  # doctest: +SKIP
        >>> layers = fit_preprocessing(["center_pixel", "standardize"], x_train)  # doctest: +SKIP
        >>> model = cnnkit.build("lenet5", (28, 28, 1), 10, preprocessing=layers)  # doctest: +SKIP
    """
    steps = parse_preprocess(preprocess)
    images = _check_images(train_images)
    dimension = math.prod(images.shape[1:])
    whitening = {"pca", "zca"} & set(steps)
    h, w, c = images.shape[1:]
    if whitening and dimension > MAX_WHITENING_DIM:
        raise ValueError(
            f"Whitening images of {h}x{w}x{c} = {dimension} values needs a {dimension}x{dimension} matrix and far "
            f"more than {dimension} images to estimate it; cnnkit whitens up to {MAX_WHITENING_DIM} values "
            f"(64x64x1). Resize the images or use 'standardize'. Received: preprocess={preprocess!r}"
        )
    if whitening and len(images) <= dimension:
        raise ValueError(
            f"Whitening images of {h}x{w}x{c} = {dimension} values needs more than {dimension} training images: "
            f"fitted on {len(images)}, it would scale the directions they do not vary in by up to 316 on new "
            f"images. Use more images or 'standardize'. Received: preprocess={preprocess!r}, {len(images)} images"
        )
    if whitening and len(images) < 5 * dimension:
        warnings.warn(
            f"Whitening images of {h}x{w}x{c} = {dimension} values fitted on {len(images)} images, fewer than "
            f"5 x {dimension}: new images will come out with a larger spread than the training images. Use more "
            f"images or 'standardize'.", stacklevel=2
        )
    layer_dtype = None if dtype is None else keras.dtype_policies.get(dtype).variable_dtype
    layers = [keras.layers.Rescaling(1 / 255, name="rescale", dtype=layer_dtype)]
    fitted_steps = [step for step in steps if step != "scale"]
    if not fitted_steps:
        return layers
    if len(images) < 2:
        raise ValueError(f"Fitting {fitted_steps} needs at least 2 training images. Received: {len(images)} image(s)")
    for step in fitted_steps:
        layers.append(_fit_step(step, images, layers[1:], layer_dtype))
    return layers


@keras.saving.register_keras_serializable(package="cnnkit")
class Standardization(keras.layers.Layer):
    """``(x - mean) / std`` per pixel (statistics shaped like the image) or per channel (shaped ``(C,)``).

    The statistics are non-trainable weights, as in :class:`Whitening`. Keras's ``Normalization``
    keeps its statistics as tensors made when it is built, which ONNX export (tf2onnx) turns into
    inputs the exported graph then lacks; weights are frozen into the graph.

    Args:
        mean: the mean image ``(H, W, C)`` or per-channel means ``(C,)``.
        std: standard deviations of the same shape (ones: centring only).
        per_pixel: for loading a saved model without ``mean`` and ``std``: the statistics' layout.
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Example:
        >>> import numpy as np
        >>> layer = Standardization(np.array([0.5]), np.array([0.25]))
        >>> np.asarray(layer(np.ones((1, 2, 2, 1)))).ravel().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean=None, std=None, *, per_pixel=None, **kwargs):
        super().__init__(**kwargs)
        if (mean is None) != (std is None):
            raise ValueError("Pass Standardization both `mean` and `std`, or neither (when loading a saved model)")
        self._fitted = None
        if mean is not None:
            mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
            if mean.shape != std.shape or mean.ndim not in (1, 3) or not (std > 0).all():
                raise ValueError(f"Standardization needs a mean and a positive std of one shape, (C,) or (H, W, C). "
                                 f"Received: mean.shape={mean.shape}, std.shape={std.shape}")
            self._fitted, per_pixel = (mean, std), mean.ndim == 3
        self.per_pixel = bool(per_pixel)

    def build(self, input_shape):
        shape = tuple(input_shape[1:]) if self.per_pixel else (input_shape[-1],)
        if self._fitted is not None and self._fitted[0].shape != shape:
            raise ValueError(f"This Standardization was fitted on statistics of shape {self._fitted[0].shape}; the "
                             f"input needs {shape}. Received: input_shape={tuple(input_shape)}")
        self.mean = self.add_weight(name="mean", shape=shape, initializer="zeros", trainable=False)
        self.std = self.add_weight(name="std", shape=shape, initializer="ones", trainable=False)
        if self._fitted is not None:
            self.mean.assign(self._fitted[0])
            self.std.assign(self._fitted[1])

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        return (x - ops.cast(self.mean, self.compute_dtype)) / ops.cast(self.std, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "per_pixel": self.per_pixel}  # the statistics are weights


@keras.saving.register_keras_serializable(package="cnnkit")
class Whitening(keras.layers.Layer):
    """``(x - mean) @ matrix`` on each flattened image, reshaped back to the image's shape.

    The mean vector and the matrix are non-trainable weights, so they are saved with the model
    (in its weights file, not its JSON config). ``fit_preprocessing("pca" | "zca", ...)`` makes
    this layer; constructing it without ``mean`` and ``matrix`` is for loading a saved model,
    whose weights then fill them in.

    Args:
        mean: ``(d,)`` mean of the flattened training images, ``d = H*W*C``.
        matrix: ``(d, d)`` whitening matrix (PCA: ``U / sqrt(S + eps)``; ZCA: that times ``U^T``).
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Input shape:
        ``(batch, H, W, C)`` with ``H*W*C == d``.

    Output shape:
        Same as the input.

    Example:
        >>> import numpy as np
        >>> layer = Whitening(np.full(4, 0.5), 2 * np.eye(4))
        >>> np.asarray(layer(np.ones((1, 2, 2, 1)))).ravel().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, mean=None, matrix=None, **kwargs):
        super().__init__(**kwargs)
        if (mean is None) != (matrix is None):
            raise ValueError("Pass Whitening both `mean` and `matrix`, or neither (when loading a saved model)")
        self._fitted = None
        if mean is not None:
            mean, matrix = np.asarray(mean, np.float64), np.asarray(matrix, np.float64)
            if mean.ndim != 1 or matrix.shape != (mean.size, mean.size):
                raise ValueError(f"Whitening needs a mean of shape (d,) and a matrix of shape (d, d). "
                                 f"Received: mean.shape={mean.shape}, matrix.shape={matrix.shape}")
            self._fitted = (mean, matrix)

    def build(self, input_shape):
        dims = tuple(input_shape[1:])
        if None in dims:
            raise ValueError(f"Whitening needs a fully known image shape. Received: input_shape={tuple(input_shape)}")
        dimension = math.prod(dims)
        if self._fitted is not None and self._fitted[0].size != dimension:
            raise ValueError(f"This Whitening was fitted on {self._fitted[0].size} values per image; the input has "
                             f"{dimension}. Received: input_shape={tuple(input_shape)}")
        self.mean = self.add_weight(name="mean", shape=(dimension,), initializer="zeros", trainable=False)
        self.matrix = self.add_weight(name="matrix", shape=(dimension, dimension), initializer="zeros",
                                      trainable=False)
        if self._fitted is not None:
            self.mean.assign(self._fitted[0])
            self.matrix.assign(self._fitted[1])
        self._image_shape = dims

    def call(self, inputs):
        x = ops.reshape(ops.cast(inputs, self.compute_dtype), (-1, self.mean.shape[0]))
        mean = ops.cast(self.mean, self.compute_dtype)
        matrix = ops.cast(self.matrix, self.compute_dtype)
        return ops.reshape(ops.matmul(x - mean, matrix), (-1, *self._image_shape))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return super().get_config()  # the fitted arrays are weights, saved with the model's weights


def parse_preprocess(preprocess) -> list[str]:
    """The steps of a ``preprocess`` argument, checked: known names, "scale" first only, one of each layer.

    Example:
        >>> parse_preprocess("zca")
        ['zca']
    """
    steps = [preprocess] if isinstance(preprocess, str) else preprocess
    if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(step, str) for step in steps):
        raise ValueError(f"preprocess must be one of {list(PREPROCESSORS)} or a non-empty list of them. "
                         f"Received: preprocess={preprocess!r}")
    for step in steps:
        if step not in PREPROCESSORS:
            close = difflib.get_close_matches(step, PREPROCESSORS, n=2)
            hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
            raise ValueError(f"Unknown preprocessing {step!r}; choose from {list(PREPROCESSORS)}.{hint} "
                             f"Received: preprocess={preprocess!r}")
    if "scale" in steps[1:]:
        raise ValueError(f"'scale' can only be the first step (every preprocessing starts by scaling to [0, 1]). "
                         f"Received: preprocess={preprocess!r}")
    names = [_LAYER_NAMES[step] for step in steps if step != "scale"]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"preprocess has two steps making a {repeated[0]!r} layer (centre or whiten once). "
                         f"Received: preprocess={preprocess!r}")
    return list(steps)


def _check_images(train_images) -> np.ndarray:
    images = np.asarray(train_images)
    if images.ndim != 4 or 0 in images.shape[:3] or images.shape[-1] not in (1, 3):
        raise ValueError(f"train_images must be an (N, H, W, C) array with N, H and W above 0 and C in {{1, 3}}. "
                         f"Received: train_images.shape={images.shape}")
    if not np.issubdtype(images.dtype, np.integer):
        raise ValueError(f"train_images must be raw integer pixels 0-255 (as the model receives them). "
                         f"Received: train_images.dtype={images.dtype}")
    if images.dtype != np.uint8 and (images.min() < 0 or images.max() > 255):
        raise ValueError(f"train_images must hold pixels 0-255. Received: range {images.min()}..{images.max()}")
    return images


def _chunks(images: np.ndarray, fitted: list[keras.layers.Layer]) -> Iterator[np.ndarray]:
    """``images`` scaled to [0, 1] float32, passed through the ``fitted`` layers, ``CHUNK_VALUES`` values at a time."""
    size = max(1, CHUNK_VALUES // math.prod(images.shape[1:]))
    for start in range(0, len(images), size):
        x = images[start:start + size].astype(np.float32) / np.float32(255)
        for layer in fitted:
            x = np.asarray(layer(x))
        yield x


def _fit_step(step: str, images: np.ndarray, fitted: list[keras.layers.Layer], dtype) -> keras.layers.Layer:
    """The layer of ``step``, its statistics summed in float64 over the chunks of ``images`` after ``fitted``."""
    name = _LAYER_NAMES[step]
    axes = (0, 1, 2) if step in ("center_channel", "standardize") else (0,)
    count = math.prod(images.shape[axis] for axis in axes)  # values summed into each statistic
    mean = sum(x.sum(axis=axes, dtype=np.float64) for x in _chunks(images, fitted)) / count
    if step in ("center_pixel", "center_channel"):
        return Standardization(_f32(mean), np.ones_like(_f32(mean)), name=name, dtype=dtype)
    if step == "standardize":
        variance = sum(np.square(x - mean).sum(axis=axes) for x in _chunks(images, fitted)) / count
        if (variance < EPSILON).any():
            warnings.warn(
                f"Standardizing channel(s) {np.flatnonzero(variance < EPSILON).tolist()} of variance below {EPSILON} "
                f"in the training images (constant?): a new image that varies there is scaled up by as much as 316. "
                f"Use 'center_channel' or more varied images.", stacklevel=3
            )
        return Standardization(_f32(mean), _f32(np.sqrt(variance + EPSILON)), name=name, dtype=dtype)
    mean = mean.ravel()
    covariance = sum(centred.T @ centred for centred in (x.reshape(len(x), -1) - mean for x in _chunks(images, fitted)))
    eigenvalues, matrix = _whitening(covariance / count, zca=step == "zca")
    if eigenvalues[-1] < EPSILON:
        h, w, c = images.shape[1:]
        warnings.warn(
            f"Whitening images of {h}x{w}x{c} = {mean.size} values: {np.count_nonzero(eigenvalues < EPSILON)} of the "
            f"{mean.size} directions have a variance below {EPSILON} in the training images (constant?): a new image "
            f"that varies there is scaled up by as much as 316. Use more varied images or 'standardize'.", stacklevel=3
        )
    return Whitening(_f32(mean), _f32(matrix), name=name, dtype=dtype)


def _whitening(covariance: np.ndarray, *, zca: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (decreasing) and whitening matrix of ``covariance`` (X^T X / N): CS231n's recipe."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # the SVD of a symmetric PSD matrix, ascending
    eigenvalues, eigenvectors = np.clip(eigenvalues[::-1], 0, None), eigenvectors[:, ::-1]
    matrix = eigenvectors / np.sqrt(eigenvalues + EPSILON)
    if zca:
        matrix = matrix @ eigenvectors.T
    return eigenvalues, matrix


def _f32(array) -> np.ndarray:
    return np.asarray(array, np.float32)
