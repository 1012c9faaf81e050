"""Tests for cnnkit.models.layers (LocalResponseNormalization, LocallyConnected2D)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnkit.models.layers import LocallyConnected2D, LocalResponseNormalization


def _rand(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype("float32")


def _lc2d_reference(x, kernel, bias, kernel_size, strides):
    """Explicit loop: out[b, i, j] = patch(i, j) . kernel[i*out_w + j] + bias[i, j]."""
    batch, height, width, channels = x.shape
    kh, kw = kernel_size
    sh, sw = strides
    out_h = (height - kh) // sh + 1
    out_w = (width - kw) // sw + 1
    filters = kernel.shape[-1]
    out = np.zeros((batch, out_h, out_w, filters), dtype="float64")
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                patch = x[b, i * sh : i * sh + kh, j * sw : j * sw + kw, :]
                for f in range(filters):
                    acc = 0.0
                    for di in range(kh):
                        for dj in range(kw):
                            for c in range(channels):
                                p = (di * kw + dj) * channels + c
                                acc += float(patch[di, dj, c]) * float(kernel[i * out_w + j, p, f])
                    out[b, i, j, f] = acc + (0.0 if bias is None else bias[i, j, f])
    return out


def _lrn_reference(x, size, k, alpha, beta):
    """Explicit loop over channels, windows clipped at the edges."""
    x = x.astype("float64")
    channels = x.shape[-1]
    r = size // 2
    out = np.empty_like(x)
    for i in range(channels):
        lo, hi = max(0, i - r), min(channels, i + r + 1)
        s = np.sum(x[..., lo:hi] ** 2, axis=-1)
        out[..., i] = x[..., i] / (k + alpha * s) ** beta
    return out


# ---------------------------------------------------------------- LRN


@pytest.mark.parametrize(
    "size,k,alpha,beta",
    [(5, 2.0, 1e-4, 0.75), (3, 1.0, 0.5, 0.5), (1, 2.0, 0.1, 0.75), (7, 0.5, 0.02, 1.0)],
)
def test_lrn_matches_tf_nn_lrn(size, k, alpha, beta):
    x = _rand((2, 5, 4, 9), seed=size, scale=3.0)
    got = keras.ops.convert_to_numpy(
        LocalResponseNormalization(size=size, k=k, alpha=alpha, beta=beta)(x)
    )
    want = tf.nn.local_response_normalization(
        x, depth_radius=size // 2, bias=k, alpha=alpha, beta=beta
    ).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _lrn_reference(x, size, k, alpha, beta), rtol=1e-5, atol=1e-5)


def test_lrn_alpha_multiplies_plain_sum_not_mean():
    # One channel at 1, rest 0: centre sees sum 1, so b = 1 / (k + alpha) ** beta.
    x = np.zeros((1, 1, 1, 5), dtype="float32")
    x[..., 2] = 1.0
    out = keras.ops.convert_to_numpy(
        LocalResponseNormalization(size=5, k=1.0, alpha=1.0, beta=1.0)(x)
    )
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_lrn_window_is_clipped_and_local():
    # Channel 0 large; with size=3 it only affects channels 0 and 1.
    x = np.ones((1, 1, 1, 6), dtype="float32")
    x[..., 0] = 10.0
    out = keras.ops.convert_to_numpy(
        LocalResponseNormalization(size=3, k=1.0, alpha=1.0, beta=1.0)(x)
    )[0, 0, 0]
    np.testing.assert_allclose(out[0], 10.0 / (1 + 100 + 1), rtol=1e-6)
    np.testing.assert_allclose(out[1], 1.0 / (1 + 100 + 1 + 1), rtol=1e-6)
    np.testing.assert_allclose(out[2:5], 1.0 / 4.0, rtol=1e-6)
    np.testing.assert_allclose(out[5], 1.0 / 3.0, rtol=1e-6)


def test_lrn_works_with_unknown_channels_in_tf_function():
    layer = LocalResponseNormalization(size=3, alpha=0.1)
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])
    x = _rand((1, 3, 3, 6), seed=3)
    want = tf.nn.local_response_normalization(
        x, depth_radius=1, bias=2.0, alpha=0.1, beta=0.75
    ).numpy()
    np.testing.assert_allclose(fn(x).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [4, 0, -3, 2.0, True, "5"])
def test_lrn_rejects_bad_size(size):
    with pytest.raises(ValueError, match=f"Received: size={size!r}"):
        LocalResponseNormalization(size=size)


def test_lrn_bad_size_message_exact():
    with pytest.raises(ValueError, match=r"Received: size=4$"):
        LocalResponseNormalization(size=4)


@pytest.mark.parametrize("kwargs", [{"k": "2"}, {"alpha": None}, {"beta": True}])
def test_lrn_rejects_non_numeric_constants(kwargs):
    with pytest.raises(TypeError, match="must be a real number"):
        LocalResponseNormalization(**kwargs)


def test_lrn_has_no_weights_and_keeps_shape():
    layer = LocalResponseNormalization()
    out = layer(_rand((2, 3, 3, 4)))
    assert layer.weights == []
    assert layer.count_params() == 0
    assert tuple(out.shape) == (2, 3, 3, 4)
    assert layer.compute_output_shape((None, 7, 7, 96)) == (None, 7, 7, 96)


def test_lrn_get_config_round_trip():
    layer = LocalResponseNormalization(size=3, k=1.5, alpha=2e-3, beta=0.6, name="lrn")
    config = layer.get_config()
    assert {k: config[k] for k in ("size", "k", "alpha", "beta")} == {
        "size": 3,
        "k": 1.5,
        "alpha": 2e-3,
        "beta": 0.6,
    }
    clone = LocalResponseNormalization.from_config(config)
    assert clone.get_config() == config
    x = _rand((1, 2, 2, 5), seed=4, scale=5.0)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(clone(x)), keras.ops.convert_to_numpy(layer(x))
    )
    # Also via the generic registry path.
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(revived, LocalResponseNormalization)
    assert revived.get_config() == config


def test_lrn_training_flag_has_no_effect():
    layer = LocalResponseNormalization(alpha=0.1)
    x = _rand((2, 3, 3, 6), seed=5)
    a = keras.ops.convert_to_numpy(layer(x, training=True))
    b = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_array_equal(a, b)


def test_lrn_save_and_load_keras_file(tmp_path):
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    h = LocalResponseNormalization(size=3, k=1.0, alpha=0.05, beta=0.75, name="lrn")(h)
    outputs = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "lrn_model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("lrn"), LocalResponseNormalization)
    assert loaded.get_layer("lrn").get_config()["alpha"] == 0.05
    x = _rand((2, 6, 6, 3), seed=6, scale=4.0)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x))
    )


def test_lrn_mixed_bfloat16():
    layer = LocalResponseNormalization(size=3, k=1.0, alpha=0.5, beta=0.75, dtype="mixed_bfloat16")
    x = _rand((2, 3, 3, 6), seed=7)
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    want = _lrn_reference(x, 3, 1.0, 0.5, 0.75)
    got = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("value", [255.0, 300.0, 1000.0])
def test_lrn_mixed_float16_does_not_overflow_on_large_activations(value):
    # 300 ** 2 = 90,000 > float16's largest 65,504: squared in float16 the output and gradient were 0.
    x = tf.Variable(np.full((1, 2, 2, 7), value, np.float32))
    results = {}
    for policy in ("float32", "mixed_float16"):
        layer = LocalResponseNormalization(size=5, dtype=policy)
        with tf.GradientTape() as tape:
            out = layer(x)
            total = tf.reduce_sum(tf.cast(out, tf.float32))
        results[policy] = out.numpy().astype(np.float32), tape.gradient(total, x).numpy()
    out16, grad16 = results["mixed_float16"]
    out32, grad32 = results["float32"]
    np.testing.assert_allclose(out16, out32, rtol=2e-3)  # float16 keeps about 3 decimal digits
    assert np.all(grad16 != 0)
    np.testing.assert_allclose(grad16, grad32, rtol=1e-2)


def test_lrn_mixed_float16_output_is_float16():
    out = LocalResponseNormalization(size=3, dtype="mixed_float16")(np.full((1, 1, 1, 3), 400.0, np.float32))
    assert keras.backend.standardize_dtype(out.dtype) == "float16"


# ---------------------------------------------------------------- LocallyConnected2D


def _randomize(layer, seed):
    layer.set_weights([_rand(w.shape, seed=seed + i) for i, w in enumerate(layer.get_weights())])


@pytest.mark.parametrize(
    "input_shape,filters,kernel_size,strides",
    [
        ((2, 5, 5, 3), 4, 3, 1),
        ((2, 7, 6, 2), 3, (3, 3), 2),
        ((1, 6, 7, 3), 2, (2, 3), (1, 2)),
        ((2, 5, 4, 1), 1, (3, 1), (2, 1)),
    ],
)
def test_lc2d_matches_numpy_loop(input_shape, filters, kernel_size, strides):
    x = _rand(input_shape, seed=11)
    layer = LocallyConnected2D(filters, kernel_size, strides=strides)
    layer.build(input_shape)
    _randomize(layer, seed=20)
    kernel, bias = layer.get_weights()
    got = keras.ops.convert_to_numpy(layer(x))
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * 2
    st = strides if isinstance(strides, tuple) else (strides,) * 2
    want = _lc2d_reference(x, kernel, bias, ks, st)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lc2d_no_bias_and_activation():
    x = _rand((2, 4, 4, 2), seed=12)
    layer = LocallyConnected2D(3, 2, strides=2, activation="relu", use_bias=False)
    layer.build(x.shape)
    assert len(layer.weights) == 1 and layer.bias is None
    _randomize(layer, seed=30)
    (kernel,) = layer.get_weights()
    got = keras.ops.convert_to_numpy(layer(x))
    want = np.maximum(_lc2d_reference(x, kernel, None, (2, 2), (2, 2)), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert layer.count_params() == 2 * 2 * (2 * 2 * 2 * 3)


def test_lc2d_weights_are_unshared():
    # Same patch content at every position but different per-position kernels
    # must give different outputs; a Conv2D would give identical ones.
    x = np.ones((1, 4, 4, 1), dtype="float32")
    layer = LocallyConnected2D(1, 2, use_bias=False)
    layer.build(x.shape)
    _randomize(layer, seed=40)
    out = keras.ops.convert_to_numpy(layer(x))[0, :, :, 0]
    assert len(np.unique(np.round(out, 5))) == out.size
    # Gradient of one output position only touches that position's kernel row.
    with tf.GradientTape() as tape:
        y = layer(x)[:, 1, 2, :]
    grad = tape.gradient(y, layer.kernel).numpy()
    nonzero_rows = np.flatnonzero(np.abs(grad).sum(axis=(1, 2)))
    assert nonzero_rows.tolist() == [1 * 3 + 2]


@pytest.mark.parametrize(
    "in_hw,in_c,filters,kernel_size,strides",
    [
        ((8, 8), 3, 5, (3, 3), (1, 1)),
        ((9, 7), 2, 4, (3, 2), (2, 3)),
        ((6, 6), 1, 1, (6, 6), (1, 1)),
    ],
)
def test_lc2d_count_params_and_output_shape(in_hw, in_c, filters, kernel_size, strides):
    (h, w), (kh, kw), (sh, sw) = in_hw, kernel_size, strides
    out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
    layer = LocallyConnected2D(filters, kernel_size, strides=strides)
    assert layer.compute_output_shape((None, h, w, in_c)) == (None, out_h, out_w, filters)
    layer.build((None, h, w, in_c))
    assert layer.count_params() == out_h * out_w * (kh * kw * in_c * filters + filters)
    assert tuple(layer.kernel.shape) == (out_h * out_w, kh * kw * in_c, filters)
    assert tuple(layer.bias.shape) == (out_h, out_w, filters)
    out = layer(_rand((2, h, w, in_c)))
    assert tuple(out.shape) == (2, out_h, out_w, filters)
    symbolic = layer(keras.Input((h, w, in_c)))
    assert tuple(symbolic.shape) == (None, out_h, out_w, filters)


def test_lc2d_count_params_keras2_reference_value():
    # Keras 2: LocallyConnected2D(64, 3) on (32, 32, 3) -> 30*30*(27*64 + 64) params.
    model = keras.Sequential([keras.Input((32, 32, 3)), LocallyConnected2D(64, 3)])
    assert model.count_params() == 30 * 30 * (3 * 3 * 3 * 64 + 64) == 1_612_800


@pytest.mark.parametrize(
    "shape",
    [(None, None, 8, 3), (None, 8, None, 3), (None, 8, 8, None), (None, 8, 3), (None, 2, 8, 8, 3)],
)
def test_lc2d_rejects_unknown_or_wrong_rank_input(shape):
    layer = LocallyConnected2D(2, 3)
    with pytest.raises(ValueError, match="height, width and channels") as info:
        layer.build(shape)
    assert str(shape) in str(info.value)


def test_lc2d_rejects_unknown_dims_in_functional_model():
    with pytest.raises(ValueError, match=r"\(None, None, None, 3\)"):
        LocallyConnected2D(2, 3)(keras.Input((None, None, 3)))


@pytest.mark.parametrize("kernel_size", [(5, 3), (3, 5), 6])
def test_lc2d_rejects_kernel_larger_than_input(kernel_size):
    with pytest.raises(ValueError, match=r"larger than the input.*height=4, width=4") as info:
        LocallyConnected2D(2, kernel_size).build((None, 4, 4, 3))
    assert "kernel_size=" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"filters": 0, "kernel_size": 3}, r"`filters` must be a positive int. Received: filters=0"),
        ({"filters": 2, "kernel_size": (3, 0)}, r"`kernel_size` must be .* Received: kernel_size=\(3, 0\)"),
        ({"filters": 2, "kernel_size": 3, "strides": (1, 2, 3)}, r"`strides` must be .* Received: strides=\(1, 2, 3\)"),
        ({"filters": 2.5, "kernel_size": 3}, r"`filters` must be a positive int. Received: filters=2.5"),
    ],
)
def test_lc2d_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocallyConnected2D(**kwargs)


def test_lc2d_get_config_round_trip():
    layer = LocallyConnected2D(
        3,
        (2, 3),
        strides=(2, 1),
        activation="tanh",
        use_bias=True,
        kernel_initializer="he_normal",
        bias_initializer="ones",
        kernel_regularizer=keras.regularizers.L2(1e-3),
        kernel_constraint=keras.constraints.MaxNorm(2.0),
        name="lc",
    )
    config = layer.get_config()
    assert config["filters"] == 3
    assert tuple(config["kernel_size"]) == (2, 3)
    assert tuple(config["strides"]) == (2, 1)
    clone = LocallyConnected2D.from_config(config)
    assert clone.get_config() == config
    assert clone.kernel_size == (2, 3) and clone.strides == (2, 1)
    assert isinstance(clone.kernel_regularizer, keras.regularizers.L2)
    assert isinstance(clone.kernel_constraint, keras.constraints.MaxNorm)
    clone.build((None, 5, 5, 2))
    np.testing.assert_array_equal(clone.bias.numpy(), np.ones((2, 3, 3), dtype="float32"))
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(revived, LocallyConnected2D)
    assert revived.get_config() == config


def test_lc2d_regularizer_adds_loss():
    layer = LocallyConnected2D(2, 2, kernel_regularizer=keras.regularizers.L2(0.5))
    layer(_rand((1, 3, 3, 1)))
    assert len(layer.losses) == 1
    expected = 0.5 * np.sum(np.square(layer.get_weights()[0]))
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-5)


def test_lc2d_training_flag_has_no_effect():
    layer = LocallyConnected2D(2, 2)
    x = _rand((2, 4, 4, 3), seed=13)
    a = keras.ops.convert_to_numpy(layer(x, training=True))
    b = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_array_equal(a, b)


def test_lc2d_save_and_load_keras_file(tmp_path):
    inputs = keras.Input((7, 6, 2))
    h = LocallyConnected2D(
        3, (3, 2), strides=(2, 1), activation="relu", kernel_regularizer="l2", name="lc"
    )(inputs)
    h = LocalResponseNormalization(size=3, name="lrn")(h)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    _randomize(model.get_layer("lc"), seed=50)
    path = tmp_path / "lc_model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("lc")
    assert isinstance(layer, LocallyConnected2D)
    assert layer.kernel_size == (3, 2) and layer.strides == (2, 1)
    for w_loaded, w_orig in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(w_loaded, w_orig)
    x = _rand((3, 7, 6, 2), seed=14)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x))
    )


def test_lc2d_mixed_bfloat16():
    layer = LocallyConnected2D(2, 2, dtype="mixed_bfloat16")
    x = _rand((2, 4, 4, 3), seed=15)
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float32"
    kernel, bias = layer.get_weights()
    want = _lc2d_reference(x, kernel, bias, (2, 2), (1, 1))
    got = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2)


def test_mixed_bfloat16_model_with_both_layers():
    inputs = keras.Input((6, 6, 2))
    h = LocallyConnected2D(4, 3, dtype="mixed_bfloat16")(inputs)
    h = LocalResponseNormalization(size=3, dtype="mixed_bfloat16")(h)
    model = keras.Model(inputs, h)
    out = model(_rand((2, 6, 6, 2), seed=16))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))))


def test_lc2d_trains_with_fit():
    keras.utils.set_random_seed(0)
    x = _rand((8, 5, 5, 2), seed=17)
    y = _rand((8, 1), seed=18)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            LocallyConnected2D(3, 3, strides=1, name="lc"),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    kernel_before, bias_before = (w.copy() for w in model.get_layer("lc").get_weights())
    loss_before = model.evaluate(x, y, batch_size=8, verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loss_after = model.evaluate(x, y, batch_size=8, verbose=0)
    kernel_after, bias_after = model.get_layer("lc").get_weights()
    assert loss_after < loss_before
    # Every position's kernel and bias received an update.
    assert np.all(np.abs(kernel_after - kernel_before).sum(axis=(1, 2)) > 0)
    assert np.all(np.abs(bias_after - bias_before).sum(axis=-1) > 0)
