"""``cnnkit.recipes.train``: train a classifier from scratch and write its run directory.

Example:
    >>> import cnnkit
    >>> run = cnnkit.recipes.train("20C5-MP2-50C5-MP2-FC256", "mnist-sample", epochs=3)  # doctest: +SKIP
    >>> run.metrics["test_accuracy"]  # doctest: +SKIP
    0.968
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

import cnnkit
from cnnkit.distribute import describe, distributed, learning_rate_scale, shard
from cnnkit.recipes.batchnorm import recalibrate_batch_norm
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
from cnnkit.recipes.optimization import make_optimizer, resolve_precision
from cnnkit.recipes.options import check_call
from cnnkit.recipes.pipeline import prepare_inputs, resolve_data, training_subsample
from cnnkit.runs import Run


@distributed
def train(
    arch,
    data,
    *,
    model_options: dict | None = None,
    augment=None,
    preprocess="scale",
    imbalance=None,
    label_smoothing: float = 0.0,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    ema: float | None = None,
    precise_bn: int = 0,
    schedule="constant",
    epochs: int = 10,
    batch_size: int = 128,
    early_stopping: int | None = None,
    precision: str = "auto",
    steps_per_execution: int = 16,
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
    """Train a network from scratch, evaluate it on the test split, and write its run directory.

    Args:
        arch: notation (``"20C5-MP2-50C5-MP2-FC256"``), a registered name (``"lenet"``), or a
            ``keras.Model`` taking raw pixels (then ``model_options``, ``preprocess`` and
            ``precision`` do not apply: the model is used as built).
        data: a ``cnnkit.data.ImageData``, a dataset name for ``cnnkit.data.load`` ("mnist",
            "mnist-sample"), or a mapping: ``cnnkit.data.load`` arguments with "name"
            (``{"name": "mnist", "val_split": 0}``) or ``cnnkit.data.from_folder`` arguments with "path".
        model_options: build options for ``cnnkit.build`` (activation, padding, batch_norm,
            initializer, l2, max_norm).
        augment: training-time augmentation in the input pipeline: a preset name ("shift",
            "affine", "elastic", "crop_flip", "mixup", ... see ``cnnkit.recipes.augment``), a
            list of presets and ``{"name": ..., **options}`` dicts, or ``None``.
        preprocess: input preprocessing fitted on the training split and built into the model
            ("scale", "center_pixel", "center_channel", "standardize", "pca", "zca", or a
            list; see ``cnnkit.recipes.preprocess``), so the saved model takes raw pixels.
        imbalance: class-imbalance strategy ("class_weight", "oversample", "undersample",
            "balanced_batches", "two_stage", "logit_adjusted", or a dict with "strategy" and its options; see
            ``cnnkit.recipes.imbalance``), or ``None`` to train on the data as it is.
        label_smoothing: train against labels smoothed towards uniform by this much
            (Szegedy et al. 2016; 0.1 is usual): ``(1 - e) * one_hot + e / classes``. 0: hard labels.
            The history's ``val_loss`` is the smoothed loss too (Keras applies the training loss
            to validation); the test metrics are not affected.
        optimizer: "sgd", "momentum", "nesterov", "adam", "adamw" or "rmsprop".
        learning_rate: peak learning rate.
        momentum: for momentum, nesterov and rmsprop.
        weight_decay: decoupled weight decay, not applied to biases and batch-norm parameters.
        ema: keep an exponential moving average of the weights with this momentum (Polyak
            averaging; 0.999 averages over about the last 1,000 steps). Validation metrics are
            those of the averaged weights, and they replace the weights when training ends, so
            the run's test metrics and saved model are the average's. ``None``: no average.
        precise_bn: after training, re-estimate the batch-norm statistics on this many clean
            training images (a random sample drawn with ``seed``, at most 256 MiB) with dropout off
            (``cnnkit.recipes.batchnorm``; 10000 is plenty); 0: keep the averages gathered during
            training, over augmented, dropped-out batches. Test metrics and the saved model use them.
        schedule: "constant", "step", "cosine", "onecycle", or a dict (see
            ``cnnkit.recipes.optimization.make_schedule``).
        epochs: passes over the training split.
        batch_size: images per step.
        early_stopping: stop when validation loss has not improved for this many epochs and
            restore the best weights; ``None`` trains all epochs.
        precision: "auto" (mixed_bfloat16 where the CPU or GPU computes bf16 fast, else
            float32), "float32", "mixed_bfloat16" or "mixed_float16". Variables and the softmax
            output stay float32.
        steps_per_execution: training steps run per call into the compiled graph; more
            amortises Python overhead on small networks (callbacks then see every N-th batch);
            1 under a strategy with several replicas (``cnnkit.distribute``).
        seed: seeds weights, shuffling, augmentation, resampling and dropout.
        deterministic: also make TensorFlow's kernels deterministic (slower, process-wide):
            two runs with the same seed then end with identical weights and metrics.
        strategy: "auto" (one device, or all GPUs when there are several), "mirrored",
            "multi_worker" (the hosts of ``TF_CONFIG``), "tpu" or a ``tf.distribute.Strategy``;
            see ``cnnkit.distribute``. ``batch_size`` is the global batch, split across replicas;
            only the chief writes ``run_dir``.
        scale_learning_rate: multiply the learning rate by the number of replicas (the linear
            scaling rule, for a global batch that many times the one the rate was tuned for).
        callbacks: extra ``keras.callbacks.Callback`` objects, run after cnnkit's own (resume
            backup, TensorBoard, early stopping).
        run_dir: where to write the run; default ``runs/<arch>-<digest of the arguments and
            data>``, so the same call finds its interrupted run again. A directory holding an
            interrupted run of the same arguments resumes from its last completed epoch (with
            a fixed seed and ``deterministic=True``, to the weights an uninterrupted run ends with); one holding a finished
            run, or another call's run, is refused, and so is a folder that is not empty and holds no run.
        overwrite: replace a run directory that holds a finished or other run (never a folder that
            holds no run).
        report: write ``report.html`` in the run directory (``cnnkit.html_report``; a few seconds
            for a small net, more for a large backbone); ``cnnkit report RUN`` writes it later too.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.

    Returns:
        A ``cnnkit.Run`` with ``metrics`` holding ``test_accuracy``, ``test_error``,
        ``balanced_accuracy``, per-class precision/recall/F1 and the confusion matrix (when
        the data has a test split), plus ``epochs_run`` and training throughput.

    Example:
        >>> run = train("lenet", "mnist-sample", optimizer="momentum", learning_rate=0.05,
        ...             schedule="cosine", augment="shift", epochs=5)  # doctest: +SKIP
    """
    check_call(train, locals())  # the values as given (recorded_arguments names callbacks), before any data loads
    arguments = recorded_arguments(train, locals())
    learning_rate = learning_rate * learning_rate_scale(batch_size, scale_learning_rate)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    data = resolve_data(data)
    if early_stopping and data.val is None:
        raise ValueError("early_stopping needs a validation split; the data has none (val_split=0)")
    label, key = arch if isinstance(arch, str) else arch.name, run_key(arguments, data)
    if isinstance(arch, str):  # the arguments say all of the call (a model object's weights they do not)
        done = finished_run(run_dir, label, key=key, overwrite=overwrite, verbose=verbose)
        if done is not None:
            return done
    precision = resolve_precision(precision) if not isinstance(arch, keras.Model) else "as built"
    dtype = None if precision in ("float32", "as built") else precision
    recipe = prepare_inputs(data, augment=augment, preprocess=preprocess, imbalance=imbalance,
                            label_smoothing=label_smoothing, seed=seed, dtype=dtype)
    model = _make_model(arch, data, dtype, model_options or {}, recipe.preprocessing)
    steps_per_epoch = math.ceil(recipe.train_size / batch_size)
    stages = [Stage("train", epochs, make_optimizer(
        optimizer, learning_rate=learning_rate, schedule=schedule, momentum=momentum, weight_decay=weight_decay,
        ema=ema, steps_per_epoch=steps_per_epoch, epochs=epochs,
    ), shard(recipe.train_pipeline(batch_size, seed)), class_weight=recipe.class_weight, images=recipe.train_size)]
    second = recipe.resampled.second_stage if recipe.resampled is not None else None
    if second is not None:  # Wei's two-stage schedule: then fine-tune on a class-balanced resample
        options = recipe.resampled.options
        second_epochs = options["second_stage_epochs"]
        stages.append(Stage("balanced", second_epochs, make_optimizer(
            optimizer, learning_rate=learning_rate * options["second_stage_lr_factor"], momentum=momentum,
            weight_decay=weight_decay, ema=ema, steps_per_epoch=math.ceil(second.size / batch_size), epochs=second_epochs,
        ), shard(recipe.train_pipeline(batch_size, seed, resampled=second)), class_weight=second.class_weight,
            images=second.size))
    run_dir = prepare_run_dir(run_dir, label, key=key, overwrite=overwrite)  # args checked
    if verbose:
        print(data.summary())
    with released_on_failure(run_dir):  # precise_bn or writing the run may fail after the fit
        history, fit_seconds, stage_records = fit_stages(
            model, stages, validation=shard(recipe.validation_pipeline()), run_dir=run_dir, seed=seed, loss=recipe.loss,
            steps_per_execution=steps_per_execution, early_stopping=early_stopping, callbacks=callbacks or (),
            seeded=recipe.augmentation.layers if recipe.augmentation else (), precision=precision,
            verbose=verbose,
        )
        if precise_bn:
            images = training_subsample(data, precise_bn, seed)
            layers = recalibrate_batch_norm(model, images, batch_size=batch_size)
            if verbose:
                print(f"precise_bn: re-estimated the statistics of {layers} batch-norm layer(s) on "
                      f"{len(images)} clean training images")
        config = run_config("train", arguments, data, key=key, seed=seed,
                            arch=label if isinstance(arch, str) else f"<keras.Model {arch.name}>",
                            precision=precision, **recipe.config(), stages=stage_records, distribution=describe())
        return finish_run(model, data, history=history, fit_seconds=fit_seconds, config=config, run_dir=run_dir,
                          verbose=verbose, report=report)


def _make_model(arch, data, dtype, model_options, preprocessing):
    if isinstance(arch, keras.Model):
        if model_options:
            raise ValueError("model_options apply when arch is notation or a registered name, not a keras.Model")
        if preprocessing is not None:
            raise ValueError("preprocess applies when arch is notation or a registered name; a keras.Model "
                             "is used as built (put its preprocessing layers inside it)")
        return arch
    if preprocessing is not None and "preprocessing" in model_options:
        raise ValueError("give preprocessing either as preprocess= or as model_options['preprocessing'], not both")
    if preprocessing is not None:
        model_options = {**model_options, "preprocessing": preprocessing}
    return cnnkit.build(arch, data.image_shape, data.num_classes, dtype=dtype, **model_options)
