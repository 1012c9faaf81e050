"""Dense-to-convolution conversion and sliding-window score maps (CS231n, "Converting FC layers
to CONV layers").

A classifier trained on h x w crops becomes a network that slides over a larger image in one
forward pass: the first dense layer (after the flatten) becomes a convolution whose window is
the flatten's input grid, later dense layers become 1x1 convolutions, and global pooling
becomes pooling over the native feature-map size with stride 1. Every position of the output
map is then exactly the original network applied to one crop.

Example:
    >>> import cnnkit, numpy as np
    >>> model = cnnkit.build("8C5-MP2-FC16", (28, 28, 1), 10)
    >>> dense = to_fully_convolutional(model)
    >>> dense.output_shape
    (None, None, None, 10)
    >>> predict_map(model, np.zeros((84, 84), np.uint8)).shape  # native stride 2
    (29, 29, 10)
"""

from __future__ import annotations

import numbers

import keras
import numpy as np

_SLIDING_SAFE = (
    keras.layers.InputLayer, keras.layers.Rescaling, keras.layers.Conv2D, keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D, keras.layers.ZeroPadding2D, keras.layers.BatchNormalization,
    keras.layers.Activation, keras.layers.Dropout, keras.layers.Add, keras.layers.Identity,
)


def to_fully_convolutional(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose dense head is convolutional, so its input size is free.

    Args:
        model: a functional classifier built by cnnkit (notation or registered), with a
            fixed input size and a head of flatten + dense layers or global pooling + dense.

    Returns:
        A new ``keras.Model`` with copied weights, mapping (batch, H, W, C) images to a
        (batch, H', W', classes) map of class probabilities (softmax per position).

    Raises:
        ValueError: naming a layer that cannot slide (a locally connected layer has
            weights for fixed positions, a PReLU on a feature map without ``shared_axes=[1, 2]``
            slopes for them; any layer type not known to be position-wise).
    """
    grid = _flatten_grid(model)
    first_dense = next((layer for layer in model.layers if isinstance(layer, keras.layers.Dense)), None)
    replaced = {}

    def convert(layer):
        new = _converted_layer(layer, grid if layer is first_dense else None)
        replaced[new.name] = layer
        return new

    inputs = keras.Input((None, None, model.input_shape[-1]), dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    converted = keras.models.clone_model(model, input_tensors=inputs, clone_function=convert)
    for new in converted.layers:
        original = replaced.get(new.name)
        if original is not None and original.weights:
            new.set_weights([np.reshape(value, weight.shape) for value, weight in
                             zip(original.get_weights(), new.weights, strict=True)])
    return converted


def _flatten_grid(model):
    """(height, width) that the flatten layer flattens, or None without one."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Flatten):
            return tuple(layer.input.shape[1:3])
    return None


def _converted_layer(layer, grid):
    config = layer.get_config()
    policy = layer.dtype_policy
    if isinstance(layer, keras.layers.Flatten):
        return keras.layers.Identity(name=layer.name, dtype=policy)
    if isinstance(layer, keras.layers.Dense):
        window = grid or (1, 1)
        return keras.layers.Conv2D(
            layer.units, window, activation=config["activation"], use_bias=layer.use_bias, name=layer.name,
            dtype=policy,
        )
    if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)):
        pool = (keras.layers.AveragePooling2D if isinstance(layer, keras.layers.GlobalAveragePooling2D)
                else keras.layers.MaxPooling2D)
        return pool(tuple(layer.input.shape[1:3]), strides=1, name=layer.name, dtype=policy)
    if isinstance(layer, keras.layers.PReLU) and len(layer.input.shape) == 2:
        return keras.layers.PReLU(shared_axes=[1, 2], name=layer.name, dtype=policy)
    if _position_wise(layer):
        return layer.__class__.from_config(config)
    if type(layer).__name__ == "LocallyConnected2D":
        reason = "a locally connected layer has weights for fixed positions"
    elif isinstance(layer, keras.layers.PReLU):
        reason = f"its slopes are per position (shared_axes={layer.shared_axes}); one with shared_axes=[1, 2] slides"
    else:
        reason = "it is not known to act the same at every position"
    raise ValueError(f"cannot convert layer {layer.name!r} ({type(layer).__name__}) to slide over larger images: "
                     f"{reason}")


def _position_wise(layer) -> bool:
    """A layer that acts the same at every position: it slides unchanged. cnnkit's per-channel
    ``Standardization`` (``preprocess="standardize"`` or ``"center_channel"``) is; the per-pixel one
    and ``Whitening`` hold statistics for fixed positions. A PReLU is when its slopes are shared over
    height and width (``shared_axes`` holds 1 and 2; Keras's default, None, gives a slope per position)."""
    name = type(layer).__name__
    return (isinstance(layer, _SLIDING_SAFE) or name == "LocalResponseNormalization"
            or name == "Standardization" and not layer.per_pixel
            or isinstance(layer, keras.layers.PReLU) and {1, 2} <= set(layer.shared_axes or ()))


def _check_unpadded(model):
    """A padded layer sees zeros at a crop's border where the larger image has pixels. A "same" layer
    with a 1x1 window pads nothing (the builder makes ``16C1`` one: P = (F - 1)/2 = 0)."""
    for layer in model.layers:
        window = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None) or (2,)  # unknown: pads
        same = getattr(layer, "padding", None) == "same" and max(window) > 1
        if isinstance(layer, keras.layers.ZeroPadding2D) or same:
            raise ValueError(
                f"layer {layer.name!r} pads its input, so map positions near a crop's border would see image "
                "pixels where the crop saw zeros and would not equal the network on that crop; predict_map "
                "takes networks with valid (p0) convolutions and pooling. to_fully_convolutional(model) still "
                "converts this one."
            )


