"""``cnnkit.recipes.finetune``: fine-tune a pretrained backbone in stages, with a new head.

"Don't be a hero": take a network trained on a large dataset, put a new classifier on its
features, train the classifier with the backbone frozen, then unfreeze the top of the backbone
at a lower rate (and, with enough data, all of it). The backbone is a ``keras.applications``
family (see ``cnnkit.models.list_backbones()``), a ``.keras`` file, or a cnnkit run directory.

The model takes raw pixels of the data's shape: resizing to the backbone's input size,
grayscale-to-RGB and the backbone's own preprocessing are layers inside it, so a saved or
exported model needs nothing outside.

Example:
    >>> import cnnkit
    >>> run = cnnkit.recipes.finetune("mobilenet_v2", {"path": "pets/", "image_size": [160, 160]},
    ...                               epochs=3)  # doctest: +SKIP
    finetune: 3,680 training images, 37 classes (99 per class: small); similarity 'similar'
      -> Wei's case 1 (small, similar): train the head on frozen features, then the top group at lr/10
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import re
from pathlib import Path

import keras
import tensorflow as tf
from keras import ops

from cnnkit.distribute import describe, distributed, learning_rate_scale, shard
from cnnkit.recipes.fitting import (
    Stage,
    finish_run,
    finished_run,
    fit_stages,
    prepare_run_dir,
    recorded_arguments,
    released_on_failure,
    run_config,
    run_key,
)
from cnnkit.recipes.optimization import NO_DECAY_NAMES, is_finite_number, make_optimizer, resolve_precision
from cnnkit.recipes.options import check_call
from cnnkit.recipes.pipeline import prepare_inputs, resolve_data
from cnnkit.runs import MODEL_FILE, Run, file_sha256

BATCH_NORM_POLICIES = ("frozen", "scale_shift", "recalibrate")
SIMILARITIES = ("similar", "different")
SMALL_PER_CLASS = 1000  # fewer training images per class than this counts as a small dataset
_STAGE_KEYS = {"unfreeze", "epochs", "learning_rate", "lr_multipliers", "name"}


@distributed
def finetune(
    backbone,
    data,
    *,
    weights="imagenet",
    trust: bool = False,
    stages="auto",
    similarity: str = "similar",
    batch_norm: str = "frozen",
    input_size=None,
    head_dropout: float = 0.2,
    augment=None,
    imbalance=None,
    label_smoothing: float = 0.0,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    ema: float | None = None,
    epochs: int = 5,
    batch_size: int = 32,
    early_stopping: int | None = None,
    precision: str = "auto",
    steps_per_execution: int = 1,
    seed: int = 0,
    deterministic: bool = False,
    strategy="auto",
    scale_learning_rate: bool = False,
    callbacks: list | None = None,
    run_dir=None,
    overwrite: bool = False,
    report: bool = True,
    verbose: int = 1,
) -> Run:
    """Fine-tune a pretrained backbone on ``data`` in stages and write the run directory.

    Args:
        backbone: a ``keras.applications`` name from ``cnnkit.models.list_backbones()``
            ("mobilenet_v2", "efficientnet_b0", "resnet50", ...), a ``.keras`` file, or a cnnkit
            run directory. A saved classifier is cut at the input of its last dense layer (its
            penultimate features; refused when weighted layers follow that dense layer) and given a
            new head; a model of any input size takes the data's size (or ``input_size``). Its
            groups are its weighted layers, those of a nested model (a base model inside it, an
            earlier fine-tuning's backbone) included.
        data: an ``ImageData``, a dataset name, or a mapping of ``load`` or ``from_folder`` arguments (as for ``train``).
        weights: for an applications backbone: "imagenet" (Keras downloads and caches them), a
            path to a weights file of the headless model, or ``None`` (untrained). A saved backbone
            brings its own weights: anything but the default is refused.
        trust: for a ``.keras`` file or run directory as backbone: load it even when it holds
            Python code (a Lambda layer). Only for files you trust; refused otherwise.
        stages: "auto" (chosen by dataset size and ``similarity``, Wei's four cases; printed),
            or a list of stages, each a dict with ``unfreeze`` (0 or ``None``: head only; an int
            n: the top n groups; a list of group names; "all"), ``epochs``, ``learning_rate``
            and optionally ``lr_multipliers`` ({group: factor} for discriminative rates; only
            groups the stage unfreezes) and ``name``. The head always trains.
        similarity: "similar" or "different": how the data compares with what the backbone
            learnt from; with the dataset size it picks the "auto" stages.
        batch_norm: "frozen" (batch norm in inference mode with fixed statistics, the Keras
            guide's advice), "scale_shift" (train gamma and beta of unfrozen groups, normalising
            with the fixed moving statistics), or
            "recalibrate" (unfrozen groups' batch norm trains and re-estimates statistics).
            Keras 3 note: calling the backbone with ``training=False`` (the Keras guide's recipe)
            does not keep an unfrozen batch norm in inference mode, as the outer ``training``
            overrides it; the policies here set each layer instead.
        input_size: ``(height, width)`` the backbone sees, or one int for a square; default its
            pretraining size (an applications backbone) or its input (a saved model).
        head_dropout: dropout before the new classifier.
        augment: training-time augmentation, as for ``train``.
        imbalance: class-imbalance strategy, as for ``train``; "two_stage" adds a stage "balanced"
            after the others: the last stage's groups and rates again, the rate times
            ``second_stage_lr_factor``, on a class-balanced resample.
        label_smoothing: smooth the training labels towards uniform, as for ``train``.
        optimizer: as for ``train`` ("adam", "adamw", "momentum", ...).
        learning_rate: the head's rate; "auto" stages use lr/10 for unfrozen groups, lr/100
            for a final all-layers stage.
        weight_decay: decoupled weight decay.
        ema: keep a moving average of the weights with this momentum within each stage, as for
            ``train``: validation sees the average, and each stage ends with its average in place,
            which the next stage starts from. The average spans about ``1 / (1 - ema)`` steps, so
            a stage needs several times that many (0.99: a few hundred), or it stays near its start.
        epochs: epochs of each "auto" stage.
        batch_size: images per step.
        early_stopping: patience in epochs within each stage, or ``None``.
        precision: as for ``train``, for an applications backbone; a saved backbone keeps the
            dtypes it was trained with.
        steps_per_execution: training steps per call into the compiled graph (1 under a strategy
            with several replicas).
        seed: seeds the head, shuffling, augmentation and dropout.
        deterministic: also make TensorFlow's kernels deterministic, as for ``train``.
        strategy: "auto", "mirrored", "multi_worker", "tpu" or a ``tf.distribute.Strategy``, as for
            ``train`` (``batch_size`` is the global batch; only the chief writes ``run_dir``).
        scale_learning_rate: multiply every stage's learning rate by the number of replicas.
        callbacks: extra Keras callbacks.
        run_dir: the run directory, as for ``train``: it resumes an interrupted run of the same
            call, returns the finished run of the same call instead of training again, and refuses
            another call's run. "The same call" is the same arguments and data, and, for a saved
            backbone or a weights file, the same file contents.
        overwrite: replace a run directory that holds a finished or other run.
        report: write ``report.html`` in the run directory (``cnnkit.html_report``; a few seconds
            for a small net, more for a large backbone); ``cnnkit report RUN`` writes it later too.
        verbose: 0 silent, 1 progress bars, 2 one line per epoch.

    Returns:
        A ``cnnkit.Run``; ``config.yaml`` records the stages, groups and policy chosen.

    Example:
        >>> run = finetune("runs/digits-0-4", data, stages=[
        ...     {"unfreeze": 0, "epochs": 5, "learning_rate": 1e-3},
        ...     {"unfreeze": 1, "epochs": 5, "learning_rate": 1e-4}])  # doctest: +SKIP
    """
    check_call(finetune, locals())  # the values as given (recorded_arguments names callbacks), before any data loads
    arguments = recorded_arguments(finetune, locals())
    _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("batch_norm", batch_norm, BATCH_NORM_POLICIES)
    check_backbone_weights(backbone, weights)
    if not 0 <= head_dropout < 1:
        raise ValueError(f"head_dropout must be in [0, 1). Received: head_dropout={head_dropout!r}")
    scale = learning_rate_scale(batch_size, scale_learning_rate)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    data = resolve_data(data)
    key = run_key(arguments, data, files=_file_digests(backbone, weights))
    name = _backbone_name(backbone)
    label = f"finetune-{name}"
    if name is not None:  # else building raises, below
        done = finished_run(run_dir, label, key=key, overwrite=overwrite, verbose=verbose)
        if done is not None:
            return done
    precision = resolve_precision(precision)
    recipe = prepare_inputs(data, augment=augment, imbalance=imbalance, label_smoothing=label_smoothing, seed=seed)
    built = build_finetune_model(backbone, data, weights=weights, trust=trust, input_size=input_size,
                                 head_dropout=head_dropout, precision=precision)
    group_names = built.group_names
    plan = _auto_stages(data, similarity, learning_rate, epochs, group_names) if stages == "auto" else None
    stage_specs = plan["stages"] if plan else _check_stages(stages, group_names)
    if plan and verbose:
        print(plan["message"])
    model = built.model
    splits = [recipe.resampled] * len(stage_specs)  # None: the data as it is
    second = recipe.resampled.second_stage if recipe.resampled is not None else None
    if second is not None:  # Wei's two-stage schedule: the last stage once more, on a class-balanced resample
        options, last = recipe.resampled.options, stage_specs[-1]
        stage_specs = [*stage_specs, {**last, "name": "balanced", "epochs": options["second_stage_epochs"],
                                      "learning_rate": last["learning_rate"] * options["second_stage_lr_factor"]}]
        splits.append(second)
    fit_plan = [finetune_stage(built, spec, train=shard(recipe.train_pipeline(batch_size, seed, resampled=split)),
                               steps_per_epoch=math.ceil((split.size if split else recipe.train_size) / batch_size),
                               optimizer=optimizer, weight_decay=weight_decay, ema=ema, batch_norm=batch_norm,
                               class_weight=split.class_weight if split else None, rate_scale=scale,
                               images=split.size if split else recipe.train_size)
                for spec, split in zip(stage_specs, splits)]
    source = built.source
    run_dir = prepare_run_dir(run_dir, label, key=key, overwrite=overwrite)
    if verbose:
        print(data.summary())
    with released_on_failure(run_dir):
        history, fit_seconds, stage_records = fit_stages(
            model, fit_plan, validation=shard(recipe.validation_pipeline()), run_dir=run_dir, seed=seed, loss=recipe.loss,
            steps_per_execution=steps_per_execution, early_stopping=early_stopping, callbacks=callbacks or (),
            seeded=recipe.augmentation.layers if recipe.augmentation else (), precision=precision,
            verbose=verbose,
        )
        # A plain optimiser for the saved model: the discriminative-rate wrapper is not serializable.
        plain = make_optimizer(optimizer, learning_rate=learning_rate, steps_per_epoch=1, epochs=1)
        model.compile(optimizer=plain, loss=recipe.loss, metrics=["accuracy"])
        plain.build(model.trainable_variables)  # so a reloaded model's optimizer matches the saved one
        config = run_config("finetune", arguments, data, key=key, seed=seed, backbone=source, precision=precision,
                            **recipe.config(), wei_case=plan["case"] if plan else None, groups=group_names,
                            stages=[{**spec, **record} for spec, record in zip(stage_specs, stage_records)],
                            distribution=describe())
        return finish_run(model, data, history=history, fit_seconds=fit_seconds, config=config, run_dir=run_dir,
                          verbose=verbose, report=report)


@dataclasses.dataclass
class FinetuneModel:
    """A backbone with a new head, and what staged fine-tuning needs to know of it.

    Attributes:
        model: ``image (raw pixels) -> resize / gray-to-RGB / preprocessing -> features -> global
            pooling (if spatial) -> dropout -> classifier -> probabilities``.
        features: the backbone, a nested model inside ``model``.
        groups: ``[(group name, [layers])]`` of the backbone, from input to output.
        source: what the backbone is, for ``config.yaml``.

    Example:
        >>> built = build_finetune_model("mobilenet_v2", data, weights=None)  # doctest: +SKIP
        >>> built.group_names  # doctest: +SKIP
        ['stem', 'blocks_1_2', 'blocks_3_5', 'blocks_6_12', 'blocks_13_16', 'top']
    """

    model: keras.Model
    features: keras.Model
    groups: list
    source: dict

    @property
    def group_names(self) -> list[str]:
        """The groups' names, from input to output (``unfreeze: n`` unfreezes the last n)."""
        return [name for name, _ in self.groups]


def build_finetune_model(backbone, data, *, weights="imagenet", trust: bool = False, input_size=None,
                         head_dropout: float = 0.2, precision: str = "float32") -> FinetuneModel:
    """The fine-tuning model of ``finetune``: the backbone, cut and grouped, with a new head for ``data``.

    Args:
        backbone, weights, trust, input_size, head_dropout: as for :func:`finetune`.
        data: the ``ImageData`` (its image shape is the model's input, its classes the head's).
        precision: a resolved precision ("float32", "mixed_bfloat16", ...): the backbone is built
            under it (``keras.applications`` constructors take no dtype).

    Returns:
        A :class:`FinetuneModel`, not compiled; every layer trainable until a stage's ``prepare``.

    Example:
        >>> built = build_finetune_model("runs/digits-0-4", data)  # doctest: +SKIP
        >>> built.group_names  # doctest: +SKIP
        ['conv1', 'conv2', 'fc1']
    """
    input_size = _check_input_size(input_size)
    saved = check_backbone_weights(backbone, weights)
    with _dtype_policy("float32" if saved else precision):  # a saved model keeps the dtypes it was saved with
        features, groups, adapt_input, source = _load_backbone(backbone, weights, data, input_size, trust)
    return FinetuneModel(_attach_head(features, data, adapt_input, head_dropout), features, groups, source)


def finetune_stage(built, spec, *, train, steps_per_epoch, optimizer="adam", weight_decay=0.0, ema=None,
                   batch_norm="frozen", class_weight=None, rate_scale=1.0, images=None) -> Stage:
    """The ``Stage`` of one stage spec (a dict as in ``finetune(stages=[...])``) on a :class:`FinetuneModel`.

    Its ``prepare`` sets ``trainable`` group by group: the head always trains, the groups the spec's
    ``unfreeze`` selects train, batch norm as ``batch_norm`` says; call it, then compile with the
    stage's optimiser (Keras needs a recompile after ``trainable`` changes), as ``fit_stages``
    does. The optimiser runs at the spec's ``learning_rate`` (times ``rate_scale``),
    cosine-decayed over the stage's epochs when it unfreezes a group and constant otherwise; the
    variables of each unfrozen group in ``lr_multipliers`` move at that factor of the rate. With
    ``ema`` the optimiser keeps a moving average of the weights (``make_optimizer``).

    Example:
        >>> stage = finetune_stage(built, {"name": "top1", "unfreeze": 1, "epochs": 2, "learning_rate": 1e-3,
        ...                                "lr_multipliers": {"fc1": 0.1}}, train=pipeline, steps_per_epoch=10)  # doctest: +SKIP
        >>> stage.prepare(built.model); built.model.compile(optimizer=stage.optimizer, loss="sparse_categorical_crossentropy")  # doctest: +SKIP
    """
    unfrozen = _unfrozen_groups(spec["unfreeze"], built.group_names)
    base = make_optimizer(optimizer, learning_rate=spec["learning_rate"] * rate_scale,
                          weight_decay=weight_decay, ema=ema, schedule="cosine" if unfrozen else "constant",
                          steps_per_epoch=steps_per_epoch, epochs=spec["epochs"])
    multipliers = spec.get("lr_multipliers") or {}  # groups the stage unfreezes (checked by _check_stages)
    return Stage(spec["name"], spec["epochs"], with_lr_multipliers(base, _variable_multipliers(built.groups, multipliers)),
                 train, class_weight=class_weight, prepare=_freezer(built.features, built.groups, unfrozen, batch_norm),
                 images=images)


def with_lr_multipliers(optimizer, multipliers):
    """``optimizer`` with per-variable learning-rate factors (discriminative fine-tuning rates).

    Keras optimisers take one rate for every variable; this copy scales the rate of each
    variable in ``multipliers`` (``(keras.Variable, factor)`` pairs) inside
    ``update_step``, so Adam's updates shrink too (scaling gradients would not: Adam is
    invariant to gradient scale). Decoupled weight decay scales with the factor too (as
    PyTorch's per-group rates do), and spares biases and batch-norm parameters, as
    ``make_optimizer``'s does. With no multipliers the optimiser is returned unchanged.

    Example:
        >>> opt = with_lr_multipliers(keras.optimizers.Adam(1e-3), [(model.get_layer("conv1").kernel, 0.1)])  # doctest: +SKIP
    """
    if not multipliers:
        return optimizer
    base = type(optimizer)

    class Discriminative(base):
        def update_step(self, gradient, variable, learning_rate):
            key = self._var_key(variable)
            factor = self.lr_multipliers.get(key)
            if factor is not None:
                learning_rate = learning_rate * factor
                if key in self.decayed_at_factor:  # decoupled decay at the group's rate, before its update as Keras's
                    decay = ops.cast(self.weight_decay, variable.dtype) * ops.cast(learning_rate, variable.dtype)
                    variable.assign_sub(variable * decay)
            return super().update_step(gradient, variable, learning_rate)

    Discriminative.__name__ = f"Discriminative{base.__name__}"
    discriminative = Discriminative.from_config(optimizer.get_config())
    discriminative.lr_multipliers = {discriminative._var_key(variable): factor for variable, factor in multipliers}
    discriminative.decayed_at_factor = set()
    if optimizer.weight_decay:  # the config does not carry make_optimizer's exclusions
        spared = re.compile("|".join(NO_DECAY_NAMES))
        discriminative.decayed_at_factor = {discriminative._var_key(variable) for variable, _ in multipliers
                                            if not spared.search(variable.name)}
        # Keras decays every other variable at the full rate; these the update step decays at their factor.
        discriminative.exclude_from_weight_decay(var_list=[variable for variable, _ in multipliers],
                                                 var_names=list(NO_DECAY_NAMES))
    return discriminative


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}. Received: {name}={value!r}")


def check_backbone_weights(backbone, weights) -> bool:
    """Whether ``backbone`` is a saved model, which brings its own weights (``weights`` must stay at its default).

    Example:
        >>> check_backbone_weights("mobilenet_v2", None)
        False
        >>> check_backbone_weights("runs/digits-0-4", None)  # doctest: +SKIP
        Traceback (most recent call last):
        ...
        ValueError: weights applies to keras.applications backbones; a saved backbone (runs/digits-0-4) brings its own weights. Received: weights=None
    """
    saved = isinstance(backbone, (str, Path)) and is_saved_model(backbone)
    if saved and weights != "imagenet":
        raise ValueError(f"weights applies to keras.applications backbones; a saved backbone ({backbone}) brings its "
                         f"own weights. Received: weights={weights!r}")
    return saved


@contextlib.contextmanager
def _dtype_policy(precision):
    """Build the backbone under the run's precision (applications take no dtype argument)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if precision == "float32" else precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _load_backbone(backbone, weights, data, input_size, trust):
    """``(feature model, [(group, layers)], input adapter, source description)``; the adapter maps the
    raw image tensor to the backbone's input (resize, grayscale to RGB, the backbone's preprocessing)."""
    if isinstance(backbone, (str, Path)) and is_saved_model(backbone):
        return _saved_backbone(Path(backbone), data, input_size, trust)
    from cnnkit.models import backbones

    if not isinstance(backbone, str):
        raise ValueError("backbone must be a keras.applications name (see cnnkit.models.list_backbones()), a "
                         f".keras file or a cnnkit run directory. Received: backbone={backbone!r}")
    meta = backbones.get_backbone(backbone)
    size = input_size or tuple(meta.input_size)
    meta = _with_input_size(meta, size)
    features = backbones.build_backbone(meta.name, input_shape=(*size, 3), weights=weights)
    groups = list(backbones.layer_groups(features, meta).items())
    layers = backbones.preprocessing_layers(meta, image_shape=data.image_shape)

    def adapt(x):
        for layer in layers:
            x = layer(x)
        return x

    weights_label = str(weights) if weights is not None else None
    return features, groups, adapt, {"name": meta.name, "weights": weights_label, "input_size": list(size)}


def _backbone_name(backbone) -> str | None:
    """The backbone's name in ``config.yaml`` and the default run directory: a registered backbone's
    own name, a saved one's file or folder name; ``None`` for an argument that building refuses."""
    if isinstance(backbone, (str, Path)) and is_saved_model(backbone):
        path = Path(backbone)
        return path.stem if path.suffix else path.name
    from cnnkit.models import backbones

    try:
        return backbones.get_backbone(backbone).name
    except ValueError:
        return None


def _file_digests(backbone, weights) -> dict:
    """SHA-256 of the files a call reads beyond its arguments: a saved backbone's model, a weights file.

    Example:
        >>> _file_digests("runs/digits-0-4", "imagenet")  # doctest: +SKIP
        {'backbone': '9b1f...'}
    """
    files = {}
    if isinstance(backbone, (str, Path)) and is_saved_model(backbone):
        files["backbone"] = Path(backbone) / MODEL_FILE if Path(backbone).is_dir() else Path(backbone)
    if isinstance(weights, (str, os.PathLike)) and weights != "imagenet":
        files["weights"] = Path(weights).expanduser()
    return {name: file_sha256(path) for name, path in files.items() if path.is_file()}


def _check_input_size(input_size):
    """``input_size`` as a ``(height, width)`` tuple (an int ``n`` is ``(n, n)``), or ``None``."""
    if input_size is None:
        return None
    size = [input_size] * 2 if isinstance(input_size, numbers.Integral) else input_size
    size = tuple(size) if isinstance(size, (list, tuple)) else ()
    if len(size) != 2 or not all(isinstance(side, numbers.Integral) and not isinstance(side, bool) and side >= 1
                                 for side in size):
        raise ValueError("input_size must be (height, width) in pixels, or one int for a square. "
                         f"Received: input_size={input_size!r}")
    return tuple(int(side) for side in size)


def _with_input_size(meta, size):
    if size[0] < meta.min_input_size[0] or size[1] < meta.min_input_size[1]:
        raise ValueError(f"{meta.name} needs inputs of at least {tuple(meta.min_input_size)}. Received: input_size={size}")
    return dataclasses.replace(meta, input_size=size)


def is_saved_model(path) -> bool:
    """Whether ``finetune`` takes a backbone argument as a ``.keras`` file or run directory (else a
    ``keras.applications`` name).

    Example:
        >>> is_saved_model("runs/digits-0-4"), is_saved_model("mobilenet_v2")
        (True, False)
    """
    path = Path(path)
    return path.suffix == ".keras" or path.is_dir() or "/" in str(path)


def _saved_backbone(path, data, input_size, trust):
    """A saved classifier cut at the input of its last dense layer, grouped by weighted layer."""
    import cnnkit

    model = cnnkit.load(path, trust=trust).model  # a clear error for a missing, unreadable or unsafe file
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"{path}: the model has no dense classifier to cut off")
    following = [layer.name for layer in model.layers[model.layers.index(dense[-1]) + 1:] if layer.weights]
    if following:  # a dense layer inside the network (a squeeze-excitation block): not its classifier
        raise ValueError(f"{path}: its last dense layer, {dense[-1].name!r}, is not its classifier: weighted layers "
                         f"{following} follow it. Give a model whose classifier is its last dense layer")
    features = keras.Model(model.inputs, dense[-1].input, name=f"{model.name}_features")
    groups = _layer_groups_by_block(features)
    if not groups:
        raise ValueError(f"{path}: no weighted layer comes before its classifier, {dense[-1].name!r}, so there are no "
                         "features to fine-tune. Give a model with weighted layers before its last dense layer")
    shape = tuple(features.input_shape[1:])
    if None in shape[:2]:  # a model of any input size: the data's size, or input_size
        shape = (*(input_size or data.image_shape[:2]), shape[2])
    elif input_size and input_size != shape[:2]:
        raise ValueError(f"{path} takes {shape[:2]} inputs; input_size does not apply. Received: input_size={input_size}")
    return features, groups, _input_adapter(data.image_shape, shape, path), {"name": _backbone_name(path), "path": str(path)}


def _input_adapter(image_shape, target_shape, path):
    """Resize to the saved model's input size and repeat a gray channel for an RGB model."""
    channels, target_channels = image_shape[-1], target_shape[-1]
    if channels != target_channels and not (channels == 1 and target_channels == 3):
        raise ValueError(f"{path} takes {target_channels}-channel images; the data has {channels} channels")

    def adapt(x):
        if tuple(image_shape[:2]) != tuple(target_shape[:2]):
            x = keras.layers.Resizing(*target_shape[:2], name="resize")(x)
        if channels != target_channels:
            x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
        return x

    return adapt


def _layer_groups_by_block(model):
    """Groups of a saved model's layers, those of nested models (a base model inside a classifier,
    an earlier fine-tuning's backbone) taken in their place: a weighted layer starts a group;
    batch norm, activations and pooling join the group before them (the first group, before any),
    as do layers sharing its name prefix: the name up to its first ``_`` (``conv1`` of ``conv1_bn``),
    or to its second where a number follows the first (Keras's own names ``conv2d_1``, ``dense_2``;
    MobileNet's ``block_1_expand``), so such layers are not all one group."""
    groups, leading = [], []
    for layer in _leaf_layers(model):
        parts = layer.name.split("_")
        prefix = "_".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]
        owner = next((group for group in groups if group[0] == prefix), None)
        starts = layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
        if owner is None and starts:
            groups.append((prefix, [*leading, layer]))
            leading = []
        elif owner is not None:
            owner[1].append(layer)
        elif groups:
            groups[-1][1].append(layer)
        else:
            leading.append(layer)
    return groups


