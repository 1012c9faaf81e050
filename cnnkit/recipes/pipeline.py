"""From an ``ImageData`` split to a batched, prefetched ``tf.data`` pipeline.

Images stay uint8 through the pipeline (4x less memory in the cache than float32); the model
scales them in its first layer.

Example:
    >>> import numpy as np, cnnkit
    >>> data = cnnkit.data.from_arrays(np.zeros((20, 8, 8), np.uint8), np.arange(20) % 2)
    >>> batch_images, batch_labels = next(iter(input_pipeline(data, "train", batch_size=4, shuffle=True)))
    >>> batch_images.shape, batch_images.dtype.name
    (TensorShape([4, 8, 8, 1]), 'uint8')
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import keras
import numpy as np
import tensorflow as tf

SHUFFLE_BUFFER_BYTES = 512 * 2**20


def resolve_data(data):
    """An ``ImageData`` from an ``ImageData``, a dataset name, or a mapping: ``cnnkit.data.load``
    arguments with "name", or ``cnnkit.data.from_folder`` arguments with "path".

    Example:
        >>> resolve_data("mnist-sample").sizes["test"]  # doctest: +SKIP
        1000
        >>> resolve_data({"name": "mnist-sample", "val_split": 0}).sizes  # doctest: +SKIP
        {'train': 5000, 'test': 1000}
    """
    from cnnkit import data as data_sources

    if isinstance(data, data_sources.ImageData):
        return data
    if isinstance(data, str):
        return data_sources.load(data)
    if isinstance(data, dict):
        options = dict(data)
        if ("name" in options) == ("path" in options):
            raise ValueError("a data mapping holds cnnkit.data.load arguments with 'name' or cnnkit.data.from_folder "
                             f"arguments with 'path' (one of the two). Received: data={data!r}")
        if "name" in options:
            return data_sources.load(options.pop("name"), **options)
        return data_sources.from_folder(options.pop("path"), **options)
    raise ValueError(
        "data must be a cnnkit.data.ImageData, a dataset name such as 'mnist', or a mapping of "
        f"load or from_folder arguments. Received: data={data!r}"
    )


def input_pipeline(data, split: str, *, batch_size: int, shuffle: bool = False, seed: int = 0, dataset=None,
                   size: int | None = None, augmentation=None, one_hot: bool = False):
    """Cache, (shuffle), batch, (augment) and prefetch one split; ``None`` when the split is absent.

    The shuffle buffer holds the whole split when it fits in 512 MiB of uint8 images (a full
    shuffle, as for MNIST), else as many images as fit. The order is a function of ``seed`` and
    the epoch being trained (``cnnkit.recipes.resume.training_epoch``), not of how often the
    pipeline was iterated, so a resumed run sees the orders an uninterrupted one would.

    Args:
        data: the ``ImageData``.
        split: "train", "val" or "test".
        batch_size: images per batch.
        shuffle: reshuffle every epoch.
        seed: the shuffle seed.
        dataset: an unbatched dataset to use instead of the split (a resampled training split,
            ``cnnkit.recipes.imbalance.Resampled.dataset``), with ``size`` its length; it is not
            cached, so a resample drawn afresh each epoch stays fresh.
        augmentation: a ``cnnkit.recipes.augment.Augmentation`` applied to each batch in the
            pipeline (never inside the model).
        one_hot: give one-hot float labels (for MixUp/CutMix training), else int labels.
    """
    if dataset is None:
        dataset = getattr(data, split)
        if dataset is None:
            return None
        dataset, size = dataset.cache(), data.sizes[split]
    if shuffle:
        dataset = _epoch_shuffled(dataset, size, data.image_shape, seed)
    dataset = dataset.batch(batch_size)
    if augmentation is not None:
        dataset = augmentation.apply(dataset)
    if one_hot and not (augmentation is not None and augmentation.soft_labels):
        depth = data.num_classes
        dataset = dataset.map(lambda images, labels: (images, tf.one_hot(labels, depth)),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _epoch_shuffled(dataset, size, image_shape, seed):
    """``dataset`` shuffled afresh for each epoch, with the seed ``epoch_seed(seed, epoch)``."""
    from cnnkit.recipes.resume import per_epoch

    buffer = max(1, min(size, SHUFFLE_BUFFER_BYTES // max(1, math.prod(image_shape))))
    return per_epoch(lambda epoch_seed: dataset.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False),
                     seed, size)


SAMPLE_BYTES = 256 * 2**20


def training_sample(data) -> np.ndarray:
    """The training images (uint8 NHWC) that preprocessing and PCA colour are fitted on.

    The whole training split when it fits in 256 MiB (all of MNIST or CIFAR-10), else a uniform
    random sample of that size drawn with a fixed seed from the whole split (whatever its order:
    ``from_arrays`` keeps the caller's, which may be class by class), in the split's order; the
    split is read once and only the sample is held in memory.

    Example:
        >>> training_sample(cnnkit.data.load("mnist-sample")).shape  # doctest: +SKIP
        (4500, 28, 28, 1)
    """
    size = data.sizes["train"]
    count = min(size, max(1, SAMPLE_BYTES // max(1, math.prod(data.image_shape))))
    images = data.train.map(lambda image, label: image)
    if count < size:
        chosen = np.zeros(size, bool)
        chosen[np.random.default_rng(0).choice(size, count, replace=False)] = True
        chosen = tf.constant(chosen)
        images = images.enumerate().filter(lambda index, image: chosen[index]).map(lambda _, image: image)
    return next(iter(images.batch(count))).numpy()


def training_subsample(data, count: int, seed) -> np.ndarray:
    """``count`` clean training images drawn at random with ``seed`` from :func:`training_sample`
    (all of them, shuffled, when it holds fewer): what ``train(precise_bn=count)`` re-estimates
    batch norm on. Random, not the first ``count``: a split may be stored sorted by class.

    Example:
        >>> training_subsample(cnnkit.data.load("mnist-sample"), 1000, seed=0).shape  # doctest: +SKIP
        (1000, 28, 28, 1)
    """
    images = training_sample(data)
    return images[np.random.default_rng(seed).permutation(len(images))[:count]]


class TrainingInputs:
    """What a recipe's ``augment``, ``preprocess`` and ``imbalance`` arguments make of the data.

    Attributes:
        preprocessing: ``None`` (the model's default 1/255 rescaling) or the fitted
            preprocessing layers to build into the model.
        augmentation: the ``Augmentation`` applied to training batches, or ``None``.
        resampled: the ``Resampled`` training split, or ``None``; without class weights when
            ``label_weights`` holds them.
        train_size: images per training epoch (after resampling).
        class_weight: per-class loss weights for ``fit``, or ``None``.
        label_weights: with soft labels, the class weights as a vector: the training pipeline
            gives each example the weight ``label @ label_weights`` (a mixed label weighs each
            class by its share; ``fit``'s ``class_weight`` would give it its largest class's
            weight), and ``class_weight`` is ``None``. Else ``None``.
        soft_labels: labels are one-hot floats (augmentation mixes them, or ``label_smoothing``).
        loss: categorical cross-entropy on soft labels (smoothed by ``label_smoothing``), else
            sparse categorical cross-entropy; logit-adjusted with ``imbalance="logit_adjusted"``.

    Example:
        >>> inputs = prepare_inputs(data, augment="shift", preprocess="scale", imbalance=None, seed=0)  # doctest: +SKIP
        >>> pipeline = inputs.train_pipeline(batch_size=128, seed=0)  # doctest: +SKIP
    """

    def __init__(self, data, *, augment, preprocess, imbalance, label_smoothing, seed, dtype):
        check_label_smoothing(label_smoothing)
        self.data = data
        sample = None
        if preprocess != "scale" or augment not in (None, "none"):
            sample = training_sample(data)
        self.preprocessing = None
        if preprocess != "scale":
            from cnnkit.recipes.preprocess import fit_preprocessing

            self.preprocessing = fit_preprocessing(preprocess, sample, dtype=dtype)
        self.augmentation = None
        if augment not in (None, "none"):
            from cnnkit.recipes.augment import make_augmentation

            self.augmentation = make_augmentation(augment, image_shape=data.image_shape,
                                                  num_classes=data.num_classes, seed=seed, train_images=sample)
        self.resampled = None
        if imbalance not in (None, "none"):
            from cnnkit.recipes.imbalance import resample

            self.resampled = resample(imbalance, data, seed=seed)
        self.train_size = self.resampled.size if self.resampled else data.sizes["train"]
        self.soft_labels = bool(self.augmentation and self.augmentation.soft_labels) or label_smoothing > 0
        self.label_weights = None
        if self.soft_labels and self.resampled and self.resampled.class_weight:
            weights = self.resampled.class_weight  # Keras's default for a class without a weight: 1
            self.label_weights = np.array([weights.get(c, 1.0) for c in range(data.num_classes)], np.float32)
            self.resampled = dataclasses.replace(self.resampled, class_weight=None)
        self.class_weight = self.resampled.class_weight if self.resampled else None
        self.loss = (self.resampled.loss(sparse=not self.soft_labels, label_smoothing=label_smoothing)
                     if self.resampled else cross_entropy(sparse=not self.soft_labels, label_smoothing=label_smoothing))
        self._config = {"augment": self.augmentation.config if self.augmentation else None,
                        "preprocess": preprocess,
                        "imbalance": self.resampled.config if self.resampled else None}

    def train_pipeline(self, batch_size, seed, resampled=None):
        """The batched, shuffled, augmented training pipeline (of ``resampled`` when given): batches of
        ``(images, labels)``, or ``(images, labels, example weights)`` with ``label_weights``."""
        resampled = resampled or self.resampled
        dataset = input_pipeline(
            self.data, "train", batch_size=batch_size, shuffle=True, seed=seed,
            dataset=resampled.dataset if resampled else None, size=resampled.size if resampled else None,
            augmentation=self.augmentation, one_hot=self.soft_labels,
        )
        if self.label_weights is None:
            return dataset
        weights = tf.constant(self.label_weights)
        return dataset.map(lambda images, labels: (images, labels, tf.linalg.matvec(labels, weights)),
                           num_parallel_calls=tf.data.AUTOTUNE)

    def validation_pipeline(self, batch_size=1024):
        """The batched validation pipeline, labels one-hot when training labels are."""
        return input_pipeline(self.data, "val", batch_size=batch_size, one_hot=self.soft_labels)

    def config(self) -> dict:
        """Plain data for ``config.yaml``: the augmentation, preprocessing and class counts used."""
        config = dict(self._config)
        if self.resampled is not None:
            config["train_class_counts"] = {"before": list(self.resampled.counts_before),
                                            "after": list(self.resampled.counts_after)}
            if self.resampled.second_stage is not None:
                config["train_class_counts"]["second_stage"] = list(self.resampled.second_stage.counts_after)
        return config


def check_label_smoothing(label_smoothing) -> None:
    """Refuse a ``label_smoothing`` that is not a number in [0, 1).

    Example:
        >>> check_label_smoothing(1.0)
        Traceback (most recent call last):
        ...
        ValueError: label_smoothing must be a number in [0, 1) (e.g. 0.1). Received: label_smoothing=1.0
    """
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or not (
            0 <= label_smoothing < 1):
        raise ValueError(f"label_smoothing must be a number in [0, 1) (e.g. 0.1). "
                         f"Received: label_smoothing={label_smoothing!r}")


def cross_entropy(*, sparse: bool = True, label_smoothing: float = 0.0):
    """The classification loss: sparse (integer labels) or categorical (one-hot or soft labels).

    ``label_smoothing`` (Szegedy et al. 2016) trains against ``(1 - e) * one_hot + e / classes``;
    it needs one-hot labels, so it applies to the categorical loss only.

    Example:
        >>> cross_entropy(sparse=False, label_smoothing=0.1).get_config()["label_smoothing"]
        0.1
    """
    if label_smoothing:
        if sparse:
            raise ValueError("label smoothing needs one-hot labels (sparse=False)")
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    return "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"


def prepare_inputs(data, *, augment=None, preprocess="scale", imbalance=None, label_smoothing=0.0, seed=0,
                   dtype=None) -> TrainingInputs:
    """Check and fit a recipe's ``augment``, ``preprocess``, ``imbalance`` and ``label_smoothing`` on ``data``.

    ``dtype`` is the model's dtype policy (``None`` for float32), for the preprocessing layers.

    Example:
        >>> prepare_inputs(data, imbalance="oversample").train_size  # doctest: +SKIP
        50000
    """
    if data.num_classes < 2:
        raise ValueError(f"the data ({data.source}) has {data.num_classes} class "
                         f"({', '.join(map(repr, data.class_names))}); a classifier needs at least 2")
    return TrainingInputs(data, augment=augment, preprocess=preprocess, imbalance=imbalance,
                          label_smoothing=label_smoothing, seed=seed, dtype=dtype)
