"""cnnkit.build: plan == model for random valid specs, and every build option."""

import math
import re

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cnnkit
from cnnkit.models.layers import LocallyConnected2D, LocalResponseNormalization
from cnnkit.planner import plan
from cnnkit.spec import SpecError


def _shapes_match(model, model_plan):
    for row in model_plan.rows:
        layer = model.get_layer(row.name)  # residual rows: the block's output layer
        assert tuple(layer.output.shape[1:]) == row.output_shape, (row.name, layer.output.shape)


def _trainable_count(model):
    return sum(math.prod(weight.shape) for weight in model.trainable_weights)


# --- property: random valid specs ----------------------------------------------------------

_ACT = st.sampled_from(["", "", "", ":relu", ":tanh", ":prelu", ":elu", ":sigmoid", ":linear"])
_R_ACT = st.sampled_from(["", "", ":relu", ":tanh", ":prelu", ":selu", ":linear"])
_PAD = st.sampled_from(["", "", "p0", "p1", "p2", "psame"])


def _opt(prefix, values):
    return st.sampled_from(values).map(lambda v: "" if v is None else f"{prefix}{v}")


_CONV = st.builds(lambda n, k, k2, s, p, a: f"{n}C{k}{k2}{s}{p}{a}",
                  st.integers(1, 6), st.integers(1, 5), _opt("x", [None, None, 1, 2, 3, 5]),
                  _opt("s", [None, 1, 2, "2x1", "1x2"]), _PAD, _ACT)
_LOCAL = st.builds(lambda n, k, s, p, a: f"{n}LC{k}{s}{p}{a}",
                   st.integers(1, 4), st.integers(1, 3), _opt("s", [None, 1, 2]), st.sampled_from(["", "p0"]), _ACT)
_POOL = st.builds(lambda kind, k, k2, s, p: f"{kind}{k}{k2}{s}{p}",
                  st.sampled_from(["MP", "AP"]), st.integers(1, 3), _opt("x", [None, None, 1, 2, 4]),
                  _opt("s", [None, None, 1, 2, "1x2"]), st.sampled_from(["", "", "p0", "psame"]))
_RES = st.builds(lambda n, s, a: f"R{n}{s}{a}", st.integers(1, 6), st.sampled_from(["", "s2", "s1x2"]), _R_ACT)
_SPATIAL = st.one_of(_CONV, _CONV, _LOCAL, _POOL, _RES, st.sampled_from(["BN", "LRN", "LRN3", "D0.5", "D0.2"]))
_FLAT = st.one_of(st.builds(lambda n, a: f"FC{n}{a}", st.integers(1, 12), _ACT), st.sampled_from(["BN", "D0.3"]))
SPECS = st.builds(
    lambda spatial, pool, flat: "-".join(spatial + ([pool] if pool else []) + flat),
    st.lists(_SPATIAL, min_size=0, max_size=4), st.sampled_from(["", "", "GAP", "GMP"]),
    st.lists(_FLAT, max_size=2),
).filter(bool)
SHAPES = st.tuples(st.integers(16, 32), st.integers(16, 32), st.integers(1, 3))
OPTIONS = st.fixed_dictionaries({}, optional={
    "batch_norm": st.booleans(),
    "padding": st.sampled_from(["valid", "same"]),
    "activation": st.sampled_from(["relu", "tanh", "prelu"]),
    "dtype": st.just("mixed_bfloat16"),
    "shortcut": st.sampled_from(["projection", "zero_pad"]),
})


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(SPECS, SHAPES, st.sampled_from([None, 2, 10]), OPTIONS)
def test_random_valid_specs_build_as_planned(spec, input_shape, num_classes, options):
    try:
        model_plan = plan(spec, input_shape, num_classes, **options)
    except SpecError:
        assume(False)
    # Reset Keras' global state each example; skip its gc.collect() (0.15 s each here), which the
    # interpreter's own collector does anyway.
    keras.backend.clear_session(free_memory=False)
    model = cnnkit.build(spec, input_shape, num_classes, **options)  # any error here is a failure
    assert model.count_params() == model_plan.params
    assert _trainable_count(model) == model_plan.trainable_params
    _shapes_match(model, model_plan)
    assert model.output_shape[1:] == model_plan.output_shape
    # the memory estimate keeps one tensor per Keras layer output (padding, shortcuts, rescaling too)
    assert model_plan.memory(batch_size=1, optimizer="sgd").activations == 2 * 4 * _stored_elements(model)