def native_stride(model: keras.Model, converted: keras.Model | None = None) -> int:
    """The total downsampling of ``model``: how far one step of the score map moves.

    It is the product of the strides of the convolutions and poolings between the input and the
    output (the planner's ``jump``). Probing how far the input must grow before the output grows
    would be wrong: a pooling that floors (a 2x2 pool over 11 rows drops one) lets the output grow
    after one more row although each output step moves two.

    Args:
        model: the original classifier.
        converted: ``to_fully_convolutional(model)`` when already made.

    Raises:
        ValueError: a layer whose stride is not known, different strides along height and width,
            or branches of a merge with different strides.

    Example:
        >>> import cnnkit
        >>> native_stride(cnnkit.build("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10))
        4
    """
    dense = converted or to_fully_convolutional(model)
    return _total_stride(dense.outputs[0], {})


def _total_stride(tensor, known: dict) -> int:
    """The product of the layer strides from the model's input to ``tensor`` (``known``: id -> stride)."""
    if id(tensor) not in known:
        layer, node_index, _ = tensor._keras_history
        inputs = layer._inbound_nodes[node_index].input_tensors
        below = {_total_stride(value, known) for value in inputs} or {1}  # the input layer has no inputs
        if len(below) != 1:
            raise ValueError(f"cannot tell the native stride at layer {layer.name!r}: its inputs come with "
                             f"different strides {sorted(below)}")
        known[id(tensor)] = below.pop() * _layer_stride(layer)
    return known[id(tensor)]


def _layer_stride(layer) -> int:
    """A layer's stride: its ``strides`` (the same along height and width), or 1 for a position-wise layer."""
    strides = getattr(layer, "strides", None)
    if strides is None:
        if _position_wise(layer):
            return 1
        raise ValueError(f"cannot tell the native stride at layer {layer.name!r}: the stride of a "
                         f"{type(layer).__name__} is not known")
    if len(set(strides)) != 1:
        raise ValueError(f"cannot tell the native stride at layer {layer.name!r}: its strides {tuple(strides)} "
                         "differ along height and width")
    return strides[0]


def predict_map(model: keras.Model, image, *, stride: int | None = None, converted: keras.Model | None = None):
    """Class-probability map of ``model`` slid over a larger ``image`` (CS231n's sliding window).

    Position ``(i, j)`` of the map is the original network applied to the crop whose top-left
    corner is ``(i * stride, j * stride)``. The native stride is the network's total
    downsampling and costs one forward pass; a finer stride (a divisor of it) combines
    ``(native / stride) ** 2`` forward passes over shifted copies of the image; a coarser one
    (a multiple of it) keeps every ``stride / native``-th position of the native map.

    Args:
        model: the original classifier (fixed input size), not its ``to_fully_convolutional`` copy.
        image: (H, W) or (H, W, C) raw pixels, at least the model's input size.
        stride: a divisor or a multiple of ``native_stride(model)``; default the native stride.
        converted: ``to_fully_convolutional(model)`` when already made (saves rebuilding it).

    Returns:
        NumPy array (rows, cols, classes), ``rows = (H - h) // stride + 1``.

    Raises:
        ValueError: If ``model``'s input size is not fixed, ``image`` is smaller or has other channels,
            a layer pads, or ``stride`` is neither a divisor nor a multiple of the native stride.

    Example:
        >>> import cnnkit
        >>> net = cnnkit.build("8C3-MP2-FC8", (12, 12, 1), 3)
        >>> predict_map(net, np.zeros((20, 20)), stride=1).shape
        (9, 9, 3)
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    height, width, channels = model.input_shape[1:]
    if height is None or width is None:
        raise ValueError("predict_map needs the original classifier with a fixed input size (the crop size); "
                         "pass it rather than an any-size model such as to_fully_convolutional's result. "
                         f"Received: model {model.name!r} with input shape {model.input_shape}")
    if image.ndim != 3 or image.shape[2] != channels or image.shape[0] < height or image.shape[1] < width:
        raise ValueError(f"image must be (H, W[, {channels}]) with H >= {height} and W >= {width}. "
                         f"Received: image.shape={image.shape}")
    _check_unpadded(model)
    converted = converted or to_fully_convolutional(model)
    native = native_stride(model, converted)
    stride = native if stride is None else stride
    integer = isinstance(stride, numbers.Integral) and not isinstance(stride, bool)
    if not integer or stride < 1 or native % stride and stride % native:
        raise ValueError(f"stride must be an integer, a positive divisor or multiple of the native stride {native}. "
                         f"Received: stride={stride!r}")
    stride = int(stride)
    fine = min(stride, native)  # the map is made at this stride, then every (stride // fine)-th position kept
    rows, cols = (image.shape[0] - height) // fine + 1, (image.shape[1] - width) // fine + 1
    step = native // fine
    result = np.zeros((rows, cols, converted.output_shape[-1]), np.float32)
    for offset_y in range(step):
        for offset_x in range(step):
            # Shifted by (offset_y, offset_x) strides, the native map's k-th position is the crop at
            # (offset + k * step) * fine: it fills every step-th position of the finer map. The
            # converted network can give more positions than fit (a flooring pooling drops the image's
            # last rows, so a crop running past the image gives a score): only the crops inside count.
            shifted = image[offset_y * fine:, offset_x * fine:][None].astype(model.inputs[0].dtype)
            target = result[offset_y::step, offset_x::step]
            if target.size:
                scores = np.asarray(converted(shifted, training=False))[0]
                target[...] = scores[: target.shape[0], : target.shape[1]]
    return result[:: stride // fine, :: stride // fine]
