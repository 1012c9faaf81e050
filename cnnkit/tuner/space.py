"""Search spaces: a notation template with named hyperparameters, plus the training knobs.

A search space only declares hyperparameters and names what they build: an ``arch`` template in
cnnkit's notation, filled in and handed to ``cnnkit.build``. It never trains and never picks an
algorithm (that is a string given to ``cnnkit.tuner.search``). In YAML (the ``space:`` key of a
file in ``tuner/``)::

    space:
      name: mnist_conv
      arch: "{f1}C{k1}-MP2-{f2}C{k2}-MP2-FC{units}-D{dropout}"
      hyperparameters:
        f1: [16, 20, 32]                           # a list: one of these values
        k1: [3, 5, 7]
        f2: {min: 32, max: 64, step: 16}           # a range: integers when min, max (and step) are
        k2: [3, 5]
        units: [128, 256]
        dropout: {min: 0.0, max: 0.5, step: 0.25}  # floats otherwise
        learning_rate: {min: 1.0e-4, max: 1.0e-2, sampling: log}
        batch_norm: [false, true]
        augment: [none, shift]
        optimizer: adam                            # one value: fixed (recorded, not searched)

Every name in ``{braces}`` of the template must be declared; every other declared name must be a
knob from ``KNOBS``: build options (``batch_norm``, ``activation``, ...), training settings
(``learning_rate``, ``batch_size``, ``optimizer``, ``augment``, ...) and the fine-tuning knobs
(``unfreeze_depth``, ``lr_multiplier``), which belong to spaces that name a ``backbone`` instead
of an ``arch``. A range is ``{min, max}`` with an optional ``step`` and ``sampling`` ("linear",
"log", "reverse_log"); the declarations become Keras Tuner ``Choice``, ``Int``, ``Float`` and
``Fixed`` hyperparameters, so every Keras Tuner algorithm can search them.

A combination whose network does not fit the input (a kernel larger than the feature map) is
found by the planner before anything is built: :meth:`SearchSpace.invalid_reason` returns the
planner's message, and the search records such a trial as invalid without training it.

Example:
    >>> space = SearchSpace("{f}C{k}-MP2-FC64", {"f": [8, 16], "k": [3, 5], "learning_rate": 0.01})
    >>> space.placeholders
    ('f', 'k')
    >>> space.arch_for({"f": 16, "k": 5})
    '16C5-MP2-FC64'
    >>> space.invalid_reason({"f": 8, "k": 5}, (4, 4, 1), 10) is not None
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import random
import string

import keras_tuner as kt

from cnnkit.planner import plan
from cnnkit.spec import SpecError

# knob -> (group, what it sets). "model": a cnnkit.build option (model_options of the train
# recipe); "train": an argument of the train recipe; "finetune": a finetune-recipe argument.
KNOBS = {
    "activation": ("model", "activation of every layer without its own (relu, tanh, ...)"),
    "padding": ("model", "default padding of convolutions: valid or same"),
    "batch_norm": ("model", "batch normalisation after every convolution: true/false"),
    "initializer": ("model", "weight initialiser (auto, he_normal, glorot_uniform, theano, ...)"),
    "l2": ("model", "L2 penalty on kernels"),
    "max_norm": ("model", "max-norm constraint on kernels"),
    "learning_rate": ("train", "peak learning rate (constant during a trial)"),
    "optimizer": ("train", "sgd, momentum, nesterov, adam, adamw or rmsprop"),
    "momentum": ("train", "momentum of momentum, nesterov and rmsprop"),
    "weight_decay": ("train", "decoupled weight decay"),
    "batch_size": ("train", "images per step"),
    "augment": ("train", "augmentation preset or op name (cnnkit.recipes.augment), none for none"),
    "preprocess": ("train", "input preprocessing (scale, standardize, ...; cnnkit.recipes.preprocess)"),
    "unfreeze_depth": ("finetune", "how many backbone layer groups to unfreeze"),
    "lr_multiplier": ("finetune", "learning-rate multiplier of the unfrozen backbone layers"),
}
"""The training knobs a space may declare besides its template's placeholders."""