def _stored_elements(model) -> int:  # an Identity layer's output is its input
    return sum(math.prod(layer.output.shape[1:]) for layer in model.layers
               if not isinstance(layer, keras.layers.Identity))


# --- specific builds -----------------------------------------------------------------------


def test_docstring_example_and_names():
    model = cnnkit.build("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10)
    assert model.output_shape == (None, 10)
    assert model.count_params() == plan("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10).params == 233_196
    assert [layer.name for layer in model.layers] == [
        "image", "rescale", "conv1", "conv1_act", "pool1", "conv2", "conv2_act", "pool2", "flatten", "fc1",
        "fc1_act", "classifier", "probabilities",
    ]
    assert model.name == "cnnkit_net"
    assert model.get_layer("conv1").get_config()["activation"] == "linear"
    assert model.get_layer("classifier").get_config()["activation"] == "linear"
    assert model.get_layer("probabilities").get_config()["activation"] == "softmax"


def test_build_fails_before_keras_with_the_formula():
    with pytest.raises(SpecError, match=r"\(224 - 11 \+ 0\)/4 \+ 1 = 54.25 is not an integer"):
        cnnkit.build("96C11s4p0-MP3s2", (224, 224, 3), 10)


def test_build_without_classifier():
    model = cnnkit.build("4C3-GAP", (8, 8, 1), None)
    assert model.output_shape == (None, 4)
    assert "probabilities" not in [layer.name for layer in model.layers]


def test_custom_layers_from_notation():
    model = cnnkit.build("4LC3-LRN3-R8s2", (9, 9, 2), 3)
    assert isinstance(model.get_layer("local1"), LocallyConnected2D)
    assert isinstance(model.get_layer("lrn1"), LocalResponseNormalization)
    assert model.get_layer("lrn1").size == 3
    assert isinstance(model.get_layer("residual1_proj"), keras.layers.Conv2D)
    assert model.get_layer("residual1").output.shape[1:] == (4, 4, 8)


def test_non_square_pool_strides_by_its_window():
    model = cnnkit.build("MP2x4-AP3x1psame", (8, 8, 1), 2)
    assert model.get_layer("pool1").strides == (2, 4)
    assert tuple(model.get_layer("pool1").output.shape[1:]) == (4, 2, 1) == plan("MP2x4", (8, 8, 1)).output_shape
    assert model.get_layer("pool2").strides == (3, 1)
    assert tuple(model.get_layer("pool2").output.shape[1:]) == (2, 2, 1)
    x = np.arange(64, dtype="float32").reshape(1, 8, 8, 1)
    pooled = keras.Model(model.input, model.get_layer("pool1").output)(x * 255)  # undo the 1/255 rescale
    np.testing.assert_allclose(np.asarray(pooled)[0, :, :, 0], x[0, :, :, 0].reshape(4, 2, 2, 4).max(axis=(1, 3)))


def test_zero_padded_shortcut_is_the_subsampled_input_with_zero_channels(tmp_path):
    model = cnnkit.build("3C1-R8s2", (6, 6, 1), 2, shortcut="zero_pad", preprocessing=None)
    names = [layer.name for layer in model.layers]
    assert "residual1_proj" not in names
    assert model.count_params() == plan("3C1-R8s2", (6, 6, 1), 2, shortcut="zero_pad").params
    probe = keras.Model(model.input, [model.get_layer("conv1_act").output,
                                      model.get_layer("residual1_zero_pad").output])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 1)).astype("float32")
    features, shortcut = (np.asarray(t) for t in probe(x))
    assert shortcut.shape == (2, 3, 3, 8)
    np.testing.assert_array_equal(shortcut[..., :3], features[:, ::2, ::2, :])
    np.testing.assert_array_equal(shortcut[..., 3:], 0)
    path = tmp_path / "zero_pad.keras"
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(x), model(x), atol=1e-7)


