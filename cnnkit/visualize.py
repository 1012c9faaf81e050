"""See inside a trained network: kernels, feature maps, filter patterns, Grad-CAM, top losses.

Every function takes a ``keras.Model``, a ``cnnkit.Run``, a run directory or a ``.keras`` file,
and images as raw pixels (uint8 or numbers in 0-255, ``(H, W)``, ``(H, W, C)`` or a batch), the
way cnnkit models take them: preprocessing (``Rescaling`` and the like) is inside the model.
Models run with ``training=False``, so dropout and any augmentation layers do nothing, and
every array that comes back is float32 numpy, whatever the model's precision policy
(``mixed_bfloat16`` feature maps and gradients are cast).

"The output of a convolution" means the output of its block: a ``Conv2D`` followed by its
batch normalisation and activation (cnnkit builds ``conv1 -> conv1_act``) is read after the
activation, where the next layer sees it. In a residual block the convolutions that end the
block (the second one and the projection shortcut) are read after the shortcut is added and
activated (``residual3``, the tensor the next block or the global pooling takes), named after that
output. A backbone nested as one layer (``keras.applications`` fine-tuned) counts as one
convolution, its output feature map. A nested backbone that ends in flat features (a saved
classifier cut before its dense layers, as ``finetune`` makes of a cnnkit run) is opened: its
convolutions are read as the model's own. A model whose convolutions are in several nested models (an
ensemble's members) is refused: visualise one member, ``model.get_layer("member_0")``. A test-time
augmentation model (``cnnkit.recipes.ensemble.with_tta``: views of each image through one model, their
probabilities averaged) is visualised through the model inside it, one map per image (Grad-CAM explains
that model's prediction for the image as given, not the average over the views).

Each function can also write a PNG (``save=path``), atomically (``cnnkit.runs.atomic_write_bytes``).

Example:
    >>> from cnnkit import visualize
    >>> grid = visualize.kernels("runs/mnist", save="kernels.png")        # doctest: +SKIP
    >>> cam = visualize.grad_cam("runs/mnist", image, save="cam.png")     # doctest: +SKIP
    >>> cam.shape                                                         # doctest: +SKIP
    (28, 28)
"""

from __future__ import annotations

import dataclasses
import io
import math
import numbers
import os
import weakref
from pathlib import Path

import numpy as np

from cnnkit.runs import atomic_write_bytes

__all__ = [
    "TopLosses",
    "conv_layers",
    "feature_maps",
    "filter_patterns",
    "grad_cam",
    "image_grid",
    "kernels",
    "overlay",
    "top_losses",
]

# Layers that only carry a convolution's output on to its block's output (batch norm, activation; in a
# residual block the shortcut's addition): a block's output is read after them.
_BLOCK_TAIL = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax",
               "LocalResponseNormalization", "Identity", "Add")
_CONV_TYPES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "LocallyConnected2D")


# --------------------------------------------------------------------------- models and images


def _model(model):
    """A ``keras.Model`` from a model, a ``Run``, a run directory or a ``.keras`` file."""
    import keras

    if isinstance(model, keras.Model):
        return model
    if isinstance(getattr(model, "model", None), keras.Model):
        return model.model
    if isinstance(model, (str, os.PathLike)):
        from cnnkit.runs import load

        return load(model).model
    raise ValueError(
        "`model` must be a keras.Model, a cnnkit.Run, a run directory or a .keras file. "
        f"Received: model of type {type(model).__name__}"
    )


def _input_shape(model) -> tuple:
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(f"Expected a model taking images (H, W, C). Received: a model with input shape {shape}")
    return shape


