"""Class-imbalance strategies: resample the training split or weight its classes.

``resample(imbalance, data, seed=...)`` returns a :class:`Resampled`: the (unbatched, finite)
training dataset to fit on, the class weights to pass to ``fit``, and the class counts before
and after. Validation and test splits are never resampled: they measure the model on the data's
own distribution (the test split of ``cnnkit.data.long_tailed`` stays balanced).

Strategies (``STRATEGIES``, with each one's options and defaults):

* ``"none"``: the data as it is.
* ``"class_weight"``: the data as it is, with "balanced" loss weights
  ``n_samples / (n_classes * count_c)`` (scikit-learn's formula; ``fit(class_weight=...)``
  applies them to ``tf.data`` input).
* ``"oversample"``: every class replicated up to the largest class's count (each example
  ``target // n_c`` times, plus a random ``target % n_c`` once more). With
  ``augmented_copies`` the replicas (never the originals) become new images, each drawn once:
  ``True`` makes them the seed's minority crops (a random crop of 85-90% of the area scaled
  back to full size, shifted by up to 7% of the side: ``keras.layers.RandomZoom`` +
  ``RandomTranslation``, seeded); an augmentation as ``augment=`` takes it (a preset or op
  name, or a list: ``"elastic"`` gives Simard's distortions, the best on long-tailed MNIST).
* ``"undersample"``: every class cut down to the smallest class's count, chosen at random;
  ``Resampled.dropped`` says how many examples that leaves out.
* ``"balanced_batches"``: each epoch draws as many examples as the training split holds, each
  from a uniformly chosen class (``tf.data.Dataset.sample_from_datasets`` over per-class
  shuffled, repeated datasets), freshly every epoch, seeded by the seed and the epoch.
* ``"two_stage"``: Wei's schedule: train on the data as it is, then fine-tune for
  ``second_stage_epochs`` (3) epochs at ``second_stage_lr_factor`` (0.1) times the learning
  rate on class-balanced batches (``Resampled.second_stage``).
* ``"logit_adjusted"``: the data as it is, trained with the logit-adjusted cross-entropy of
  Menon et al. 2021 (``LogitAdjustedCrossentropy``: ``tau`` (1.0) times the log class prior
  added to the logits in the loss only, so the trained model predicts for a balanced test set;
  with ``tau=1`` this is Ren et al. 2020's balanced softmax).

Classes with no training example are left out of the balancing (nothing to replicate; they do
not set the undersampling target) and get no class weight.

Resampled splits index the training images held in memory (``ImageData.arrays("train")``),
so only indices are repeated, not images (augmented copies are the exception: they are new
images). The order is shuffled once with ``seed``; the input pipeline reshuffles every epoch.

Example:
    >>> import numpy as np, cnnkit
    >>> x = np.zeros((60, 8, 8), np.uint8)
    >>> y = np.array([0] * 40 + [1] * 15 + [2] * 5)
    >>> data = cnnkit.data.from_arrays(x, y, val_split=0)
    >>> resample("oversample", data).counts_after
    [40, 40, 40]
    >>> resample({"strategy": "undersample"}, data).counts_after
    [5, 5, 5]
"""

from __future__ import annotations

import dataclasses
import numbers

import keras
import numpy as np
import tensorflow as tf

from cnnkit.data.imagedata import check_seed, count_classes
from cnnkit.recipes.optimization import is_finite_number
from cnnkit.recipes.pipeline import cross_entropy

__all__ = ["STRATEGIES", "LogitAdjustedCrossentropy", "Resampled", "parse_imbalance", "resample"]

STRATEGIES = {
    "none": {},
    "class_weight": {},
    "oversample": {"augmented_copies": False},
    "undersample": {},
    "balanced_batches": {},
    "two_stage": {"second_stage_epochs": 3, "second_stage_lr_factor": 0.1},
    "logit_adjusted": {"tau": 1.0},
}
CROP_AREA = (0.85, 0.90)  # fraction of the image an augmented copy's crop keeps
SHIFT = 0.07  # an augmented copy's translation, as a fraction of the side


