"""Plan a network before building it: shapes, parameters, MACs, receptive field, memory.

``plan()`` resolves a notation string (or a registered name) for an input shape: it fills in the
default activation and padding, inserts the flatten before the first dense layer, moves an
activation after a following ``BN``, and appends the classifier. ``cnnkit.build`` makes its Keras
layers from these same rows, so the plan's shapes and parameter counts are the model's.

A convolution whose window does not tile its input raises :class:`cnnkit.SpecError` with the
CS231n formula filled in; pooling floors like Keras, Theano (``ignore_border``) and PyTorch do,
and the row's note says how many rows/columns it drops.

Example:
    >>> p = plan("96C11s4p0-LRN-MP3s2", (227, 227, 3))
    >>> p.rows[0].output_shape, p.rows[0].params
    ((55, 55, 96), 34944)
    >>> plan("96C11s4p0", (224, 224, 3))
    Traceback (most recent call last):
    ...
    cnnkit.spec.SpecError: token 1 '96C11s4p0': (W - F + 2P)/S + 1 = (224 - 11 + 0)/4 + 1 = 54.25 is not an integer
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from cnnkit.spec import ACTIVATIONS, Layer, SpecError, format_layer, parse

DEFAULT_OPTIONS = {
    "activation": "relu",
    "padding": "valid",
    "batch_norm": False,
    "initializer": "auto",
    "l2": 0.0,
    "max_norm": None,
    "preprocessing": "rescale",
    "dtype": None,
    "shortcut": "projection",
}
"""Build options and their defaults; registered networks override some (``lenet``: tanh)."""

INITIALIZERS = (
    "auto", "he_normal", "he_uniform", "glorot_uniform", "glorot_normal", "lecun_uniform", "lecun_normal", "theano",
)
"""Kernel initialisers ``cnnkit.build`` takes (see its ``initializer`` option)."""
SHORTCUTS = ("projection", "zero_pad")
"""Residual shortcuts where a block changes shape (He et al. 2016): a 1x1 convolution + BN
(option B), or the parameter-free identity, subsampled and zero-padded to the new width (option A)."""

_SPATIAL = {"conv", "local", "maxpool", "avgpool", "gap", "gmp", "lrn", "residual"}
_WEIGHTED = {"conv", "local", "dense"}
_OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "adamw": 2, "rmsprop": 2}
"""Float32 values the optimizer keeps per trainable weight, for each of ``cnnkit.recipes.optimization.OPTIMIZERS``
as ``make_optimizer`` builds it: RMSprop with its default momentum 0.9 keeps velocities and momentums."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One layer of a plan. ``layer`` is the resolved spec (activation and padding filled in)."""

    name: str
    layer: Layer
    output_shape: tuple[int, ...]
    params: int
    trainable_params: int
    macs: int
    receptive_field: tuple[int, int]
    use_bias: bool = True
    note: str = ""

    @property
    def token(self) -> str:
        """The row's token without its activation (shown in its own column)."""
        return format_layer(dataclasses.replace(self.layer, activation=None)) if self.layer.kind != "flatten" else ""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Training memory in bytes, by the CS231n accounting (see :meth:`Plan.memory`)."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    batch_size: int
    precision: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    def __str__(self):
        mib = 2**20
        parts = ", ".join(
            f"{label} {value / mib:,.1f} MiB"
            for label, value in [
                ("weights", self.weights),
                ("gradients", self.gradients),
                ("optimizer", self.optimizer_state),
                ("activations", self.activations),
            ]
        )
        return (
            f"training memory estimate (batch {self.batch_size}, {self.precision}): "
            f"{self.total / mib:,.1f} MiB = {parts}"
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A resolved network: rows, totals, and the build options it was planned with."""

    spec: str
    input_shape: tuple[int, int, int]
    num_classes: int | None
    rows: tuple[Row, ...]
    options: dict

    @property
    def params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def trainable_params(self) -> int:
        return sum(row.trainable_params for row in self.rows)

    @property
    def macs(self) -> int:
        return sum(row.macs for row in self.rows)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.rows[-1].output_shape if self.rows else self.input_shape

    def memory(self, *, batch_size: int = 128, precision: str = "float32", optimizer: str = "adam") -> MemoryEstimate:
        """Estimate training memory as CS231n does: weights, their gradients, optimizer state,
        and every tensor the built model keeps for the backward pass plus its gradient (the
        input and its rescaled copy, each layer's output and activation, padded inputs, residual
        shortcuts).

        Variables stay float32 under mixed precision; activations take 2 bytes then.

        Example:
            >>> plan("FC256", (28, 28, 1), 10).memory(batch_size=1, optimizer="sgd").weights
            814120
        """
        if optimizer not in _OPTIMIZER_SLOTS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZER_SLOTS)}. Received: optimizer={optimizer!r}")
        if precision not in ("float32", "mixed_bfloat16", "mixed_float16"):
            raise ValueError(
                f"precision must be float32, mixed_bfloat16 or mixed_float16. Received: precision={precision!r}"
            )
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be at least 1. Received: batch_size={batch_size}")
        activation_bytes = 4 if precision == "float32" else 2
        preprocessing = self.options.get("preprocessing")
        layers_before = 1 if preprocessing == "rescale" else len(preprocessing) if isinstance(preprocessing, (list, tuple)) else 0
        stored, inputs = math.prod(self.input_shape) * (1 + layers_before), self.input_shape
        for row in self.rows:
            stored += _stored_elements(row, inputs, self.options.get("shortcut", "projection"))
            inputs = row.output_shape
        return MemoryEstimate(
            weights=4 * self.params,
            gradients=4 * self.trainable_params,
            optimizer_state=4 * self.trainable_params * _OPTIMIZER_SLOTS[optimizer],
            activations=2 * batch_size * stored * activation_bytes,
            batch_size=batch_size,
            precision=precision,
        )

    def __str__(self):
        header = ("#", "layer", "token", "activation", "output", "params", "MACs", "RF", "note")
        lines = [("", "input", "", "", _shape_text(self.input_shape), "", "", "1x1", "")]
        for index, row in enumerate(self.rows, start=1):
            lines.append(
                (
                    str(index),
                    row.name,
                    row.token,
                    row.layer.activation if row.layer.activation not in (None, "linear") else "",
                    _shape_text(row.output_shape),
                    f"{row.params:,}",
                    f"{row.macs:,}",
                    "x".join(map(str, row.receptive_field)) if len(row.output_shape) == 3 else "all",
                    row.note,
                )
            )
        widths = [max(len(line[col]) for line in [header, *lines]) for col in range(len(header))]
        text = [
            "  ".join(cell.ljust(width) if col in (1, 2, 3, 8) else cell.rjust(width)
                      for col, (cell, width) in enumerate(zip(line, widths))).rstrip()
            for line in [header, *lines]
        ]
        text.insert(1, "-" * len(text[0]))
        text.append("-" * len(text[0]))
        text.append(
            f"total: {self.params:,} parameters ({self.trainable_params:,} trainable), "
            f"{self.macs:,} multiply-accumulates per image"
        )
        return "\n".join(text)


def plan(arch, input_shape, num_classes: int | None = None, **options) -> Plan:
    """Resolve a notation string or registered name for an input shape.

    Args:
        arch: a notation string (``"20C5-MP2-50C5-MP2-FC256"``) or a registered model name.
        input_shape: ``(height, width, channels)``.
        num_classes: append the softmax classifier ``FC{num_classes}`` unless the spec already
            ends with it; ``None`` plans the body alone.
        **options: build options (see ``DEFAULT_OPTIONS``); ``activation``, ``padding``,
            ``batch_norm`` and ``shortcut`` change the plan, the rest are carried to ``cnnkit.build``.

    Returns:
        A :class:`Plan`; ``print(plan)`` shows the layer table.

    Raises:
        cnnkit.SpecError: a bad token, or a layer that does not fit its input.

    Example:
        >>> print(plan("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10).output_shape)
        (10,)
    """
    from cnnkit.models.registry import resolve_arch

    spec, options = resolve_arch(arch, options)
    input_shape = _check_input_shape(input_shape)
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2. Received: num_classes={num_classes!r}")
    check_options(options)
    num_classes = None if num_classes is None else int(num_classes)
    layers = _resolve(parse(spec), num_classes, options, rank=len(input_shape))
    rows = _plan_rows(layers, input_shape, options["shortcut"])
    return Plan(spec=spec, input_shape=input_shape, num_classes=num_classes, rows=tuple(rows), options=options)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_options(options: dict) -> None:
    """Refuse a build option (resolved: every key of ``DEFAULT_OPTIONS``) of the wrong type or range,
    naming it; ``preprocessing`` and ``dtype`` are checked where the model is built.

    Example:
        >>> check_options({**DEFAULT_OPTIONS, "padding": "sane"})
        Traceback (most recent call last):
        ...
        ValueError: padding must be one of ('valid', 'same'). Received: padding='sane'
    """
    choices = {"activation": ACTIVATIONS, "padding": ("valid", "same"), "shortcut": SHORTCUTS,
               "initializer": INITIALIZERS}
    for key, allowed in choices.items():
        if options[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}. Received: {key}={options[key]!r}")
    if not isinstance(options["batch_norm"], bool):
        raise ValueError(f"batch_norm must be True or False. Received: batch_norm={options['batch_norm']!r}")
    l2, max_norm = options["l2"], options["max_norm"]
    if l2 is not None and (not _is_real(l2) or not l2 >= 0):
        raise ValueError(f"l2 must be None or a number >= 0. Received: l2={l2!r}")
    if max_norm is not None and (not _is_real(max_norm) or not max_norm > 0):
        raise ValueError(f"max_norm must be None or a number > 0. Received: max_norm={max_norm!r}")


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(_is_int(size) and size >= 1 for size in shape):
        raise ValueError(
            f"input_shape must be three positive integers (height, width, channels). Received: input_shape={input_shape!r}"
        )
    return tuple(int(size) for size in shape)


def _resolve(layers: list[Layer], num_classes, options, rank) -> list[Layer]:
    """Fill defaults, insert BN (batch_norm option) and flatten, move activations after BN, add the classifier."""
    resolved = []
    for layer in layers:
        if layer.kind in ("conv", "local", "dense", "residual") and layer.activation is None:
            layer = dataclasses.replace(layer, activation=options["activation"])
        if layer.kind == "conv" and layer.padding is None:
            layer = dataclasses.replace(layer, padding=0 if options["padding"] == "valid" else "same")
        if layer.kind == "local" and layer.padding not in (None, 0):
            raise SpecError("locally connected layers take no padding", token=layer.token, position=layer.position)
        if layer.kind in ("maxpool", "avgpool") and layer.padding not in (None, 0, "same"):
            raise SpecError(
                "pooling takes p0 or psame: Keras has no pooling that pads with -inf (max) or leaves the padding "
                "out of the average, and zero padding would change both", token=layer.token, position=layer.position,
            )
        resolved.append(layer)
        if options["batch_norm"] and layer.kind in ("conv", "local"):
            resolved.append(Layer("bn", token="BN"))
    # Drop a BN inserted by batch_norm=True right before an explicit one.
    resolved = [
        layer for index, layer in enumerate(resolved)
        if not (layer.kind == "bn" and layer.position == 0 and index + 1 < len(resolved)
                and resolved[index + 1].kind == "bn")
    ]
    if num_classes is not None:
        given = layers[-1]
        if given.kind == "dense" and given.size == num_classes and given.activation in (None, "softmax"):
            resolved[-1] = dataclasses.replace(resolved[-1], activation="softmax")
        else:
            resolved.append(Layer("dense", size=num_classes, activation="softmax", token=f"FC{num_classes}"))
    for index in range(1, len(resolved)):
        layer, previous = resolved[index], resolved[index - 1]
        if layer.kind == "bn" and previous.kind in _WEIGHTED:
            resolved[index - 1] = dataclasses.replace(previous, activation="linear")
            resolved[index] = dataclasses.replace(layer, activation=previous.activation)
    with_flatten, spatial = [], rank == 3
    for layer in resolved:
        if layer.kind == "dense" and spatial:
            with_flatten.append(Layer("flatten"))
            spatial = False
        elif layer.kind in _SPATIAL and not spatial:
            raise SpecError(
                "needs a spatial (height x width x channels) input, but it comes after a flatten or global pooling",
                token=layer.token, position=layer.position,
            )
        if layer.kind in ("gap", "gmp"):
            spatial = False
        with_flatten.append(layer)
    return with_flatten


def _plan_rows(layers: list[Layer], input_shape, shortcut="projection") -> list[Row]:
    rows, counts = [], {}
    shape = input_shape
    receptive, jump = (1, 1), (1, 1)
    last_dense = max((i for i, layer in enumerate(layers) if layer.kind == "dense"), default=-1)
    for index, layer in enumerate(layers):
        following = layers[index + 1] if index + 1 < len(layers) else None
        use_bias = not (following is not None and following.kind == "bn" and layer.kind in _WEIGHTED)
        if index == last_dense and layer.activation == "softmax":
            name = "classifier"
        else:
            base = _NAME.get(layer.kind, layer.kind)
            counts[base] = counts.get(base, 0) + 1
            name = base if layer.kind == "flatten" else f"{base}{counts[base]}"
        out, params, trainable, macs, receptive, jump, note = _layer_math(layer, shape, use_bias, receptive, jump,
                                                                          shortcut)
        if len(out) == 1:  # a unit after flatten or global pooling sees the whole image
            receptive = tuple(input_shape[:2])
        if layer.activation == "prelu":
            prelu = out[-1]
            params, trainable = params + prelu, trainable + prelu
        rows.append(Row(name, layer, out, params, trainable, macs, receptive, use_bias, note))
        shape = out
    return rows


_NAME = {"maxpool": "pool", "avgpool": "pool", "gap": "gap", "gmp": "gmp", "dense": "fc"}


def _window_out(layer: Layer, size: int, axis: str, window: int, stride: int, strict: bool) -> tuple[int, str]:
    """Output size along one axis, with the CS231n formula in the error."""
    padding = layer.padding or 0
    if padding == "same":
        return -(-size // stride), ""
    span = size - window + 2 * padding
    formula = f"({axis} - F + 2P)/S + 1 = ({size} - {window} + {2 * padding})/{stride} + 1"
    if span < 0:
        raise SpecError(
            f"{formula} = {span / stride + 1:g}: the {window}-wide window is larger than the padded input",
            token=layer.token, position=layer.position,
        )
    if span % stride:
        if strict:
            raise SpecError(f"{formula} = {span / stride + 1:g} is not an integer", token=layer.token,
                            position=layer.position)
        return span // stride + 1, f"floor drops {span % stride} of {axis}"
    return span // stride + 1, ""


def _layer_math(layer: Layer, shape, use_bias, receptive, jump, shortcut="projection"):
    """(output shape, params, trainable params, MACs, receptive field, jump, note) for one layer."""
    kind = layer.kind
    if kind in ("conv", "local", "maxpool", "avgpool"):
        height, width, channels = shape
        (kernel_h, kernel_w), (stride_h, stride_w) = layer.kernel, layer.stride
        strict = kind in ("conv", "local")
        out_w, note_w = _window_out(layer, width, "W", kernel_w, stride_w, strict)
        out_h, note_h = _window_out(layer, height, "H", kernel_h, stride_h, strict)
        receptive = (receptive[0] + (kernel_h - 1) * jump[0], receptive[1] + (kernel_w - 1) * jump[1])
        jump = (jump[0] * stride_h, jump[1] * stride_w)
        note = "; ".join(filter(None, [note_h, note_w]))
        if kind in ("maxpool", "avgpool"):
            return (out_h, out_w, channels), 0, 0, 0, receptive, jump, note
        filters = layer.size
        per_position = kernel_h * kernel_w * channels * filters
        if kind == "conv":
            params = per_position + (filters if use_bias else 0)
        else:
            params = out_h * out_w * (per_position + (filters if use_bias else 0))
        return (out_h, out_w, filters), params, params, out_h * out_w * per_position, receptive, jump, note
    if kind == "residual":
        height, width, channels = shape
        filters, (stride_h, stride_w) = layer.size, layer.stride
        out_h, out_w = -(-height // stride_h), -(-width // stride_w)
        params = 9 * channels * filters + 9 * filters * filters + 8 * filters
        macs = out_h * out_w * (9 * channels * filters + 9 * filters * filters)
        non_trainable, note = 4 * filters, ""
        if layer.stride != (1, 1) or channels != filters:
            if shortcut == "zero_pad" and filters >= channels:
                note = "zero-padded shortcut"
            else:
                params += channels * filters + 4 * filters
                macs += out_h * out_w * channels * filters
                non_trainable += 2 * filters
                note = "projection shortcut"
        if layer.activation == "prelu":  # the block's inner activation; _plan_rows adds the outer one
            params += filters
        receptive = (receptive[0] + 2 * jump[0] + 2 * jump[0] * stride_h,
                     receptive[1] + 2 * jump[1] + 2 * jump[1] * stride_w)
        jump = (jump[0] * stride_h, jump[1] * stride_w)
        return (out_h, out_w, filters), params, params - non_trainable, macs, receptive, jump, note
    if kind in ("gap", "gmp"):
        return (shape[-1],), 0, 0, 0, receptive, jump, ""
    if kind == "flatten":
        return (math.prod(shape),), 0, 0, 0, receptive, jump, ""
    if kind == "dense":
        inputs = shape[0]
        params = inputs * layer.size + (layer.size if use_bias else 0)
        return (layer.size,), params, params, inputs * layer.size, receptive, jump, ""
    if kind == "bn":
        channels = shape[-1]
        return shape, 4 * channels, 2 * channels, 0, receptive, jump, ""
    if kind in ("dropout", "lrn"):
        if kind == "lrn" and layer.size % 2 == 0:
            raise SpecError("an LRN window must be odd", token=layer.token, position=layer.position)
        return shape, 0, 0, 0, receptive, jump, ""
    raise SpecError(f"layer kind {kind!r} cannot be planned", token=layer.token, position=layer.position)


def _stored_elements(row: Row, input_shape, shortcut: str) -> int:
    """Elements a layer keeps for the backward pass: the tensors ``cnnkit.build`` makes for it.

    Its output and its activation's output; the zero-padded input of a padding Keras's "same"
    cannot express (a ``ZeroPadding2D`` layer); for a residual block its main-path tensors (seven, five
    without an activation)
    and the shortcut's (projection: 1x1 conv and BN; zero_pad: subsampled, then padded input).
    """
    layer, elements = row.layer, math.prod(row.output_shape)
    if layer.kind == "residual":
        stride, (height, width, channels) = layer.stride, input_shape
        linear = layer.activation in (None, "linear")
        stored = (5 if linear else 7) * elements  # conv, BN, activation, conv, BN, add, activation
        if shortcut == "zero_pad" and layer.size >= channels:
            subsampled = math.ceil(height / stride[0]) * math.ceil(width / stride[1]) * channels
            return stored + (subsampled if stride != (1, 1) else 0) + (elements if layer.size > channels else 0)
        return stored + (2 * elements if stride != (1, 1) or channels != layer.size else 0)
    has_activation = layer.activation not in (None, "linear")
    stored = elements * (2 if has_activation else 1)
    padding = layer.padding or 0
    if layer.kind in ("conv", "maxpool", "avgpool") and isinstance(padding, int) and padding:
        same = layer.kind == "conv" and layer.stride == (1, 1) and layer.kernel == (2 * padding + 1,) * 2
        if not same:
            height, width, channels = input_shape
            stored += (height + 2 * padding) * (width + 2 * padding) * channels
    return stored


def _shape_text(shape) -> str:
    return "x".join(str(size) for size in shape)
