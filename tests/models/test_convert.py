import re

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.models.convert import native_stride, predict_map, to_fully_convolutional
from cnnkit.recipes.preprocess import fit_preprocessing

RNG = np.random.default_rng(0)


def _crop_scores(model, canvas, stride, shape):
    rows = (canvas.shape[0] - shape[0]) // stride + 1
    cols = (canvas.shape[1] - shape[1]) // stride + 1
    crops = np.stack([canvas[i * stride:i * stride + shape[0], j * stride:j * stride + shape[1]]
                      for i in range(rows) for j in range(cols)]).astype("float32")
    return np.asarray(model(crops)).reshape(rows, cols, -1)


def _with_random_statistics(model):
    """``model`` with batch-norm statistics and PReLU slopes away from their initial values, so a
    conversion that did not copy them would differ."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([RNG.uniform(0.5, 2.0, w.shape) if "variance" in w.path or "gamma" in w.path
                               else RNG.normal(0, 0.5, w.shape) for w in layer.weights])
        elif isinstance(layer, keras.layers.PReLU):
            layer.set_weights([RNG.uniform(0.1, 0.5, layer.weights[0].shape)])
    return model


@pytest.mark.parametrize("arch, shape", [
    ("20C5-MP2-50C5-MP2-FC256", (28, 28, 1)),
    ("lenet", (28, 28, 1)),
    ("network3", (28, 28, 1)),
    ("mlp_64", (28, 28, 1)),
    ("8C3-MP2-8C3-GAP-FC8", (16, 16, 3)),
    ("8C3-BN-FC8:prelu-BN-D0.5", (12, 12, 3)),
    ("resnet8", (28, 28, 1)),  # padded: converts, and agrees at the native size
])
def test_converted_model_equals_the_original_at_the_native_size(arch, shape):
    model = _with_random_statistics(cnnkit.build(arch, shape, 10))
    converted = to_fully_convolutional(model)
    assert converted.input_shape == (None, None, None, shape[2])
    x = RNG.integers(0, 256, (3, *shape)).astype("float32")
    out = np.asarray(converted(x))
    assert out.shape == (3, 1, 1, 10)
    np.testing.assert_allclose(out[:, 0, 0], np.asarray(model(x)), atol=1e-5)


@pytest.mark.parametrize("stride", [8, 4, 2, 1])
def test_every_map_position_equals_the_network_on_its_crop(stride):
    model = cnnkit.build("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10)
    canvas = RNG.integers(0, 256, (47, 41)).astype(np.uint8)
    scores = predict_map(model, canvas, stride=stride)
    assert scores.shape == ((47 - 28) // stride + 1, (41 - 28) // stride + 1, 10)
    np.testing.assert_allclose(scores, _crop_scores(model, canvas[..., None], stride, (28, 28)), atol=1e-5)
    np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)  # softmax per position


def test_a_model_with_per_channel_standardization_slides_and_one_per_pixel_is_refused():
    images = RNG.integers(0, 256, (50, 12, 12, 1)).astype(np.uint8)
    model = cnnkit.build("8C3-MP2-FC8", (12, 12, 1), 10, preprocessing=fit_preprocessing("standardize", images))
    canvas = RNG.integers(0, 256, (19, 17)).astype(np.uint8)
    np.testing.assert_allclose(predict_map(model, canvas, stride=1), _crop_scores(model, canvas[..., None], 1, (12, 12)),
                               atol=1e-5)
    per_pixel = cnnkit.build("8C3-MP2-FC8", (12, 12, 1), 10, preprocessing=fit_preprocessing("center_pixel", images))
    with pytest.raises(ValueError, match="layer 'center' .Standardization. to slide over larger images: it is "
                                         "not known to act the same at every position"):
        to_fully_convolutional(per_pixel)


def test_global_pooling_slides_at_its_native_size():
    model = cnnkit.build("8C3-MP2-8C3-GAP-FC8", (16, 16, 3), 10)
    canvas = RNG.integers(0, 256, (27, 22, 3)).astype(np.uint8)
    assert native_stride(model) == 2
    np.testing.assert_allclose(predict_map(model, canvas, stride=1), _crop_scores(model, canvas, 1, (16, 16)),
                               atol=1e-5)


@pytest.fixture(scope="module")
def flooring_net():
    """Conv 13 -> 11 rows, then a 2x2 pool that floors 11 to 5 (drops a row): total stride 2."""
    return cnnkit.build("4C3-MP2-FC8", (13, 13, 1), 3)


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("size", [13, 14, 21])
def test_a_flooring_pooling_keeps_the_total_stride(flooring_net, size, stride):
    assert native_stride(flooring_net) == 2  # growing the input by one row already grows the output
    canvas = np.random.default_rng(size).integers(0, 256, (size, size, 1)).astype(np.uint8)
    scores = predict_map(flooring_net, canvas, stride=stride)
    assert scores.shape == ((size - 13) // stride + 1, (size - 13) // stride + 1, 3)
    np.testing.assert_allclose(scores, _crop_scores(flooring_net, canvas, stride, (13, 13)), atol=1e-5)


def test_a_stride_that_differs_along_the_axes_is_refused():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.MaxPooling2D((2, 1), name="tall_pool")(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x)))
    with pytest.raises(ValueError, match=r"native stride at layer 'tall_pool': its strides \(2, 1\) differ"):
        native_stride(model)


def test_mixed_precision_policy_is_kept():
    model = cnnkit.build("8C3-MP2-FC8", (12, 12, 1), 3, dtype="mixed_bfloat16")
    converted = to_fully_convolutional(model)
    assert converted.get_layer("fc1").compute_dtype == "bfloat16"
    assert converted.output.dtype == "float32"


def test_weights_are_copied_not_shared():
    model = cnnkit.build("8C3-MP2-FC8", (12, 12, 1), 3)
    converted = to_fully_convolutional(model)
    assert converted.get_layer("fc1").kernel.shape == (5, 5, 8, 8)
    converted.get_layer("conv1").kernel.assign(np.zeros((3, 3, 1, 8), "float32"))
    assert np.abs(np.asarray(model.get_layer("conv1").kernel)).sum() > 0


def test_locally_connected_layer_is_named_in_the_error():
    model = cnnkit.build("4LC3-FC8", (8, 8, 1), 3)
    with pytest.raises(ValueError, match="'local1' .*fixed positions"):
        to_fully_convolutional(model)


@pytest.mark.parametrize("shared_axes", [None, [1], [3]])
def test_a_prelu_with_slopes_per_position_is_named_in_the_error(shared_axes):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.PReLU(shared_axes=shared_axes, name="prelu_pos")(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x)))
    with pytest.raises(ValueError, match=r"cannot convert layer 'prelu_pos' \(PReLU\) to slide over larger images: its "
                                         rf"slopes are per position \(shared_axes={re.escape(str(shared_axes))}\); "
                                         r"one with shared_axes=\[1, 2\] slides"):
        to_fully_convolutional(model)


def test_a_prelu_with_one_slope_per_channel_slides():
    model = _with_random_statistics(cnnkit.build("4C3:prelu-MP2-FC8", (12, 12, 1), 3))
    assert model.get_layer("conv1_act").shared_axes == [1, 2]
    canvas = RNG.integers(0, 256, (19, 17, 1)).astype(np.uint8)
    np.testing.assert_allclose(predict_map(model, canvas, stride=1), _crop_scores(model, canvas, 1, (12, 12)),
                               atol=1e-5)


def test_padded_network_is_refused_by_predict_map():
    model = cnnkit.build("vgg_small", (28, 28, 1), 10)
    with pytest.raises(ValueError, match="layer 'conv1' pads its input"):
        predict_map(model, np.zeros((40, 40), np.uint8))


def test_a_1x1_convolution_made_same_by_the_builder_slides():
    model = cnnkit.build("4C3-8C1-MP2-FC8", (12, 12, 1), 3)  # 8C1 has P = (F - 1)/2 = 0: a Keras "same" Conv2D
    assert model.get_layer("conv2").padding == "same"
    canvas = RNG.integers(0, 256, (19, 17, 1)).astype(np.uint8)
    np.testing.assert_allclose(predict_map(model, canvas, stride=1), _crop_scores(model, canvas, 1, (12, 12)),
                               atol=1e-5)


@pytest.mark.parametrize("stride, rows", [(np.int64(2), 5), (np.int32(4), 3), (1, 9)])
def test_predict_map_takes_any_integer_stride(stride, rows):
    model = cnnkit.build("4C3-MP2-FC8", (12, 12, 1), 3)
    scores = predict_map(model, np.zeros((20, 20), np.uint8), stride=stride)
    assert scores.shape == (rows, rows, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"stride": 3}, "positive divisor or multiple of the native stride 4. Received: stride=3"),
    ({"stride": True}, "must be an integer, .*Received: stride=True"),
    ({"stride": 2.0}, "must be an integer, .*Received: stride=2.0"),
    ({"stride": np.int64(3)}, r"native stride 4. Received: stride=np.int64\(3\)"),
    ({"image": np.zeros((20, 40), np.uint8)}, "H >= 28"),
    ({"image": np.zeros((40, 40, 3), np.uint8)}, "image.shape=\\(40, 40, 3\\)"),
])
def test_bad_predict_map_arguments(kwargs, message):
    model = cnnkit.build("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10)
    arguments = {"image": np.zeros((40, 40), np.uint8), **kwargs}
    with pytest.raises(ValueError, match=message):
        predict_map(model, arguments.pop("image"), **arguments)


def test_predict_map_refuses_an_any_size_model_naming_the_classifier_to_pass():
    converted = to_fully_convolutional(cnnkit.build("8C3-MP2-FC8", (12, 12, 1), 3))
    with pytest.raises(ValueError, match=r"predict_map needs the original classifier with a fixed input size \(the crop "
                                         r"size\); pass it rather than an any-size model such as "
                                         r"to_fully_convolutional's result. Received: model '.*' with input shape "
                                         r"\(None, None, None, 1\)"):
        predict_map(converted, np.zeros((20, 20), np.uint8))


def test_public_names():
    assert cnnkit.predict_map is predict_map
    assert cnnkit.models.to_fully_convolutional is to_fully_convolutional


def test_predict_map_reuses_a_given_conversion(monkeypatch):
    from cnnkit.models import convert

    model = cnnkit.build("8C3-MP2-FC8", (12, 12, 1), 3)
    converted = to_fully_convolutional(model)

    def no_second_conversion(_model):
        raise AssertionError("predict_map converted the model again")

    monkeypatch.setattr(convert, "to_fully_convolutional", no_second_conversion)
    assert predict_map(model, np.zeros((20, 20), np.uint8), converted=converted).shape == (5, 5, 3)
