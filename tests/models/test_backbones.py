"""Backbones: the table, building at the smallest input, layer groups, preprocessing, weights files."""

import dataclasses
import importlib
import urllib.error

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

import cnnkit
from cnnkit.models.backbones import (
    Backbone,
    GrayscaleToRGB,
    ImageNetPreprocessing,
    build_backbone,
    get_backbone,
    layer_groups,
    list_backbones,
    preprocessing_layers,
)

EXPECTED = {
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_b0", "resnet50", "resnet50_v2", "densenet121",
    "convnext_tiny", "vgg16", "xception", "inception_v3",
}
# Checked against keras/src/applications/<family>.py: preprocess_input's mode, or the
# rescaling the network does inside (preprocess_input is then the identity).
EXPECTED_MODES = {
    "mobilenet_v2": "tf", "mobilenet_v3_small": "none", "mobilenet_v3_large": "none", "efficientnet_b0": "none",
    "efficientnet_b1": "none", "efficientnet_b2": "none", "efficientnet_b3": "none", "efficientnet_v2_b0": "none",
    "resnet50": "caffe", "resnet50_v2": "tf", "densenet121": "torch", "convnext_tiny": "none", "vgg16": "caffe",
    "xception": "tf", "inception_v3": "tf",
}


def _min_shape(name):
    return (*get_backbone(name).min_input_size, 3)


def _constructor(name):
    module, _, function = get_backbone(name).constructor.rpartition(".")
    return getattr(importlib.import_module(module), function)


def _family_preprocess_input(name):
    """``keras.applications.<family>.preprocess_input`` of the module that defines the constructor."""
    family = _constructor(name).__module__.rpartition(".")[2]
    return getattr(keras.applications, family).preprocess_input


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


# --------------------------------------------------------------------------- the table


def test_list_backbones_is_sorted_and_has_the_issue_families():
    names = list_backbones()
    assert names == sorted(names)
    assert set(names) >= EXPECTED
    assert cnnkit.models.list_backbones() == names


@pytest.mark.parametrize("name", list_backbones())
def test_metadata(name):
    backbone = get_backbone(name)
    assert backbone.name == name
    assert backbone.preprocessing == EXPECTED_MODES[name]
    assert backbone.reference
    assert len(backbone.groups) >= 4
    assert len({group for group, _ in backbone.groups}) == len(backbone.groups)
    height, width = backbone.min_input_size
    assert height == width  # keras.applications check one minimum for both sides
    assert min(backbone.input_size) >= height
    # min_input_size is Keras's own limit: one pixel less is refused by the constructor itself.
    with pytest.raises(ValueError, match=f"at least {height}x{width}"):
        _constructor(name)(include_top=False, weights=None, input_shape=(height - 1, width, 3))
    with pytest.raises(ValueError, match=f"at least {height}x{width} pixels"):
        build_backbone(name, input_shape=(height, width - 1, 3), weights=None)


@pytest.mark.parametrize("name", list_backbones())
def test_the_keras_class_name_finds_the_backbone(name):
    class_name = get_backbone(name).constructor.rpartition(".")[2]
    assert get_backbone(class_name) is get_backbone(name)
    assert get_backbone(name.upper().replace("_", "-")) is get_backbone(name)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"did you mean mobilenet_v2.*registered: convnext_tiny"):
        get_backbone("mobilenet_v4")
    with pytest.raises(ValueError, match="did you mean resnet50"):
        get_backbone("ResNet51")
    with pytest.raises(ValueError, match="Received: name=3"):
        get_backbone(3)


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("name", list_backbones())
def test_builds_headless_at_the_smallest_input(name, untrained_backbone):
    model = untrained_backbone(name)
    assert tuple(model.input.shape) == (None, *_min_shape(name))
    assert len(model.output.shape) == 4  # a feature map: no classifier, no pooling
    assert not any(isinstance(layer, keras.layers.Dense) and layer.name == "predictions" for layer in model.layers)
    features = np.asarray(model(_pixels((1, *_min_shape(name))), training=False))
    assert features.shape[1:] == tuple(model.output.shape[1:])
    assert np.isfinite(features).all()


