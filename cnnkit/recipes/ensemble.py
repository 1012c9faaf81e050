"""``cnnkit.recipes.ensemble``: several classifiers combined into one Keras model; test-time augmentation.

An ensemble is one functional ``keras.Model``: the raw-pixel ``image`` input feeds every member
(nested models named ``member_0``, ``member_1``, ...) and a ``CombineProbabilities`` layer turns
their probabilities into the ensemble's. It saves, loads (``cnnkit.load``,
``keras.saving.load_model`` once this module is imported) and exports like any other model.

Members come from seeds, from different architectures, from existing runs, or from the cycles
of one training run (snapshot ensembles: Huang et al. 2017). Test-time augmentation
(``with_tta``) averages a model's probabilities over flipped and shifted views of each image.
The run directory also gets ``report.html`` (``cnnkit.html_report``) with how often the members agree.

Example:
    >>> import cnnkit
    >>> run = cnnkit.recipes.ensemble(5, "mnist", arch="network3", train_options={"epochs": 40})  # doctest: +SKIP
    >>> run.metrics["test_accuracy"], run.metrics["member_test_accuracy"]  # doctest: +SKIP
    (0.9968, [0.9958, 0.9961, 0.9957, 0.996, 0.9955])
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import ops

import cnnkit
from cnnkit.distribute import describe, distributed
from cnnkit.html_report import write_report
from cnnkit.models.registry import resolve_arch
from cnnkit.recipes.fitting import (
    discard_backup,
    prepare_run_dir,
    recorded_arguments,
    released_on_failure,
    run_config,
    run_key,
)
from cnnkit.recipes.options import check_call, is_integer
from cnnkit.recipes.pipeline import resolve_data
from cnnkit.recipes.train import train
from cnnkit.runs import (
    BACKUP_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    Run,
    atomic_save_model,
    atomic_write_text,
    release_run_dir,
    write_manifest,
    write_run,
)
from cnnkit.spec import SpecError

COMBINE_MODES = ("mean", "geometric", "vote")
TTA_MODES = ("flip", "crops", "ten_crop")
# train() arguments the ensemble sets itself, per member.
_SET_BY_ENSEMBLE = ("arch", "data", "seed", "strategy", "run_dir", "verbose")
_NOT_COMPARED = ("callbacks", "overwrite", "report")  # a reused member need not match these (given callbacks must)
_TRAIN_PARAMETERS = inspect.signature(train).parameters


@keras.saving.register_keras_serializable(package="cnnkit")
class CombineProbabilities(keras.layers.Layer):
    """Combines a list of ``(batch, classes)`` probability tensors into one, in float32.

    Modes:
        ``"mean"``: the mean probability.
        ``"geometric"``: the normalised geometric mean, ``softmax(mean(log(p + epsilon)))``.
        ``"vote"``: majority vote. Each member votes for its most probable class; the output
        is the vote counts plus the mean probability counted as one more, fractional vote,
        divided by ``members + 1``. It sums to 1, its arg-max is the majority class, and a
        tie goes to the class with the higher mean probability.

    Args:
        mode: one of ``COMBINE_MODES``.
        epsilon: added to probabilities before the log of the geometric mean; a finite number > 0.

    Example:
        >>> layer = CombineProbabilities("mean")
        >>> layer([np.array([[0.8, 0.2]]), np.array([[0.4, 0.6]])]).numpy().round(2)
        array([[0.6, 0.4]], dtype=float32)
    """

    def __init__(self, mode="mean", epsilon=1e-7, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}. Received: combine={mode!r}")
        if not (isinstance(epsilon, numbers.Real) and 0 < epsilon < math.inf):  # log(0) of a zero probability: NaN
            raise ValueError(f"epsilon must be a finite number > 0. Received: epsilon={epsilon!r}")
        self.mode = mode
        self.epsilon = float(epsilon)

    def call(self, inputs):
        probabilities = ops.stack([ops.cast(member, "float32") for member in inputs], axis=0)  # (M, B, K)
        mean = ops.mean(probabilities, axis=0)
        if self.mode == "mean":
            return mean
        if self.mode == "geometric":
            return ops.softmax(ops.mean(ops.log(probabilities + self.epsilon), axis=0), axis=-1)
        # Each member's vote: a one-hot of its argmax, from comparisons (Keras's argmax in TensorFlow adds
        # Bitcast ops that TFLite and ONNX cannot run); the cumulative sum keeps the first of tied maxima.
        is_max = ops.cast(ops.equal(probabilities, ops.max(probabilities, axis=-1, keepdims=True)), "float32")
        votes = ops.sum(is_max * ops.cast(ops.equal(ops.cumsum(is_max, axis=-1), 1.0), "float32"), axis=0)
        return (votes + mean) / (len(inputs) + 1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="cnnkit")
class ImageViews(keras.layers.Layer):
    """Stacks views of each image along the batch axis: ``(B, H, W, C) -> (views * B, H, W, C)``.

    View ``v`` of image ``b`` is row ``v * B + b``. ``"flip"``: the image and its left-right
    mirror. ``"crops"``: AlexNet's five crops (centre, then the four corners), taken from the
    image zero-padded by ``shift`` pixels on every side, so each crop keeps the input size and
    the corners are the image shifted diagonally by ``shift`` pixels. ``"ten_crop"``: the
    five crops and their mirrors.

    Args:
        mode: one of ``TTA_MODES``.
        shift: the padding, in pixels, for the crop modes; less than the image's height and width.

    Example:
        >>> ImageViews("ten_crop", shift=1)(np.zeros((2, 8, 8, 1))).shape
        TensorShape([20, 8, 8, 1])
    """

    def __init__(self, mode="flip", shift=1, **kwargs):
        super().__init__(**kwargs)
        if mode not in TTA_MODES:
            raise ValueError(f"mode must be one of {TTA_MODES}. Received: mode={mode!r}")
        if not is_integer(shift) or shift < 1:
            raise ValueError(f"shift must be an integer >= 1 (pixels). Received: shift={shift!r}")
        self.mode = mode
        self.shift = int(shift)

    def build(self, input_shape):  # not in call: a symbolic input (with_tta) reaches build but not call
        height, width = input_shape[1:3]
        if self.mode != "flip" and self.shift >= min(height, width):
            raise ValueError(f"shift must be less than the image's height and width (a corner crop would be all "
                             f"padding). Received: shift={self.shift} for {height}x{width} images")

    @property
    def num_views(self) -> int:
        """Views per image: 2, 5 or 10."""
        return {"flip": 2, "crops": 5, "ten_crop": 10}[self.mode]

    def call(self, images):
        if self.mode == "flip":
            views = [images]
        else:
            height, width, shift = images.shape[1], images.shape[2], self.shift
            padded = ops.pad(images, [[0, 0], [shift, shift], [shift, shift], [0, 0]])
            offsets = [(shift, shift), (0, 0), (0, 2 * shift), (2 * shift, 0), (2 * shift, 2 * shift)]
            views = [padded[:, top:top + height, left:left + width, :] for top, left in offsets]
        if self.mode != "crops":
            views += [ops.flip(view, axis=2) for view in views]
        return ops.concatenate(views, axis=0)

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "shift": self.shift}


@keras.saving.register_keras_serializable(package="cnnkit")
class AverageViews(keras.layers.Layer):
    """Averages the probabilities of ``num_views`` views: ``(views * B, K) -> (B, K)`` (see ``ImageViews``).

    Args:
        num_views: views per image (an integer >= 1), stacked view-major along the batch axis; the
            batch holds ``num_views`` times as many rows as images.

    Example:
        >>> AverageViews(2)(np.array([[1.0, 0.0], [0.0, 1.0]])).numpy()
        array([[0.5, 0.5]], dtype=float32)
    """

    def __init__(self, num_views=2, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not is_integer(num_views) or num_views < 1:
            raise ValueError(f"num_views must be an integer >= 1. Received: num_views={num_views!r}")
        self.num_views = int(num_views)

    def call(self, probabilities):
        probabilities = ops.cast(probabilities, "float32")
        rows = probabilities.shape[0]
        if rows is not None and rows % self.num_views:
            raise ValueError(f"{self.num_views} views per image need a row count that is a multiple of "
                             f"{self.num_views}. Received: {rows} rows")
        return ops.mean(ops.reshape(probabilities, (self.num_views, -1, probabilities.shape[-1])), axis=0)

    def compute_output_shape(self, input_shape):
        return (None, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "num_views": self.num_views}


def with_tta(model, mode, *, shift=None) -> keras.Model:
    """``model`` with test-time augmentation: its probabilities averaged over views of each image.

    ``"flip"`` averages the image and its left-right mirror; ``"crops"`` AlexNet's five crops
    (four corners and centre); ``"ten_crop"`` the five crops and their mirrors (AlexNet's
    ten-crop evaluation). AlexNet crops 224 px out of a 256 px image; a cnnkit model takes its
    training size, so the crops here come from the image zero-padded by ``shift`` pixels on
    each side: the corner crops are the image shifted diagonally by ``shift`` pixels, with zeros
    filling in. Mirrors are wrong for data whose classes are not mirror-symmetric, digits
    above all (a mirrored 2 is not a 2): use ``"crops"`` there.

    Args:
        model: a ``keras.Model`` (or ``cnnkit.Run``) from raw images to probabilities.
        mode: "flip", "crops" or "ten_crop".
        shift: padding for the crop modes in pixels; default about 6% of the smaller image
            side, ``max(1, min(height, width) // 16)`` (1 for 28 px, 14 for 224 px); less than
            both sides (a corner crop would be all padding).

    Returns:
        A functional ``keras.Model`` with the same input and output shapes; the views go
        through ``model`` as one batch.

    Example:
        >>> tta_model = with_tta(run.model, "crops")  # doctest: +SKIP
        >>> cnnkit.Run(tta_model).evaluate(data)["test_accuracy"]  # doctest: +SKIP
        0.9931
    """
    model = model.model if isinstance(model, Run) else model
    image_shape = tuple(model.input_shape[1:])
    if shift is None:
        shift = max(1, min(image_shape[:2]) // 16)
    views = ImageViews(mode, shift, name="views")
    inputs = keras.Input(image_shape, name="image")
    outputs = AverageViews(views.num_views, name="probabilities")(model(views(inputs)))
    return keras.Model(inputs, outputs, name=f"{model.name}_{mode}")


def combine_models(models, *, combine="mean", name="ensemble") -> keras.Model:
    """One ``keras.Model`` from several: a shared image input, the members, then ``CombineProbabilities``.

    Each member is nested as ``member_<i>`` (a functional view of its layers, so the models
    passed in are neither copied nor renamed).

    Args:
        models: ``keras.Model`` objects with one image input and one ``(None, K)`` probability
            output, all of the same input shape and class count.
        combine: "mean", "geometric" or "vote" (see ``CombineProbabilities``).
        name: the model's name.

    Returns:
        The combined functional ``keras.Model``; its output layer is ``probabilities``.

    Example:
        >>> a, b = (cnnkit.build("8C3-FC16", (12, 12, 1), 3) for _ in range(2))
        >>> combine_models([a, b], combine="vote").output_shape
        (None, 3)
    """
    models = list(models)
    if not models:
        raise ValueError("an ensemble needs at least one member. Received: models=[]")
    _check_agreement(models, [f"member {index} ({model.name})" for index, model in enumerate(models)])
    inputs = keras.Input(models[0].input_shape[1:], name="image")
    outputs = [keras.Model(model.input, model.output, name=f"member_{index}")(inputs)
               for index, model in enumerate(models)]
    return keras.Model(inputs, CombineProbabilities(combine, name="probabilities")(outputs), name=name)


class SnapshotSaver(keras.callbacks.Callback):
    """Saves the model as ``<directory>/cycle_<c>.keras`` at the end of every ``every``-th epoch.

    With a cyclic cosine schedule of ``every`` epochs per cycle, the files are the snapshots of
    a snapshot ensemble (Huang et al. 2017): one model per annealed cycle. Each file is written
    atomically; a resumed run keeps the snapshots it has already written.

    Args:
        directory: where the snapshots go (created).
        every: epochs per cycle.

    Example:
        >>> saver = SnapshotSaver("runs/snap/snapshots", every=10)
        >>> cnnkit.recipes.train("lenet", "mnist", epochs=40, callbacks=[saver],
        ...                      schedule={"name": "cosine", "cycles": 4})  # doctest: +SKIP
    """

    def __init__(self, directory, *, every):
        super().__init__()
        self.directory = Path(directory)
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            atomic_save_model(self.model, self.directory / f"cycle_{(epoch + 1) // self.every}.keras")


@distributed
def ensemble(
    members,
    data,
    *,
    arch=None,
    combine: str = "mean",
    snapshot_cycles: int | None = None,
    tta: str | None = None,
    train_options: dict | None = None,
    seed: int = 0,
    strategy="auto",
    run_dir=None,
    overwrite: bool = False,
    verbose: int = 1,
) -> Run:
    """Train or gather ensemble members, combine them into one model, evaluate it, write its run directory.

    Args:
        members: what the members are:
            an int ``n``: ``n`` networks ``arch`` trained with seeds ``seed .. seed + n - 1``;
            ``"snapshot"``: one training run of ``arch`` with a cyclic cosine schedule of
            ``snapshot_cycles`` cycles, one member saved at the end of each cycle (snapshot
            ensembles, Huang et al. 2017: ``k`` members for the cost of one run);
            a list whose items are each an architecture (notation or registered name, trained
            with seed ``seed + i`` for item ``i``), a run directory or ``.keras`` file (a
            ``pathlib.Path``, or a string naming an existing path or containing "/" or
            ending in ".keras"), a ``cnnkit.Run`` or a ``keras.Model`` (used as they are).
        data: a ``cnnkit.data.ImageData``, a dataset name or ``load``/``from_folder`` arguments (as for
            ``train``); trained members learn from it and everything is evaluated on its test split.
        arch: the architecture for an int ``members`` or ``"snapshot"``: notation or a registered
            name (each member is a new network; trained models go in a ``members`` list).
        combine: "mean" (mean probability), "geometric" (normalised geometric mean) or
            "vote" (majority vote, ties to the higher mean probability); see ``CombineProbabilities``.
        snapshot_cycles: cycles (members) of a snapshot ensemble; must divide the epochs.
        tta: test-time augmentation for an extra evaluation: None, "flip", "crops" or
            "ten_crop" (see ``with_tta``; mirrors are wrong for digits). The metrics gain
            ``tta_test_accuracy``, ``tta_test_error`` and ``tta_balanced_accuracy``; the saved
            model stays the plain ensemble. Data without a test split gets a warning and no TTA metrics.
        train_options: keyword arguments of ``cnnkit.recipes.train`` for trained members
            (epochs, optimizer, augment, ...), except arch, data, seed, strategy, run_dir and
            verbose, which the ensemble sets. A snapshot ensemble sets the schedule itself and refuses
            early stopping (it would cut cycles short), ``ema`` (it would average across the
            restarts), ``precise_bn`` and ``imbalance="two_stage"`` (they act after the last cycle,
            on no member).
        seed: the first member's seed; every trained member's ``seed + i`` must lie in [0, 2**32).
        strategy: "auto", "mirrored", "multi_worker", "tpu" or a ``tf.distribute.Strategy``, as for
            ``train``: every trained member trains under it (``train_options`` may add
            ``scale_learning_rate``); only the chief writes ``run_dir``.
        run_dir: the ensemble's run directory (default ``runs/ensemble-<timestamp>``). Trained
            members go to ``members/<i>``, a snapshot run to ``training`` with its snapshots
            in ``snapshots``. A finished ensemble there is refused; a finished member there is
            reused (when its arch, seed, data and train options match) rather than retrained,
            so an interrupted ensemble resumes.
        overwrite: delete a finished ensemble (or an interrupted one, members included) in
            ``run_dir`` and build it again; a member path inside ``run_dir`` is refused (it would be deleted).
        verbose: 0 silent, 1 progress bars, 2 one line per epoch.

    Returns:
        A ``cnnkit.Run`` of the combined model. ``metrics`` hold the ensemble's
        ``test_accuracy``, ``test_error``, ``balanced_accuracy``, per-class figures and
        confusion matrix, plus ``member_test_accuracy`` (one per member, to see the gain).

    Raises:
        ValueError: bad arguments, or members that disagree on input shape or class count.
        cnnkit.SpecError: an architecture that is neither a registered name nor valid notation
            (checked before any member trains).

    Example:
        >>> run = ensemble(5, "mnist-sample", arch="lenet", train_options={"epochs": 5})  # doctest: +SKIP
        >>> snap = ensemble("snapshot", "mnist-sample", arch="lenet", snapshot_cycles=4,
        ...                 train_options={"epochs": 20, "optimizer": "momentum", "learning_rate": 0.1})  # doctest: +SKIP
        >>> mixed = ensemble(["runs/a", "runs/b", "lenet5"], "mnist-sample", combine="vote", tta="crops")  # doctest: +SKIP
    """
    members = int(members) if is_integer(members) else members  # a NumPy integer counts too
    snapshot_cycles = int(snapshot_cycles) if is_integer(snapshot_cycles) else snapshot_cycles
    arguments = recorded_arguments(ensemble, locals())
    options = _check_train_options(train_options, snapshot=members == "snapshot")
    plan = _member_plan(members, arch, snapshot_cycles, options, seed)
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}. Received: combine={combine!r}")
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES} or None. Received: tta={tta!r}")
    _check_seeds(plan, seed)
    if overwrite and run_dir is not None:
        _check_outside(plan, run_dir)
    data = resolve_data(data)
    if tta is not None and data.test is None:
        warnings.warn(f"tta={tta!r} evaluates the test split and the data has none: the ensemble is built and "
                      "saved without a test-time augmentation evaluation", stacklevel=2)
    run_dir = prepare_run_dir(run_dir, "ensemble", overwrite=overwrite)
    with released_on_failure(run_dir):  # a member that trained an epoch keeps the folder, to resume
        run = _combine_and_write(plan, data, options, arguments, members, combine, tta, seed, run_dir, verbose)
    if verbose:
        print(_result_line(run))
    return run


def _combine_and_write(plan, data, options, arguments, members, combine, tta, seed, run_dir, verbose) -> Run:
    models, labels = _gather(plan, data, options, run_dir, verbose)
    _check_agreement(models, labels, data)
    model = combine_models(models, combine=combine)

    arguments.update(members=members if isinstance(members, (int, str)) else labels,
                     train_options={key: _plain_option(value) for key, value in options.items()})
    config = run_config("ensemble", arguments, data, seed=seed, members=labels, combine=combine, tta=tta,
                        distribution=describe())
    run = Run(model, run_dir=run_dir, class_names=data.class_names, config=config)
    metrics = {}
    if data.test is not None:
        metrics = run.evaluate(data, split="test")
        metrics["member_test_accuracy"] = [
            Run(member, class_names=data.class_names).evaluate(data)["test_accuracy"] for member in models
        ]
        if tta is not None:
            tta_metrics = Run(with_tta(model, tta), class_names=data.class_names).evaluate(data)
            metrics.update({f"tta_{key}": tta_metrics[key] for key in ("test_accuracy", "test_error", "balanced_accuracy")})
    metrics["num_members"] = len(models)
    run.metrics = metrics
    atomic_write_text(run_dir / BACKUP_DIR / "key", run_key(arguments, data))  # interrupted until all is written
    write_run(run_dir, model=model, history={}, metrics=metrics, config=config, class_names=data.class_names)
    write_report(run_dir, model=model, data=data)  # report.html with member agreement; a failure only warns
    write_manifest(run_dir)
    discard_backup(run_dir)
    release_run_dir(run_dir)
    return run


def _check_train_options(train_options, *, snapshot) -> dict:
    options = dict(train_options or {})
    valid = [name for name in _TRAIN_PARAMETERS if name not in _SET_BY_ENSEMBLE]
    for key in options:
        if key in _SET_BY_ENSEMBLE:
            raise ValueError(f"train_options may not set {key!r}: the ensemble sets it for each member. "
                             f"Received: train_options={train_options!r}")
        if key not in valid:
            raise ValueError(f"unknown train option {key!r}; valid: {valid}. Received: train_options={train_options!r}")
    if snapshot:
        for key in ("schedule", "early_stopping"):
            if options.get(key) is not None:
                raise ValueError(f"a snapshot ensemble sets its own cyclic schedule and trains every cycle, so "
                                 f"train_options may not set {key!r}. Received: {key}={options[key]!r}")
        if options.get("ema") is not None:
            raise ValueError("a snapshot ensemble keeps each cycle's own weights; a moving average would run across "
                             f"the restarts, so train_options may not set 'ema'. Received: ema={options['ema']!r}")
        if options.get("precise_bn"):
            raise ValueError("a snapshot ensemble's members are the models saved at each cycle's end; precise_bn "
                             "re-estimates only the final model, after the last cycle, so train_options may not set "
                             f"'precise_bn'. Received: precise_bn={options['precise_bn']!r}")
        imbalance = options.get("imbalance")
        if (imbalance.get("strategy") if isinstance(imbalance, dict) else imbalance) == "two_stage":
            raise ValueError("a snapshot ensemble's members are its cycles; imbalance='two_stage' trains a balanced "
                             "stage after the last one that no member would hold, so train_options may not set it "
                             f"('balanced_batches' or 'class_weight' act in every cycle). Received: imbalance={imbalance!r}")
    try:
        check_call(train, options)
    except ValueError as error:
        raise ValueError(f"train_options: {error}") from None
    return options


def _member_plan(members, arch, snapshot_cycles, options, seed) -> list:
    """What each member is: ("train", arch, seed), ("snapshot", arch, seed, cycles) or ("existing", item).

    Every architecture is resolved here (registry.resolve_arch parses notation), so a typo fails before any member trains.
    """
    counted = isinstance(members, int) and not isinstance(members, bool)
    if counted or members == "snapshot":
        if not isinstance(arch, str):  # a model object would be trained again, in place, for every member
            raise ValueError(f"members={members!r} trains networks: pass arch= (notation or a registered name); "
                             "to combine trained models, pass them or their run directories as the members list. "
                             f"Received: arch={arch!r}")
        resolve_arch(arch, {})  # an unknown name or bad notation: SpecError
        if counted and members < 1:
            raise ValueError(f"members must be at least 1. Received: members={members!r}")
    elif arch is not None:
        raise ValueError(f"arch applies when members is a count or 'snapshot'. Received: arch={arch!r} "
                         f"with members={members!r}")
    if (members == "snapshot") != (snapshot_cycles is not None):
        raise ValueError(f"snapshot_cycles goes with members='snapshot' (and only with it). Received: "
                         f"members={members!r}, snapshot_cycles={snapshot_cycles!r}")
    if counted:
        return [("train", arch, seed + index) for index in range(members)]
    if members == "snapshot":
        epochs = options.get("epochs", _TRAIN_PARAMETERS["epochs"].default)
        valid = is_integer(snapshot_cycles) and snapshot_cycles >= 1 and is_integer(epochs)
        if not valid or epochs % snapshot_cycles:
            raise ValueError(f"snapshot_cycles must be an integer >= 1 that divides the epochs ({epochs}), so that "
                             f"each cycle ends at an epoch. Received: snapshot_cycles={snapshot_cycles!r}")
        return [("snapshot", arch, seed, snapshot_cycles)]
    if isinstance(members, (str, bytes, dict)) or not hasattr(members, "__iter__"):
        raise ValueError("members must be a count, 'snapshot', or a list of architectures, run directories, "
                         f".keras files, Runs or keras.Models. Received: members={members!r}")
    members = list(members)
    if not members:
        raise ValueError("an ensemble needs at least one member. Received: members=[]")
    plan = []
    for index, item in enumerate(members):
        if isinstance(item, (keras.Model, Run, os.PathLike)) or (isinstance(item, str) and _names_a_path(item)):
            if _is_path(item) and not os.path.exists(item):
                raise FileNotFoundError(f"member {index}: no run directory or .keras file at {str(item)!r}")
            plan.append(("existing", item))
        elif isinstance(item, str):
            try:
                resolve_arch(item, {})
            except SpecError as error:
                raise SpecError(f"member {index}: {error}; and no run directory or .keras file named "
                                f"{item!r}") from None
            plan.append(("train", item, seed + index))
        else:
            raise ValueError(f"member {index} must be an architecture, a run directory, a .keras file, a Run or a "
                             f"keras.Model. Received: {item!r} of type {type(item).__name__}")
    objects = [id(_as_model(step[1])) for step in plan if step[0] == "existing" and not _is_path(step[1])]
    if len(objects) != len(set(objects)):
        raise ValueError("the same model object is given as two members; pass each member once")
    paths = [path for path in (_run_path(step[1]) for step in plan if step[0] == "existing") if path is not None]
    repeated = sorted({str(path) for path in paths if paths.count(path) > 1})
    if repeated:
        raise ValueError(f"the same run is given as two members ({', '.join(repeated)}); pass each member once")
    return plan


def _check_seeds(plan, seed) -> None:
    """Refuse a ``seed`` that puts a trained member's ``seed + i`` outside NumPy's range, [0, 2**32)."""
    last = max((index for index, step in enumerate(plan) if step[0] != "existing"), default=None)
    if last is not None and not (is_integer(seed) and 0 <= seed < 2**32 - last):
        members = f" ({len(plan)} members: member {last} trains with seed + {last})" if last else ""
        raise ValueError(f"seed must be an integer in [0, {2**32 - last}){members}. Received: seed={seed!r}")


def _check_outside(plan, run_dir) -> None:
    """Refuse member paths inside ``run_dir``: ``overwrite=True`` deletes the run there before they load."""
    run_dir = Path(run_dir).resolve()
    for index, step in enumerate(plan):
        if step[0] == "existing" and _is_path(step[1]) and _run_path(step[1]).is_relative_to(run_dir):
            raise ValueError(f"member {index} ({step[1]}) lies inside run_dir {run_dir}, which overwrite=True deletes "
                             "before the members load; copy the member elsewhere first or pass another run_dir")


def _run_path(item) -> Path | None:
    """The run (directory, else ``.keras`` file) a member comes from, resolved; None for a model without one."""
    if _is_path(item):
        return _source(item).resolve()
    return Path(item.run_dir).resolve() if isinstance(item, Run) and item.run_dir else None


def _source(path) -> Path:
    """A member path as a run: a run directory's ``model.keras`` is its run directory (class names, config)."""
    path = Path(path)
    return path.parent if path.name == MODEL_FILE and (path.parent / CONFIG_FILE).is_file() else path


def _names_a_path(text: str) -> bool:
    return os.path.exists(text) or "/" in text or os.sep in text or text.endswith(".keras")


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


def _as_model(item):
    return item.model if isinstance(item, Run) else item


def _gather(plan, data, options, run_dir, verbose):
    """The member models and a label for each (its run directory, file, or object)."""
    models, labels = [], []
    for step in plan:
        if step[0] == "existing":
            item = cnnkit.load(_source(step[1])) if _is_path(step[1]) else step[1]
            model = _as_model(item)
            if _is_path(step[1]) or (isinstance(item, Run) and item.run_dir):
                label = str(step[1] if _is_path(step[1]) else item.run_dir)
            else:
                label = f"<keras.Model {model.name}>"
            named = isinstance(item, Run) and (item.config.get("class_names") or
                                               item.class_names != [str(i) for i in range(len(item.class_names))])
            if named and item.class_names != list(data.class_names):  # not just the 0..K-1 of a bare model
                raise ValueError(f"member {label} was trained on classes {item.class_names}; the data has "
                                 f"{list(data.class_names)}")
            models.append(model)
            labels.append(label)
        elif step[0] == "train":
            member_dir = run_dir / "members" / str(len(models))
            models.append(_train_member(step[1], data, step[2], options, member_dir, verbose).model)
            labels.append(str(member_dir))
        else:
            snapshots = _snapshots(step[1], data, step[2], step[3], options, run_dir, verbose)
            models += snapshots
            labels += [str(run_dir / "snapshots" / f"cycle_{cycle}.keras") for cycle in range(1, len(snapshots) + 1)]
    return models, labels


def _train_member(arch, data, seed, options, member_dir, verbose) -> Run:
    """Train one member, or reuse the finished run already in ``member_dir`` when it matches."""
    if not (member_dir / METRICS_FILE).exists() or (member_dir / BACKUP_DIR).exists():
        return train(arch, data, seed=seed, run_dir=member_dir, verbose=verbose, **options)
    run = cnnkit.load(member_dir)
    recorded = run.config.get("arguments", {})
    defaults = {name: parameter.default for name, parameter in _TRAIN_PARAMETERS.items()
                if name not in _SET_BY_ENSEMBLE + _NOT_COMPARED}
    expected = {**defaults, **options, "arch": arch, "seed": seed}  # options left out must be at their defaults
    differ = sorted(key for key, value in expected.items()
                    if key in recorded and _plain_option(recorded[key]) != _plain_option(value))
    if run.config.get("data", {}).get("fingerprint") != data.fingerprint:
        differ.append("data")
    if differ:
        raise ValueError(f"{member_dir} holds a finished member trained with other settings ({', '.join(differ)}); "
                         "pass another run_dir or remove it")
    return run


def _snapshots(arch, data, seed, cycles, options, run_dir, verbose) -> list:
    epochs = options.get("epochs", _TRAIN_PARAMETERS["epochs"].default)
    snapshot_dir = run_dir / "snapshots"
    options = {**options, "schedule": {"name": "cosine", "cycles": cycles},
               "callbacks": [*(options.get("callbacks") or ()), SnapshotSaver(snapshot_dir, every=epochs // cycles)]}
    _train_member(arch, data, seed, options, run_dir / "training", verbose)
    paths = [snapshot_dir / f"cycle_{cycle}.keras" for cycle in range(1, cycles + 1)]
    missing = [path.name for path in paths if not path.exists()]
    if missing:
        raise ValueError(f"the snapshot run in {run_dir / 'training'} left no {', '.join(missing)}; remove "
                         f"{run_dir} and train again")
    return [keras.saving.load_model(path, compile=False) for path in paths]


def _plain_option(value):
    """A train option as config.yaml records it: callbacks by class name, tuples as lists.

    Example:
        >>> _plain_option({"augment": ("shift",)})
        {'augment': ['shift']}
    """
    if isinstance(value, (list, tuple)) and any(isinstance(item, keras.callbacks.Callback) for item in value):
        return [type(item).__name__ for item in value]
    if isinstance(value, (list, tuple)):
        return [_plain_option(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain_option(item) for key, item in value.items()}
    return value


def _check_agreement(models, labels, data=None):
    shapes = []
    for model, label in zip(models, labels):
        try:
            shapes.append((tuple(model.input_shape[1:]), model.output_shape[-1]))
        except (AttributeError, ValueError, TypeError) as err:
            raise ValueError(f"{label} is not a model with one image input and one probability output") from err
    expected = (tuple(data.image_shape), data.num_classes) if data is not None else shapes[0]
    wrong = [f"{label} takes {shape} images and gives {classes} classes"
             for label, (shape, classes) in zip(labels, shapes) if (shape, classes) != expected]
    if wrong:
        against = "the data's" if data is not None else "the first member's"
        raise ValueError(f"ensemble members must agree on input shape and class count ({against}: {expected[0]} "
                         f"images, {expected[1]} classes): " + "; ".join(wrong))


def _result_line(run) -> str:
    metrics = run.metrics
    if "test_accuracy" not in metrics:
        return f"ensemble of {metrics['num_members']} members saved to {run.run_dir}"
    members = metrics["member_test_accuracy"]
    line = (f"ensemble of {len(members)} ({run.config['combine']}): test accuracy {metrics['test_accuracy']:.2%} "
            f"(members {min(members):.2%} to {max(members):.2%}, mean {float(np.mean(members)):.2%})")
    if "tta_test_accuracy" in metrics:
        line += f", with {run.config['tta']} test-time augmentation {metrics['tta_test_accuracy']:.2%}"
    return f"{line}; run saved to {run.run_dir}"
