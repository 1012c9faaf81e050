"""Precise batch norm: re-estimate batch-norm statistics on clean training images after training.

A ``BatchNormalization`` layer's moving mean and variance are an exponential average over the
last few hundred training batches: batches of *augmented* images, seen through *dropout*, by
weights that were still changing. At test time the layer meets clean images, no dropout and the
final weights, so its statistics are off, the more so the stronger the augmentation and the
dropout before it (Li et al. 2019, "Understanding the disharmony between dropout and batch
normalization"). Re-estimating them once after training, as population averages over a few
thousand clean training images with dropout off, removes that mismatch (precise BN: Wu and
Johnson 2021, "Rethinking 'Batch' in BatchNorm"; pycls and Detectron2 do it too). Only the
moving statistics change; no weight does.

Example:
    >>> import numpy as np, cnnkit
    >>> model = cnnkit.build("8C3-BN-MP2-FC16", (28, 28, 1), 10)
    >>> recalibrate_batch_norm(model, np.zeros((64, 28, 28, 1), "uint8"))
    1
"""

from __future__ import annotations

import keras
import numpy as np


def recalibrate_batch_norm(model: keras.Model, images: np.ndarray, *, batch_size: int = 256) -> int:
    """Set every trainable batch-norm layer's moving statistics to their average over ``images``.

    The model runs forward in training mode (so each batch-norm layer sees, and averages, the
    statistics of its inputs) with every ``Dropout`` layer's rate set to 0 for the pass; each batch
    enters the averages weighted by its number of images (the momentum is ``seen / (seen + n)``, ``n``
    the batch's size, ``seen`` the images before it), so the result is the mean of the batches' means
    and variances over all images, not an exponential one, and a short last batch counts only for
    its images. Frozen batch-norm layers (``trainable=False``, in inference mode) keep theirs.
    Momenta and rates are restored after. Other stochastic layers (``GaussianNoise``, ...) stay
    active in the pass.

    Args:
        model: a built model taking ``images`` as they are (raw pixels for a cnnkit model).
        images: clean (not augmented) training images, e.g. a few thousand.
        batch_size: images per forward pass; the variance is each batch's, averaged over the batches.

    Returns:
        The number of batch-norm layers re-estimated (0 when the model has none).

    Example:
        >>> recalibrate_batch_norm(run.model, training_images[:10000])  # doctest: +SKIP
        7
    """
    layers = list(model._flatten_layers(include_self=True, recursive=True))  # custom layers' sublayers too
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not norms or len(images) == 0:
        return 0
    dropouts = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
    momenta, rates = [layer.momentum for layer in norms], [layer.rate for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for seen in range(0, len(images), batch_size):
            batch = np.asarray(images[seen:seen + batch_size], "float32")
            for layer in norms:
                layer.momentum = seen / (seen + len(batch))
            model(batch, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    return len(norms)

