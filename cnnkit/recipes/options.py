"""Checks of a recipe's options that need no data, run before any image is read.

``train``, ``finetune``, ``ensemble`` (its ``train_options``) and ``transfer`` call
:func:`check_call` first, and ``cnnkit run`` calls it on a recipe file's arguments, so a typo
(``optimizer: adamm``) is refused, naming the file, before a dataset or image folder is loaded.
What depends on the data (an augmentation's size against the images, whitening against their
count) is checked when the data is there.

Example:
    >>> check_options(optimizer="adamm")
    Traceback (most recent call last):
    ...
    ValueError: optimizer must be one of ('sgd', 'momentum', 'nesterov', 'adam', 'adamw', 'rmsprop'). Received: optimizer='adamm'
"""

from __future__ import annotations

import inspect
import numbers

import keras

from cnnkit.recipes.augment import parse_augment
from cnnkit.recipes.imbalance import parse_imbalance
from cnnkit.recipes.optimization import check_ema, make_optimizer, resolve_precision
from cnnkit.recipes.pipeline import check_label_smoothing
from cnnkit.recipes.preprocess import parse_preprocess

OPTIMIZER_KEYS = ("optimizer", "learning_rate", "schedule", "momentum", "weight_decay")
CHECKED_KEYS = (*OPTIMIZER_KEYS, "ema", "epochs", "batch_size", "steps_per_execution", "precise_bn",
                "early_stopping", "precision", "label_smoothing", "augment", "preprocess", "imbalance", "callbacks",
                "seed")


def check_options(**options) -> None:
    """Refuse option values that no data could make valid; checks only the keys given.

    Args:
        **options: any of ``CHECKED_KEYS``, as ``cnnkit.recipes.train`` takes them. The optimiser
            keys are checked together (a ``{"name": "cosine", "cycles": 3}`` schedule against
            ``epochs``), with ``train``'s defaults for those not given.

    Raises:
        ValueError: the first bad value, naming its key.
        TypeError: a key this function does not check (a caller's mistake).

    Example:
        >>> check_options(epochs=10, schedule={"name": "cosine", "cycles": 3}, optimizer="momentum")
        Traceback (most recent call last):
        ...
        ValueError: cosine cycles must be an integer >= 1 that divides epochs (10), so that each cycle ends at an epoch boundary. Received: cycles=3
    """
    unknown = sorted(set(options) - set(CHECKED_KEYS))
    if unknown:
        raise TypeError(f"check_options() got unexpected keys {unknown}; it checks {list(CHECKED_KEYS)}")
    for name, low in (("epochs", 1), ("batch_size", 1), ("steps_per_execution", 1), ("precise_bn", 0)):
        if name in options:
            _check_integer(name, options[name], low)
    seed = options.get("seed", 0)
    if not is_integer(seed) or not 0 <= seed < 2**32:  # the range keras.utils.set_random_seed (NumPy) takes
        raise ValueError(f"seed must be an integer in [0, 2**32). Received: seed={seed!r}")
    early_stopping = options.get("early_stopping")
    if early_stopping is not None and (not is_integer(early_stopping) or early_stopping < 1):
        raise ValueError(f"early_stopping must be a patience in epochs (>= 1) or None. Received: "
                         f"early_stopping={early_stopping!r}")
    check_ema(options.get("ema"), early_stopping=early_stopping)
    if any(key in options for key in OPTIMIZER_KEYS):
        optimizer = {key: options[key] for key in OPTIMIZER_KEYS if key in options}
        make_optimizer(optimizer.pop("optimizer", "adam"), **{"learning_rate": 1e-3, **optimizer},
                       ema=options.get("ema"), steps_per_epoch=1, epochs=options.get("epochs", 1))
    if "precision" in options:
        resolve_precision(options["precision"])
    if "label_smoothing" in options:
        check_label_smoothing(options["label_smoothing"])
    _check_callbacks(options.get("callbacks"))
    if "augment" in options:
        parse_augment(options["augment"])
    if "preprocess" in options:
        parse_preprocess(options["preprocess"])
    if "imbalance" in options:
        copies = parse_imbalance(options["imbalance"])[1].get("augmented_copies", False)
        if not isinstance(copies, bool):  # an augmentation for the minority copies
            try:
                parse_augment(copies)
            except ValueError as error:
                raise ValueError(f"imbalance augmented_copies: {error}") from None


def check_call(function, kwargs: dict) -> None:
    """:func:`check_options` on a call of the recipe ``function``: ``kwargs``, and its defaults for the rest.

    Example:
        >>> from cnnkit.recipes import train
        >>> check_call(train, {"schedule": {"name": "cosine", "cycles": 5}})  # train's default: 10 epochs
        >>> check_call(train, {"schedule": {"name": "cosine", "cycles": 3}})
        Traceback (most recent call last):
        ...
        ValueError: cosine cycles must be an integer >= 1 that divides epochs (10), so that each cycle ends at an epoch boundary. Received: cycles=3
    """
    parameters = inspect.signature(function).parameters
    check_options(**{key: kwargs.get(key, parameters[key].default) for key in CHECKED_KEYS if key in parameters})


def _check_callbacks(callbacks) -> None:
    if callbacks is None:
        return
    if not isinstance(callbacks, (list, tuple)):
        raise ValueError(f"callbacks must be a list of keras.callbacks.Callback objects or None. "
                         f"Received: callbacks={callbacks!r}")
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, keras.callbacks.Callback):
            raise ValueError(f"callbacks[{index}] is not a keras.callbacks.Callback. Received: "
                             f"{callback!r} ({type(callback).__name__})")


def is_integer(value) -> bool:
    """An integer of any type (NumPy's too), not a bool: ``is_integer(np.int64(3))`` is True, ``is_integer(True)`` False."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_integer(name: str, value, low: int) -> None:
    if not is_integer(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}. Received: {name}={value!r}")


__all__ = ["CHECKED_KEYS", "check_call", "check_options"]
