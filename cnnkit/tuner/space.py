"""Search spaces: a notation template (or a backbone to fine-tune) with named hyperparameters and knobs.

A search space only declares hyperparameters and names what they build: an ``arch`` template in
cnnkit's notation, filled in and handed to ``cnnkit.build``, or a ``backbone`` that
``cnnkit.recipes.finetune`` fine-tunes. It never trains and never picks an algorithm (that is a
string given to ``cnnkit.tuner.search``). In YAML (the ``space:`` key of a file in ``tuner/``)::

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
(``unfreeze_depth``, ``lr_multiplier``, ``head_epochs``). A range is ``{min, max}`` with an optional ``step`` and ``sampling`` ("linear",
"log", "reverse_log"); the declarations become Keras Tuner ``Choice``, ``Int``, ``Float`` and
``Fixed`` hyperparameters, so every Keras Tuner algorithm can search them. Under log sampling
``step`` is a multiplier, as in Keras Tuner: ``{min: 16, max: 128, step: 2, sampling: log}`` is
16, 32, 64, 128; a step <= 1, or one that leaves ``min`` the only value, is refused. A grid
needs a ``step`` in every range but a linear integer one (:meth:`SearchSpace.check_grid`).

A combination whose network does not fit the input (a kernel larger than the feature map) is
found by the planner before anything is built: :meth:`SearchSpace.invalid_reason` returns the
planner's message, and the search records such a trial as invalid without training it. A listed
(or fixed) value that makes the template bad notation, a typo such as ``4C3-MPP2``, is refused when
the space is made, naming the hyperparameter and the value: notation does not depend on the input.

A fine-tuning space names a ``backbone`` (a ``keras.applications`` name with its ``weights``, a
``.keras`` file or a cnnkit run directory) instead of an ``arch``; build knobs do not apply, and
neither do ``momentum`` and ``preprocess`` (``finetune`` takes neither: the backbone brings its
own preprocessing)::

    space:
      name: finetune_digits
      backbone: runs/quickstart/pretrain                  # or mobilenet_v2 with weights: imagenet
      hyperparameters:
        unfreeze_depth: [0, 1, 2, 3]                      # top groups unfrozen after the head epochs
        lr_multiplier: {min: 0.01, max: 1.0, sampling: log}
        learning_rate: {min: 3.0e-4, max: 3.0e-3, sampling: log}
        head_epochs: 1                                    # epochs on the frozen backbone first

Each trial is two ``finetune`` stages (:meth:`SearchSpace.stages_for`): the head alone on the
frozen backbone for the trial's first ``head_epochs`` epochs, then the top ``unfreeze_depth``
groups with it for the rest, the groups at ``learning_rate * lr_multiplier``.

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
import decimal
import difflib
import random
import string

import keras_tuner as kt
import numpy as np
from keras_tuner.engine.hyperparameters import Choice, Fixed

from cnnkit.planner import plan
from cnnkit.recipes.finetune import check_backbone_weights
from cnnkit.recipes.optimization import is_finite_number
from cnnkit.spec import SpecError, parse

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
    "momentum": ("train", "momentum of momentum, nesterov and rmsprop, in [0, 1]"),
    "weight_decay": ("train", "decoupled weight decay"),
    "label_smoothing": ("train", "smooth the training labels towards uniform by this much (0.1 is usual), in [0, 1)"),
    "batch_size": ("train", "images per step"),
    "augment": ("train", "augmentation preset or op name (cnnkit.recipes.augment), none for none"),
    "preprocess": ("train", "input preprocessing (scale, standardize, ...; cnnkit.recipes.preprocess)"),
    "unfreeze_depth": ("finetune", "how many backbone layer groups to unfreeze (from the top) after the head epochs"),
    "lr_multiplier": ("finetune", "learning-rate multiplier of the unfrozen backbone layers"),
    "head_epochs": ("finetune", "epochs of each trial that train the head alone on the frozen backbone first"),
}
"""The training knobs a space may declare besides its template's placeholders."""

FINETUNE_DEFAULTS = {"unfreeze_depth": 1, "lr_multiplier": 0.1, "head_epochs": 1}
"""The fine-tuning knobs' values when a space leaves them out (fastai's ``fine_tune``: one frozen epoch)."""

_NOT_FOR_FINETUNE = ("momentum", "preprocess")  # train-recipe knobs cnnkit.recipes.finetune has no argument for