_RANGE_KEYS = ("min", "max", "step", "sampling")
_SAMPLINGS = ("linear", "log", "reverse_log")
_BOOLEAN_KNOBS = ("batch_norm",)
_INTEGER_KNOBS = {"batch_size": 1, "unfreeze_depth": 0}  # knob -> smallest value
_POSITIVE_KNOBS = ("learning_rate", "lr_multiplier", "max_norm")
_NON_NEGATIVE_KNOBS = ("momentum", "weight_decay", "l2")
_PLAN_OPTIONS = ("activation", "padding", "batch_norm")


@dataclasses.dataclass
class SearchSpace:
    """A notation template with named hyperparameters and training knobs (see the module docstring).

    Args:
        arch: the notation template, e.g. ``"{f1}C{k1}-MP2-FC{units}"``; ``None`` for a
            fine-tuning space.
        hyperparameters: name -> declaration: a list (one of these values; ``None`` in a list of
            strings means the string ``"none"``), a mapping ``{min, max, step?, sampling?}`` (a
            range), or a single value (fixed).
        backbone: the pretrained backbone a fine-tuning space searches over (instead of ``arch``).
        name: names the search (its default directory is ``runs/tune-<name>``).

    Raises:
        ValueError: a template placeholder that is not declared, a declared name that is neither
            a placeholder nor a knob, a malformed declaration, or a knob value out of range; the
            message names the hyperparameter.

    Example:
        >>> space = SearchSpace("{f}C3-MP2-FC{units}", {"f": [16, 32], "units": {"min": 32, "max": 128, "step": 32}})
        >>> sorted(space.hyperparameters)
        ['f', 'units']
    """

    arch: str | None = None
    hyperparameters: dict = dataclasses.field(default_factory=dict)
    backbone: str | None = None
    name: str = "search"

    def __post_init__(self):
        if (self.arch is None) == (self.backbone is None):
            raise ValueError("a search space names exactly one of arch (a notation template) or backbone "
                             f"(fine-tuning). Received: arch={self.arch!r}, backbone={self.backbone!r}")
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise ValueError(f"name must be a non-empty word of letters, digits, '_', '-' or '.'. Received: name={self.name!r}")
        if not isinstance(self.hyperparameters, dict):
            raise ValueError("hyperparameters must map names to declarations. "
                             f"Received: hyperparameters={self.hyperparameters!r}")
        if self.arch is not None and not isinstance(self.arch, str):
            raise ValueError(f"arch must be a notation template string. Received: arch={self.arch!r}")
        placeholders = self.placeholders
        missing = [name for name in placeholders if name not in self.hyperparameters]
        if missing:
            raise ValueError(f"the template {self.arch!r} uses {{{missing[0]}}} but hyperparameters does not declare "
                             f"it. Received: hyperparameters={sorted(self.hyperparameters)}")
        for name in self.hyperparameters:
            if name in placeholders and name in KNOBS:
                raise ValueError(f"{{{name}}} in the template is a knob's name; rename the placeholder")
            if name in placeholders:
                continue
            if name not in KNOBS:
                close = difflib.get_close_matches(name, [*KNOBS, *placeholders], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"hyperparameter {name!r} is neither a placeholder of the template nor a knob{hint}; "
                                 f"knobs: {', '.join(KNOBS)}")
            group = KNOBS[name][0]
            if (group == "finetune" and self.kind != "finetune") or (group == "model" and self.kind != "train"):
                needs = "a backbone:" if group == "finetune" else "an arch:"
                raise ValueError(f"knob {name!r} applies to spaces with {needs} this space has "
                                 f"{'a backbone' if self.backbone else 'an arch'}")
        self.declare(kt.HyperParameters())  # Keras Tuner checks each declaration
        for name in self.hyperparameters:
            if name in KNOBS:
                _check_knob(name, self.hyperparameters[name])

    @classmethod
    def coerce(cls, space) -> SearchSpace:
        """A ``SearchSpace`` from itself or from a mapping with ``arch``/``backbone``, ``hyperparameters``, ``name``.

        Example:
            >>> SearchSpace.coerce({"arch": "{f}C3", "hyperparameters": {"f": [4, 8]}}).placeholders
            ('f',)
        """
        if isinstance(space, cls):
            return space
        if not isinstance(space, dict):
            raise ValueError("space must be a SearchSpace or a mapping with 'arch' (or 'backbone'), "
                             f"'hyperparameters' and optionally 'name'. Received: space={space!r}")
        allowed = ("arch", "backbone", "hyperparameters", "name")
        unknown = [key for key in space if key not in allowed]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in the search space; valid keys: {', '.join(allowed)}")
        return cls(**space)

    def to_dict(self) -> dict:
        """Plain data that :meth:`coerce` turns back into this space.

        Example:
            >>> SearchSpace("{f}C3", {"f": [4, 8]}, name="tiny").to_dict()
            {'arch': '{f}C3', 'hyperparameters': {'f': [4, 8]}, 'name': 'tiny'}
        """
        key = "arch" if self.arch is not None else "backbone"
        return {key: getattr(self, key), "hyperparameters": dict(self.hyperparameters), "name": self.name}

    @property
    def kind(self) -> str:
        """``"train"`` (an arch template) or ``"finetune"`` (a backbone)."""
        return "train" if self.arch is not None else "finetune"

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The names in braces in the template, in order of first use."""
        if self.arch is None:
            return ()
        names = []
        try:
            fields = list(string.Formatter().parse(self.arch))
        except ValueError as error:
            raise ValueError(f"arch template {self.arch!r}: {error}") from None
        for _, name, format_spec, conversion in fields:
            if name is None:
                continue
            if not name.isidentifier() or format_spec or conversion:
                raise ValueError(f"arch template placeholders are plain names like {{f1}}. Received: {{{name}}} in "
                                 f"arch={self.arch!r}")
            if name not in names:
                names.append(name)
        return tuple(names)

    def declare(self, hp) -> None:
        """Declare every hyperparameter on a ``keras_tuner.HyperParameters``.

        Example:
            >>> hp = kt.HyperParameters()
            >>> SearchSpace("{f}C3", {"f": [4, 8]}).declare(hp)
            >>> hp.values
            {'f': 4}
        """
        for name, declaration in self.hyperparameters.items():
            try:
                _declare(hp, name, declaration)
            except (TypeError, ValueError) as error:
                raise ValueError(f"hyperparameter {name!r}: {error}. Received: {name}={declaration!r}") from None

    def values(self, tuner_values: dict) -> dict:
        """This space's values out of a trial's Keras Tuner values (its ``tuner/...`` entries dropped).

        Floats are rounded to 10 significant digits (a stepped range gives ``0.30000000000000004``).

        Example:
            >>> SearchSpace("{d}", {"d": [0.5]}).values({"d": 0.30000000000000004, "tuner/epochs": 2})
            {'d': 0.3}
        """
        return {name: _tidy(tuner_values[name]) for name in self.hyperparameters if name in tuner_values}

    def arch_for(self, values: dict) -> str:
        """The notation string of one combination of values.

        Example:
            >>> SearchSpace("FC{units}-D{dropout}", {"units": [64], "dropout": [0.25]}).arch_for({"units": 64, "dropout": 0.25})
            'FC64-D0.25'
        """
        return self.arch.format(**{name: _format(values[name]) for name in self.placeholders})

    def model_options(self, values: dict) -> dict:
        """The ``cnnkit.build`` options (``model`` knobs) among ``values``.

        Example:
            >>> SearchSpace("{f}C3", {"f": [4], "batch_norm": [True, False]}).model_options({"f": 4, "batch_norm": True})
            {'batch_norm': True}
        """
        return {name: value for name, value in values.items() if KNOBS.get(name, ("",))[0] == "model"}

    def invalid_reason(self, values: dict, input_shape, num_classes) -> str | None:
        """The planner's reason why a combination's network does not fit the input, or ``None``.

        Example:
            >>> SearchSpace("{f}C{k}", {"f": [4], "k": [3, 9]}).invalid_reason({"f": 4, "k": 9}, (8, 8, 1), 2)[:30]
            'token 1 (4C9): the kernel 9x9 '
        """
        arch = self.arch_for(values)
        options = {name: values[name] for name in _PLAN_OPTIONS if name in values}
        try:
            plan(arch, tuple(input_shape), num_classes, **options)
        except SpecError as error:
            return f"{arch}: {error}"
        return None

    def check_fits(self, input_shape, num_classes, *, samples: int = 200, seed: int = 0) -> None:
        """Raise unless some combination fits the input: the default one or one of ``samples`` random ones.

        A space none of whose networks fits would otherwise turn every trial into an invalid one.

        Raises:
            ValueError: no combination tried fits; the message gives the planner's first reason.

        Example:
            >>> SearchSpace("{f}C{k}", {"f": [4], "k": [9, 11]}).check_fits((8, 8, 1), 2)
            Traceback (most recent call last):
            ...
            ValueError: no network of search space 'search' fits input (8, 8, 1): ...
        """
        hp = kt.HyperParameters()
        self.declare(hp)
        first_reason, tried = None, set()
        candidates = [dict(hp.values)]
        rng = random.Random(seed)
        candidates += [{p.name: p.random_sample(rng.randrange(2**31)) for p in hp.space} for _ in range(samples)]
        for tuner_values in candidates:
            values = self.values(tuner_values)
            key = (self.arch_for(values), tuple(values.get(name) for name in _PLAN_OPTIONS))
            if key in tried:
                continue
            tried.add(key)
            reason = self.invalid_reason(values, input_shape, num_classes)
            if reason is None:
                return
            first_reason = first_reason or reason
        raise ValueError(f"no network of search space {self.name!r} fits input {tuple(input_shape)}: tried "
                         f"{len(tried)} combinations; the first: {first_reason}")


def _declare(hp, name, declaration):
    if isinstance(declaration, list):
        if not declaration:
            raise ValueError("a list of choices must not be empty")
        values = list(declaration)
        if None in values and all(isinstance(value, str) for value in values if value is not None):
            values = ["none" if value is None else value for value in values]
        numbers = [value for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if len(numbers) == len(values) and any(isinstance(value, float) for value in values):
            values = [float(value) for value in values]
        if len(set(values)) != len(values):
            raise ValueError("the choices repeat a value")
        if all(isinstance(value, bool) for value in values) and len(values) == 2:
            hp.Boolean(name, default=values[0])  # Keras Tuner's Choice would turn booleans into ints
        elif all(isinstance(value, bool) for value in values):
            hp.Fixed(name, values[0])
        else:
            hp.Choice(name, values)
    elif isinstance(declaration, dict):
        unknown = [key for key in declaration if key not in _RANGE_KEYS]
        if unknown or "min" not in declaration or "max" not in declaration:
            raise ValueError(f"a range is a mapping with min and max, and optionally step and sampling "
                             f"({', '.join(_SAMPLINGS)})")
        low, high, step = declaration["min"], declaration["max"], declaration.get("step")
        sampling = declaration.get("sampling", "linear")
        if sampling not in _SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(_SAMPLINGS)}")
        numbers = [value for value in (low, high, step) if value is not None]
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in numbers):
            raise ValueError("min, max and step must be numbers")
        if not low < high:
            raise ValueError("min must be below max")
        if sampling != "linear" and low <= 0:
            raise ValueError(f"{sampling} sampling needs min > 0")
        if all(isinstance(value, int) for value in numbers):
            hp.Int(name, low, high, step=step, sampling=sampling)
        else:
            hp.Float(name, float(low), float(high), step=None if step is None else float(step), sampling=sampling)
    else:
        if declaration is None:
            declaration = "none"
        if not isinstance(declaration, (bool, int, float, str)):
            raise ValueError("a declaration is a list (choices), a mapping {min, max, ...} (a range) or one value")
        hp.Fixed(name, declaration)


def _candidates(declaration) -> list:
    """The values a declaration can take, or a range's ends."""
    if isinstance(declaration, list):
        return list(declaration)
    if isinstance(declaration, dict):
        return [declaration["min"], declaration["max"]]
    return [declaration]


def _check_knob(name, declaration):
    for value in _candidates(declaration):
        if name in _BOOLEAN_KNOBS:
            ok, need = isinstance(value, bool), "true or false"
        elif name in _INTEGER_KNOBS:
            low = _INTEGER_KNOBS[name]
            ok, need = isinstance(value, int) and not isinstance(value, bool) and value >= low, f"an integer >= {low}"
        elif name in _POSITIVE_KNOBS:
            ok, need = _is_number(value) and value > 0, "a number > 0"
        elif name in _NON_NEGATIVE_KNOBS:
            ok, need = _is_number(value) and value >= 0, "a number >= 0"
        else:
            ok, need = value is None or isinstance(value, str), "a name"
        if not ok:
            raise ValueError(f"knob {name!r} takes {need}. Received: {name}={declaration!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tidy(value):
    return float(f"{value:.10g}") if isinstance(value, float) else value


def _format(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


__all__ = ["KNOBS", "SearchSpace"]
