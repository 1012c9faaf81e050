"""Custom Keras 3 layers used by cnnkit's classic architectures.

Both layers are written with ``keras.ops`` only, compute in the layer's
``compute_dtype`` (so they run under ``"mixed_bfloat16"`` and
``"mixed_float16"`` policies; LRN's sum of squares is taken in float32 there),
are registered for serialization under the
``"cnnkit"`` package, and round-trip through ``.keras`` files with
``keras.saving.load_model(path)`` in the default safe mode.

* :class:`LocalResponseNormalization` - AlexNet's cross-channel local
  response normalization (Krizhevsky et al. 2012, section 3.3).
* :class:`LocallyConnected2D` - a 2D layer with unshared weights (Keras 3
  removed ``keras.layers.LocallyConnected2D``); weight layout and parameter
  count match Keras 2's ``LocallyConnected2D(implementation=1)`` with
  ``padding="valid"``.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

__all__ = ["LocalResponseNormalization", "LocallyConnected2D"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _normalize_pair(value, name: str) -> tuple[int, int]:
    """Turns an int or a pair of ints into a tuple of two positive ints."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(
            f"`{name}` must be a positive int or a tuple of two positive ints. "
            f"Received: {name}={value!r}"
        )
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(
            f"`{name}` must be a positive int or a tuple of two positive ints. "
            f"Received: {name}={value!r}"
        )
    return pair