def _batch(model, images) -> tuple[np.ndarray, bool]:
    """``(batch as float32 NHWC, whether one image was given)``; a missing channel axis is added."""
    try:
        array = np.asarray(images, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`image` must be numeric pixels. Received: image of type {type(images).__name__}") from err
    height, width, channels = _input_shape(model)
    rank = array.ndim
    if channels == 1 and rank in (2, 3) and (rank == 2 or array.shape[-1] != 1):
        array = array[..., np.newaxis]  # (H, W) or (N, H, W)
    single = array.ndim == 3
    if single:
        array = array[np.newaxis]
    expected = (height, width, channels)
    if array.ndim != 4 or any(e is not None and s != e for s, e in zip(array.shape[1:], expected)):
        raise ValueError(
            f"`image` must be one image {expected} (or without its channel axis) or a batch of them. "
            f"Received: image.shape={np.shape(images)}"
        )
    return array, single


def _layer(model, layer):
    if isinstance(layer, str):
        try:
            return model.get_layer(layer)
        except ValueError:
            names = [candidate.name for candidate in model.layers]
            raise ValueError(f"The model has no layer {layer!r}; its layers: {names}. "
                             f"Received: layer={layer!r}") from None
    if layer in model.layers:
        return layer
    raise ValueError(f"`layer` must be a layer name or a layer of the model. Received: layer={layer!r}")


def _is_conv(layer) -> bool:
    import keras

    if isinstance(layer, keras.Model):
        return len(layer.outputs[0].shape) == 4 and bool(_conv_layers_of(layer))
    return type(layer).__name__ in _CONV_TYPES or isinstance(layer, keras.layers.Conv2D)


def _searchable(model):
    """``model``, or, when it has no convolution of its own but a nested model holds some (a backbone
    ending in flat features), a copy that calls the nested models' layers in their place: the same
    layers and weights, computing the same, with every tensor in one graph to read and differentiate.
    Several nested models that hold convolutions (an ensemble's members) are refused (:func:`_one_nested`).
    A test-time augmentation model (``with_tta``) gives the model inside it, opened the same way.

    Example:
        >>> [layer.name for layer in _searchable(finetuned).layers]  # doctest: +SKIP
        ['image', 'rescale', 'conv1', 'conv1_act', 'pool1', 'flatten', 'fc1', 'classifier', 'probabilities']
    """
    import keras

    if model in _opened:
        return _opened[model]
    inner = _inside_views(model)
    if inner is not None:
        return _searchable(inner)
    _one_nested(model)
    if not _is_functional(model) or _conv_layers_of(model) or not any(
            _is_functional(layer) and _holds_conv(layer) for layer in model.layers):
        return model

    def inline(layer, *args, **kwargs):
        if _is_functional(layer):
            return _call_layers(layer, args[0]).outputs[0]
        return layer(*args, **kwargs)

    def _call_layers(nested, tensor):
        tensors = [tensor] if isinstance(nested.input, list) else tensor
        return keras.models.clone_model(nested, input_tensors=tensors, clone_function=lambda layer: layer,
                                        call_function=inline)

    source = model.inputs[0]
    _opened[model] = _call_layers(model, keras.Input(batch_shape=source.shape, dtype=source.dtype, name=source.name))
    return _opened[model]


_opened = weakref.WeakKeyDictionary()  # model -> its opened copy, made once (each copy adds a call to every layer)


def _inside_views(model):
    """The model a ``with_tta`` model runs on its views (image -> ``ImageViews`` -> model -> ``AverageViews``), else
    ``None``: read in the wrapper, each map and gradient would be one per view, not per image."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    views = any(type(layer).__name__ == "ImageViews" for layer in model.layers)
    return nested[0] if views and len(nested) == 1 else None


def _is_functional(model) -> bool:
    """A functional model of one input (what ``clone_model`` can re-call layer by layer; not a Sequential)."""
    import keras

    return (isinstance(model, keras.Model) and not isinstance(model, keras.Sequential)
            and hasattr(model, "_nodes_by_depth") and len(model.inputs) == 1)


def _holds_conv(model) -> bool:
    return any(_is_conv(layer) or _is_functional(layer) and _holds_conv(layer) for layer in model.layers)


def _one_nested(model) -> None:
    """Refuse a model with no convolution of its own whose convolutions lie in several nested models (an
    ensemble's members, ``member_0``, ``member_1``, ...): which member to show is the caller's choice."""
    import keras

    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model) and _holds_conv(layer)]
    if len(nested) > 1 and not _conv_layers_of(model):
        raise ValueError(f"The model {model.name!r} is an ensemble: its convolutions are in {len(nested)} nested "
                         f"models ({', '.join(nested)}). Visualise one member: model.get_layer({nested[0]!r}) in "
                         "Python, or the member's own run directory (an ensemble's trained members are in its "
                         f"members/ folder). Received: a model with layers {[layer.name for layer in model.layers]}")


def _first_conv(model):
    """The first convolution with a 4-D kernel (the one :func:`kernels` draws), looking inside a nested
    backbone; a locally connected layer (a kernel per position) is passed over. An ensemble is refused
    (:func:`_one_nested`)."""
    import keras

    _one_nested(model)
    for layer in model.layers:  # a nested backbone whatever its output (a saved net cut before its dense layers)
        if isinstance(layer, keras.Model):
            try:
                return _first_conv(layer)
            except ValueError:
                continue
        if _is_conv(layer) and any(len(weight.shape) == 4 for weight in layer.weights):
            return layer
    raise ValueError(f"The model {model.name!r} has no convolution with a 4-D kernel (a locally connected "
                     f"layer's kernels are per position). Received: a model with layers "
                     f"{[layer.name for layer in model.layers]}")


def _conv_layers_of(model) -> list:
    return [layer for layer in model.layers if _is_conv(layer)]


def conv_layers(model) -> list[str]:
    """Names of the model's convolutions, input to output (a nested backbone counts as one).

    Example:
        >>> conv_layers(cnnkit.build("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10))  # doctest: +SKIP
        ['conv1', 'conv2']
    """
    return [layer.name for layer in _conv_layers_of(_searchable(_model(model)))]


def _consumers(model) -> dict:
    """``id(tensor) -> [layers that take it]`` over the model's graph."""
    consumers = {}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for tensor in node.input_tensors:
                consumers.setdefault(id(tensor), []).append(layer)
    return consumers


def _output(model, layer):
    """The layer's output tensor in ``model``'s graph (a nested model's ``.output`` is its own graph's)."""
    node = _node(model, layer)
    return layer.output if node is None else node.output_tensors[0]


def _node(model, layer):
    """The layer's call in ``model``'s graph; ``None`` for a Sequential (its layers have one call)."""
    for nodes in getattr(model, "_nodes_by_depth", {}).values():
        for node in nodes:
            if node.operation is layer:
                return node
    return None


def _block_output(model, layer, consumers=None):
    """``(tensor, residual)``: the tensor a convolution's block hands on, after its batch norm /
    activation layers and, in a residual block, after the shortcut's ``Add`` and the activation that
    follows (what the next layer sees); ``residual`` is the layer giving that tensor when the way
    passed an ``Add``, else None."""
    consumers = _consumers(model) if consumers is None else consumers
    tensor, residual = _output(model, layer), None
    while True:
        following = consumers.get(id(tensor), [])
        if len(following) != 1 or type(following[0]).__name__ not in _BLOCK_TAIL:
            return tensor, residual
        if residual or type(following[0]).__name__ == "Add":
            residual = following[0]
        tensor = _output(model, following[0])


def _resolve_layers(model, layers, *, default):
    """``[(name, tensor)]``: named layers as they are (a convolution as its block output).

    By default the convolutions ``default`` picks, each tensor once: a residual block's output (which
    its second convolution and its projection both resolve to) is named after its output layer."""
    consumers = _consumers(model)
    if layers is None:
        chosen = default(_conv_layers_of(model))
        if not chosen:
            raise ValueError(f"The model {model.name!r} has no convolution with a spatial output at its own level (a "
                             "nested Sequential or several-input model is not opened). Received: a "
                             f"model with layers {[layer.name for layer in model.layers]}")
    else:
        chosen = [_layer(model, layer) for layer in ([layers] if isinstance(layers, str) else layers)]
        if not chosen:
            raise ValueError("`layers` names no layer: give layer names, or None for every convolution. "
                             f"Received: layers={layers!r}")
    resolved = []
    for layer in chosen:
        tensor, residual = _block_output(model, layer, consumers) if _is_conv(layer) else (_output(model, layer), None)
        if layers is None and residual is not None:
            if any(tensor is seen for _, seen in resolved):
                continue
            layer = residual
        resolved.append((layer.name, tensor))
    return resolved


def _as_float(value) -> np.ndarray:
    import tensorflow as tf

    return np.asarray(tf.cast(value, tf.float32))


# --------------------------------------------------------------------------- pictures


def image_grid(tiles, *, columns: int | None = None, pad: int = 1, normalize: str = "each",
               background: float = 1.0) -> np.ndarray:
    """Tile images into one picture, scaled to [0, 1], with a gap between tiles.

    Args:
        tiles: ``(N, h, w)`` or ``(N, h, w, 3)`` array.
        columns: tiles per row; default about ``sqrt(N)``.
        pad: pixels between tiles.
        normalize: "each" scales every tile to its own min..max; "symmetric" maps each tile's
            ``-m..m`` (``m`` its largest magnitude) to 0..1, so 0 is mid-grey (for kernels);
            "none" clips to 0..1 as given.
        background: the value of gaps and empty cells (NaN marks them for drawing).

    Returns:
        A float32 ``(H, W)`` or ``(H, W, 3)`` array in [0, 1], gaps ``background``.

    Example:
        >>> image_grid(np.zeros((6, 5, 5)), columns=3).shape
        (11, 17)
    """
    tiles = np.asarray(tiles, dtype=np.float32)
    if tiles.ndim not in (3, 4) or tiles.shape[0] == 0 or (tiles.ndim == 4 and tiles.shape[-1] != 3):
        raise ValueError(f"`tiles` must have shape (N, h, w) or (N, h, w, 3) with N >= 1. Received: {tiles.shape}")
    if normalize == "each":
        axes = tuple(range(1, tiles.ndim))
        low, high = tiles.min(axis=axes, keepdims=True), tiles.max(axis=axes, keepdims=True)
        tiles = (tiles - low) / np.where(high > low, high - low, 1.0)
    elif normalize == "symmetric":
        scale = np.abs(tiles).max(axis=tuple(range(1, tiles.ndim)), keepdims=True)
        tiles = 0.5 + 0.5 * tiles / np.where(scale > 0, scale, 1.0)
    elif normalize != "none":
        raise ValueError(f"`normalize` must be 'each', 'symmetric' or 'none'. Received: normalize={normalize!r}")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ValueError(f"`columns` must be None or an integer >= 1. Received: columns={columns!r}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"`pad` must be an integer >= 0. Received: pad={pad!r}")
    tiles = np.clip(tiles, 0.0, 1.0)
    count, height, width = tiles.shape[:3]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + pad) - pad, columns * (width + pad) - pad, *tiles.shape[3:]), background,
                   np.float32)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (height + pad), (index % columns) * (width + pad)
        grid[top:top + height, left:left + width] = tile
    return grid


def overlay(image, heatmap, *, alpha: float = 0.45) -> np.ndarray:
    """A heat map (values in [0, 1]) in the "jet" colours over an image, as uint8 RGB.

    Example:
        >>> overlay(np.zeros((28, 28)), np.ones((28, 28))).shape
        (28, 28, 3)
    """
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., np.newaxis], 3, axis=-1)
    high = float(image.max())
    base = image / (255.0 if high > 1.0 else 1.0)
    colours = colormaps["jet"](np.clip(np.asarray(heatmap, np.float32), 0.0, 1.0))[..., :3]
    return np.round(255 * np.clip((1 - alpha) * base + alpha * colours, 0.0, 1.0)).astype(np.uint8)


