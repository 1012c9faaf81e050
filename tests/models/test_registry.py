"""Registered networks: lookup by string, plan == model for every one, .keras round trip."""

import re

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.models import registry
from cnnkit.models.registry import Architecture, describe, get_architecture, list_models, register_model
from cnnkit.planner import plan
from cnnkit.spec import SpecError

NUM_CLASSES = 10
EXPECTED_MODELS = {
    "alexnet", "alexnet_small", "lenet", "lenet5", "mlp_256x2", "mlp_64", "network3", "resnet20", "resnet8",
    "vgg_small",
}


def _input_shape(name):
    return {"alexnet": (227, 227, 3), "alexnet_small": (32, 32, 3)}.get(name, (28, 28, 1))


@pytest.fixture(scope="module")
def built():
    """Build each registered model once per module (alexnet has 58M parameters)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = cnnkit.build(name, _input_shape(name), NUM_CLASSES)
        return cache[name]

    yield get
    cache.clear()
    keras.backend.clear_session()


def test_list_models_is_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert set(names) >= EXPECTED_MODELS
    assert names[:2] == ["alexnet", "alexnet_small"]
    assert cnnkit.models.list_models() == names


@pytest.mark.parametrize("name", list_models())
def test_architecture_is_valid_notation(name):
    arch = get_architecture(name)
    assert isinstance(arch, Architecture)
    assert arch.reference
    # Its notation parses and plans by itself with the network's options.
    p = plan(arch.spec, _input_shape(name), NUM_CLASSES, **arch.options)
    assert p.params == plan(name, _input_shape(name), NUM_CLASSES).params
    assert describe(name).startswith(arch.spec)
    assert describe(name).endswith(f": {arch.reference}")


@pytest.mark.parametrize("name", list_models())
def test_plan_matches_built_model(name, built):
    model_plan = plan(name, _input_shape(name), NUM_CLASSES)
    model = built(name)
    assert model.count_params() == model_plan.params
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    assert trainable == model_plan.trainable_params
    for row in model_plan.rows:
        # Residual rows: the layer named exactly row.name is the block's output.
        layer = model.get_layer(row.name)
        assert tuple(layer.output.shape[1:]) == row.output_shape, row.name
    assert model.output_shape == (None, NUM_CLASSES)
    assert model.input_shape == (None, *_input_shape(name))
    assert model.name == name
    assert model.layers[1].name == "rescale"
    assert model.layers[-1].name == "probabilities"
    assert model_plan.rows[-1].name == "classifier"


def test_registered_options_reach_the_model(built):
    lenet = built("lenet")
    assert lenet.get_layer("conv1_act").get_config()["activation"] == "tanh"
    assert isinstance(lenet.get_layer("conv1").kernel_initializer, keras.initializers.RandomUniform)
    lenet5 = built("lenet5")
    assert isinstance(lenet5.get_layer("conv1").kernel_initializer, keras.initializers.LecunUniform)
    assert lenet5.get_layer("conv1").output.shape[1:] == (28, 28, 6)  # p2 pads 28x28 to LeNet-5's 32x32
    assert isinstance(lenet5.get_layer("pool1"), keras.layers.AveragePooling2D)
    resnet = built("resnet8")
    assert isinstance(resnet.get_layer("residual2_conv1").kernel_initializer, keras.initializers.HeNormal)
    assert isinstance(resnet.get_layer("residual2_zero_pad"), keras.layers.ZeroPadding2D)  # shortcut="zero_pad"
    vgg = built("vgg_small")
    assert vgg.get_layer("conv1").output.shape[1:] == (28, 28, 64)  # 'same' padding


def test_resnet_depths():
    assert get_architecture("resnet8").spec == "16C3p1-BN-R16-R32s2-R64s2-GAP"
    resnet20 = get_architecture("resnet20").spec.split("-")
    assert resnet20.count("R16") == 3 and resnet20.count("R32") == 2 and resnet20.count("R64s2") == 1
    # 6n + 2 weighted layers: the first conv, two per block, the classifier
    assert 1 + 2 * sum(token.startswith("R") for token in resnet20) + 1 == 20


def test_cifar_resnets_use_the_papers_parameter_free_shortcuts():
    # He et al. 2016, section 4.2: option A shortcuts, ResNet-20 has 0.27M parameters.
    p = plan("resnet20", (32, 32, 3), 10)
    assert p.options["shortcut"] == "zero_pad"
    assert p.trainable_params == 269_722
    assert [row.note for row in p.rows if row.note] == ["zero-padded shortcut"] * 2
    model = cnnkit.build("resnet20", (32, 32, 3), 10)
    assert model.count_params() == p.params
    assert sum(int(np.prod(weight.shape)) for weight in model.trainable_weights) == 269_722
    assert not [layer.name for layer in model.layers if layer.name.endswith("_proj")]
    projected = plan("resnet20", (32, 32, 3), 10, shortcut="projection")  # option B on request
    assert projected.trainable_params == 269_722 + 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


@pytest.mark.parametrize("name", list_models())
def test_save_load_round_trip(name, built, tmp_path):
    # alexnet included: build + save + load + predict takes about 10 s here.
    model = built(name)
    x = np.random.default_rng(0).integers(0, 256, size=(2, *_input_shape(name)), dtype="uint8")
    expected = model.predict(x, verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode default
    path.unlink()  # alexnet's file is 230 MB; do not keep it in pytest's temp dirs
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert loaded.count_params() == model.count_params()
    actual = loaded.predict(x, verbose=0)
    assert actual.shape == (2, NUM_CLASSES)
    np.testing.assert_allclose(np.sum(actual, axis=1), 1.0, rtol=1e-5)
    # Another graph of the same weights: oneDNN may pick other kernels (measured: 1.3e-7 for alexnet); a weight
    # not restored moves the probabilities far more.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_docstring_descriptions():
    assert describe("lenet") == (
        "20C5-MP2-50C5-MP2-FC500 (activation=tanh, initializer=theano): LeNet of the deeplearning.net Theano tutorial"
    )
    assert describe("mlp_64") == "FC64: MLP baseline, one hidden layer of 64 units"


def test_classic_docstring_network3_params():
    # 20C5 (520) - 40C5 (20,040) - FC1000 (641,000) - FC1000 (1,001,000) - classifier (10,010)
    assert plan("network3", (28, 28, 1), 10).params == 520 + 20_040 + 641_000 + 1_001_000 + 10_010


# --- unknown names -------------------------------------------------------------------------


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError) as info:
        get_architecture("lenet55")
    message = str(info.value)
    assert "unknown model 'lenet55'" in message
    assert "did you mean lenet5" in message
    assert "registered: alexnet, alexnet_small" in message
    assert not isinstance(info.value, SpecError)


@pytest.mark.parametrize("call", [
    lambda: cnnkit.build("lenet55", (28, 28, 1), 10),
    lambda: plan("lenet55", (28, 28, 1), 10),
    lambda: describe("lenet55"),
])
def test_unknown_model_through_build_plan_describe(call):
    with pytest.raises(ValueError, match="did you mean lenet5"):
        call()


def test_unknown_model_without_close_match():
    with pytest.raises(ValueError) as info:
        plan("zzzzqqq", (28, 28, 1), 10)
    assert "did you mean" not in str(info.value)
    assert "unknown model 'zzzzqqq'" in str(info.value)


@pytest.mark.parametrize("arch", ["FC", "GAPP", "BN2"])
def test_a_bad_single_token_that_looks_like_a_name_is_still_a_spec_error(arch):
    with pytest.raises(SpecError, match=f"unknown model '{arch}'; .*as notation, token 1 '{arch}'") as info:
        plan(arch, (28, 28, 1), 10)
    assert (info.value.token, info.value.position) == (arch, 1)


def test_notation_words_are_not_taken_for_model_names():
    assert plan("gap", (4, 4, 2)).rows[0].layer.kind == "gap"
    assert plan("bn", (4, 4, 2)).rows[0].layer.kind == "bn"
    assert plan("lrn3", (4, 4, 2)).rows[0].layer.kind == "lrn"


def test_non_string_arch():
    with pytest.raises(ValueError, match="arch must be a notation string"):
        plan(["8C3"], (8, 8, 1))


# --- registration --------------------------------------------------------------------------


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the registry, so registering in a test leaves list_models() unchanged."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._registry()))
    return registry._REGISTRY


def test_register_model_duplicate_name_is_an_error(private_registry):
    def lenet():
        return Architecture("8C3")

    with pytest.raises(ValueError, match="a model named 'lenet' is already registered"):
        register_model(lenet)
    assert get_architecture("lenet").spec == "20C5-MP2-50C5-MP2-FC500"


def test_register_model_new_name_then_duplicate(private_registry):
    def tiny_test_net():
        """A tiny network."""
        return Architecture("4C3-MP2", {"activation": "tanh"}, reference="test")

    assert register_model(tiny_test_net) is tiny_test_net
    assert register_model(tiny_test_net) is tiny_test_net  # the same function again is fine
    assert "tiny_test_net" in list_models()
    p = plan("tiny_test_net", (8, 8, 1), 3)
    assert [r.name for r in p.rows] == ["conv1", "pool1", "flatten", "classifier"]
    assert p.rows[0].layer.activation == "tanh"
    model = cnnkit.build("tiny_test_net", (8, 8, 1), 3)
    assert model.name == "tiny_test_net"
    assert model.count_params() == p.params

    def other():
        return Architecture("8C3")

    other.__name__ = "tiny_test_net"
    with pytest.raises(ValueError, match="already registered"):
        register_model(other)
    assert get_architecture("tiny_test_net").spec == "4C3-MP2"


def test_a_name_with_capitals_is_registered_and_found_in_any_case(private_registry):
    def TinyNet():  # noqa: N802  (the name under test)
        return Architecture("8C3-MP2", reference="test")

    register_model(TinyNet)
    assert "tinynet" in list_models() and "TinyNet" not in list_models()
    for name in ("TinyNet", "tinynet", "TINYNET"):
        assert plan(name, (8, 8, 1), 2).spec == "8C3-MP2"
        assert describe(name) == "8C3-MP2: test"
    assert cnnkit.build("TinyNet", (8, 8, 1), 2).count_params() == plan("tinynet", (8, 8, 1), 2).params

    def tinynet():
        return Architecture("4C3")

    with pytest.raises(ValueError, match="a model named 'tinynet' is already registered"):
        register_model(tinynet)
    assert get_architecture("tinynet").spec == "8C3-MP2"


@pytest.mark.parametrize("name, notation", [("fc64", "FC64"), ("GAP", "GAP"), ("mp2s1", "MP2s1"), ("d0", "D0")])
def test_a_name_that_is_notation_is_refused(private_registry, name, notation):
    def model():
        return Architecture("8C3-MP2")

    model.__name__ = name
    with pytest.raises(ValueError, match=re.escape(f"cannot register a model named {name.lower()!r}: it is also the "
                                                   f"notation {notation!r}")):
        register_model(model)
    assert name.lower() not in list_models()
    assert plan(name.upper(), (8, 8, 1), 3).spec == name.upper()  # still the layer


def test_a_model_function_that_returns_no_architecture_is_named(private_registry):
    def broken_net():
        return "8C3"

    register_model(broken_net)
    where = f"{broken_net.__module__}.test_a_model_function_that_returns_no_architecture_is_named.<locals>.broken_net"
    with pytest.raises(TypeError, match=re.escape(f"model 'broken_net' ({where}) must return an Architecture. "
                                                  "Received: '8C3'")):
        plan("Broken_Net", (8, 8, 1), 3)


def test_registering_in_tests_left_the_real_registry_alone():
    # Runs after the tests above: the private_registry fixture put the real registry back.
    assert "tiny_test_net" not in list_models() and "tinynet" not in list_models()
    assert set(list_models()) >= EXPECTED_MODELS