_RANGE_KEYS = ("min", "max", "step", "sampling")
_SAMPLINGS = ("linear", "log", "reverse_log")
_BOOLEAN_KNOBS = ("batch_norm",)
_INTEGER_KNOBS = {"batch_size": 1, "unfreeze_depth": 0, "head_epochs": 0}  # knob -> smallest value
_POSITIVE_KNOBS = ("learning_rate", "lr_multiplier", "max_norm")
_NON_NEGATIVE_KNOBS = ("weight_decay", "l2")
_FRACTION_KNOBS = ("label_smoothing",)  # in [0, 1)
_UNIT_KNOBS = ("momentum",)  # in [0, 1]
_PLAN_OPTIONS = ("activation", "padding", "batch_norm")


@dataclasses.dataclass
class SearchSpace:
    """A notation template with named hyperparameters and training knobs (see the module docstring).

    Args:
        arch: the notation template, e.g. ``"{f1}C{k1}-MP2-FC{units}"``; ``None`` for a
            fine-tuning space.
        hyperparameters: name -> declaration: a list (one of these values; ``None`` in a list of
            strings means the string ``"none"``), a mapping ``{min, max, step?, sampling?}`` (a
            range), or a single value (fixed). NumPy scalars and arrays in them (``np.geomspace(...)``)
            are taken as the plain Python values they hold.
        backbone: the pretrained backbone a fine-tuning space fine-tunes (instead of ``arch``):
            a ``keras.applications`` name (``cnnkit.models.list_backbones()``), a ``.keras``
            file or a cnnkit run directory, as for ``cnnkit.recipes.finetune``.
        name: names the search (its default directory is ``runs/tune-<name>``).
        weights: a fine-tuning space's ``keras.applications`` weights: "imagenet" (Keras
            downloads and caches them), a local weights file, or ``None`` (untrained).
        input_size: ``(height, width)`` the backbone sees, as for ``finetune``; default its own.

    Raises:
        ValueError: a template placeholder that is not declared, a declared name that is neither
            a placeholder nor a knob, a knob of the other kind of space, a malformed
            declaration, a listed or fixed value that makes the template bad notation, or a knob
            value out of range; the message names the hyperparameter.

    Example:
        >>> space = SearchSpace("{f}C3-MP2-FC{units}", {"f": [16, 32], "units": {"min": 32, "max": 128, "step": 32}})
        >>> sorted(space.hyperparameters)
        ['f', 'units']
    """

    arch: str | None = None
    hyperparameters: dict = dataclasses.field(default_factory=dict)
    backbone: str | None = None
    name: str = "search"
    weights: str | None = "imagenet"
    input_size: list | None = None

    def __post_init__(self):
        if (self.arch is None) == (self.backbone is None):
            raise ValueError("a search space names exactly one of arch (a notation template) or backbone "
                             f"(fine-tuning). Received: arch={self.arch!r}, backbone={self.backbone!r}")
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise ValueError(f"name must be a non-empty word of letters, digits, '_', '-' or '.'. Received: name={self.name!r}")
        if not isinstance(self.hyperparameters, dict):
            raise ValueError("hyperparameters must map names to declarations. "
                             f"Received: hyperparameters={self.hyperparameters!r}")
        self.hyperparameters = {name: _plain(declaration) for name, declaration in self.hyperparameters.items()}
        if self.arch is not None and not isinstance(self.arch, str):
            raise ValueError(f"arch must be a notation template string. Received: arch={self.arch!r}")
        self._check_backbone_fields()
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
            if name in _NOT_FOR_FINETUNE and self.kind == "finetune":
                raise ValueError(f"knob {name!r} does not apply to a fine-tuning space: cnnkit.recipes.finetune has "
                                 f"no {name} argument")
        self.declare(kt.HyperParameters())  # Keras Tuner checks each declaration
        for name in self.hyperparameters:
            if name in KNOBS:
                _check_knob(name, self.hyperparameters[name])
        self._check_notation()

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
        allowed = ("arch", "backbone", "hyperparameters", "name", "weights", "input_size")
        unknown = [key for key in space if key not in allowed]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in the search space; valid keys: {', '.join(allowed)}")
        return cls(**space)

    def to_dict(self) -> dict:
        """Plain data that :meth:`coerce` turns back into this space.

        Example:
            >>> SearchSpace("{f}C3", {"f": [4, 8]}, name="tiny").to_dict()
            {'arch': '{f}C3', 'hyperparameters': {'f': [4, 8]}, 'name': 'tiny'}
            >>> SearchSpace(backbone="runs/digits", hyperparameters={"unfreeze_depth": [1, 2]}).to_dict()["weights"]
            'imagenet'
        """
        if self.kind == "train":
            return {"arch": self.arch, "hyperparameters": dict(self.hyperparameters), "name": self.name}
        return {"backbone": self.backbone, "hyperparameters": dict(self.hyperparameters), "name": self.name,
                "weights": self.weights, "input_size": None if self.input_size is None else list(self.input_size)}

    def _check_backbone_fields(self):
        if self.kind == "train":
            if self.weights != "imagenet" or self.input_size is not None:
                raise ValueError("weights and input_size belong to fine-tuning spaces (with a backbone); this space has "
                                 f"an arch. Received: weights={self.weights!r}, input_size={self.input_size!r}")
            return
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError("backbone must be a keras.applications name, a .keras file or a run directory. "
                             f"Received: backbone={self.backbone!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ValueError(f"weights must be 'imagenet', a weights file or null. Received: weights={self.weights!r}")
        check_backbone_weights(self.backbone, self.weights)  # a saved backbone brings its own
        size = self.input_size
        if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
                isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)):
            raise ValueError(f"input_size must be [height, width] or null. Received: input_size={size!r}")

    def _check_notation(self):
        # Notation does not depend on the input: a value that breaks it is refused here, not tried as a misfit.
        if self.kind != "train":
            return
        hp = kt.HyperParameters()
        self.declare(hp)
        listed = {parameter.name: parameter.values if isinstance(parameter, Choice) else [parameter.value]
                  for parameter in hp.space if parameter.name in self.placeholders
                  and isinstance(parameter, (Choice, Fixed))}  # a range's numbers (and a boolean) are no typos
        for name, values in listed.items():  # each value with the other placeholders at their first values
            problems = [_notation_problem(self.arch_for(self.values({**hp.values, name: value}))) for value in values]
            if None in problems and any(problems):  # some values make notation, these do not: typos
                value, problem = next((value, problem) for value, problem in zip(values, problems) if problem)
                raise ValueError(f"hyperparameter {name!r}: the value {value!r} makes the template read {problem}. "
                                 f"Received: {name}={self.hyperparameters[name]!r}")
        problem = _notation_problem(self.arch_for(self.values(hp.values)))
        if problem and len(listed) == len(self.placeholders):  # no range's value involved: the values are wrong
            shown = ", ".join(f"{name}={hp.values[name]!r}" for name in self.placeholders)
            raise ValueError(f"arch template {self.arch!r}{f' with {shown}' if shown else ''} reads {problem}")

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

        Floats are rounded to 10 significant digits (a stepped range gives ``0.30000000000000004``),
        and an integer range's values are ints (Keras Tuner's grid gives ``32.0`` for a log range).

        Example:
            >>> SearchSpace("D{d}", {"d": [0.5]}).values({"d": 0.30000000000000004, "tuner/epochs": 2})
            {'d': 0.3}
            >>> SearchSpace("FC{u}", {"u": {"min": 16, "max": 64, "step": 2, "sampling": "log"}}).values({"u": 32.0})
            {'u': 32}
        """
        return {name: _tidy(tuner_values[name], self.hyperparameters[name])
                for name in self.hyperparameters if name in tuner_values}

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

        A fine-tuning space has no template to plan: always ``None``.

        Example:
            >>> SearchSpace("{f}C{k}", {"f": [4], "k": [3, 9]}).invalid_reason({"f": 4, "k": 9}, (8, 8, 1), 2)[:30]
            "4C9: token 1 '4C9': (W - F + 2"
        """
        if self.kind == "finetune":
            return None
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
        A fine-tuning space passes (its backbone is checked when ``search`` loads it).

        Raises:
            ValueError: no combination tried fits; the message gives the planner's first reason.

        Example:
            >>> SearchSpace("{f}C{k}", {"f": [4], "k": [9, 11]}).check_fits((8, 8, 1), 2)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: no network of search space 'search' fits input (8, 8, 1): ...
        """
        if self.kind == "finetune":
            return
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

    def check_grid(self) -> None:
        """Refuse a range a grid search cannot list: one without a ``step``, unless it is a linear range of integers.

        Keras Tuner's grid takes ten points of a step-less float (or log) range, which may not
        include ``max``; a linear integer range without a step is every integer from min to max.

        Raises:
            ValueError: such a range; the message names the hyperparameter.

        Example:
            >>> space = SearchSpace("{f}C3", {"f": {"min": 4, "max": 8}, "learning_rate": {"min": 1e-3, "max": 1e-2}})
            >>> space.check_grid()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: hyperparameter 'learning_rate': a grid search needs a step in this range (or a list of ...
        """
        for name, declaration in self.hyperparameters.items():
            if not isinstance(declaration, dict) or declaration.get("step") is not None:
                continue
            integers = isinstance(declaration["min"], int) and isinstance(declaration["max"], int)
            if integers and declaration.get("sampling", "linear") == "linear":
                continue
            raise ValueError(f"hyperparameter {name!r}: a grid search needs a step in this range (or a list of values "
                             "instead); without one Keras Tuner's grid tries ten points of it, which may not include "
                             f"max. Received: {name}={declaration!r}")

    def check_finetune(self, groups, epochs: int) -> None:
        """Refuse fine-tuning knob values this backbone or epoch count cannot honour, before any trial.

        Args:
            groups: the backbone's layer group names (``unfreeze_depth`` counts them from the top).
            epochs: the search's epochs per trial (Hyperband: the most).

        Raises:
            ValueError: an ``unfreeze_depth`` value (a listed one or a range's end) above the
                number of groups, or a ``head_epochs`` value that leaves no epoch to unfreeze
                in; the message names the knob, the value and the groups (or epochs).

        Example:
            >>> space = SearchSpace(backbone="runs/digits", hyperparameters={"unfreeze_depth": [1, 4]})
            >>> space.check_finetune(["conv1", "conv2", "fc1"], 3)
            Traceback (most recent call last):
            ...
            ValueError: knob unfreeze_depth: 4 is more than the 3 layer groups of backbone 'runs/digits' (conv1, conv2, fc1). Received: unfreeze_depth=[1, 4]
        """
        declared = {**FINETUNE_DEFAULTS, **self.hyperparameters}
        depths = _candidates(declared["unfreeze_depth"])
        for depth in depths:
            self._check_depth(depth, groups, received=declared["unfreeze_depth"])
        for head in _candidates(declared["head_epochs"]):
            if max(depths) > 0 and head >= epochs:
                raise ValueError(f"knob head_epochs: {head} leaves none of a trial's {epochs} epochs to unfreeze "
                                 f"groups in; give more epochs or fewer head_epochs. Received: "
                                 f"head_epochs={declared['head_epochs']!r}")

    def _check_depth(self, depth, groups, *, received):
        if depth > len(groups):
            raise ValueError(f"knob unfreeze_depth: {depth} is more than the {len(groups)} layer groups of backbone "
                             f"{self.backbone!r} ({', '.join(groups)}). Received: unfreeze_depth={received!r}")

    def stages_for(self, values: dict, groups, epochs: int, *, initial_epoch: int = 0) -> list[dict]:
        """The ``cnnkit.recipes.finetune`` stages that train epochs ``initial_epoch`` to ``epochs`` of a trial.

        The split is by epoch number. A trial of ``epochs`` epochs trains the head alone on the
        frozen backbone for its first ``head_epochs`` epochs (stage ``head``, at
        ``learning_rate``), then unfreezes the top ``unfreeze_depth`` groups for the remaining
        epochs (stage ``top<depth>``: the head at ``learning_rate``, the unfrozen groups at
        ``learning_rate * lr_multiplier``, cosine-decayed over the stage as ``finetune`` does).
        ``unfreeze_depth: 0``, or a trial no longer than ``head_epochs``, trains the head alone
        throughout, in one stage. Hyperband's budget is the trial's ``epochs``: a network
        continued from a lower round (``initial_epoch`` > 0, its weights carried over) goes on
        in the stage its next epoch falls in, each stage counting only the epochs it trains
        now (so its schedule restarts: Keras Tuner carries weights, not optimiser state).

        Args:
            values: the trial's values; knobs left out take ``FINETUNE_DEFAULTS`` (and
                ``learning_rate`` must be there: the caller fills in the recipe's default).
            groups: the backbone's group names, from input to output.
            epochs: the epoch the trial ends at (its epoch budget).
            initial_epoch: the epochs already trained (by a lower Hyperband round).

        Returns:
            Stage dicts as ``finetune(stages=[...])`` takes them (one or two; none when there is
            nothing left to train).

        Raises:
            ValueError: ``unfreeze_depth`` is more than the backbone's groups.

        Example:
            >>> space = SearchSpace(backbone="runs/digits", hyperparameters={"unfreeze_depth": [0, 2]})
            >>> values = {"unfreeze_depth": 2, "lr_multiplier": 0.1, "head_epochs": 1, "learning_rate": 0.01}
            >>> for stage in space.stages_for(values, ["conv1", "conv2", "fc1"], 3):
            ...     print(stage)
            {'name': 'head', 'unfreeze': 0, 'epochs': 1, 'learning_rate': 0.01}
            {'name': 'top2', 'unfreeze': 2, 'epochs': 2, 'learning_rate': 0.01, 'lr_multipliers': {'conv2': 0.1, 'fc1': 0.1}}
        """
        values = {**FINETUNE_DEFAULTS, **values}
        depth, rate = values["unfreeze_depth"], values["learning_rate"]
        groups = list(groups)
        self._check_depth(depth, groups, received=depth)
        switch = min(values["head_epochs"], epochs) if depth else epochs
        stages = []
        if initial_epoch < switch:
            stages.append({"name": "head", "unfreeze": 0, "epochs": switch - initial_epoch, "learning_rate": rate})
        if max(switch, initial_epoch) < epochs:
            stage = {"name": f"top{depth}", "unfreeze": depth, "epochs": epochs - max(switch, initial_epoch),
                     "learning_rate": rate}
            if values["lr_multiplier"] != 1:
                stage["lr_multipliers"] = {group: values["lr_multiplier"] for group in groups[-depth:]}
            stages.append(stage)
        return stages


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
        if sampling == "linear" and step is not None and not 0 < step <= (high - low) * (1 + 1e-9):  # 0.3 - 0.2
            raise ValueError(f"under linear sampling step must be > 0 and at most max - min ({high - low}), "
                             f"or the range holds only min; received step={step}")
        if sampling != "linear" and step is not None and (step <= 1 or low * step > high * (1 + 1e-9)):
            only = "" if step <= 1 else f" (this range allows only {low if sampling == 'log' else high})"
            raise ValueError(f"under {sampling} sampling step is a multiplier (log: min, min*step, min*step**2, ... "
                             f"up to max; reverse_log mirrors them towards max), so it must be > 1 and at most "
                             f"max/min{only}; use a step like 2, or leave step out to sample the range continuously")
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


def _plain(declaration):
    """A declaration with NumPy scalars and arrays as Python values (search.yaml holds plain YAML)."""
    if isinstance(declaration, (np.generic, np.ndarray)):
        return declaration.tolist()
    if isinstance(declaration, list):
        return [_plain(value) for value in declaration]
    if isinstance(declaration, dict):
        return {key: _plain(value) for key, value in declaration.items()}
    return declaration


def _candidates(declaration) -> list:
    """The values a declaration can take, or a range's ends."""
    if isinstance(declaration, list):
        return list(declaration)
    if isinstance(declaration, dict):
        return [declaration["min"], declaration["max"]]
    return [declaration]


def _notation_problem(arch) -> str | None:
    """Why ``arch`` is not valid notation, or ``None``."""
    try:
        parse(arch)
    except SpecError as error:
        return f"{arch!r}, which is not valid notation: {error}"
    return None


def _check_knob(name, declaration):
    for value in _candidates(declaration):
        if name in _BOOLEAN_KNOBS:
            ok, need = isinstance(value, bool), "true or false"
        elif name in _INTEGER_KNOBS:
            low = _INTEGER_KNOBS[name]
            ok, need = isinstance(value, int) and not isinstance(value, bool) and value >= low, f"an integer >= {low}"
        elif name in _POSITIVE_KNOBS:
            ok, need = is_finite_number(value) and value > 0, "a number > 0"
        elif name in _NON_NEGATIVE_KNOBS:
            ok, need = is_finite_number(value) and value >= 0, "a number >= 0"
        elif name in _FRACTION_KNOBS:
            ok, need = is_finite_number(value) and 0 <= value < 1, "a number in [0, 1)"
        elif name in _UNIT_KNOBS:
            ok, need = is_finite_number(value) and 0 <= value <= 1, "a number in [0, 1]"
        else:
            ok, need = value is None or isinstance(value, str), "a name"
        if not ok:
            raise ValueError(f"knob {name!r} takes {need}. Received: {name}={declaration!r}")




def _tidy(value, declaration=None):
    """A value as recorded: an integer range's as an int, other floats to 10 significant digits."""
    if not isinstance(value, float):
        return value
    if isinstance(declaration, dict) and all(isinstance(declaration.get(key, 1), int) and not isinstance(
            declaration.get(key), bool) for key in ("min", "max", "step")):
        return round(value)
    return float(f"{value:.10g}")


def _format(value) -> str:
    """A value as the template's text; a float exact and never in exponent form (``D0.00005``), as ``format_layer``."""
    return f"{decimal.Decimal(repr(float(value))).normalize():f}" if isinstance(value, float) else str(value)


__all__ = ["FINETUNE_DEFAULTS", "KNOBS", "SearchSpace"]
