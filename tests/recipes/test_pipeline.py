import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.recipes import pipeline
from cnnkit.recipes.pipeline import input_pipeline, prepare_inputs, resolve_data
from cnnkit.recipes.resume import training_epoch


def _data(n=64):
    x = np.arange(n, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)
    return cnnkit.data.from_arrays(x, np.arange(n) % 4, val_split=0, seed=0)


def test_batches_stay_uint8_and_cover_the_split():
    data = _data()
    batches = list(input_pipeline(data, "train", batch_size=10, shuffle=True))
    assert [images.shape[0] for images, _ in batches] == [10] * 6 + [4]
    assert all(images.dtype.name == "uint8" for images, _ in batches)
    seen = np.sort(np.concatenate([images.numpy()[:, 0, 0, 0] for images, _ in batches]))
    np.testing.assert_array_equal(seen, np.arange(64))


def _images_of_epoch(dataset, epoch):
    training_epoch().assign(epoch)  # what EpochCheckpoint does at each epoch's start
    return np.concatenate([images.numpy()[:, 0, 0, 0] for images, _ in dataset])


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    dataset = input_pipeline(_data(), "train", batch_size=64, shuffle=True, seed=1)
    first, second = _images_of_epoch(dataset, 0), _images_of_epoch(dataset, 1)
    assert not np.array_equal(first, second)
    assert sorted(first) == sorted(second) == list(range(64))
    # a fresh pipeline (a resumed run) gives epoch 1's order without having seen epoch 0
    rebuilt = input_pipeline(_data(), "train", batch_size=64, shuffle=True, seed=1)
    np.testing.assert_array_equal(_images_of_epoch(rebuilt, 1), second)
    np.testing.assert_array_equal(_images_of_epoch(rebuilt, 0), first)
    other_seed = input_pipeline(_data(), "train", batch_size=64, shuffle=True, seed=2)
    assert not np.array_equal(_images_of_epoch(other_seed, 0), first)
    assert dataset.cardinality() == 1  # Keras sees the steps of an epoch


def test_missing_split_gives_none():
    assert input_pipeline(_data(), "val", batch_size=8) is None


def test_shuffle_buffer_is_capped_by_memory(monkeypatch):
    monkeypatch.setattr(pipeline, "SHUFFLE_BUFFER_BYTES", 16 * 10)  # room for 10 images of 4x4x1
    dataset = input_pipeline(_data(), "train", batch_size=64, shuffle=True, seed=0)
    order = _images_of_epoch(dataset, 0)  # image i is the split's i-th
    assert sorted(order) == list(range(64))  # nothing dropped, only a windowed shuffle
    assert not np.array_equal(order, np.arange(64))
    # a buffer of 10 holds the next 10 images in: the k-th out is one of the first k + 10
    assert (order - np.arange(64)).max() <= 9


def test_training_sample_is_drawn_from_the_whole_split(monkeypatch):
    data = _data(200)  # image i is the split's i-th
    np.testing.assert_array_equal(pipeline.training_sample(data)[:, 0, 0, 0], np.arange(200))  # it fits: all of it
    monkeypatch.setattr(pipeline, "SAMPLE_BYTES", 16 * 50)  # room for 50 images of 4x4x1
    sample = pipeline.training_sample(data)[:, 0, 0, 0]
    assert len(np.unique(sample)) == 50
    assert np.bincount(sample // 50, minlength=4).min() >= 5  # from every quarter of the split, not the first half
    np.testing.assert_array_equal(pipeline.training_sample(data)[:, 0, 0, 0], sample)  # a fixed seed


def test_mixed_labels_weigh_each_class_by_its_share():
    x = np.random.default_rng(0).integers(0, 256, (100, 8, 8), dtype=np.uint8)
    data = cnnkit.data.from_arrays(x, np.array([0] * 90 + [1] * 10), val_split=0)
    inputs = prepare_inputs(data, augment="cutmix", imbalance="class_weight", seed=0)
    assert inputs.class_weight is None and inputs.resampled.class_weight is None  # fit would weigh by argmax
    np.testing.assert_allclose(inputs.label_weights, [100 / 180, 100 / 20])
    dataset = inputs.train_pipeline(batch_size=100, seed=0)
    _, labels, weights = next(iter(dataset))
    mixed = labels.numpy().max(axis=1) < 1
    assert mixed.sum() > 10
    np.testing.assert_allclose(weights, labels.numpy() @ [100 / 180, 100 / 20], rtol=1e-6)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2, "softmax")])
    model.compile("sgd", inputs.loss)
    assert np.isfinite(model.fit(dataset, class_weight=inputs.class_weight, shuffle=False, verbose=0).history["loss"][0])


def test_resolve_data_forms(image_folder):
    data = _data()
    assert resolve_data(data) is data
    assert resolve_data("mnist-sample").sizes["test"] == 1000
    folder = resolve_data({"path": str(image_folder), "image_size": 6})
    assert folder.class_names == ["cat", "dog"] and folder.image_shape == (6, 6, 3)
    with pytest.raises(ValueError, match="'path'"):
        resolve_data({"image_size": 6})
    whole = resolve_data({"name": "mnist-sample", "val_split": 0})
    assert whole.val is None and whole.sizes["train"] == 5000
    with pytest.raises(ValueError, match="one of the two"):
        resolve_data({"name": "mnist-sample", "path": str(image_folder)})
    with pytest.raises(ValueError, match="val_spilt"):
        resolve_data({"name": "mnist-sample", "val_spilt": 0})
    with pytest.raises(ValueError, match="Received: data=3"):
        resolve_data(3)