def test_padding_layers():
    model = cnnkit.build("4C3p1-4C3s2p1-MP3s2psame", (9, 9, 1), 3)
    names = [layer.name for layer in model.layers]
    assert model.get_layer("conv1").padding == "same" and "conv1_pad" not in names  # 3x3, p1, stride 1
    assert isinstance(model.get_layer("conv2_pad"), keras.layers.ZeroPadding2D)
    assert model.get_layer("conv2").padding == "valid"
    assert model.get_layer("pool1").padding == "same" and "pool1_pad" not in names
    assert model.get_layer("pool1").output.shape[1:] == (3, 3, 4)  # 9 -> 9 -> 5 -> 3


def test_bn_moves_activation_and_drops_bias():
    model = cnnkit.build("8C3-BN-FC8-BN", (8, 8, 1), 3)
    assert model.get_layer("conv1").use_bias is False
    assert model.get_layer("fc1").use_bias is False
    assert model.get_layer("classifier").use_bias is True
    assert model.get_layer("bn1_act").get_config()["activation"] == "relu"
    assert model.get_layer("bn2_act").get_config()["activation"] == "relu"
    names = [layer.name for layer in model.layers]
    assert "conv1_act" not in names and "fc1_act" not in names
    assert names.index("conv1") < names.index("bn1") < names.index("bn1_act")


def test_batch_norm_option():
    model = cnnkit.build("vgg_small", (8, 8, 3), 10, batch_norm=True)
    for index in (1, 2, 3, 4):
        assert model.get_layer(f"conv{index}").use_bias is False
        assert isinstance(model.get_layer(f"bn{index}"), keras.layers.BatchNormalization)
        assert model.get_layer(f"bn{index}_act").get_config()["activation"] == "relu"
    assert model.count_params() == plan("vgg_small", (8, 8, 3), 10, batch_norm=True).params


# --- options -------------------------------------------------------------------------------


def test_activation_override_per_token():
    model = cnnkit.build("8C3:tanh-8C3-4LC3:elu-R8-FC8:sigmoid", (12, 12, 1), 3)
    assert model.get_layer("conv1_act").get_config()["activation"] == "tanh"
    assert model.get_layer("conv2_act").get_config()["activation"] == "relu"
    assert model.get_layer("local1_act").get_config()["activation"] == "elu"
    assert model.get_layer("fc1_act").get_config()["activation"] == "sigmoid"
    model = cnnkit.build("8C3:tanh-8C3", (12, 12, 1), 3, activation="elu")
    assert model.get_layer("conv1_act").get_config()["activation"] == "tanh"
    assert model.get_layer("conv2_act").get_config()["activation"] == "elu"


def test_residual_activation_override():
    model = cnnkit.build("8C3-R8:tanh", (8, 8, 1), 3)
    assert model.get_layer("residual1_act1").get_config()["activation"] == "tanh"
    assert model.get_layer("residual1").get_config()["activation"] == "tanh"


def test_prelu_activation_params_counted():
    spec, shape = "8C3-R8-FC4", (6, 6, 2)
    model = cnnkit.build(spec, shape, 3, activation="prelu")
    model_plan = plan(spec, shape, 3, activation="prelu")
    assert model.count_params() == model_plan.params
    assert model_plan.params == plan(spec, shape, 3).params + 8 + 2 * 8 + 4
    assert isinstance(model.get_layer("conv1_act"), keras.layers.PReLU)
    assert tuple(model.get_layer("conv1_act").alpha.shape) == (1, 1, 8)  # shared over height, width
    assert tuple(model.get_layer("residual1_act1").alpha.shape) == (1, 1, 8)
    assert tuple(model.get_layer("fc1_act").alpha.shape) == (4,)


