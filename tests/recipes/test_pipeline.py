import numpy as np
import pytest

import cnnkit
from cnnkit.recipes import pipeline
from cnnkit.recipes.pipeline import input_pipeline, resolve_data
from cnnkit.recipes.resume import training_epoch


def _labels_of_epoch(dataset):
    return np.concatenate([labels.numpy() for _, labels in dataset])


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
    order = _labels_of_epoch(dataset)
    assert len(order) == 64  # nothing dropped, only a windowed shuffle


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
