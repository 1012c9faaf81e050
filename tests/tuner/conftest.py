import keras
import numpy as np
import pytest
import tensorflow as tf

import cnnkit


def make_tiny_data(seed=0):
    """64 8x8 grey images, 2 classes (class 1 has a bright top half), 48 train / 16 validation."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, (64, 8, 8), dtype=np.uint8)
    y = np.arange(64) % 2
    x[y == 1, :4] += 150
    return cnnkit.data.from_arrays(x, y, val_split=0.25, seed=seed)


@pytest.fixture(scope="session")
def tiny_data():
    return make_tiny_data()


@pytest.fixture
def tiny_space():
    """A template with two placeholders and fixed training knobs that learn the tiny task in an epoch."""
    return {"name": "tiny", "arch": "{f}C3-MP2-FC{units}",
            "hyperparameters": {"f": [2, 4], "units": [4, 8], "learning_rate": 0.05, "batch_size": 8}}


class CountTrainings(keras.callbacks.Callback):
    """Counts fit calls across the deep copies Keras Tuner makes; optionally acts on the n-th one."""

    calls = 0
    actions = {}

    def on_train_begin(self, logs=None):
        CountTrainings.calls += 1
        action = CountTrainings.actions.get(CountTrainings.calls)
        if action == "oom":
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor of shape [8,8]")
        if action == "nan":
            for weight in self.model.trainable_weights:
                weight.assign(tf.fill(weight.shape, float("nan")))
        if action == "error":
            raise RuntimeError("boom in training")
        if action == "setup":
            raise FileNotFoundError("images/0001.png")


@pytest.fixture
def counter():
    CountTrainings.calls, CountTrainings.actions = 0, {}
    return CountTrainings
