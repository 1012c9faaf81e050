"""Optimisers, learning-rate schedules and numeric precision for the recipes.

Example:
    >>> optimizer = make_optimizer("momentum", learning_rate=0.1, schedule="cosine",
    ...                            steps_per_epoch=100, epochs=10)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import numbers

import keras
import tensorflow as tf

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
NO_DECAY_NAMES = ("bias", "gamma", "beta")  # variables weight decay leaves alone: biases, batch-norm scale and offset


def check_ema(ema, *, early_stopping=None) -> None:
    """Refuse an ``ema`` that is not a momentum in (0, 1), or ``ema`` together with early stopping.

    Keras's EarlyStopping would restore the best epoch's raw weights, not their average.

    Example:
        >>> check_ema(0.999, early_stopping=None)
        >>> check_ema(0.999, early_stopping=3)
        Traceback (most recent call last):
        ...
        ValueError: early_stopping and ema do not combine: Keras's EarlyStopping would restore the best epoch's raw weights, not their average. Drop one of them
    """
    if ema is not None and (isinstance(ema, bool) or not isinstance(ema, numbers.Real) or not 0 < ema < 1):
        raise ValueError(f"ema must be a momentum between 0 and 1 (e.g. 0.999) or None. Received: ema={ema!r}")
    if ema is not None and early_stopping:
        raise ValueError("early_stopping and ema do not combine: Keras's EarlyStopping would restore the best "
                         "epoch's raw weights, not their average. Drop one of them")


def loss_scaled(optimizer, precision):
    """``optimizer`` in Keras's ``LossScaleOptimizer`` when ``precision`` is "mixed_float16", else itself.

    cnnkit sets float16 layer by layer, so the model's own policy stays float32 and Keras's
    ``compile`` does not add the loss scaling; without it small float16 gradients underflow to zero.
    A step the loss scaling skips (its gradients overflowed) still counts in ``iterations``, as in
    TensorFlow's own ``LossScaleOptimizer``: Keras 3's does not count it, so every learning-rate schedule
    would fall a step behind the epochs at each skip. The class stays Keras's, so a saved model loads
    without cnnkit.

    Example:
        >>> type(loss_scaled(keras.optimizers.Adam(), "mixed_float16")).__name__
        'LossScaleOptimizer'
    """
    if precision != "mixed_float16":
        return optimizer
    scaled = keras.optimizers.LossScaleOptimizer(optimizer)
    halve_scale = scaled._stateful_handle_non_finite_grads  # Keras's step for overflowed gradients

    def skip_step():
        halve_scale()
        optimizer.iterations.assign_add(1)

    scaled._stateful_handle_non_finite_grads = skip_step
    return scaled


def make_optimizer(name, *, learning_rate, schedule="constant", momentum=0.9, weight_decay=0.0, ema=None,
                   steps_per_epoch, epochs) -> keras.optimizers.Optimizer:
    """A Keras optimiser with its learning-rate schedule.

    Args:
        name: "sgd" (plain), "momentum" (heavy ball), "nesterov", "adam", "adamw", "rmsprop".
        learning_rate: the peak rate (finite, > 0).
        schedule: "constant"; "step" (x0.1 at 50% and 75% of training, from the first step of
            the epoch after the boundary); "cosine" (cosine decay to 0 at the last step trained);
            "onecycle" (Smith: warm up from lr/25 over 30% of steps, cosine down to lr/25e4 at the
            last step trained, as PyTorch's ``OneCycleLR``); or a dict with "name" and options:
            step ``every`` (an integer of epochs, >= 1 and below ``epochs``) and ``factor`` (in (0, 1]);
            cosine ``warmup_epochs`` (>= 0, below ``epochs``) or ``cycles``. ``{"name": "cosine", "cycles": k}`` is
            cosine annealing with warm restarts (Loshchilov and Hutter's SGDR with equal
            periods, the schedule of Huang et al.'s snapshot ensembles): ``k`` cosine decays
            of ``epochs / k`` epochs each, every one starting again from the peak rate (so, as in
            both papers, a cycle's last step is one step short of 0); ``k`` must divide ``epochs``
            so that each cycle ends at an epoch boundary.
        momentum: for "momentum", "nesterov" and "rmsprop": a number in [0, 1] (an integer such as 0 is
            taken as a float, which Keras's ``SGD`` requires); checked whatever the optimiser.
        weight_decay: decoupled weight decay (Loshchilov and Hutter), >= 0; biases and batch-norm
            scales and offsets are excluded.
        ema: momentum of an exponential moving average of the weights (Polyak averaging, Keras's
            ``use_ema``), e.g. 0.999 (an average over about the last 1,000 steps); ``fit`` ends by
            replacing the weights with their average. ``None``: no average.
        steps_per_epoch, epochs: to place the schedule's boundaries in optimiser steps.

    Example:
        >>> opt = make_optimizer("adamw", learning_rate=1e-3, weight_decay=1e-4, steps_per_epoch=10, epochs=2)
        >>> type(opt).__name__
        'AdamW'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}. Received: optimizer={name!r}")
    if not is_finite_number(learning_rate) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a finite number > 0. Received: learning_rate={learning_rate!r}")
    if not is_finite_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0. Received: weight_decay={weight_decay!r}")
    if not is_finite_number(momentum) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1]. Received: momentum={momentum!r}")
    momentum = float(momentum)
    check_ema(ema)
    rate = make_schedule(schedule, learning_rate, steps_per_epoch=steps_per_epoch, epochs=epochs)
    common = {"weight_decay": weight_decay or None, "use_ema": ema is not None, "ema_momentum": ema or 0.99}
    if name == "sgd":
        optimizer = keras.optimizers.SGD(rate, **common)
    elif name in ("momentum", "nesterov"):
        optimizer = keras.optimizers.SGD(rate, momentum=momentum, nesterov=name == "nesterov", **common)
    elif name == "adam":
        optimizer = keras.optimizers.Adam(rate, **common)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(rate, **{**common, "weight_decay": weight_decay})
    else:
        optimizer = keras.optimizers.RMSprop(rate, momentum=momentum, **common)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
    return optimizer


def make_schedule(schedule, learning_rate, *, steps_per_epoch, epochs):
    """The learning rate as a float or a ``keras.optimizers.schedules.LearningRateSchedule``.

    Example:
        >>> make_schedule("step", 0.1, steps_per_epoch=10, epochs=4)(25).numpy().round(4)
        np.float32(0.01)
    """
    options = dict(schedule) if isinstance(schedule, dict) else {"name": schedule}
    name = options.pop("name", None)
    total = max(1, steps_per_epoch * epochs)
    allowed = {"constant": set(), "step": {"every", "factor"}, "cosine": {"warmup_epochs", "cycles"}, "onecycle": set()}
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a dict with 'name'. Received: schedule={schedule!r}")
    unknown = set(options) - allowed[name]
    if unknown:
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} for schedule {name!r}; valid: {sorted(allowed[name])}")
    if name == "constant":
        return learning_rate
    if name == "step":
        factor = options.get("factor", 0.1)
        every = options.get("every")
        if "every" in options and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"step every must be an integer >= 1 (epochs). Received: every={every!r}")
        if every and every >= epochs:
            raise ValueError(f"step every must be below epochs ({epochs}), else the rate never drops. Received: "
                             f"every={every}")
        if not is_finite_number(factor) or not 0 < factor <= 1:
            raise ValueError(f"step factor must be a number in (0, 1]. Received: factor={factor!r}")
        epochs_at = range(every, epochs, every) if every else [epochs // 2, (3 * epochs) // 4]
        # Keras reads the rate at the step's index before counting it, and the piecewise rate changes
        # after a boundary: the last step of the epoch before the drop is the boundary.
        boundaries = sorted({steps_per_epoch * epoch - 1 for epoch in epochs_at if 0 < epoch < epochs})
        values = [learning_rate * factor**index for index in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values) if boundaries else learning_rate
    if name == "cosine":
        warmup_epochs = options.get("warmup_epochs", 0)
        if not is_finite_number(warmup_epochs) or not 0 <= warmup_epochs < epochs:
            raise ValueError(f"cosine warmup_epochs must be a number >= 0 and below epochs ({epochs}). Received: "
                             f"warmup_epochs={warmup_epochs!r}")
        warmup = math.ceil(warmup_epochs * steps_per_epoch)  # a fraction of an epoch is at least one step
        cycles = options.get("cycles", 1)
        if not isinstance(cycles, int) or isinstance(cycles, bool) or cycles < 1 or epochs % cycles:
            raise ValueError(f"cosine cycles must be an integer >= 1 that divides epochs ({epochs}), so that each "
                             f"cycle ends at an epoch boundary. Received: cycles={cycles!r}")
        if cycles > 1 and warmup_epochs:
            raise ValueError(f"cosine cycles restart at the peak rate and take no warmup_epochs. Received: "
                             f"cycles={cycles}, warmup_epochs={options['warmup_epochs']!r}")
        if cycles > 1:  # t_mul=1, m_mul=1: equal periods, each restarting at the peak rate
            return keras.optimizers.schedules.CosineDecayRestarts(learning_rate, first_decay_steps=total // cycles,
                                                                  t_mul=1.0, m_mul=1.0)
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                learning_rate / 100, decay_steps=max(1, total - warmup - 1), warmup_target=learning_rate,
                warmup_steps=warmup,
            )
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total - 1))
    warmup = min(max(1, int(0.3 * total)), total - 1)  # a one-step run trains at the peak
    return keras.optimizers.schedules.CosineDecay(
        learning_rate / 25, decay_steps=max(1, total - warmup - 1), alpha=1 / 25e4,
        warmup_target=learning_rate, warmup_steps=warmup,
    )


def is_finite_number(value) -> bool:
    """Whether ``value`` is a finite real number (not a bool).

    Example:
        >>> [is_finite_number(v) for v in (0.1, 3, float("nan"), True, "1")]
        [True, True, False, False, False]
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def resolve_precision(precision: str) -> str:
    """"auto" -> "mixed_bfloat16" where bf16 math is fast (a GPU of compute capability 8.0 or
    newer; a CPU with AVX512_BF16 or AMX), else "float32". Other values are checked and returned.

    Example:
        >>> resolve_precision("float32")
        'float32'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}. Received: precision={precision!r}")
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if _fast_bfloat16() else "float32"


@functools.cache
def _fast_bfloat16() -> bool:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return bool(capability) and tuple(capability) >= (8, 0)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})