@dataclasses.dataclass(frozen=True, repr=False)
class Resampled:
    """A training split prepared for one imbalance strategy.

    Attributes:
        strategy: the strategy's name (a key of ``STRATEGIES``).
        options: the strategy's options, defaults filled in.
        dataset: unbatched, finite ``tf.data.Dataset`` of ``(uint8 image, int32 label)``.
        size: examples in one pass over ``dataset``.
        class_weight: ``{class: weight}`` for ``model.fit``, or ``None``.
        counts_before: training examples per class before resampling.
        counts_after: examples per class in one pass over ``dataset`` (for "balanced_batches"
            the expected counts: the draw is random).
        dropped: training examples that ``dataset`` never yields (undersampling only).
        second_stage: the class-balanced split of Wei's second stage, or ``None``.
        loss_tau: the logit adjustment's ``tau`` ("logit_adjusted" only), else ``None``.
        config: plain data for ``config.yaml``: ``{"strategy": ..., **options}``.

    Example:
        >>> resampled = resample("class_weight", data)  # doctest: +SKIP
        >>> model.fit(resampled.dataset.batch(128), class_weight=resampled.class_weight)  # doctest: +SKIP
    """

    strategy: str
    options: dict
    dataset: tf.data.Dataset
    size: int
    class_weight: dict | None
    counts_before: list[int]
    counts_after: list[int]
    dropped: int = 0
    second_stage: Resampled | None = None
    loss_tau: float | None = None

    def loss(self, *, sparse: bool = True, label_smoothing: float = 0.0) -> str | keras.losses.Loss:
        """The training loss this strategy needs: cross-entropy, or the logit-adjusted one.

        Example:
            >>> resample("logit_adjusted", data).loss()  # doctest: +SKIP
            <LogitAdjustedCrossentropy ...>
        """
        if self.loss_tau is not None:
            return LogitAdjustedCrossentropy(self.counts_before, tau=self.loss_tau, sparse=sparse,
                                             label_smoothing=label_smoothing)
        return cross_entropy(sparse=sparse, label_smoothing=label_smoothing)

    @property
    def config(self) -> dict:
        """``{"strategy": ..., **options}``, the argument that recreates this resample."""
        return {"strategy": self.strategy, **self.options}

    def __repr__(self) -> str:
        return (f"Resampled(strategy={self.strategy!r}, options={self.options}, size={self.size}, "
                f"counts_before={self.counts_before}, counts_after={self.counts_after})")