def test_l2_adds_losses():
    spec = "4C3-R4s2-4LC2-FC8"
    assert cnnkit.build(spec, (10, 10, 1), 3).losses == []
    model = cnnkit.build(spec, (10, 10, 1), 3, l2=1e-3)
    kernels = [model.get_layer(name).kernel for name in (
        "conv1", "residual1_conv1", "residual1_conv2", "residual1_proj", "local1", "fc1", "classifier")]
    assert len(model.losses) == len(kernels)
    expected = 1e-3 * sum(float(np.sum(np.square(kernel.numpy()))) for kernel in kernels)
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)


def test_max_norm_sets_and_enforces_constraints():
    model = cnnkit.build("4C3-4LC3-FC8", (10, 10, 1), 3, max_norm=0.5)
    axes = {"conv1": [0, 1, 2], "local1": 1, "fc1": 0, "classifier": 0}
    for name, axis in axes.items():
        constraint = model.get_layer(name).kernel.constraint
        assert isinstance(constraint, keras.constraints.MaxNorm), name
        assert constraint.max_value == 0.5 and constraint.axis == axis
    assert cnnkit.build("4C3", (10, 10, 1), 3).get_layer("conv1").kernel.constraint is None
    # One big SGD step, then every filter's norm is clipped to 0.5.
    model.compile(optimizer=keras.optimizers.SGD(1e3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.integers(0, 256, (4, 10, 10, 1)).astype("float32"), np.array([0, 1, 2, 0]))
    norms = {
        "conv1": np.sqrt(np.sum(np.square(model.get_layer("conv1").kernel.numpy()), axis=(0, 1, 2))),
        "local1": np.sqrt(np.sum(np.square(model.get_layer("local1").kernel.numpy()), axis=1)),
        "fc1": np.sqrt(np.sum(np.square(model.get_layer("fc1").kernel.numpy()), axis=0)),
    }
    for name, norm in norms.items():
        assert np.max(norm) <= 0.5 + 1e-5, name


def test_theano_initializer_lenet():
    model = cnnkit.build("lenet", (28, 28, 1), 10)
    conv1 = model.get_layer("conv1")
    initializer = conv1.kernel_initializer
    assert isinstance(initializer, keras.initializers.RandomUniform)
    fan_in, fan_out = 1 * 5 * 5, 20 * 5 * 5 / (2 * 2)  # deeplearning.net LeNetConvPoolLayer
    limit = math.sqrt(6 / (fan_in + fan_out))
    assert limit == pytest.approx(0.2)
    assert initializer.maxval == pytest.approx(limit) and initializer.minval == pytest.approx(-limit)
    kernel = conv1.kernel.numpy()
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
    conv2 = model.get_layer("conv2").kernel_initializer
    assert conv2.maxval == pytest.approx(math.sqrt(6 / (20 * 25 + 50 * 25 / 4)))
    fc1 = model.get_layer("fc1").kernel_initializer
    assert fc1.maxval == pytest.approx(math.sqrt(6 / (800 + 500)))


def test_auto_initializer_follows_activation():
    model = cnnkit.build("8C3:tanh-8C3-8C3:sigmoid-BN-8C1-BN-FC8:selu-FC8:leaky_relu", (10, 10, 1), 3)
    expected = {
        "conv1": keras.initializers.GlorotUniform,  # tanh
        "conv2": keras.initializers.HeNormal,  # relu (default)
        "conv3": keras.initializers.GlorotUniform,  # sigmoid, moved after BN
        "conv4": keras.initializers.HeNormal,  # relu, moved after BN
        "fc1": keras.initializers.LecunNormal,  # selu
        "fc2": keras.initializers.HeNormal,  # leaky_relu
        "classifier": keras.initializers.GlorotUniform,  # softmax
    }
    for name, cls in expected.items():
        assert type(model.get_layer(name).kernel_initializer) is cls, name
    model = cnnkit.build("8C3-R8", (10, 10, 1), 3, activation="tanh")
    assert type(model.get_layer("conv1").kernel_initializer) is keras.initializers.GlorotUniform
    assert type(model.get_layer("residual1_conv1").kernel_initializer) is keras.initializers.GlorotUniform


def test_named_initializer():
    model = cnnkit.build("8C3-FC8", (10, 10, 1), 3, initializer="he_uniform")
    for name in ("conv1", "fc1", "classifier"):
        assert type(model.get_layer(name).kernel_initializer) is keras.initializers.HeUniform


def test_the_docstring_names_exactly_the_initializers_build_takes():
    from cnnkit.models.builder import build
    from cnnkit.planner import INITIALIZERS

    paragraph = build.__doc__.split("``initializer``")[1].split("``l2``")[0]
    assert set(re.findall(r'"(\w+)"', paragraph)) == set(INITIALIZERS)
    for name in set(INITIALIZERS) - {"auto", "theano"}:
        model = cnnkit.build("4C3-FC4", (6, 6, 1), 3, initializer=name)
        assert type(model.get_layer("conv1").kernel_initializer) is type(keras.initializers.get(name)), name
    with pytest.raises(ValueError, match=re.escape(f"initializer must be one of {INITIALIZERS}. "
                                                   "Received: initializer='orthogonal'")):
        cnnkit.build("4C3", (6, 6, 1), 3, initializer="orthogonal")


def test_mixed_bfloat16():
    before = keras.config.dtype_policy().name
    model = cnnkit.build("8C3-4LC3-LRN3-R8-BN-FC8", (10, 10, 3), 3, dtype="mixed_bfloat16")
    assert keras.config.dtype_policy().name == before  # the global policy is left alone
    for name in ("rescale", "conv1", "local1", "lrn1", "residual1_conv1", "fc1", "classifier"):
        layer = model.get_layer(name)
        assert layer.compute_dtype == "bfloat16", name
        assert layer.variable_dtype == "float32", name
    assert model.get_layer("conv1").kernel.dtype == "float32"
    assert model.get_layer("conv1").output.dtype == "bfloat16"
    assert model.output.dtype == "float32"
    x = np.random.default_rng(0).integers(0, 256, (2, 10, 10, 3), dtype="uint8")
    y = model.predict(x, verbose=0)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)