def _figure(width, height):
    from cnnkit.report import _new_figure

    return _new_figure(width, height)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _show(ax, picture, title=None, *, cmap="gray", gaps="white"):
    """Draw a picture in [0, 1] (a NaN pixel in the ``gaps`` colour) on axes without ticks."""
    from matplotlib import colormaps, colors

    picture = np.asarray(picture)
    if picture.ndim == 2:
        colour_map = colormaps[cmap].with_extremes(bad=gaps)
        ax.imshow(np.ma.masked_invalid(picture), cmap=colour_map, vmin=0, vmax=1, interpolation="nearest")
    else:
        if picture.dtype.kind == "f":  # colour: NaN gaps painted, values clipped to 0..1
            missing = np.isnan(picture).any(axis=-1, keepdims=True)
            picture = np.where(missing, colors.to_rgb(gaps), np.clip(np.nan_to_num(picture), 0.0, 1.0))
        ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9, parse_math=False)  # names as written, "$" and all


def grid_png(grid, title=None, *, scale: float = 1.0, cmap: str = "gray", gaps: str = "white") -> bytes:
    """A PNG of one picture (an :func:`image_grid`), with a title; about 4 inches wide at ``scale=1``.

    NaN pixels (gaps of ``image_grid(..., background=np.nan)``) are drawn in the ``gaps`` colour.

    Example:
        >>> grid_png(image_grid(np.random.rand(4, 5, 5)), "kernels")[:4]
        b'\\x89PNG'
    """
    height, width = np.shape(grid)[:2]
    inches = 4.0 * scale
    figure = _figure(inches, max(1.2, inches * height / width + (0.35 if title else 0.0)))
    _show(figure.add_subplot(1, 1, 1), grid, title, cmap=cmap, gaps=gaps)
    return _png(figure)


