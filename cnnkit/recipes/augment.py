"""Training-time augmentation: named presets and op lists, run in the ``tf.data`` pipeline.

A recipe's ``augment=`` argument is a preset name (``"shift"``, ``"affine"``, ``"crop_flip"``,
... see ``PRESETS`` / ``list_presets()``), or a list whose items are preset names, op names, or
mappings ``{"name": op, **parameters}`` (see ``list_ops()``), which reads naturally in YAML::

    augment: [shift, {name: rotation, degrees: 10}]

``make_augmentation`` turns it into an ``Augmentation``: a chain of seeded Keras preprocessing
layers applied to training batches by ``Augmentation.apply`` (a parallel ``map`` over batches).
Augmentation never enters the model, so nothing of it is exported. Keras's own layers are used
where they do the job (``RandomRotation``, ``RandomShear``, ``RandomTranslation``, ``RandomZoom``,
``RandomFlip``, ``RandomColorJitter``, ``MixUp``; ``RandAugment`` and ``CutMix`` corrected in
``SymmetricRandAugment`` and ``PixelAreaCutMix``); four layers are cnnkit's, each seeded,
deterministic for a seed, and the identity when ``training=False``:

* ``RandomPixelShift``: Nielsen's "expanded data", exact integer shifts with zeros in.
* ``RandomPadCrop``: pad and crop back at a random offset, per image (Keras's ``RandomCrop``
  crops a whole batch at one offset and returns a smaller image in training than at inference).
* ``ElasticDistortion``: Simard et al. (2003) elastic distortions, batched. Keras's
  ``RandomElasticTransform`` ties alpha and sigma to the image size (alpha at most a tenth of
  the side, 2.8 pixels on MNIST against Simard's 34), draws the same field for both axes, and
  loops over the batch in Python, which a ``tf.data`` batch of unknown size defeats.
* ``PCAColor``: AlexNet's "fancy PCA" colour augmentation, fitted on training pixels.

They are written with ``keras.ops``, except that shifts and warps gather with ``tf.gather`` and
``batch_dims`` (about 3x faster on a CPU than ``keras.ops.take_along_axis``, which broadcasts
its indices); like the rest of cnnkit they assume Keras's TensorFlow backend. ``make_augmentation``
builds every layer in float32 whatever the global dtype policy (``mixed_bfloat16`` would round
pixel values and sampling positions); the pipeline hands the model float32 images.

Reproducibility: every layer draws from its own ``keras.random.SeedGenerator``, seeded from
``make_augmentation``'s ``seed``, so a layer built with a seed gives the same outputs for the same
inputs. In ``apply`` the map runs batches in parallel, so which batch gets which draw may differ
between runs unless TensorFlow's op determinism is on (``train(..., deterministic=True)``), under
which ``tf.data`` runs the map in order. Without it, two batches mapped at the same moment can
read a layer's seed state before either advances it and get the same draw (measured: about 1 batch
in 60 for elastic distortions); the images differ, so this only repeats transformations.

Example:
    >>> import numpy as np, tensorflow as tf
    >>> augmentation = make_augmentation("shift", image_shape=(28, 28, 1), num_classes=10, seed=0)
    >>> batches = tf.data.Dataset.from_tensor_slices(
    ...     (np.zeros((8, 28, 28, 1), np.uint8), np.zeros(8, np.int32))).batch(4)
    >>> images, labels = next(iter(augmentation.apply(batches)))
    >>> images.dtype.name, tuple(images.shape), tuple(labels.shape)
    ('float32', (4, 28, 28, 1), (4,))
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from cnnkit.data.imagedata import check_seed
from cnnkit.recipes.optimization import is_finite_number

__all__ = [
    "PRESETS",
    "Augmentation",
    "ElasticDistortion",
    "PCAColor",
    "Preset",
    "RandomPadCrop",
    "RandomPixelShift",
    "list_ops",
    "list_presets",
    "make_augmentation",
    "parse_augment",
]


# ----------------------------------------------------------------------------- custom layers


class _RandomImageLayer(keras.layers.Layer):
    """Base of cnnkit's augmentation layers: a seed, a batch ``(B, H, W, C)`` in, the same shape out."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer or None. Received: seed={seed!r}")
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(f"{type(self).__name__} takes a batch of images (batch, height, width, channels) "
                             f"with known height and width. Received: input_shape={tuple(input_shape)}")

    def call(self, images, training=True):
        if not training:
            return images
        return self._augment(ops.cast(images, self.compute_dtype))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["seed"] = self.seed
        return config


