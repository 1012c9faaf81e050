"""The layer notation of the classic papers: parse ``"64C3-MP2-FC256"`` into layer specs and back.

Tokens are joined by ``-`` (``--`` is accepted too). Letters are case-insensitive.

=====================  =======================================================================
Token                  Meaning
=====================  =======================================================================
``64C3``               convolution, 64 filters of 3x3 (``64C3x5`` for 3x5), stride 1
``96C11s4p0``          ... with stride 4 and zero-padding 0 (``psame`` for Keras "same"); stride
                       before padding; ``s2x1`` for a stride that differs per axis
``32LC3``              locally connected 3x3 (no weight sharing), 32 filters; ``s`` for stride
``MP2`` / ``MP3s2``    max-pooling 2x2 (stride = size) / 3x3 with stride 2 (overlapping);
                       ``MP2x4`` pools 2x4 with stride 2x4 (the stride is the window, per axis)
``AP2``                average pooling, same options as ``MP``
``GAP`` / ``GMP``      global average / global max pooling
``FC256``              fully connected, 256 units (a flatten is inserted where needed)
``D0.5``               dropout with rate 0.5
``BN``                 batch normalisation; the previous layer's activation moves after it
``LRN`` / ``LRN5``     AlexNet's local response normalisation across 5 channels
``R64`` / ``R128s2``   residual basic block (two 3x3 convolutions + BN, shortcut), stride 2
``...:tanh``           per-token activation override on C, LC, FC, R tokens
=====================  =======================================================================

Default padding is ``valid`` (P = 0), as in the papers' notation (``20C5`` takes 28x28 to 24x24);
``cnnkit.build(..., padding="same")`` changes the default for tokens without ``p``.

Example:
    >>> [layer.kind for layer in parse("20C5-MP2-50C5:tanh-MP2-FC500-D0.5")]
    ['conv', 'maxpool', 'conv', 'maxpool', 'dense', 'dropout']
    >>> format_spec(parse("96c11S4P0--mp3s2"))
    '96C11s4p0-MP3s2'
"""

from __future__ import annotations

import dataclasses
import decimal
import re

ACTIVATIONS = (
    "relu", "tanh", "sigmoid", "leaky_relu", "prelu", "elu", "selu", "gelu", "swish", "linear", "softmax",
)

_STRIDE = r"(?:s(?P<s>\d+)(?:x(?P<s2>\d+))?)?"
_WINDOW = rf"(?P<k>\d+)(?:x(?P<k2>\d+))?{_STRIDE}(?:p(?P<p>\d+|same))?"
_PATTERNS = [
    ("local", re.compile(rf"(?P<n>\d+)LC{_WINDOW}", re.I)),
    ("conv", re.compile(rf"(?P<n>\d+)C{_WINDOW}", re.I)),
    ("maxpool", re.compile(rf"MP{_WINDOW}", re.I)),
    ("avgpool", re.compile(rf"AP{_WINDOW}", re.I)),
    ("gap", re.compile(r"GAP", re.I)),
    ("gmp", re.compile(r"GMP", re.I)),
    ("dense", re.compile(r"FC(?P<n>\d+)", re.I)),
    ("dropout", re.compile(r"D(?P<rate>\d*\.?\d+)", re.I)),
    ("bn", re.compile(r"BN", re.I)),
    ("lrn", re.compile(r"LRN(?P<n>\d+)?", re.I)),
    ("residual", re.compile(rf"R(?P<n>\d+){_STRIDE}", re.I)),
]
_TAKES_ACTIVATION = {"conv", "local", "dense", "residual"}
_PREFIX = {"maxpool": "MP", "avgpool": "AP", "gap": "GAP", "gmp": "GMP", "bn": "BN", "lrn": "LRN"}


class SpecError(ValueError):
    """A notation string, or a network it describes, is invalid.

    Attributes:
        token: the offending token (``None`` when the problem is not one token's).
        position: 1-based position of the token in the spec (``None`` likewise).
    """

    def __init__(self, message, *, token=None, position=None):
        if token is not None:
            message = f"token {position} {token!r}: {message}"
        super().__init__(message)
        self.token = token
        self.position = position


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parsed token. Fields that do not apply to a kind are ``None``.

    ``size`` is the filter count (C, LC, R), unit count (FC) or LRN depth; ``kernel`` and
    ``stride`` are (height, width) pairs (an int given to the constructor becomes a pair);
    a pool's default stride is its window, per axis, and that of C, LC and R is 1; ``padding`` is
    an int, ``"same"``, or ``None`` for the build default; ``activation`` is ``None`` for the build default.

    Example:
        >>> str(Layer("maxpool", kernel=3)), str(Layer("conv", size=64, kernel=3, stride=2))
        ('MP3', '64C3s2')
    """

    kind: str
    size: int | None = None
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    padding: int | str | None = None
    rate: float | None = None
    activation: str | None = None
    token: str = ""
    position: int = 0

    def __post_init__(self):
        def pair(value):
            return (value, value) if isinstance(value, int) else tuple(value)

        if self.kernel is not None:
            object.__setattr__(self, "kernel", pair(self.kernel))
        if self.stride is not None:
            object.__setattr__(self, "stride", pair(self.stride))
        elif self.kind in ("maxpool", "avgpool") and self.kernel is not None:
            object.__setattr__(self, "stride", self.kernel)
        elif self.kind in ("conv", "local", "residual"):
            object.__setattr__(self, "stride", (1, 1))

    def __str__(self):
        return format_layer(self)


def parse(spec: str) -> list[Layer]:
    """Parse a notation string into a list of :class:`Layer`.

    Raises:
        SpecError: naming the first bad token and its 1-based position.

    Example:
        >>> parse("MP3s2")[0]
        Layer(kind='maxpool', size=None, kernel=(3, 3), stride=(2, 2), padding=None, rate=None, activation=None, token='MP3s2', position=1)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"a spec must be a non-empty string like '20C5-MP2-FC256'. Received: spec={spec!r}")
    tokens = re.split(r"--?", spec.strip())
    return [_parse_token(token.strip(), position) for position, token in enumerate(tokens, start=1)]