def test_imagenet_weights_without_network_are_one_line_naming_the_offline_way(tmp_path, monkeypatch):
    from keras.src.backend import config as keras_config

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # an empty cache: Keras must download

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(OSError, match=r"could not download the ImageNet weights of mobilenet_v2 \(URL fetch failure "
                                      r"on https://.*\); without network: weights=PATH"):
        build_backbone("mobilenet_v2", input_shape=(32, 32, 3))


def test_every_backbone_names_a_keras_applications_constructor():
    for name in list_backbones():
        module, _, function = get_backbone(name).constructor.rpartition(".")
        assert module == "keras.applications" and callable(getattr(keras.applications, function, None)), name


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "resnet50"])  # the same call for every backbone
def test_imagenet_weights_go_through_the_keras_constructor(name, untrained_backbone, monkeypatch):
    calls = []
    model = untrained_backbone(name)

    def constructor(**kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(keras.applications, get_backbone(name).constructor.rpartition(".")[2], constructor)
    assert build_backbone(name) is model
    assert build_backbone(name, input_shape=(None, None, 3)) is model
    size = get_backbone(name).input_size
    assert calls == [
        {"include_top": False, "weights": "imagenet", "input_shape": (*size, 3)},
        {"include_top": False, "weights": "imagenet", "input_shape": (None, None, 3)},
    ]


def test_bad_input_shapes_are_refused_before_building():
    with pytest.raises(ValueError, match=r"preprocessing_layers\(\) converts grayscale.*input_shape=\(224, 224, 1\)"):
        build_backbone("mobilenet_v2", input_shape=(224, 224, 1), weights=None)
    with pytest.raises(ValueError, match="at least 75x75"):
        build_backbone("inception_v3", input_shape=(64, 64, 3), weights=None)
    with pytest.raises(ValueError, match="input_shape=224"):
        build_backbone("vgg16", input_shape=224, weights=None)


def test_feature_layer_cuts_the_network_and_leaves_later_groups_empty():
    cut = dataclasses.replace(get_backbone("mobilenet_v2"), feature_layer="block_12_add")
    model = build_backbone(cut, input_shape=(32, 32, 3), weights=None)
    assert model.layers[-1].name == "block_12_add"
    assert tuple(model.output.shape) == (None, 2, 2, 96)
    groups = layer_groups(model, cut)
    assert groups["blocks_13_16"] == [] and groups["top"] == []
    assert groups["blocks_6_12"][-1].name == "block_12_add"


# --------------------------------------------------------------------------- weights files


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_a_weights_file_round_trips(name, untrained_backbone, tmp_path):
    source = untrained_backbone(name)
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    loaded = build_backbone(name, input_shape=_min_shape(name), weights=path)
    assert len(loaded.weights) == len(source.weights)
    for saved, restored in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


def test_weights_saved_at_one_size_load_at_another(untrained_backbone, tmp_path):
    path = tmp_path / "small.weights.h5"
    untrained_backbone("mobilenet_v2").save_weights(path)
    larger = build_backbone("mobilenet_v2", input_shape=(64, 48, 3), weights=str(path))
    for saved, restored in zip(untrained_backbone("mobilenet_v2").weights, larger.weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


def test_a_weights_path_under_the_home_directory_may_start_with_a_tilde(untrained_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    untrained_backbone("mobilenet_v2").save_weights(tmp_path / "home.weights.h5")
    loaded = build_backbone("mobilenet_v2", input_shape=_min_shape("mobilenet_v2"), weights="~/home.weights.h5")
    for saved, restored in zip(untrained_backbone("mobilenet_v2").weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


def test_the_keras_cache_file_format_loads(untrained_backbone, tmp_path):
    """``weights="imagenet"`` downloads a legacy ``*_notop.h5`` file; a copy of it loads offline."""
    source = untrained_backbone("mobilenet_v3_small")
    path = tmp_path / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, source)
    loaded = build_backbone("mobilenet_v3_small", input_shape=(32, 32, 3), weights=path)
    for saved, restored in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small"])
@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")
def test_a_weights_file_computes_what_the_imagenet_download_would(name, untrained_backbone, tmp_path, monkeypatch):
    source = untrained_backbone(name)
    normalization = [layer for layer in source.layers if isinstance(layer, keras.layers.Normalization)]
    shared = [layer.get_weights() for layer in normalization]  # the shared build's: put back below
    for layer in normalization:  # the statistics Keras's EfficientNet files hold
        layer.set_weights([np.array([0.485, 0.456, 0.406], "float32"), np.array([0.229, 0.224, 0.225], "float32"),
                           np.array(0)])
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    for layer, weights in zip(normalization, shared, strict=True):
        layer.set_weights(weights)
    # Keras's imagenet path, with the "download" answered by the local file.
    monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: str(path))
    reference = _constructor(name)(include_top=False, weights="imagenet", input_shape=_min_shape(name))
    monkeypatch.undo()
    ours = build_backbone(name, input_shape=_min_shape(name), weights=path)
    plain = _constructor(name)(include_top=False, weights=None, input_shape=_min_shape(name))
    plain.load_weights(path)
    first_conv = "stem_conv" if normalization else "conv"

    def stem(model):
        return np.asarray(keras.Model(model.input, model.get_layer(first_conv).output)(_pixels((1, 32, 32, 3))))

    np.testing.assert_allclose(stem(ours), stem(reference), rtol=1e-6, atol=1e-6)
    x = _pixels((1, 32, 32, 3), seed=1)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-6)
    # Keras's own weights=None network differs from the imagenet one exactly for EfficientNet (V1).
    assert np.allclose(stem(plain), stem(reference)) == (not normalization)


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras, before its own error
def test_bad_weights_values_name_the_problem(untrained_backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        build_backbone("mobilenet_v2", input_shape=(32, 32, 3), weights=tmp_path / "missing.weights.h5")
    with pytest.raises(ValueError, match=r"whole model.*keras.saving.load_model.*model.keras"):
        build_backbone("mobilenet_v2", input_shape=(32, 32, 3), weights=str(tmp_path / "model.keras"))
    with pytest.raises(ValueError, match="weights='imagenet21k'"):
        build_backbone("mobilenet_v2", input_shape=(32, 32, 3), weights="imagenet21k")
    with pytest.raises(ValueError, match="weights=True"):
        build_backbone("mobilenet_v2", input_shape=(32, 32, 3), weights=True)
    other = tmp_path / "mobilenet_v3_small.weights.h5"
    untrained_backbone("mobilenet_v3_small").save_weights(other)
    with pytest.raises(ValueError, match=r"Could not load weights file '.*small.weights.h5' into backbone 'mobilenet_v2'"):
        build_backbone("mobilenet_v2", input_shape=(32, 32, 3), weights=other)
    broken = tmp_path / "broken.h5"
    broken.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"Could not load weights file '.*broken.h5'"):
        build_backbone("mobilenet_v2", input_shape=(32, 32, 3), weights=broken)


# --------------------------------------------------------------------------- layer groups


@pytest.mark.parametrize("name", list_backbones())
def test_every_layer_is_in_exactly_one_group_in_order(name, untrained_backbone):
    model = untrained_backbone(name)
    groups = layer_groups(model, name)
    assert list(groups) == [group for group, _ in get_backbone(name).groups]
    joined = [layer for layers in groups.values() for layer in layers]
    assert [id(layer) for layer in joined] == [id(layer) for layer in model.layers]  # each once, in order
    for group, layers in groups.items():
        assert any(layer.weights for layer in layers), f"group {group} has nothing to train"
    assert sum(len(layer.weights) for layer in joined) == len(model.weights)


def test_unnamed_layers_join_their_block(untrained_backbone):
    model = untrained_backbone("xception")
    groups = layer_groups(model, "xception")
    group_of = {layer.name: group for group, layers in groups.items() for layer in layers}
    shortcut_convs = [layer for layer in model.layers if type(layer) is keras.layers.Conv2D
                      and not layer.name.startswith("block")]
    assert [group_of[layer.name] for layer in shortcut_convs] == ["blocks_2_5"] * 3 + ["blocks_13_14"]
    assert group_of[model.layers[0].name] == "stem"  # the input layer


def test_layer_groups_refuse_data_that_does_not_fit(untrained_backbone):
    with pytest.raises(ValueError, match="No layer of model .* matches a group of backbone 'resnet50'"):
        layer_groups(untrained_backbone("vgg16"), "resnet50")
    vgg = get_backbone("vgg16")
    overlapping = dataclasses.replace(vgg, groups=(*vgg.groups, ("all", r"block")))
    with pytest.raises(ValueError, match="Layer 'block1_conv1' matches several groups .*block1, all"):
        layer_groups(untrained_backbone("vgg16"), overlapping)
    reversed_groups = dataclasses.replace(vgg, groups=vgg.groups[::-1])
    with pytest.raises(ValueError, match="Layer 'block2_conv1' \\(group 'block2'\\) comes after"):
        layer_groups(untrained_backbone("vgg16"), reversed_groups)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", list_backbones())
def test_preprocessing_equals_the_familys_preprocess_input(name):
    layer = ImageNetPreprocessing(get_backbone(name).preprocessing)
    pixels = _pixels((2, 5, 7, 3))
    expected = _family_preprocess_input(name)(pixels.copy())
    np.testing.assert_allclose(np.asarray(layer(pixels)), expected, rtol=1e-6, atol=1e-6)
    expected_tensor = _family_preprocess_input(name)(keras.ops.convert_to_tensor(pixels))
    np.testing.assert_allclose(np.asarray(layer(pixels)), np.asarray(expected_tensor), rtol=1e-6, atol=1e-6)


def test_preprocessing_layers_resize_and_make_three_channels():
    layers = preprocessing_layers("mobilenet_v2", image_shape=(28, 28, 1))
    assert [type(layer) for layer in layers] == [keras.layers.Resizing, GrayscaleToRGB, ImageNetPreprocessing]
    x = np.full((2, 28, 28, 1), 255.0, "float32")
    for layer in layers:
        x = layer(x)
    assert tuple(x.shape) == (2, 224, 224, 3)
    np.testing.assert_allclose(np.asarray(x), 1.0, atol=1e-6)  # "tf" mode: 255 -> 1 in every channel
    assert [type(layer) for layer in preprocessing_layers("resnet50", image_shape=(224, 224, 3))] == [
        ImageNetPreprocessing]
    varying = preprocessing_layers("inception_v3", image_shape=(None, None, 3), input_size=(80, 96))
    y = _pixels((1, 50, 40, 3))
    for layer in varying:
        y = layer(y)
    assert tuple(y.shape) == (1, 80, 96, 3)


def test_preprocessing_layers_validate_their_arguments():
    with pytest.raises(ValueError, match=r"image_shape=\(28, 28, 2\)"):
        preprocessing_layers("mobilenet_v2", image_shape=(28, 28, 2))
    with pytest.raises(ValueError, match=r"at least 71x71 .*input_size=\(64, 64\)"):
        preprocessing_layers("xception", image_shape=(28, 28, 1), input_size=(64, 64))
    with pytest.raises(ValueError, match="mode=.bgr."):
        ImageNetPreprocessing("bgr")
    with pytest.raises(ValueError, match="needs RGB input"):
        ImageNetPreprocessing("caffe")(np.zeros((1, 4, 4, 1), "float32"))
    with pytest.raises(ValueError, match="needs one input channel"):
        GrayscaleToRGB()(np.zeros((1, 4, 4, 3), "float32"))


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch", "none"])
def test_preprocessing_layer_config_round_trips(mode):
    layer = ImageNetPreprocessing(mode, name="prep")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, ImageNetPreprocessing) and restored.mode == mode and restored.name == "prep"


def test_a_raw_pixel_model_round_trips_through_keras_file(tmp_path):
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for layer in preprocessing_layers("densenet121", image_shape=(28, 28, 1), input_size=(32, 32)):
        x = layer(x)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="features")(x))
    model.save(tmp_path / "raw.keras")
    loaded = keras.saving.load_model(tmp_path / "raw.keras")  # safe mode: no Python code inside
    images = _pixels((2, 28, 28, 1))
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(model(images)), rtol=1e-5, atol=1e-6)
    assert [type(layer) for layer in loaded.layers[1:4]] == [keras.layers.Resizing, GrayscaleToRGB,
                                                             ImageNetPreprocessing]


def test_backbone_is_frozen_data():
    backbone = get_backbone("vgg16")
    assert isinstance(backbone, Backbone)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backbone.input_size = (32, 32)