def _write(save, data: bytes) -> None:
    if save is not None:
        path = Path(save)
        if path.suffix.lower() != ".png":
            raise ValueError(f"`save` must be a .png path. Received: save={str(save)!r}")
        atomic_write_bytes(path, data)


# --------------------------------------------------------------------------- kernels


def kernels(model, layer=None, *, save=None) -> np.ndarray:
    """The weights of a convolution as an image grid: one tile per filter (and input channel).

    A layer with 3 input channels gives one colour tile per filter; any other gives one
    greyscale tile per (filter, input channel), a row per filter. Each tile is scaled by its
    largest weight magnitude with 0 at mid-grey, so the pattern and its sign show (light:
    positive) whatever the filter's norm.

    Args:
        model: a ``keras.Model``, ``cnnkit.Run``, run directory or ``.keras`` file.
        layer: a ``Conv2D`` (name or layer), found where :func:`conv_layers` finds them (inside a nested
            backbone ending in flat features too); default the first convolution with a 4-D kernel
            (inside a nested backbone, its first; a locally connected layer is passed over).
        save: write the grid as a PNG here.

    Returns:
        The float32 grid in [0, 1], ``(H, W)`` or ``(H, W, 3)``.

    Raises:
        ValueError: no convolution with a 4-D kernel, or ``layer`` has no 4-D kernel.

    Example:
        >>> grid = kernels(cnnkit.build("20C5-FC10", (28, 28, 1), 10))  # doctest: +SKIP
        >>> grid.shape  # 20 tiles of 5x5 in 5 columns  # doctest: +SKIP
        (23, 29)
    """
    model = _searchable(_model(model))
    layer = _first_conv(model) if layer is None else _layer(model, layer)
    tiles, columns = _kernel_tiles(layer)
    if save is not None:
        _write(save, _kernels_png(layer, tiles, columns))
    return image_grid(tiles, columns=columns, normalize="symmetric")


def _kernel_tiles(layer):
    """``(tiles, columns)`` of a layer's 4-D kernel: a colour tile per filter for 3 input channels,
    else a grey tile per (filter, input channel) with a row per filter."""
    weights = [w for w in layer.weights if len(w.shape) == 4]
    if not weights:
        raise ValueError(f"Layer {layer.name!r} has no 4-D convolution kernel. Received: layer={layer.name!r}")
    kernel = _as_float(weights[0])  # (kh, kw, in, out)
    kh, kw, inputs, outputs = kernel.shape
    if inputs == 3:
        return np.transpose(kernel, (3, 0, 1, 2)), None
    return np.transpose(kernel, (3, 2, 0, 1)).reshape(outputs * inputs, kh, kw), (inputs if inputs > 1 else None)


def _kernels_png(layer, tiles, columns, *, scale: float = 1.2) -> bytes:
    kh, kw, inputs, outputs = next(tuple(w.shape) for w in layer.weights if len(w.shape) == 4)
    picture = image_grid(tiles, columns=columns, normalize="symmetric", background=np.nan)
    title = f"{layer.name}: {outputs} kernels {kh}x{kw}x{inputs} (grey = 0)"
    return grid_png(picture, title, scale=scale, gaps="#9ecae1")


# --------------------------------------------------------------------------- feature maps