def _leaf_layers(model):
    """The layers of ``model``, each nested ``keras.Model`` replaced by its own layers, recursively."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _attach_head(features, data, adapt_input, head_dropout):
    inputs = keras.Input(data.image_shape, name="image")
    x = adapt_input(inputs)
    x = features(x)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = keras.layers.Dropout(head_dropout, name="head_dropout", seed=0)(x)
    x = keras.layers.Dense(data.num_classes, name="classifier")(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{features.name}_finetuned")


def _auto_stages(data, similarity, learning_rate, epochs, group_names):
    """Wei's four cases (CS231n transfer-learning notes) by dataset size and similarity."""
    per_class = data.sizes["train"] / max(1, data.num_classes)
    size = "small" if per_class < SMALL_PER_CLASS else "large"
    top_half = max(1, len(group_names) // 2)
    cases = {
        ("small", "similar"): (1, "train the head on frozen features, then the top group at lr/10",
                               [(0, 1.0), (1, 0.1)]),
        ("large", "similar"): (2, f"train the head, then the top {top_half} groups at lr/10, then all at lr/100",
                               [(0, 1.0), (top_half, 0.1), ("all", 0.01)]),
        ("small", "different"): (3, f"train the head, then the top {top_half} groups at lr/10 (features from "
                                 "lower layers matter more for different data)", [(0, 1.0), (top_half, 0.1)]),
        ("large", "different"): (4, "train the head, then every layer at lr/10", [(0, 1.0), ("all", 0.1)]),
    }
    case, description, plan = cases[(size, similarity)]
    stages = [{"name": "head" if unfreeze == 0 else ("all" if unfreeze == "all" else f"top{unfreeze}"),
               "unfreeze": unfreeze, "epochs": epochs, "learning_rate": learning_rate * factor}
              for unfreeze, factor in plan]
    message = (f"finetune: {data.sizes['train']:,} training images, {data.num_classes} classes ({per_class:.0f} per "
               f"class: {size}); similarity {similarity!r}\n  -> Wei's case {case} ({size}, {similarity}): {description}")
    return {"case": case, "stages": stages, "message": message}


def _check_stages(stages, group_names):
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError(f"stages must be 'auto' or a non-empty list of stage dicts. Received: stages={stages!r}")
    checked = []
    for index, stage in enumerate(stages, 1):
        if not isinstance(stage, dict):
            raise ValueError(f"stage {index} must be a dict with unfreeze, epochs, learning_rate. Received: {stage!r}")
        unknown = set(stage) - _STAGE_KEYS
        if unknown:
            raise ValueError(f"stage {index}: unknown key {sorted(unknown)[0]!r}; valid: {sorted(_STAGE_KEYS)}")
        missing = {"epochs", "learning_rate"} - set(stage)
        if missing:
            raise ValueError(f"stage {index}: missing key {sorted(missing)[0]!r}")
        epochs = stage["epochs"]
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"stage {index}: epochs must be an integer >= 1. Received: epochs={epochs!r}")
        if not is_finite_number(stage["learning_rate"]) or stage["learning_rate"] <= 0:
            raise ValueError(f"stage {index}: learning_rate must be positive. Received: {stage['learning_rate']!r}")
        unfreeze = stage.get("unfreeze", 0)
        unfrozen = _unfrozen_groups(unfreeze, group_names, where=f"stage {index}")
        multipliers = stage.get("lr_multipliers") or {}
        if not isinstance(multipliers, dict):
            raise ValueError(f"stage {index}: lr_multipliers must be a mapping {{group: factor}}. Received: "
                             f"{multipliers!r}")
        for group, factor in multipliers.items():
            if group not in group_names:
                raise ValueError(f"stage {index}: lr_multipliers names unknown group {group!r}; groups: {group_names}")
            if group not in unfrozen:
                raise ValueError(f"stage {index}: lr_multipliers names group {group!r}, which the stage leaves frozen "
                                 f"(unfreeze={unfreeze!r} trains {sorted(unfrozen, key=group_names.index)})")
            if not is_finite_number(factor) or factor <= 0:
                raise ValueError(f"stage {index}: lr_multipliers[{group!r}] must be positive. Received: {factor!r}")
        checked.append({"name": stage.get("name", f"stage{index}"), "unfreeze": unfreeze, "epochs": epochs,
                        "learning_rate": float(stage["learning_rate"]),
                        "lr_multipliers": dict(stage.get("lr_multipliers") or {})})
    return checked


