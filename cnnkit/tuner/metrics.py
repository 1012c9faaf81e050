"""``BalancedAccuracy``: mean per-class recall as a streaming Keras metric, for the search objective.

It accumulates per-class hits and counts over all batches of an evaluation, so the value Keras
logs as ``val_balanced_accuracy`` is the balanced accuracy of the whole validation split, the
same number as ``cnnkit.evaluate.classification_metrics`` gives (classes absent from the labels
are left out of the mean).

Example:
    >>> import numpy as np
    >>> metric = BalancedAccuracy(num_classes=3)
    >>> metric.update_state(np.array([0, 0, 0, 1]), np.eye(3)[[0, 0, 1, 1]])
    >>> round(float(metric.result()), 4)
    0.8333
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="cnnkit")
class BalancedAccuracy(keras.metrics.Metric):
    """Mean recall over the classes present in the labels seen so far.

    Args:
        num_classes: the number of classes (the width of the predictions).
        name: the metric's name (Keras prefixes ``val_`` on validation data).

    Labels may be integer class indices ``(batch,)`` or one-hot / soft ``(batch, classes)``
    (MixUp); soft labels count as their largest entry.

    Example:
        >>> model.compile(loss="sparse_categorical_crossentropy", metrics=[BalancedAccuracy(10)])  # doctest: +SKIP
    """

    def __init__(self, num_classes, name="balanced_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer. Received: num_classes={num_classes!r}")
        self.num_classes = num_classes
        self.hits = self.add_variable(shape=(num_classes,), initializer="zeros", name="hits", dtype="float32")
        self.counts = self.add_variable(shape=(num_classes,), initializer="zeros", name="counts", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] != 1:
            y_true = ops.argmax(y_true, axis=-1)
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        one_hot = ops.one_hot(y_true, self.num_classes, dtype="float32")
        if sample_weight is not None:
            one_hot = one_hot * ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
        correct = ops.cast(ops.equal(y_true, predicted), "float32")
        self.hits.assign_add(ops.sum(one_hot * ops.expand_dims(correct, -1), axis=0))
        self.counts.assign_add(ops.sum(one_hot, axis=0))

    def result(self):
        present = ops.cast(self.counts > 0, "float32")
        recall = self.hits / ops.maximum(self.counts, 1.0)
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.hits.assign(ops.zeros((self.num_classes,)))
        self.counts.assign(ops.zeros((self.num_classes,)))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


__all__ = ["BalancedAccuracy"]