def feature_maps(model, image, layers=None, *, save=None) -> dict:
    """What each convolution outputs for an image.

    Args:
        model: a ``keras.Model``, ``cnnkit.Run``, run directory or ``.keras`` file.
        image: raw pixels, one image ``(H, W[, C])`` or a batch.
        layers: layer names (or one name); default every convolution (read after its batch
            norm and activation; a residual block's output once, under its output layer's name).
            Any layer can be named; a convolution is read as its block.
        save: write a PNG, a grid of channels per layer (first image of a batch).

    Returns:
        ``{layer name: float32 array}``, ``(h, w, channels)`` per layer for one image
        (``(N, h, w, channels)`` for a batch).

    Example:
        >>> maps = feature_maps(model, digit)  # doctest: +SKIP
        >>> {name: m.shape for name, m in maps.items()}  # doctest: +SKIP
        {'conv1': (24, 24, 20), 'conv2': (8, 8, 50)}
    """
    import keras

    model = _searchable(_model(model))
    batch, single = _batch(model, image)
    resolved = _resolve_layers(model, layers, default=lambda convs: convs)
    probe = keras.Model(model.inputs[0], [tensor for _, tensor in resolved])
    outputs = probe(batch, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    maps = {name: _as_float(output)[0] if single else _as_float(output)
            for (name, _), output in zip(resolved, outputs)}
    if save is not None:
        _write(save, _feature_png(maps, single))
    return maps


def _feature_png(maps, single=True, *, max_channels: int = 64, columns: int = 16) -> bytes:
    grids, titles = [], []
    for name, array in maps.items():
        array = array if single else array[0]
        if array.ndim != 3:
            array = np.reshape(array, (1, -1, 1))
        channels = np.moveaxis(array[..., :max_channels], -1, 0)
        grids.append(image_grid(channels, columns=min(columns, len(channels)), background=np.nan))
        shown = f", first {max_channels}" if array.shape[-1] > max_channels else ""
        titles.append(f"{name}: {array.shape[0]}x{array.shape[1]}, {array.shape[-1]} channels{shown}")
    width = 7.0
    heights = [width * grid.shape[0] / grid.shape[1] + 0.3 for grid in grids]
    figure = _figure(width, sum(heights))
    axes = figure.subplots(len(grids), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, grid, title in zip(axes, grids, titles):
        _show(ax, grid, title, cmap="viridis")
    return _png(figure)


# --------------------------------------------------------------------------- filter patterns


def _blur(images, sigma):
    """Gaussian blur of an NHWC float tensor, per channel, with reflect padding; the kernel is cut at 2 sigma
    and below the image's size (reflect padding needs fewer pixels than the image has)."""
    import tensorflow as tf

    radius = min(max(1, int(math.ceil(2 * sigma))), min(images.shape[1:3]) - 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    channels = images.shape[-1]
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.constant(np.tile(taps.reshape(-1, 1, 1, 1), (1, 1, channels, 1)))
    columns = tf.constant(np.tile(taps.reshape(1, -1, 1, 1), (1, 1, channels, 1)))
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(blurred, columns, [1, 1, 1, 1], "VALID")


def filter_patterns(model, layer=None, filters=8, *, steps: int = 64, step_size: float = 6.0,
                    decay: float = 0.01, blur_every: int = 4, blur_sigma: float = 0.5, jitter: int = 1,
                    seed: int = 0, save=None) -> np.ndarray:
    """Inputs that excite filters most: activation maximisation by gradient ascent on the image.

    Starting from mid-grey plus uniform noise of +-32 grey levels (seeded), each step shifts the
    image by a random ``-jitter..jitter`` pixels, takes the gradient of the filter's mean activation
    with respect to the input, divides it by its root mean square (so the step is ``step_size`` grey
    levels whatever the gradient's scale), adds it, decays the image towards mid-grey by ``decay``
    (an L2 penalty), blurs it every ``blur_every`` steps (high frequencies are what gradient ascent
    finds first and means least) and clips it to 0..255.

    The objective is the mean of the filter's channel in the layer's own output: for cnnkit's
    convolutions that is before the ReLU (``conv1_act``), because the rectified output has no
    gradient where a filter is silent, as it often is on a random start. A dense layer works too
    (its units are the "filters"). A model that takes images of any size (``to_fully_convolutional``)
    is refused: the patterns need a fixed size; draw them from the model it was made from.

    Args:
        model: a ``keras.Model``, ``cnnkit.Run``, run directory or ``.keras`` file.
        layer: the layer (name or layer); default the last convolution.
        filters: channel indices, or a count ``n`` for the first ``n``.
        steps: gradient ascent steps; 0 returns the random start.
        step_size: grey levels per step (root mean square of the change).
        decay: fraction of the distance to mid-grey removed each step; 0 for none.
        blur_every: blur every this many steps; 0 for never.
        blur_sigma: standard deviation of the blur in pixels (its kernel, 2 sigma each side, is cut to
            fit inside the image).
        jitter: largest random shift in pixels; 0 for none.
        seed: the random start and shifts.
        save: write a PNG, one tile per filter (each scaled to its own range).

    Returns:
        float32 images of raw pixel values 0..255, ``(len(filters), H, W, C)``: valid model inputs.

    Example:
        >>> patterns = filter_patterns("runs/mnist", "conv2", [0, 1, 2], steps=100)  # doctest: +SKIP
        >>> patterns.shape  # doctest: +SKIP
        (3, 28, 28, 1)
    """
    import keras
    import tensorflow as tf

    model = _searchable(_model(model))
    for name, value, low in (("steps", steps, 0), ("blur_every", blur_every, 0), ("jitter", jitter, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}. Received: {name}={value!r}")
    height, width, depth = _input_shape(model)
    if height is None or width is None:
        raise ValueError(f"The model {model.name!r} takes images of any size: filter patterns need a fixed height and "
                         "width. Draw them from the model it was made from (to_fully_convolutional keeps its "
                         f"convolutions and their weights). Received: a model with input shape {(height, width, depth)}")
    if not step_size > 0 or not 0 <= decay < 1 or not blur_sigma > 0:
        raise ValueError("`step_size` and `blur_sigma` must be positive and 0 <= `decay` < 1. Received: "
                         f"step_size={step_size!r}, decay={decay!r}, blur_sigma={blur_sigma!r}")
    main_path = [conv for conv in _conv_layers_of(model) if not conv.name.endswith("_proj")]  # not a shortcut
    layer = main_path[-1:] if layer is None else [_layer(model, layer)]
    if not layer:
        raise ValueError(f"The model {model.name!r} has no convolution layer. Received: layer=None")
    name, tensor = layer[0].name, _output(model, layer[0])
    channels = int(tensor.shape[-1])
    filters = list(range(min(filters, channels))) if isinstance(filters, numbers.Integral) else list(filters)
    if not filters or any(not isinstance(f, numbers.Integral) or not 0 <= f < channels for f in filters):
        raise ValueError(f"`filters` must be a count or indices in [0, {channels - 1}] of layer {name!r}. "
                         f"Received: filters={filters!r}")
    probe = keras.Model(model.inputs[0], tensor)
    rng = np.random.default_rng(seed)
    images = tf.Variable(128.0 + 32.0 * rng.uniform(-1, 1, (len(filters), height, width, depth)).astype(np.float32))
    selector = tf.one_hot(filters, channels, dtype=tf.float32)  # (n, channels)

    @tf.function(autograph=False, reduce_retracing=True)
    def ascend(shift):
        shifted = tf.roll(images, shift, axis=[1, 2])
        with tf.GradientTape() as tape:
            tape.watch(shifted)
            activation = tf.cast(probe(shifted, training=False), tf.float32)
            spatial = tf.reduce_mean(activation, axis=list(range(1, len(activation.shape) - 1)))
            objective = tf.reduce_sum(spatial * selector)
        gradient = tf.roll(tape.gradient(objective, shifted), -shift, axis=[1, 2])
        rms = tf.sqrt(tf.reduce_mean(tf.square(gradient), axis=[1, 2, 3], keepdims=True)) + 1e-8
        updated = images + step_size * gradient / rms
        images.assign(tf.clip_by_value(updated - decay * (updated - 128.0), 0.0, 255.0))

    for step in range(steps):
        ascend(tf.constant(rng.integers(-jitter, jitter + 1, 2), tf.int32))
        if blur_every and (step + 1) % blur_every == 0 and step + 1 < steps:
            images.assign(_blur(images, blur_sigma))
    patterns = images.numpy()
    if save is not None:
        tiles = patterns[..., 0] if depth == 1 else patterns if depth == 3 else patterns.mean(axis=-1)
        title = f"{name}: filters {', '.join(map(str, filters[:12]))}{', ...' if len(filters) > 12 else ''}"
        _write(save, grid_png(image_grid(tiles), title, scale=1.5))
    return patterns


# --------------------------------------------------------------------------- Grad-CAM


def _axis_steps(layer, size_in):
    """``[(start, jump)]`` per spatial axis of one layer: where its output index 0 centres in its
    input, and its stride; ``None`` for a layer whose geometry is unknown."""
    kernel = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
    if kernel is not None:
        strides = getattr(layer, "strides", None) or kernel
        dilation = getattr(layer, "dilation_rate", None) or (1, 1)
        steps = []
        for k, s, d, n in zip(kernel, strides, dilation, size_in):
            k = d * (k - 1) + 1
            pad = max((math.ceil(n / s) - 1) * s + k - n, 0) // 2 if getattr(layer, "padding", "valid") == "same" else 0
            steps.append(((k - 1) / 2 - pad, s))
        return steps
    name = type(layer).__name__
    if name in ("ZeroPadding2D", "Cropping2D"):
        amounts = layer.padding if name == "ZeroPadding2D" else layer.cropping
        sign = -1 if name == "ZeroPadding2D" else 1
        return [(sign * before, 1) for before, _ in amounts]
    return None


def _geometry(model, tensor):
    """Per spatial axis ``(start, jump)``: feature index ``i`` is centred on input pixel ``start + i * jump``
    (receptive-field arithmetic back to the model's input); ``None`` where a layer on the way is not
    understood (then Grad-CAM resizes plainly)."""
    try:
        return _receptive_centres(model, tensor)
    except (AttributeError, ValueError, TypeError, IndexError):  # a graph this arithmetic does not know
        return None


def _receptive_centres(model, tensor):
    import keras

    start, jump = [0.0, 0.0], [1.0, 1.0]
    path = []
    while True:
        layer, node_index, _ = tensor._keras_history
        if isinstance(layer, keras.layers.InputLayer):
            break
        inputs = layer._inbound_nodes[node_index].input_tensors
        if not inputs:
            return None
        path.append((layer, inputs[0], tensor))  # the main input: a residual Add's first, the block's path
        tensor = inputs[0]
    for layer, tensor_in, tensor_out in reversed(path):
        size_in, size_out = tuple(tensor_in.shape[1:3]), tuple(tensor_out.shape[1:3])
        if isinstance(layer, keras.Model):
            steps = _geometry(layer, layer.outputs[0])
        elif len(tensor_out.shape) != 4 or size_in == size_out and getattr(layer, "kernel_size", None) is None:
            continue  # elementwise: batch norm, activations, rescaling, dropout, add
        else:
            steps = _axis_steps(layer, size_in)
        if steps is None:
            return None
        for axis, (offset, stride) in enumerate(steps):
            start[axis] += jump[axis] * offset
            jump[axis] *= stride
    return list(zip(start, jump))


def _project(cams, geometry, size):
    """Resample ``(N, h, w)`` maps onto the input's ``size`` pixels, feature centres where ``geometry`` puts them."""
    out = cams
    for axis, target in enumerate(size):
        length = cams.shape[axis + 1]
        start, jump = geometry[axis] if geometry else ((target / length - 1) / 2, target / length)
        raw = (np.arange(target) - start) / jump
        position = np.clip(raw, 0, length - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, length - 1)
        covered = (raw >= -0.5) & (raw <= length - 0.5)  # within half a stride of a feature centre
        weights = np.zeros((target, length), np.float32)
        weights[np.arange(target), low] += (1 - (position - low)) * covered
        weights[np.arange(target), high] += (position - low) * covered
        out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, axis + 1, 0), axes=1), 0, axis + 1)
    return out


def _class_score_tensor(model):
    """The tensor to differentiate: the pre-softmax logits when the model ends in a softmax layer."""
    last = model.layers[-1]
    config = last.get_config() if type(last).__name__ in ("Activation", "Softmax") else {}
    if type(last).__name__ == "Softmax" or config.get("activation") == "softmax":
        node = _node(model, last)
        return (last.input if node is None else node.input_tensors[0]), True
    return model.outputs[0], False


def grad_cam(model, image, class_index=None, layer=None, *, save=None) -> np.ndarray:
    """Grad-CAM: where in the image the evidence for a class is (Selvaraju et al., 2017).

    The feature maps ``A`` of a convolution are weighted by the spatial mean of the gradient of the
    class score with respect to them, summed over channels and rectified:
    ``ReLU(sum_k mean_ij(dy/dA_ijk) * A_k)``, and divided by its maximum. The map is laid on the
    image by receptive-field arithmetic: each feature sits on the input pixel its receptive field
    centres on (a "valid" 5x5 convolution's first feature on pixel 2, not 0), values in between
    are bilinear, and pixels more than half a stride beyond the outermost features get 0 (a plain
    resize would stretch the feature grid over the whole image). The class score ``y`` is the
    pre-softmax logit when the model ends in a softmax layer (cnnkit's models do), else the
    log-odds ``log p - log(1 - p)``, which does not saturate for confident predictions as ``p`` does.

    Args:
        model: a ``keras.Model``, ``cnnkit.Run``, run directory or ``.keras`` file.
        image: raw pixels, one image ``(H, W[, C])`` or a batch.
        class_index: the class to explain (int, or one per image); default the predicted class.
        layer: the convolution (name or layer); default the last one, read after its batch norm
            and activation (in a residual network, the last block's output after its shortcut is
            added: the tensor the global pooling takes).
        save: write a PNG of the images over their overlays (the first 16 of a batch).

    Returns:
        float32 maps in [0, 1] of the image's height and width: ``(H, W)`` for one image,
        ``(N, H, W)`` for a batch. A map is all 0 when no feature of the layer adds to the class
        score (the class is predicted because the others are pushed down).

    Example:
        >>> cam = grad_cam("runs/mnist", digit)  # doctest: +SKIP
        >>> cam.shape, float(cam.max())  # doctest: +SKIP
        ((28, 28), 1.0)
    """
    import keras
    import tensorflow as tf

    model = _searchable(_model(model))
    batch, single = _batch(model, image)
    [(name, features)] = _resolve_layers(model, None if layer is None else [layer], default=lambda convs: convs[-1:])
    if len(features.shape) != 4:
        raise ValueError(f"Grad-CAM needs a layer with (H, W, C) output; {name!r} gives "
                         f"{tuple(features.shape[1:])}. Received: layer={name!r}")
    scores, are_logits = _class_score_tensor(model)
    if class_index is not None:
        indices = np.asarray(class_index)
        classes_out = int(scores.shape[-1])
        in_range = indices.dtype.kind in "iu" and np.all(indices >= 0) and np.all(indices < classes_out)
        if not in_range or indices.ndim > 1 or indices.size not in (1, len(batch)):
            raise ValueError(f"`class_index` must be an integer in [0, {classes_out - 1}], or one per image. "
                             f"Received: class_index={class_index!r}")
    probe = keras.Model(model.inputs[0], [features, scores])
    inputs = tf.constant(batch)
    with tf.GradientTape() as tape:
        maps, outputs = probe(inputs, training=False)
        outputs = tf.cast(outputs, tf.float32)
        if class_index is None:
            classes = tf.argmax(outputs, axis=-1)
        else:
            classes = tf.constant(np.broadcast_to(np.asarray(class_index, np.int64), (batch.shape[0],)))
        picked = tf.gather(outputs, classes, axis=1, batch_dims=1)
        if not are_logits:
            picked = tf.clip_by_value(picked, 1e-7, 1 - 1e-7)
            picked = tf.math.log(picked) - tf.math.log1p(-picked)
        score = tf.reduce_sum(picked)
    gradients = tf.cast(tape.gradient(score, maps), tf.float32)
    maps = tf.cast(maps, tf.float32)
    weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1)).numpy()
    cams = _project(cams, _geometry(model, features), batch.shape[1:3])
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    cams = np.where(peak > 0, cams / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)
    if save is not None:
        titles = [f"{name}, class {int(c)}" for c in np.asarray(classes)[:16]]
        _write(save, _cams_png(batch[:16], cams[:16], titles))
    return cams[0] if single else cams