def resample(imbalance, data, *, seed: int = 0) -> Resampled:
    """Prepare the training split of ``data`` for an imbalance strategy.

    Args:
        imbalance: ``None`` (as "none"), a strategy name from ``STRATEGIES``, or a dict
            ``{"strategy": name, **options}`` such as
            ``{"strategy": "two_stage", "second_stage_epochs": 2}``.
        data: a ``cnnkit.data.ImageData``.
        seed: seeds the choice of examples, augmented copies and the balanced draw.

    Returns:
        A :class:`Resampled`.

    Raises:
        ValueError: an unknown strategy or option (naming it and the valid ones), a bad option
            value, a seed that is not a non-negative integer, or a training split without examples.

    Example:
        >>> resampled = resample({"strategy": "oversample", "augmented_copies": True}, data, seed=1)  # doctest: +SKIP
        >>> resampled.counts_before, resampled.counts_after  # doctest: +SKIP
        ([5000, 2997, ...], [5000, 5000, ...])
    """
    seed = check_seed(seed)
    strategy, options = parse_imbalance(imbalance)
    counts = list(data.class_counts["train"])
    if sum(counts) == 0:
        raise ValueError("The training split has no examples to resample")
    if strategy in ("none", "class_weight", "two_stage", "logit_adjusted"):
        weights = _balanced_weights(counts) if strategy == "class_weight" else None
        second = _balanced_batches(data, counts, seed) if strategy == "two_stage" else None
        return Resampled(strategy, options, data.train.cache(), sum(counts), weights, counts, counts,
                         second_stage=second, loss_tau=options.get("tau"))
    if strategy == "balanced_batches":
        return _balanced_batches(data, counts, seed)
    images, labels = data.arrays("train")
    rng = np.random.default_rng(seed)
    present = [c for c, n in enumerate(counts) if n]
    if strategy == "undersample":
        target = min(counts[c] for c in present)
        chosen = [rng.choice(np.flatnonzero(labels == c), target, replace=False) for c in present]
        indices = rng.permutation(np.concatenate(chosen))
        return Resampled(strategy, options, _gather(images, labels, indices), len(indices), None, counts,
                         count_classes(labels[indices], len(counts)), dropped=len(labels) - len(indices))
    copy_augmentation = _copy_augmentation(options["augmented_copies"], images, seed)
    target = max(counts)
    originals, replicas = [], []
    for c in present:
        members = np.flatnonzero(labels == c)
        originals.append(members)
        replicas += [members] * (target // len(members) - 1)
        replicas.append(rng.choice(members, target % len(members), replace=False))
    originals, replicas = np.concatenate(originals), np.concatenate(replicas).astype(np.int64)
    if copy_augmentation and len(replicas):  # the replicas become new images
        copies, copy_labels = _augment_once(copy_augmentation, images[replicas]), labels[replicas]
        replicas = len(images) + np.arange(len(replicas))
        images, labels = np.concatenate([images, copies]), np.concatenate([labels, copy_labels])
    indices = rng.permutation(np.concatenate([originals, replicas]))
    return Resampled(strategy, options, _gather(images, labels, indices), len(indices), None, counts,
                     count_classes(labels[indices], len(counts)))


def parse_imbalance(imbalance) -> tuple[str, dict]:
    """``(strategy, options with defaults)`` of an ``imbalance`` argument, checked.

    Example:
        >>> parse_imbalance({"strategy": "two_stage", "second_stage_epochs": 2})[1]["second_stage_epochs"]
        2
    """
    if imbalance is None:
        return "none", {}
    if isinstance(imbalance, str):
        spec = {"strategy": imbalance}
    elif isinstance(imbalance, dict):
        spec = dict(imbalance)
    else:
        raise ValueError(f"imbalance must be None, a strategy name or a dict with 'strategy'. "
                         f"Received: imbalance={imbalance!r}")
    strategy = spec.pop("strategy", None)
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown imbalance strategy {strategy!r}; choose from {list(STRATEGIES)}. "
                         f"Received: imbalance={imbalance!r}")
    unknown = sorted(set(spec) - set(STRATEGIES[strategy]))
    if unknown:
        valid = ["strategy", *STRATEGIES[strategy]]
        raise ValueError(f"Unknown option {unknown[0]!r} for imbalance strategy {strategy!r}; valid keys: {valid}. "
                         f"Received: imbalance={imbalance!r}")
    options = {**STRATEGIES[strategy], **spec}
    if not isinstance(options.get("augmented_copies", False), (bool, str, list, tuple, dict)):
        raise ValueError(f"augmented_copies must be True, False or an augmentation (a preset or op name, or a list "
                         f"of them). Received: augmented_copies={options['augmented_copies']!r}")
    epochs = options.get("second_stage_epochs", 1)
    if not isinstance(epochs, numbers.Integral) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"second_stage_epochs must be an integer >= 1. Received: second_stage_epochs={epochs!r}")
    factor = options.get("second_stage_lr_factor", 1.0)
    if not (is_finite_number(factor) and factor > 0):
        raise ValueError(f"second_stage_lr_factor must be a finite number > 0. "
                         f"Received: second_stage_lr_factor={factor!r}")
    tau = options.get("tau", 1.0)
    if not (is_finite_number(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0. Received: tau={tau!r}")
    return strategy, options


@keras.saving.register_keras_serializable(package="cnnkit")
class LogitAdjustedCrossentropy(keras.losses.Loss):
    """Cross-entropy on logits shifted by ``tau * log(prior)``: Menon et al. 2021's logit adjustment.

    The model's probabilities ``p`` (its softmax output) are turned back into logits ``log p``;
    the loss adds ``tau * log(n_c / n)`` to the logit of each class ``c`` before the softmax
    cross-entropy. Frequent classes then have to win by a margin in training, rare ones less, and
    the model's own (unshifted) output is the classifier for a balanced test distribution. Only
    the loss changes: predictions, saved and exported models are plain. A class with no training
    example is given a count of 1.

    Args:
        class_counts: training examples per class.
        tau: strength of the adjustment; 0 is plain cross-entropy, 1 the balanced softmax.
        sparse: integer labels (``True``) or one-hot/soft labels.
        label_smoothing: smooth one-hot labels towards uniform by this much (``sparse=False`` only).

    Example:
        >>> loss = LogitAdjustedCrossentropy([900, 100], tau=1.0)
        >>> round(float(loss(np.array([1]), np.array([[0.5, 0.5]]))), 4)  # log(1 + 0.9/0.1) = log 10
        2.3026
    """

    def __init__(self, class_counts, tau: float = 1.0, sparse: bool = True, label_smoothing: float = 0.0,
                 name: str = "logit_adjusted_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        if sparse and label_smoothing:
            raise ValueError("label smoothing needs one-hot labels (sparse=False)")
        self.class_counts, self.tau, self.sparse = [int(n) for n in class_counts], float(tau), bool(sparse)
        self.label_smoothing = float(label_smoothing)
        counts = np.maximum(np.asarray(self.class_counts, np.float64), 1.0)
        self._offsets = (self.tau * np.log(counts / counts.sum())).astype(np.float32)

    def call(self, y_true, y_pred):
        logits = keras.ops.log(keras.ops.clip(keras.ops.cast(y_pred, "float32"), keras.config.epsilon(), 1.0))
        logits = logits + self._offsets
        if self.sparse:
            return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)
        return keras.losses.categorical_crossentropy(y_true, logits, from_logits=True,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "class_counts": self.class_counts, "tau": self.tau, "sparse": self.sparse,
                "label_smoothing": self.label_smoothing}


def _balanced_weights(counts) -> dict:
    present = [c for c, n in enumerate(counts) if n]
    total = sum(counts)
    return {c: total / (len(present) * counts[c]) for c in present}


def _balanced_batches(data, counts, seed) -> Resampled:
    from cnnkit.recipes.resume import per_epoch

    images, labels = data.arrays("train")
    present = [c for c, n in enumerate(counts) if n]
    members = [np.flatnonzero(labels == c) for c in present]
    size = sum(counts)

    def draw(epoch_seed):  # a fresh draw each epoch, seeded by (seed, epoch): a resumed run draws the same
        per_class = [tf.data.Dataset.from_tensor_slices(indices).shuffle(len(indices), seed=epoch_seed + c).repeat()
                     for c, indices in zip(present, members)]
        return tf.data.Dataset.sample_from_datasets(per_class, weights=[1 / len(present)] * len(present),
                                                    seed=epoch_seed).take(size)

    indices = per_epoch(draw, seed, size)
    expected = [0] * len(counts)
    for rank, c in enumerate(present):
        expected[c] = size // len(present) + (rank < size % len(present))
    return Resampled("balanced_batches", {}, _gather_dataset(images, labels, indices), size, None, counts, expected)


def _gather(images, labels, indices) -> tf.data.Dataset:
    return _gather_dataset(images, labels, tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64)))