def _integer_shift(images, rows_down, cols_right, most):
    """Each image ``b`` moved ``rows_down[b]`` rows down and ``cols_right[b]`` columns right, zeros in.

    Shifts are at most ``most`` pixels: a zero border of that width, then one gather of rows and
    one of columns per image.
    """
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, ((0, 0), (most, most), (most, most), (0, 0)))
    rows = tf.range(height)[None, :] + most - tf.cast(rows_down, "int32")[:, None]  # (B, H)
    cols = tf.range(width)[None, :] + most - tf.cast(cols_right, "int32")[:, None]  # (B, W)
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1. Received: {name}={value!r}")


def _check_positive(name, value):
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0. Received: {name}={value!r}")


def _check_range(name, value, high):
    if not (is_finite_number(value) and 0 <= value <= high):
        raise ValueError(f"{name} must be a number in [0, {high}]. Received: {name}={value!r}")


def _check_shift(name, value, image_shape):
    """``value`` pixels of shift must leave part of an image ``(height, width, channels)`` in the frame."""
    _check_positive_int(name, value)
    if value >= min(image_shape[:2]):
        raise ValueError(f"{name} must be less than the image's shorter side: images moved that far come out blank. "
                         f"Received: {name}={value!r}, image_shape={tuple(image_shape)}")


