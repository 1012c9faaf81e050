"""BalancedAccuracy streams the same number cnnkit.evaluate computes on the whole split."""

import keras
import numpy as np
import pytest

from cnnkit.evaluate import classification_metrics
from cnnkit.tuner import BalancedAccuracy


def test_matches_classification_metrics_over_batches():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 3], size=90, p=[0.6, 0.3, 0.1])  # class 2 never occurs
    probabilities = rng.dirichlet(np.ones(4), size=90).astype("float32")
    metric = BalancedAccuracy(num_classes=4)
    for start in range(0, 90, 32):
        metric.update_state(labels[start:start + 32], probabilities[start:start + 32])
    expected = classification_metrics(labels, probabilities, ["a", "b", "c", "d"])["balanced_accuracy"]
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_soft_labels_count_as_their_largest_entry():
    labels = np.array([0, 1, 1, 2])
    predictions = np.eye(3, dtype="float32")[[0, 1, 0, 2]]
    sparse, soft = BalancedAccuracy(3), BalancedAccuracy(3)
    sparse.update_state(labels, predictions)
    soft.update_state(0.9 * np.eye(3, dtype="float32")[labels] + 0.1 / 3, predictions)
    assert float(sparse.result()) == pytest.approx((1 + 0.5 + 1) / 3)
    assert float(soft.result()) == pytest.approx(float(sparse.result()))


def test_config_round_trip_and_bad_argument():
    metric = keras.metrics.deserialize(keras.metrics.serialize(BalancedAccuracy(5, name="bal")))
    assert (type(metric).__name__, metric.num_classes, metric.name) == ("BalancedAccuracy", 5, "bal")
    with pytest.raises(ValueError, match="num_classes"):
        BalancedAccuracy(0)
