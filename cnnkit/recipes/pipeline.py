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

import math

import tensorflow as tf

SHUFFLE_BUFFER_BYTES = 512 * 2**20


def resolve_data(data):
    """An ``ImageData`` from an ``ImageData``, a dataset name, or ``from_folder`` keyword arguments.

    Example:
        >>> resolve_data("mnist-sample").sizes["test"]  # doctest: +SKIP
        1000
    """
    from cnnkit import data as data_sources

    if isinstance(data, data_sources.ImageData):
        return data
    if isinstance(data, str):
        return data_sources.load(data)
    if isinstance(data, dict):
        options = dict(data)
        if "path" not in options:
            raise ValueError(f"a data mapping holds cnnkit.data.from_folder arguments, with 'path'. Received: data={data!r}")
        return data_sources.from_folder(options.pop("path"), **options)
    raise ValueError(
        "data must be a cnnkit.data.ImageData, a dataset name such as 'mnist', or a mapping of "
        f"from_folder arguments. Received: data={data!r}"
    )


def input_pipeline(data, split: str, *, batch_size: int, shuffle: bool = False, seed: int = 0):
    """Cache, (shuffle), batch and prefetch one split; ``None`` when the split is absent.

    The shuffle buffer holds the whole split when it fits in 512 MiB of uint8 images (a full
    shuffle, as for MNIST), else as many images as fit. The order is a function of ``seed`` and
    the epoch.
    """
    dataset = getattr(data, split)
    if dataset is None:
        return None
    dataset = dataset.cache()
    if shuffle:
        image_bytes = max(1, math.prod(data.image_shape))
        buffer = max(1, min(data.sizes[split], SHUFFLE_BUFFER_BYTES // image_bytes))
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