def _cams_png(images, cams, titles, *, columns: int = 8) -> bytes:
    """Each image over its Grad-CAM overlay, titled, ``columns`` pairs per row."""
    pairs = []
    for picture, cam in zip(_rgb(images), cams):
        gap = np.ones((max(1, picture.shape[0] // 14), *picture.shape[1:]), np.float32)
        pairs.append(np.concatenate([picture, gap, overlay(picture, cam) / np.float32(255.0)]))
    return _mosaic_png(np.stack(pairs), titles, columns=columns, lines=1)


def _rgb(images) -> np.ndarray:
    """``(N, h, w, C)`` pixels 0..255 as RGB in [0, 1]: 3 channels as they are, any other count as the grey
    of their mean."""
    images = np.asarray(images, np.float32) / 255.0
    return images if images.shape[-1] == 3 else np.repeat(images.mean(axis=-1, keepdims=True), 3, axis=-1)


def _mosaic_png(tiles, labels, *, columns: int, lines: int, inches: float = 1.3) -> bytes:
    """Tiles (RGB in [0, 1]) in rows, each with a label of ``lines`` lines above it, drawn on one axes (fast)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count, height, width = tiles.shape[:3]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    pad = max(1, width // 10)
    label_height = max(1, round(width * 0.2 * lines))  # pixels of label room above each tile
    canvas = np.ones((rows * (label_height + height + pad), columns * (width + pad) + pad, 3), np.float32)
    figure = Figure(figsize=(inches * canvas.shape[1] / width, inches * canvas.shape[0] / width), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    for index, (tile, label) in enumerate(zip(tiles, labels)):
        top = (index // columns) * (label_height + height + pad) + label_height
        left = pad + (index % columns) * (width + pad)
        canvas[top:top + height, left:left + width] = tile
        ax.text(left + width / 2, top - 0.6, label, ha="center", va="bottom", fontsize=8.5, parse_math=False)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    return _png(figure)


# --------------------------------------------------------------------------- top losses


@dataclasses.dataclass
class TopLosses:
    """The examples a model gets most confidently wrong, worst first.

    Attributes:
        indices: positions in the images given.
        losses: ``-log p[true class]``.
        labels: the true classes.
        predicted: the predicted classes.
        confidence: the probability of the predicted class.
    """

    indices: np.ndarray
    losses: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray


def top_losses(model, images, labels, k: int = 9, *, class_names=None, probabilities=None, save=None) -> TopLosses:
    """The ``k`` misclassified examples with the highest loss: confident mistakes, worst first.

    Args:
        model: a ``keras.Model``, ``cnnkit.Run``, run directory or ``.keras`` file.
        images: a batch of raw images.
        labels: their classes: integers (or whole-number floats) in ``[0, K)``.
        k: how many (fewer when fewer are wrong).
        class_names: ``K`` names for the PNG's titles, any sequence (default the indices).
        probabilities: the model's ``(N, K)`` probabilities for ``images``, when already computed.
        save: write a PNG grid titled "true / predicted (confidence)".

    Returns:
        A :class:`TopLosses`.

    Example:
        >>> worst = top_losses(run, x_test, y_test, k=9, class_names=run.class_names)  # doctest: +SKIP
        >>> worst.indices[:3]  # doctest: +SKIP
        array([ 947, 2130,  445])
    """
    from cnnkit.evaluate import LOSS_EPSILON, class_indices
    from cnnkit.runs import Run

    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
    model = _model(model)
    batch, _ = _batch(model, images)
    if probabilities is None:
        probabilities = Run(model).predict(batch)
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"`probabilities` must have shape (N, K). Received: probabilities.shape={probabilities.shape}")
    labels = class_indices(labels, probabilities.shape[1], name="labels")
    if len(labels) != len(batch) or probabilities.shape[0] != len(batch):
        raise ValueError(f"`images`, `labels` and `probabilities` must have one row per example. Received: "
                         f"{len(batch)} images, {len(labels)} labels, {probabilities.shape[0]} probability rows")
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(class_names) != probabilities.shape[1]:
            raise ValueError(f"`class_names` must have one name per class ({probabilities.shape[1]}). Received: "
                             f"class_names={class_names}")
    predicted = probabilities.argmax(axis=1)
    losses = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], LOSS_EPSILON, 1.0))
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-losses[wrong], kind="stable")][:k]
    result = TopLosses(order, losses[order], labels[order], predicted[order], probabilities[order, predicted[order]])
    if save is not None:
        _write(save, _top_losses_png(batch, result, class_names))
    return result


def _top_losses_png(batch, result, class_names, *, columns: int = 8) -> bytes:
    largest = int(max(result.labels.max(initial=0), result.predicted.max(initial=0)))
    names = [str(i) for i in range(largest + 1)] if class_names is None else class_names
    if not len(result.indices):
        return grid_png(np.ones((1, 4)), "no misclassified examples")
    labels = [f"true {names[true]}\npred {names[predicted]} ({confidence:.2f})"
              for true, predicted, confidence in zip(result.labels, result.predicted, result.confidence)]
    return _mosaic_png(_rgb(batch[result.indices]), labels, columns=columns, lines=2)