def _unfrozen_groups(unfreeze, group_names, where="stage"):
    """The set of group names an ``unfreeze`` value selects."""
    if unfreeze is None or (unfreeze == 0 and not isinstance(unfreeze, bool)):  # False is no number of groups
        return set()
    if unfreeze == "all":
        return set(group_names)
    if isinstance(unfreeze, int) and not isinstance(unfreeze, bool):
        if not 0 < unfreeze <= len(group_names):
            raise ValueError(f"{where}: unfreeze must be between 0 and the {len(group_names)} groups. "
                             f"Received: unfreeze={unfreeze}")
        return set(group_names[-unfreeze:])
    if isinstance(unfreeze, (list, tuple)):
        unknown = [name for name in unfreeze if name not in group_names]
        if unknown:
            raise ValueError(f"{where}: unknown group {unknown[0]!r}; groups: {group_names}")
        return set(unfreeze)
    raise ValueError(f"{where}: unfreeze must be 0, a number of top groups, a list of group names or 'all'. "
                     f"Received: unfreeze={unfreeze!r}")


def _freezer(features, groups, unfrozen, batch_norm):
    """The stage's ``prepare``: set ``trainable`` group by group (the head always trains), then
    apply the batch-norm policy to every batch norm in the group, inside nested layers too."""

    def prepare(model):
        features.trainable = bool(unfrozen)  # also the nested models holding the groups' layers
        for name, layers in groups:
            for layer in layers:
                layer.trainable = name in unfrozen
                for norm in layer._flatten_layers(include_self=True, recursive=True):
                    if isinstance(norm, keras.layers.BatchNormalization):
                        norm.trainable = name in unfrozen and batch_norm != "frozen"
                        if norm.trainable and batch_norm == "scale_shift":
                            _always_inference_mode(norm)

    return prepare


def _always_inference_mode(layer):
    """Make a trainable batch-norm layer normalise with its moving statistics even in training.

    Keras runs batch norm in training mode whenever the layer is trainable and the model
    trains; a nested model called with ``training=False`` does not help in Keras 3, whose
    functional models pass the outer call's ``training`` down to every layer. Gamma and beta
    still get gradients; the statistics stay as they are. Only this in-memory layer changes:
    a saved and reloaded model behaves the same at inference.
    """
    call = type(layer).call
    layer.call = lambda inputs, training=None, mask=None: call(layer, inputs, training=False, mask=mask)


def _variable_multipliers(groups, multipliers):
    return [(variable, multipliers[name]) for name, layers in groups if name in multipliers
            for layer in layers for variable in layer.weights]