def _parse_token(token: str, position: int) -> Layer:
    if not token:
        raise SpecError("empty token: layers are joined by '-' or '--', with nothing before the first or after the last",
                        token=token, position=position)
    body, colon, activation = token.partition(":")
    if colon and not activation:
        raise SpecError("':' must be followed by an activation, e.g. 64C3:tanh", token=token, position=position)
    if activation:
        activation = activation.lower()
        if activation not in ACTIVATIONS:
            raise SpecError(
                f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}", token=token, position=position
            )
    for kind, pattern in _PATTERNS:  # noqa: B007  (the for/else below uses kind)
        match = pattern.fullmatch(body)
        if match:
            break
    else:
        swapped = re.sub(r"(p(?:\d+|same))(s\d+(?:x\d+)?)$", r"\2\1", body, flags=re.I)
        if swapped != body and any(pattern.fullmatch(swapped) for _, pattern in _PATTERNS):
            raise SpecError(f"the stride comes before the padding: write {swapped + colon + activation!r}",
                            token=token, position=position)
        raise SpecError(
            "not a layer; expected e.g. 64C3, 96C11s4p0, 32LC3, MP2, MP3s2, AP2, GAP, GMP, FC256, D0.5, BN, LRN, R64s2",
            token=token,
            position=position,
        )
    if activation and kind not in _TAKES_ACTIVATION:
        raise SpecError("an activation override applies only to C, LC, FC and R tokens", token=token, position=position)
    groups = {key: value for key, value in match.groupdict().items() if value is not None}
    fields = {"kind": kind, "token": token, "position": position, "activation": activation or None}
    if "n" in groups:
        fields["size"] = int(groups["n"])
        if fields["size"] < 1:
            raise SpecError("a layer needs at least one filter or unit", token=token, position=position)
    if "k" in groups:
        fields["kernel"] = (int(groups["k"]), int(groups.get("k2", groups["k"])))
        if min(fields["kernel"]) < 1:
            raise SpecError("a window must be at least 1x1", token=token, position=position)
    if "s" in groups:
        fields["stride"] = (int(groups["s"]), int(groups.get("s2", groups["s"])))
    elif kind in ("maxpool", "avgpool"):
        fields["stride"] = fields["kernel"]  # stride = window, per axis
    elif kind in ("conv", "local", "residual"):
        fields["stride"] = (1, 1)
    if "stride" in fields and min(fields["stride"]) == 0:
        raise SpecError("a stride must be at least 1", token=token, position=position)
    if "p" in groups:
        fields["padding"] = "same" if groups["p"].lower() == "same" else int(groups["p"])
    if kind == "dropout":
        fields["rate"] = float(groups["rate"])
        if not 0.0 <= fields["rate"] < 1.0:
            raise SpecError("a dropout rate must be in [0, 1)", token=token, position=position)
    if kind == "lrn":
        fields["size"] = int(groups.get("n", 5))
    return Layer(**fields)


def format_layer(layer: Layer) -> str:
    """The canonical token for one layer.

    Example:
        >>> format_layer(Layer("conv", size=64, kernel=(3, 3), stride=1, activation="tanh"))
        '64C3:tanh'
    """
    kind = layer.kind
    if kind in ("conv", "local", "maxpool", "avgpool"):
        head = {"conv": f"{layer.size}C", "local": f"{layer.size}LC"}.get(kind, _PREFIX.get(kind, ""))
        height, width = layer.kernel
        text = f"{head}{height}" + (f"x{width}" if width != height else "")
        if layer.stride != (layer.kernel if kind in ("maxpool", "avgpool") else (1, 1)):
            text += _stride_text(layer.stride)
        if layer.padding is not None:
            text += f"p{layer.padding}"
    elif kind == "dense":
        text = f"FC{layer.size}"
    elif kind == "dropout":
        text = f"D{decimal.Decimal(repr(float(layer.rate))).normalize():f}"  # exact and never in exponent form
    elif kind == "lrn":
        text = "LRN" if layer.size in (None, 5) else f"LRN{layer.size}"
    elif kind == "residual":
        text = f"R{layer.size}" + (_stride_text(layer.stride) if layer.stride != (1, 1) else "")
    elif kind in _PREFIX:
        text = _PREFIX[kind]
    else:
        raise SpecError(f"layer kind {kind!r} has no token")
    return text + (f":{layer.activation}" if layer.activation else "")


def _stride_text(stride) -> str:
    height, width = stride
    return f"s{height}" + (f"x{width}" if width != height else "")


def format_spec(layers) -> str:
    """Join layers into a canonical notation string (inverse of :func:`parse`).

    Example:
        >>> format_spec(parse("20c5--mp2--fc500"))
        '20C5-MP2-FC500'
    """
    return "-".join(format_layer(layer) for layer in layers)
