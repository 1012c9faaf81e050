"""Registered networks, looked up by string.

A registered network is a function returning an :class:`Architecture`: a notation string plus
the build options it needs (activation, padding, initialiser). ``cnnkit.build`` and
``cnnkit.plan`` accept the name wherever they accept notation, so every registered network can
be planned, built, searched and exported the same way.

Example:
    >>> from cnnkit.models import list_models, describe
    >>> "lenet" in list_models()
    True
    >>> describe("lenet")
    '20C5-MP2-50C5-MP2-FC500 (activation=tanh, initializer=theano): LeNet of the deeplearning.net Theano tutorial'
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re

from cnnkit.spec import SpecError, format_spec, parse

_REGISTRY = {}
_BUILTIN_MODULES = ("cnnkit.models.classic", "cnnkit.models.resnet")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A network as data: its notation, default build options, and where it comes from."""

    spec: str
    options: dict = dataclasses.field(default_factory=dict)
    reference: str = ""


def register_model(fn):
    """Register ``fn`` (no arguments, returns an :class:`Architecture`) under its own name.

    Names are case-insensitive: ``def TinyNet()`` is listed and looked up as ``"tinynet"``, and a
    second model whose name differs only in case is refused, as is a name that is notation
    (``def fc64()`` would hide the layer ``FC64``).

    Example:
        >>> @register_model
        ... def tiny_net():
        ...     return Architecture("8C3-MP2", reference="a doctest")
        >>> resolve_arch("tiny_net", {})[0]
        '8C3-MP2'
    """
    name = fn.__name__.lower()
    try:
        notation = format_spec(parse(name))
    except SpecError:
        pass
    else:
        raise ValueError(f"cannot register a model named {name!r}: it is also the notation {notation!r}, which the "
                         "model would hide from cnnkit.plan and cnnkit.build; choose another name")
    registered = _REGISTRY.get(name)
    if registered is not None and registered is not fn:
        raise ValueError(f"a model named {name!r} is already registered (as {registered.__name__!r}; names ignore case)")
    _REGISTRY[name] = fn
    return fn


def _registry():
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return _REGISTRY


def list_models() -> list[str]:
    """Names of the registered networks (lower case), sorted.

    Example:
        >>> list_models()[:2]
        ['alexnet', 'alexnet_small']
    """
    return sorted(_registry())


def get_architecture(name: str) -> Architecture:
    """The :class:`Architecture` registered as ``name`` (any case); an unknown name lists close matches.

    Raises:
        ValueError: an unknown name.
        TypeError: the registered function returned something other than an :class:`Architecture`.
    """
    registry = _registry()
    if name.lower() not in registry:
        raise ValueError(_unknown_model_message(name))
    fn = registry[name.lower()]
    arch = fn()
    if not isinstance(arch, Architecture):
        raise TypeError(f"model {name.lower()!r} ({fn.__module__}.{fn.__qualname__}) must return an Architecture. "
                        f"Received: {arch!r}")
    return arch


def _unknown_model_message(name: str) -> str:
    registry = _registry()
    close = difflib.get_close_matches(name.lower().replace("-", "_"), registry, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown model {name!r}; {hint}registered: {', '.join(sorted(registry))}"


def describe(name: str) -> str:
    """One line: the notation, the options it sets, and the reference."""
    arch = get_architecture(name)
    options = ", ".join(f"{key}={value}" for key, value in arch.options.items())
    return f"{arch.spec}" + (f" ({options})" if options else "") + f": {arch.reference}"


def resolve_arch(arch: str, options: dict) -> tuple[str, dict]:
    """Turn a registered name or a notation string into ``(notation, full build options)``.

    Options the caller gives override the network's own, which override ``DEFAULT_OPTIONS``.
    """
    from cnnkit.planner import DEFAULT_OPTIONS

    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown build option {unknown[0]!r}; valid options: {', '.join(DEFAULT_OPTIONS)}")
    if not isinstance(arch, str):
        raise ValueError(f"arch must be a notation string or a registered model name. Received: arch={arch!r}")
    if arch.lower() in _registry():
        registered = get_architecture(arch)
        return registered.spec, {**DEFAULT_OPTIONS, **registered.options, **options}
    try:
        parse(arch)
    except SpecError as error:
        name_like = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", arch.strip())
        close = difflib.get_close_matches(arch.lower().replace("-", "_"), _registry(), n=1, cutoff=0.75)
        if name_like and (close or "-" not in arch):
            either = SpecError(f"{_unknown_model_message(arch)}; as notation, {error}")
            either.token, either.position = error.token, error.position
            raise either from None
        raise
    return arch, {**DEFAULT_OPTIONS, **options}