def test_default_preprocessing_rescales_by_1_over_255():
    spec, shape = "4C3-MP2-FC8", (8, 8, 1)
    default = cnnkit.build(spec, shape, 3)
    raw = cnnkit.build(spec, shape, 3, preprocessing=None)
    rescale = default.get_layer("rescale")
    assert isinstance(rescale, keras.layers.Rescaling)
    assert rescale.scale == pytest.approx(1 / 255)
    assert default.layers[1] is rescale
    assert "rescale" not in [layer.name for layer in raw.layers]
    assert len(default.layers) == len(raw.layers) + 1
    raw.set_weights(default.get_weights())
    pixels = np.random.default_rng(0).integers(0, 256, (3, *shape)).astype("float32")
    def predict(model, x):
        return np.asarray(model(x, training=False))

    np.testing.assert_allclose(predict(default, pixels), predict(raw, pixels / 255), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict(default, np.full((1, *shape), 255.0, "float32")),
                               predict(raw, np.ones((1, *shape), "float32")), rtol=1e-5, atol=1e-6)
    # and they differ when given the same input (so the check above is not vacuous)
    assert not np.allclose(predict(default, pixels), predict(raw, pixels), atol=1e-4)


def test_preprocessing_list_of_layers():
    double = keras.layers.Rescaling(2.0, name="double")
    model = cnnkit.build("FC2", (2, 2, 1), 2, preprocessing=[double])
    assert model.layers[1] is double