@keras.saving.register_keras_serializable(package="cnnkit")
class RandomPixelShift(_RandomImageLayer):
    """Nielsen's "expanded data": each image moved up, down, left or right, or left in place.

    Nielsen (Neural Networks and Deep Learning, ch. 6) adds to MNIST each training image
    displaced by one pixel up, down, left and right. Here each image of a batch takes one of
    those five views at random (equal odds), displaced by a whole number of pixels drawn from
    ``1..pixels``. Shifts are exact (a gather, no interpolation); the uncovered border is zero.

    Args:
        pixels: the largest displacement in pixels (Nielsen: 1).
        seed: seeds the draws; the same seed gives the same shifts.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``).

    Example:
        >>> layer = RandomPixelShift(pixels=1, seed=0)
        >>> tuple(layer(np.zeros((2, 28, 28, 1), "float32")).shape)
        (2, 28, 28, 1)
    """

    def __init__(self, pixels=1, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        _check_positive_int("pixels", pixels)
        self.pixels = pixels

    def _augment(self, images):
        batch = ops.shape(images)[0]
        direction = keras.random.randint((batch,), 0, 5, seed=self.generator)  # none, up, down, left, right
        distance = keras.random.randint((batch,), 1, self.pixels + 1, seed=self.generator)
        zero = ops.zeros_like(distance)
        down = ops.where(direction == 1, -distance, ops.where(direction == 2, distance, zero))
        right = ops.where(direction == 3, -distance, ops.where(direction == 4, distance, zero))
        return _integer_shift(images, down, right, self.pixels)

    def get_config(self):
        return {**super().get_config(), "pixels": self.pixels}


@keras.saving.register_keras_serializable(package="cnnkit")
class RandomPadCrop(_RandomImageLayer):
    """Pad each image by ``padding`` pixels of zeros and crop it back to its size at a random offset.

    The crop of AlexNet (Krizhevsky et al. 2012) and of the CIFAR recipes (pad 4, crop 32 x 32),
    with the output the size of the input in training and at inference. Equivalent to moving
    each image independently by ``dy, dx`` drawn uniformly from ``-padding..padding`` (exact,
    zeros in).

    Args:
        padding: pixels of zeros added on every side before cropping.
        seed: seeds the offsets.
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:
        >>> tuple(RandomPadCrop(padding=4, seed=0)(np.zeros((2, 32, 32, 3), "float32")).shape)
        (2, 32, 32, 3)
    """

    def __init__(self, padding=4, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        _check_positive_int("padding", padding)
        self.padding = padding

    def _augment(self, images):
        batch = ops.shape(images)[0]
        offsets = keras.random.randint((2, batch), -self.padding, self.padding + 1, seed=self.generator)
        return _integer_shift(images, offsets[0], offsets[1], self.padding)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian, truncated at 4 sigma as ``scipy.ndimage.gaussian_filter`` does."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype="float64")
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype("float32")


def _bilinear_sample(images, rows, cols):
    """``images`` (B, H, W, C) read at real positions ``rows, cols`` (B, H, W), bilinear, zeros outside.

    The positions should be float32 whatever the images' dtype: bfloat16 has 8 significant bits,
    so a flat index such as 783 would round to 784.
    """
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    flat = ops.reshape(images, (-1, height * width, channels))
    top, left = ops.floor(rows), ops.floor(cols)
    output = ops.zeros_like(images)
    for row in (top, top + 1):
        for col in (left, left + 1):
            weight = (1 - ops.abs(rows - row)) * (1 - ops.abs(cols - col))
            inside = (row >= 0) & (row <= height - 1) & (col >= 0) & (col <= width - 1)
            index = ops.cast(ops.clip(row, 0, height - 1) * width + ops.clip(col, 0, width - 1), "int32")
            values = tf.gather(flat, ops.reshape(index, (-1, height * width)), axis=1, batch_dims=1)
            weight = ops.cast(ops.where(inside, weight, ops.zeros_like(weight)), images.dtype)[..., None]
            output = output + ops.reshape(values, ops.shape(images)) * weight
    return output


@keras.saving.register_keras_serializable(package="cnnkit")
class ElasticDistortion(_RandomImageLayer):
    """Simard, Steinkraus & Platt (2003) elastic distortions, per image, batched.

    For each image, two random fields ``dx, dy`` of ``uniform(-1, 1)`` values, one per pixel,
    are smoothed with a Gaussian of standard deviation ``sigma`` (zeros beyond the border, as
    ``scipy.ndimage.gaussian_filter(..., mode="constant")`` in the usual implementation), scaled by
    ``alpha``, and each output pixel is the input read at ``(x + dx, y + dy)`` by bilinear
    interpolation (zeros outside). Simard et al. used ``sigma=4, alpha=34`` on 28 x 28 MNIST;
    the mean displacement is then about 1.4 pixels, and the digit's ink is kept (up to
    interpolation).

    Args:
        alpha: the scale of the displacement field, in pixels.
        sigma: the Gaussian's standard deviation in pixels (the field's smoothness).
        seed: seeds the fields.
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:
        >>> tuple(ElasticDistortion(alpha=34.0, sigma=4.0, seed=0)(np.zeros((2, 28, 28, 1), "float32")).shape)
        (2, 28, 28, 1)
    """

    def __init__(self, alpha=34.0, sigma=4.0, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        _check_positive("alpha", alpha)
        _check_positive("sigma", sigma)
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self._kernel = _gaussian_kernel(self.sigma)

    def _augment(self, images):
        height, width = images.shape[1], images.shape[2]
        # the field and positions in float32 whatever the compute dtype (see _bilinear_sample)
        field = keras.random.uniform((ops.shape(images)[0], height, width, 2), -1.0, 1.0, dtype="float32",
                                     seed=self.generator)
        kernel = ops.convert_to_tensor(self._kernel, dtype="float32")
        size = self._kernel.shape[0]
        column = ops.tile(ops.reshape(kernel, (size, 1, 1, 1)), (1, 1, 2, 1))
        field = ops.depthwise_conv(field, column, padding="same")
        field = ops.depthwise_conv(field, ops.reshape(column, (1, size, 2, 1)), padding="same") * self.alpha
        rows = ops.arange(height, dtype="float32")[None, :, None] + field[..., 0]
        cols = ops.arange(width, dtype="float32")[None, None, :] + field[..., 1]
        return _bilinear_sample(images, rows, cols)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "sigma": self.sigma}


@keras.saving.register_keras_serializable(package="cnnkit")
class PCAColor(_RandomImageLayer):
    """AlexNet's colour augmentation ("fancy PCA", Krizhevsky et al. 2012, section 4.1).

    To every pixel of an image it adds ``sum_i alpha_i * lambda_i * p_i``, where ``p_i`` and
    ``lambda_i`` are the eigenvectors and eigenvalues of the 3 x 3 covariance of the training
    set's RGB pixel values, and ``alpha_i ~ N(0, std)`` is drawn once per image each time it is
    seen. Pixels are scaled to [0, 1] for the covariance (the ImageNet eigenvalues quoted by the
    reference implementations, about 0.22, 0.019, 0.0045, are on that scale); the shift is added
    on the 0..255 scale and the result clipped to 0..255. The eigen-decomposition is part of the
    layer's config, so a saved layer needs no data. ``PCAColor.from_images`` fits it.

    Args:
        eigenvalues: the three eigenvalues ``lambda_i`` (pixels on a 0..1 scale).
        eigenvectors: 3 x 3, column ``i`` is ``p_i``.
        std: the standard deviation of ``alpha_i`` (AlexNet: 0.1).
        seed: seeds the ``alpha_i``.
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:
        >>> pixels = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
        >>> layer = PCAColor.from_images(pixels, std=0.1, seed=0)
        >>> len(layer.eigenvalues), tuple(layer(pixels.astype("float32")).shape)
        (3, (10, 8, 8, 3))
    """

    def __init__(self, eigenvalues, eigenvectors, std=0.1, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        values = np.asarray(eigenvalues, dtype="float64")
        vectors = np.asarray(eigenvectors, dtype="float64")
        if values.shape != (3,) or vectors.shape != (3, 3) or not np.all(np.isfinite(values)) \
                or not np.all(np.isfinite(vectors)):
            raise ValueError("PCAColor needs 3 finite eigenvalues and a 3 x 3 matrix of eigenvectors. Received: "
                             f"eigenvalues={eigenvalues!r}, eigenvectors={eigenvectors!r}")
        if not (is_finite_number(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0. Received: std={std!r}")
        self.eigenvalues = values.tolist()
        self.eigenvectors = vectors.tolist()
        self.std = float(std)

    @classmethod
    def from_images(cls, images, *, std=0.1, seed=None, max_pixels=2**20, **kwargs):
        """A ``PCAColor`` fitted on ``images`` (uint8 or 0..255 floats, ``(N, H, W, 3)``).

        At most ``max_pixels`` pixels are used, evenly spaced through the array.

        Example:
            >>> grey = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
            >>> layer = PCAColor.from_images(np.repeat(grey, 3, axis=-1))  # all variance along (1, 1, 1)
            >>> [round(value, 4) for value in layer.eigenvalues]
            [0.016, 0.0, 0.0]
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise ValueError("PCA colour augmentation needs RGB images, an array (N, height, width, 3) with N >= 1. "
                             f"Received: images.shape={images.shape}")
        pixels = images.reshape(-1, 3)
        pixels = pixels[:: math.ceil(len(pixels) / max_pixels)].astype("float64") / 255.0
        covariance = np.cov(pixels, rowvar=False) if len(pixels) > 1 else np.zeros((3, 3))
        values, vectors = np.linalg.eigh(covariance)
        values = np.clip(values[::-1], 0.0, None)  # largest first; round-off can leave tiny negatives
        return cls(values.tolist(), vectors[:, ::-1].tolist(), std=std, seed=seed, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        if input_shape[-1] != 3:
            raise ValueError(f"PCAColor needs RGB images (3 channels). Received: input_shape={tuple(input_shape)}")

    def _augment(self, images):
        alphas = keras.random.normal((ops.shape(images)[0], 3), stddev=self.std, seed=self.generator)
        values = ops.convert_to_tensor(self.eigenvalues, dtype=images.dtype)
        vectors = ops.convert_to_tensor(self.eigenvectors, dtype=images.dtype)
        shift = ops.matmul(ops.cast(alphas, images.dtype) * values, ops.transpose(vectors)) * 255.0  # (B, 3)
        return ops.clip(images + shift[:, None, None, :], 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors,
                "std": self.std}


# ----------------------------------------------------------------------------- ops


@dataclasses.dataclass(frozen=True)
class _Context:
    image_shape: tuple
    seed: int
    train_images: np.ndarray | None

    @property
    def layer_args(self) -> dict:
        """Every op layer's arguments: its seed, and float32 (the pipeline's dtype) whatever the global dtype
        policy, which a ``mixed_bfloat16`` model sets: bfloat16 would round pixel values and positions."""
        return {"seed": self.seed, "dtype": "float32"}


_OPS = {}


def _op(about):
    """Registers an op: ``function(context, *, params) -> keras layer``, under its name minus ``_op_``."""

    def register(function):
        _OPS[function.__name__.removeprefix("_op_")] = (function, about)
        return function

    return register


@_op("RandomPixelShift: Nielsen's one-pixel shifts (up, down, left, right or none), zeros in")
def _op_shift(context, *, pixels=1):
    _check_shift("pixels", pixels, context.image_shape)
    return RandomPixelShift(pixels=pixels, **context.layer_args)


@_op("RandomPadCrop: pad by `padding` pixels (default a side / 8) and crop back at a random offset")
def _op_crop(context, *, padding=None):
    if padding is None:
        padding = max(1, min(context.image_shape[:2]) // 8)
    _check_shift("padding", padding, context.image_shape)
    return RandomPadCrop(padding=padding, **context.layer_args)


@_op("keras.layers.RandomFlip('horizontal'): mirror half the images left-right (not for digits or text)")
def _op_flip(context):
    return keras.layers.RandomFlip("horizontal", **context.layer_args)


@_op("keras.layers.RandomRotation: rotate by up to +-`degrees`")
def _op_rotation(context, *, degrees=10.0, fill_mode="constant"):
    _check_range("degrees", degrees, 180)
    return keras.layers.RandomRotation(degrees / 360.0, fill_mode=fill_mode, **context.layer_args)


@_op("keras.layers.RandomShear: shear by up to +-`factor` (tangent of the angle) along x and y, "
     "about the top-left corner as Keras does (so it also moves the image a little)")
def _op_shear(context, *, factor=0.1, fill_mode="constant"):
    _check_range("factor", factor, 1)
    return keras.layers.RandomShear(x_factor=factor, y_factor=factor, fill_mode=fill_mode, **context.layer_args)


@_op("keras.layers.RandomTranslation: move by up to +-`fraction` of the height and width")
def _op_translation(context, *, fraction=0.1, fill_mode="constant"):
    _check_range("fraction", fraction, 1)
    return keras.layers.RandomTranslation(fraction, fraction, fill_mode=fill_mode, **context.layer_args)


@_op("keras.layers.RandomZoom: zoom in or out by up to `fraction`, aspect kept")
def _op_zoom(context, *, fraction=0.1, fill_mode="constant"):
    _check_range("fraction", fraction, 1)
    return keras.layers.RandomZoom(fraction, fill_mode=fill_mode, **context.layer_args)


@_op("ElasticDistortion: Simard et al. 2003 elastic distortions (their MNIST alpha 34, sigma 4)")
def _op_elastic(context, *, alpha=34.0, sigma=4.0):
    _check_positive("sigma", sigma)
    if sigma > max(context.image_shape[:2]):  # the Gaussian would average the random field to about zero
        raise ValueError(f"sigma must be at most the image's longer side: a wider Gaussian smooths the displacement "
                         f"field to about zero (no distortion). Received: sigma={sigma!r}, "
                         f"image_shape={tuple(context.image_shape)}")
    return ElasticDistortion(alpha=alpha, sigma=sigma, **context.layer_args)


@_op("keras.layers.RandomColorJitter: brightness +-`brightness` (of 255), contrast x(1 +- `contrast`), "
     "and on RGB saturation x(1 +- `saturation`, default 0.2) and hue +-`hue` of the circle (default 0.05)")
def _op_color(context, *, brightness=0.2, contrast=0.2, saturation=None, hue=None):
    rgb = context.image_shape[-1] == 3
    if not rgb and (saturation or hue):
        raise ValueError(f"saturation and hue jitter need RGB images; these have {context.image_shape[-1]} "
                         f"channel(s). Received: saturation={saturation!r}, hue={hue!r}")
    for name, value, high in (("brightness", brightness, 1), ("contrast", contrast, 1), ("saturation", saturation, 1),
                              ("hue", hue, 0.5)):
        if value is not None:
            _check_range(name, value, high)
    options = {}
    if rgb:
        saturation = 0.2 if saturation is None else saturation
        hue = 0.05 if hue is None else hue
        if saturation:  # Keras: factor f multiplies saturation by f / (1 - f)
            options["saturation_factor"] = ((1 - saturation) / (2 - saturation), (1 + saturation) / (2 + saturation))
        if hue:  # Keras: factor f shifts hue by up to f / 2 of the circle
            options["hue_factor"] = (0.0, 2 * hue)
    # Keras: one contrast number c draws from [1, 1 + c]; the pair (c, c) from [1 - c, 1 + c]
    layer = keras.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=brightness or None,
                                           contrast_factor=(contrast, contrast) if contrast else None,
                                           **context.layer_args, **options)
    for part in (layer.random_brightness, layer.random_contrast, layer.random_saturation, layer.random_hue):
        if part is not None:  # Keras makes them with the global dtype policy, not the layer's
            part.dtype_policy = layer.dtype_policy
    return layer


@_op("PCAColor: AlexNet's fancy PCA colour, alpha ~ N(0, `std`), fitted on the training pixels (RGB only)")
def _op_pca_color(context, *, std=0.1, eigenvalues=None, eigenvectors=None):
    if context.image_shape[-1] != 3:
        raise ValueError(f"PCA colour augmentation needs RGB images (3 channels). Received: "
                         f"image_shape={tuple(context.image_shape)}")
    if eigenvalues is not None or eigenvectors is not None:
        return PCAColor(eigenvalues, eigenvectors, std=std, **context.layer_args)
    if context.train_images is None:
        raise ValueError("PCA colour augmentation is fitted on the training pixels: pass train_images "
                         "(or eigenvalues and eigenvectors). Received: train_images=None")
    return PCAColor.from_images(context.train_images, std=std, **context.layer_args)


class SymmetricRandAugment(keras.layers.RandAugment):
    """Keras's ``RandAugment`` with its geometric and photometric ranges both ways.

    Keras turns ``factor=f`` into the range ``(0, f)`` for every op, so its rotation, translation,
    brightness and contrast only ever go one way (rotations of 0 to 36 degrees clockwise at
    ``f=0.1``, shifts only down and right). Here those four draw from ``-f..f`` (contrast
    ``x(1 +- f)``); shear was already symmetric.

    Example:
        >>> layer = SymmetricRandAugment(value_range=(0, 255), num_ops=2, factor=0.1, seed=0)
        >>> layer.random_rotation.factor
        (-0.1, 0.1)
    """

    def __init__(self, *, value_range=(0, 255), num_ops=2, factor=0.5, interpolation="bilinear", seed=None,
                 data_format=None, **kwargs):
        super().__init__(value_range=value_range, num_ops=num_ops, factor=factor, interpolation=interpolation,
                         seed=seed, data_format=data_format, **kwargs)
        strength = self.factor[1]
        both_ways = (-strength, strength)
        common = {"seed": self.seed, "data_format": self.data_format, **kwargs}  # dtype too, as Keras passes
        self.random_translation = keras.layers.RandomTranslation(both_ways, both_ways, interpolation=self.interpolation,
                                                                 **common)
        self.random_rotation = keras.layers.RandomRotation(both_ways, interpolation=self.interpolation, **common)
        self.random_brightness = keras.layers.RandomBrightness(both_ways, value_range=self.value_range, **common)
        self.random_contrast = keras.layers.RandomContrast((strength, strength), value_range=self.value_range, **common)


@_op("RandAugment (Keras's, ranges both ways): `num_ops` random ops per batch at strength `factor` "
     "(rotation up to +-factor x 360 degrees, translation, shear and brightness up to +-factor)")
def _op_randaugment(context, *, num_ops=2, factor=0.1):
    _check_positive_int("num_ops", num_ops)
    _check_range("factor", factor, 1)
    return SymmetricRandAugment(value_range=(0, 255), num_ops=num_ops, factor=factor, **context.layer_args)


@_op("keras.layers.MixUp: convex mixes of image pairs and of their one-hot labels, weight ~ Beta(alpha, alpha)")
def _op_mixup(context, *, alpha=0.2):
    _check_positive("alpha", alpha)
    return keras.layers.MixUp(alpha=alpha, **context.layer_args)


class PixelAreaCutMix(keras.layers.CutMix):
    """Keras's ``CutMix`` with each label weighted by the pixels actually pasted.

    Keras weighs the labels by the box's real-valued area, while the pasted pixels are the grid
    points inside it: up to 7% of a 28x28 image apart. Here the weight is the mask's share.

    Example:
        >>> layer = PixelAreaCutMix(factor=(1.0, 1.0), seed=0)
    """

    def _generate_batch_mask(self, images_shape, box_corners):
        masks, _ = super()._generate_batch_mask(images_shape, box_corners)
        pasted = self.backend.numpy.mean(self.backend.cast(masks, "float32"), axis=(1, 2, 3))
        return masks, 1.0 - pasted


@_op("CutMix: a box of another image pasted in, labels mixed by the pixels pasted; the box's area share "
     "~ Beta(alpha, alpha), alpha in (0, 1] (the paper's 1: uniform)")
def _op_cutmix(context, *, alpha=1.0):
    if not is_finite_number(alpha) or not 0 < alpha <= 1:
        raise ValueError(f"alpha must be a number in (0, 1]. Received: alpha={alpha!r}")
    return PixelAreaCutMix(factor=(alpha, alpha), **context.layer_args)  # Keras draws alpha from the factor range


_LABEL_MIXING = (keras.layers.MixUp, keras.layers.CutMix)


def list_ops() -> dict:
    """Op names -> ``{"about": text, "parameters": {name: default}}``.

    Example:
        >>> list_ops()["rotation"]["parameters"]
        {'degrees': 10.0, 'fill_mode': 'constant'}
    """
    return {name: {"about": about, "parameters": _parameters(function)} for name, (function, about) in _OPS.items()}


def _parameters(function) -> dict:
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named augmentation: its ops (as in the list form) and what data it suits.

    Example:
        >>> PRESETS["affine"].ops
        ('rotation', 'shear', 'translation', 'zoom')
    """

    ops: tuple
    about: str


PRESETS = {
    "none": Preset((), "no augmentation"),
    "default": Preset(("crop",), "the cheap, generally safe choice: random translations by up to 1/8 of the side "
                                 "(RandomPadCrop, exact shifts, zeros in); digits, characters and photos alike"),
    "shift": Preset(("shift",), "Nielsen's expanded data: one-pixel shifts up, down, left or right; digits, any image"),
    "affine": Preset(("rotation", "shear", "translation", "zoom"),
                     "small affine: +-10 degrees, shear +-0.1, translation +-10%, zoom +-10%, zeros in; "
                     "digits, characters, photos"),
    "elastic": Preset(("elastic",), "Simard et al. 2003 elastic distortions (alpha 34, sigma 4); handwriting"),
    "crop_flip": Preset(("crop", "flip"), "AlexNet / CIFAR crops (pad 1/8, crop back) and left-right flips; "
                                          "photos, wrong for digits and text"),
    "color": Preset(("color",), "colour jitter: brightness, contrast, and saturation and hue on RGB; photos"),
    "pca_color": Preset(("pca_color",), "AlexNet's fancy PCA colour from the training pixels; RGB photos only"),
    "randaugment": Preset(("randaugment",), "RandAugment, 2 ops at strength 0.1, ranges both ways; photos, mild enough for digits"),
    "mixup": Preset(("mixup",), "MixUp (alpha 0.2), soft labels; photos mostly"),
    "cutmix": Preset(("cutmix",), "CutMix, soft labels by the pixels pasted; photos mostly"),
}


def list_presets() -> dict:
    """Preset names -> a line saying what each is and which data it suits.

    Example:
        >>> "crop_flip" in list_presets()
        True
    """
    return {name: preset.about for name, preset in PRESETS.items()}


# ----------------------------------------------------------------------------- the chain


class Augmentation:
    """A seeded chain of augmentation layers for training batches.

    Attributes:
        layers: the Keras layers, in order.
        soft_labels: True when a layer mixes labels (MixUp, CutMix): batches then come out with
            one-hot float32 labels ``(batch, num_classes)``.
        config: plain data for ``config.yaml``: ``{"preset", "ops", "seed"}``; ``ops`` are the
            resolved op mappings, which ``make_augmentation`` accepts back.
        num_classes: the depth of one-hot labels.

    Example:
        >>> augmentation = make_augmentation(["shift", "mixup"], image_shape=(28, 28, 1), num_classes=10)
        >>> images, labels = augmentation(np.zeros((4, 28, 28, 1), np.uint8), np.arange(4))
        >>> tuple(labels.shape)
        (4, 10)
    """

    def __init__(self, layers, *, num_classes, config):
        self.layers = list(layers)
        self.num_classes = num_classes
        self.config = config
        self.soft_labels = any(isinstance(layer, _LABEL_MIXING) for layer in self.layers)

    def __call__(self, images, labels):
        """Augments one batch: uint8 (or float) images and int labels -> float32 0..255 images, labels."""
        images = tf.cast(images, "float32")
        if self.soft_labels:
            labels = tf.one_hot(tf.cast(labels, "int32"), self.num_classes)
        for layer in self.layers:
            if isinstance(layer, _LABEL_MIXING):
                mixed = layer({"images": images, "labels": labels}, training=True)
                images, labels = mixed["images"], mixed["labels"]
            else:
                images = layer(images, training=True)
        return tf.cast(images, "float32"), labels

    def apply(self, dataset):
        """``dataset`` of batched ``(images, int labels)`` -> augmented batches, mapped in parallel.

        Example:
            >>> augmented = augmentation.apply(train_batches)  # doctest: +SKIP
        """
        return dataset.map(self, num_parallel_calls=tf.data.AUTOTUNE)

    def __repr__(self):
        return f"Augmentation({self.config['ops']!r}, soft_labels={self.soft_labels})"


def make_augmentation(augment, *, image_shape, num_classes, seed=0, train_images=None) -> Augmentation | None:
    """The ``Augmentation`` named by a recipe's ``augment`` argument; ``None`` for no augmentation.

    Args:
        augment: ``None``, a preset name (``PRESETS``), an op name (``list_ops()``), or a list of
            preset names, op names and mappings ``{"name": op, **parameters}``.
        image_shape: ``(height, width, channels)`` of the images.
        num_classes: classes, for the one-hot labels of MixUp and CutMix.
        seed: seeds every layer (each its own stream drawn from this seed).
        train_images: uint8 ``(N, H, W, C)`` training images; PCA colour is fitted on them.

    Raises:
        ValueError: an unknown preset, op or parameter (the message lists the valid ones), a
            parameter out of its range (a number that is not finite, a shift or crop padding as
            large as the image's shorter side) or that Keras refuses, or an op that does not fit
            the images (PCA colour on grey), or a seed that is not a non-negative integer.

    Example:
        >>> make_augmentation(["shift", {"name": "rotation", "degrees": 15}], image_shape=(28, 28, 1),
        ...                   num_classes=10).config["ops"]
        [{'name': 'shift', 'pixels': 1}, {'name': 'rotation', 'degrees': 15, 'fill_mode': 'constant'}]
    """
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or not all(isinstance(size, int) and size > 0 for size in image_shape):
        raise ValueError(f"image_shape must be (height, width, channels). Received: image_shape={image_shape!r}")
    _check_positive_int("num_classes", num_classes)
    seed = check_seed(seed)
    items = parse_augment(augment)
    if not items:
        return None
    seeds = np.random.SeedSequence(seed).generate_state(len(items)) % (2**31 - 1)
    layers, resolved = [], []
    for (name, params, item), layer_seed in zip(items, seeds):
        function = _OPS[name][0]
        context = _Context(image_shape, int(layer_seed), train_images)
        try:
            layer = function(context, **params)
        except (ValueError, TypeError, OverflowError, NotImplementedError) as error:
            raise ValueError(f"augment op {item!r}: {error}") from error
        entry = {"name": name, **_parameters(function), **params}
        for key, value in entry.items():
            if value is None and hasattr(layer, key):  # record what a default resolved to (padding, PCA fit)
                entry[key] = getattr(layer, key)
        layers.append(layer)
        resolved.append(entry)
    config = {"preset": augment if isinstance(augment, str) else None, "ops": resolved, "seed": seed}
    return Augmentation(layers, num_classes=num_classes, config=config)


def parse_augment(augment) -> list:
    """``augment`` -> ``[(op name, parameters, the item as given), ...]`` with presets expanded.

    Checks names and parameter names only (values are checked when the layers are made, against the images).

    Example:
        >>> parse_augment(["shift", {"name": "rotation", "degrees": 15}])
        [('shift', {}, 'shift'), ('rotation', {'degrees': 15}, {'name': 'rotation', 'degrees': 15})]
    """
    if augment is None:
        return []
    if isinstance(augment, (str, dict)):
        augment = [augment]
    if not isinstance(augment, (list, tuple)):
        raise ValueError("augment must be None, a preset name, or a list of preset names, op names and "
                         f"{{'name': op, ...}} mappings. Received: augment={augment!r}")
    items = []
    for item in augment:
        if isinstance(item, dict) and set(item) == {"name"}:
            item = item["name"]
        if isinstance(item, str) and item in _OPS:
            items.append((item, {}, item))
        elif isinstance(item, str) and item in PRESETS:
            items += parse_augment(list(PRESETS[item].ops))
        elif isinstance(item, dict):
            items.append(_op_item(item))
        else:
            raise ValueError(f"unknown augmentation {item!r}: presets are {', '.join(PRESETS)}; ops are "
                             f"{', '.join(_OPS)}. Received: augment={augment!r}")
    return items


def _op_item(item: dict) -> tuple:
    name = item.get("name")
    if not isinstance(name, str) or name not in _OPS:
        hint = " (presets take no parameters)" if name in PRESETS else ""
        raise ValueError(f"an augmentation mapping needs 'name', one of the ops {', '.join(_OPS)}{hint}. "
                         f"Received: {item!r}")
    params = {key: value for key, value in item.items() if key != "name"}
    valid = _parameters(_OPS[name][0])
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"augment op {name!r} has no parameter {', '.join(map(repr, unknown))}; its parameters are "
                         f"{', '.join(valid) or 'none'}. Received: {item!r}")
    return name, params, item