@keras.saving.register_keras_serializable(package="cnnkit")
class LocalResponseNormalization(keras.layers.Layer):
    """Cross-channel local response normalization (AlexNet).

    Implements section 3.3 of Krizhevsky, Sutskever & Hinton (2012),
    "ImageNet Classification with Deep Convolutional Neural Networks", on
    channels-last inputs::

        b[..., i] = a[..., i] / (k + alpha * sum_j a[..., j] ** 2) ** beta

    where ``j`` runs over the ``size`` channels centred on channel ``i``,
    clipped at the first and last channel. As in the paper (and in
    ``tf.nn.local_response_normalization`` with ``depth_radius=size // 2``,
    ``bias=k``), ``alpha`` multiplies the plain sum of squares, not the
    mean. The layer has no weights, and behaves the same in training and
    inference. Under a 16-bit compute dtype the squares, their window sum and
    the denominator are computed in float32 (``a ** 2`` overflows float16 from
    ``a = 256``) and the result is cast back to the compute dtype.

    Args:
        size: Number of adjacent channels in each normalization window (the
            paper's ``n``). Must be an odd positive int.
        k: Additive constant in the denominator (the paper's ``k``).
        alpha: Scale applied to the windowed sum of squares.
        beta: Exponent of the denominator.
        **kwargs: Standard ``keras.layers.Layer`` keyword arguments
            (``name``, ``dtype``, ...).

    Input shape:
        Any tensor of rank >= 2 whose last axis is the channel axis, e.g.
        ``(batch, height, width, channels)``.

    Output shape:
        Same as the input.

    Raises:
        ValueError: If ``size`` is not an odd positive int.
        TypeError: If ``k``, ``alpha`` or ``beta`` is not a real number.

    Example:
        >>> import numpy as np
        >>> layer = LocalResponseNormalization(size=5, k=2.0, alpha=1e-4, beta=0.75)
        >>> x = np.ones((1, 4, 4, 8), dtype="float32")
        >>> tuple(layer(x).shape)
        (1, 4, 4, 8)
    """

    def __init__(self, size=5, k=2.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        if not _is_int(size) or size <= 0 or size % 2 == 0:
            raise ValueError(f"`size` must be an odd positive int. Received: size={size!r}")
        for name, value in (("k", k), ("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"`{name}` must be a real number. Received: {name}={value!r}")
        self.size = int(size)
        self.k = float(k)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.supports_masking = True
        self.built = True

    def call(self, inputs):
        # float16's largest value is 65504 < 256 ** 2: square and sum in float32.
        wide = "float32" if self.compute_dtype in ("float16", "bfloat16") else self.compute_dtype
        x = ops.cast(inputs, wide)
        radius = self.size // 2
        squared = ops.square(x)
        if radius:
            # Zero-pad the channel axis so that windows are clipped at the edges.
            pad = [[0, 0]] * (len(x.shape) - 1) + [[radius, radius]]
            padded = ops.pad(squared, pad)
            # padded has C + size - 1 channels; the window of channel i is
            # padded[..., i : i + size]. Summing `size` shifted slices of
            # length C avoids needing C statically.
            window_sum = None
            for offset in range(self.size):
                stop = offset - (self.size - 1)
                part = padded[..., offset:stop] if stop else padded[..., offset:]
                window_sum = part if window_sum is None else window_sum + part
        else:
            window_sum = squared
        denominator = ops.add(ops.multiply(window_sum, self.alpha), self.k)
        return ops.cast(ops.multiply(x, ops.power(denominator, -self.beta)), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"size": self.size, "k": self.k, "alpha": self.alpha, "beta": self.beta})
        return config


@keras.saving.register_keras_serializable(package="cnnkit")
class LocallyConnected2D(keras.layers.Layer):
    """2D locally connected layer: a convolution with unshared weights.

    Works like ``keras.layers.Conv2D`` with ``padding="valid"``, except that
    every output position ``(i, j)`` has its own filter bank and bias. Keras 3
    removed ``keras.layers.LocallyConnected2D``; this layer reproduces Keras
    2's ``implementation=1`` weight layout:

    * ``kernel``: ``(out_h * out_w, kh * kw * in_c, filters)``; row
      ``i * out_w + j`` holds the filters of output position ``(i, j)``, and
      the patch features are flattened in ``(kh, kw, in_c)`` order.
    * ``bias``: ``(out_h, out_w, filters)``.

    so ``count_params() == out_h * out_w * (kh * kw * in_c * filters +
    filters)`` (without the second term when ``use_bias=False``), where
    ``out_h = (H - kh) // stride_h + 1`` and likewise for ``out_w``.

    Patches are gathered with ``keras.ops.image.extract_patches`` and
    multiplied by the per-position kernels with a batched ``einsum``.

    Args:
        filters: Number of output channels.
        kernel_size: Int or pair of ints ``(kh, kw)``, the window size.
        strides: Int or pair of ints, the window step. Defaults to 1.
        activation: Activation name or callable applied to the output;
            ``None`` means linear.
        use_bias: Whether to add a per-position bias.
        kernel_initializer: Initializer for ``kernel``.
        bias_initializer: Initializer for ``bias``.
        kernel_regularizer: Optional regularizer for ``kernel``.
        kernel_constraint: Optional constraint for ``kernel``.
        **kwargs: Standard ``keras.layers.Layer`` keyword arguments
            (``name``, ``dtype``, ...).

    Input shape:
        ``(batch, H, W, C)`` (channels-last) with ``H``, ``W`` and ``C``
        known when the layer is built.

    Output shape:
        ``(batch, out_h, out_w, filters)``.

    Raises:
        ValueError: On invalid arguments, an input that is not rank 4 with
            known ``H``, ``W``, ``C``, or a kernel larger than the input.

    Example:
        >>> import numpy as np
        >>> layer = LocallyConnected2D(4, (3, 2), strides=1)
        >>> y = layer(np.zeros((2, 6, 5, 3), dtype="float32"))
        >>> tuple(y.shape)
        (2, 4, 4, 4)
        >>> layer.count_params() == 4 * 4 * (3 * 2 * 3 * 4 + 4)
        True
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        kernel_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not _is_int(filters) or filters <= 0:
            raise ValueError(f"`filters` must be a positive int. Received: filters={filters!r}")
        self.filters = int(filters)
        self.kernel_size = _normalize_pair(kernel_size, "kernel_size")
        self.strides = _normalize_pair(strides, "strides")
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _output_hw(self, input_shape) -> tuple[int, int]:
        """Validates ``input_shape`` and returns ``(out_h, out_w)``."""
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or any(d is None for d in input_shape[1:]):
            raise ValueError(
                f"{type(self).__name__} expects a channels-last input of shape "
                "(batch, height, width, channels) with known height, width and "
                f"channels. Received: input_shape={input_shape}"
            )
        height, width = int(input_shape[1]), int(input_shape[2])
        kh, kw = self.kernel_size
        if kh > height or kw > width:
            raise ValueError(
                f"{type(self).__name__}: kernel_size={self.kernel_size} is larger "
                f"than the input's spatial size (height={height}, width={width}); "
                "only 'valid' padding is supported. "
                f"Received: input_shape={input_shape}"
            )
        sh, sw = self.strides
        return (height - kh) // sh + 1, (width - kw) // sw + 1

    def build(self, input_shape):
        out_h, out_w = self._output_hw(input_shape)
        in_c = int(input_shape[-1])
        kh, kw = self.kernel_size
        self.kernel = self.add_weight(
            name="kernel",
            shape=(out_h * out_w, kh * kw * in_c, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(out_h, out_w, self.filters),
                initializer=self.bias_initializer,
            )
        else:
            self.bias = None
        self.input_spec = keras.layers.InputSpec(
            ndim=4, axes={1: int(input_shape[1]), 2: int(input_shape[2]), -1: in_c}
        )
        self._out_hw = (out_h, out_w)
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        out_h, out_w = self._out_hw
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        # (batch, out_h, out_w, kh * kw * in_c), features in (kh, kw, c) order, as ops.image.extract_patches
        # gives them; one strided slice per window offset is ~10x faster on the CPU than its identity-kernel
        # convolution, whose cost grows with the square of the channels.
        patches = ops.concatenate([x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
                                   for i in range(kh) for j in range(kw)], axis=-1)
        patches = ops.reshape(patches, (-1, out_h * out_w, patches.shape[-1]))
        kernel = ops.cast(self.kernel, self.compute_dtype)
        outputs = ops.einsum("blp,lpf->blf", patches, kernel)
        outputs = ops.reshape(outputs, (-1, out_h, out_w, self.filters))
        if self.use_bias:
            outputs = ops.add(outputs, ops.cast(self.bias, self.compute_dtype))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        out_h, out_w = self._output_hw(input_shape)
        return (input_shape[0], out_h, out_w, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            }
        )
        return config