def _gather_dataset(images, labels, indices: tf.data.Dataset) -> tf.data.Dataset:
    images, labels = tf.constant(images), tf.constant(labels, tf.int32)
    return indices.map(lambda index: (tf.gather(images, index), tf.gather(labels, index)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _copy_augmentation(augmented_copies, train_images: np.ndarray, seed: int):
    """The ``Augmentation`` that makes oversampling's copies, or ``None`` for plain replicas (PCA colour is
    fitted on ``train_images``)."""
    from cnnkit.recipes.augment import Augmentation, make_augmentation

    if augmented_copies is False:
        return None
    if augmented_copies is True:  # minority crops: a random 85-90%-area crop scaled back up, then a small shift
        zoom = (np.sqrt(CROP_AREA[0]) - 1, np.sqrt(CROP_AREA[1]) - 1)  # negative factors zoom in
        layers = [keras.layers.RandomZoom(zoom, fill_mode="nearest", seed=seed, dtype="float32"),
                  keras.layers.RandomTranslation(SHIFT, SHIFT, fill_mode="nearest", seed=seed + 1, dtype="float32")]
        return Augmentation(layers, num_classes=1, config={"preset": "minority crops", "ops": [], "seed": seed})
    try:
        augmentation = make_augmentation(augmented_copies, image_shape=train_images.shape[1:], num_classes=1,
                                         seed=seed, train_images=train_images)
    except ValueError as error:
        raise ValueError(f"augmented_copies: {error}") from None
    if augmentation is None or augmentation.soft_labels:
        why = "mixes labels" if augmentation else "augments nothing"
        raise ValueError(f"augmented_copies={augmented_copies!r} {why}: the copies need an augmentation that keeps "
                         "each image's label")
    return augmentation


def _augment_once(augmentation, images: np.ndarray) -> np.ndarray:
    """``images`` augmented once, in batches of 1,024, back to uint8."""
    batches = [images[start:start + 1024] for start in range(0, len(images), 1024)]
    copies = [np.asarray(augmentation(batch, np.zeros(len(batch)))[0]) for batch in batches]
    return np.clip(np.rint(np.concatenate(copies)), 0, 255).astype(np.uint8)