def test_preprocessing_that_changes_the_image_shape_is_refused_naming_the_layer():
    resize = keras.layers.Resizing(8, 8, name="resize")
    with pytest.raises(ValueError, match=re.escape("preprocessing layer 'resize' (Resizing) changes the image shape "
                                                   "(16, 16, 1) to (8, 8, 1); the network is planned on the input")):
        cnnkit.build("4C3-FC4", (16, 16, 1), 2, preprocessing=[resize])


@pytest.mark.parametrize("options, needle", [
    (dict(dropout=0.5), "unknown build option 'dropout'"),
    (dict(activations="relu"), "unknown build option 'activations'"),
    (dict(initializer="zeros"), "initializer must be one of"),
    (dict(preprocessing="none"), "preprocessing must be 'rescale', None or a list of Keras layers"),
    (dict(activation="swishy"), "activation must be one of"),
    (dict(padding="causal"), "padding must be one of ('valid', 'same')"),
    (dict(batch_norm="false"), "batch_norm must be True or False. Received: batch_norm='false'"),
    (dict(max_norm=-1), "max_norm must be None or a number > 0. Received: max_norm=-1"),
    (dict(l2=-0.1), "l2 must be None or a number >= 0"),
    (dict(shortcut="option_a"), "shortcut must be one of ('projection', 'zero_pad')"),
])
def test_invalid_options(options, needle):
    with pytest.raises(ValueError) as info:
        cnnkit.build("4C3", (8, 8, 1), 3, **options)
    assert needle in str(info.value)
    if "unknown build option" in needle:
        assert "valid options: activation, padding, batch_norm" in str(info.value)


def test_notation_model_with_every_option_round_trips(tmp_path):
    model = cnnkit.build("4LC3-LRN3-8C3:prelu-R8s2-BN-D0.5-FC8", (12, 12, 3), 3, max_norm=2.0, l2=1e-4,
                         dtype="mixed_bfloat16", initializer="theano")
    x = np.random.default_rng(1).integers(0, 256, (2, 12, 12, 3), dtype="uint8")
    expected = model.predict(x, verbose=0)
    path = tmp_path / "net.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=0, atol=1e-7)
    assert loaded.get_layer("conv1").compute_dtype == "bfloat16"
    assert isinstance(loaded.get_layer("local1").kernel.constraint, keras.constraints.MaxNorm)
    assert len(loaded.losses) == len(model.losses)


def test_linear_residual_block_output_keeps_the_row_name():
    model = cnnkit.build("8C3-R8:linear", (8, 8, 1), 10)
    assert tuple(model.get_layer("residual1").output.shape[1:]) == (6, 6, 8)


def test_theano_initializer_uses_the_3x3_kernel_in_residual_blocks():
    model = cnnkit.build("8C3-R8", (8, 8, 1), 10, initializer="theano")
    assert model.get_layer("residual1_conv1").kernel_initializer.maxval == pytest.approx((6 / (9 * 8 + 9 * 8)) ** 0.5)
    # one initialiser object per convolution: an unseeded Keras initialiser repeats its values
    first, second = (model.get_layer(f"residual1_conv{i}").kernel.numpy() for i in (1, 2))
    assert first.shape == second.shape and not np.allclose(first, second)


def test_theano_initializer_scales_sigmoid_units_by_4():
    model = cnnkit.build("FC500:sigmoid", (28, 28, 1), 10, initializer="theano")
    assert model.get_layer("fc1").kernel_initializer.maxval == pytest.approx(4 * (6 / (784 + 500)) ** 0.5)


def test_theano_initializer_sees_the_pool_past_batch_norm():
    model = cnnkit.build("8C3-MP2", (10, 10, 1), 10, batch_norm=True, initializer="theano")
    assert model.get_layer("conv1").kernel_initializer.maxval == pytest.approx((6 / (9 + 72 / 4)) ** 0.5)
