import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import cnnkit
import cnnkit.runs
from cnnkit.recipes import preprocess
from cnnkit.recipes.preprocess import EPSILON, PREPROCESSORS, Standardization, Whitening, fit_preprocessing

SHAPE = (4, 4, 1)


@pytest.fixture(scope="module")
def correlated_images():
    """600 raw 4x4x1 images whose pixels share a common brightness (strongly correlated)."""
    rng = np.random.default_rng(0)
    brightness = rng.normal(size=(600, 1, 1, 1))
    gradient = np.linspace(-1, 1, 4).reshape(1, 4, 1, 1) * rng.normal(size=(600, 1, 1, 1))
    pixels = 128 + 40 * brightness + 15 * gradient + 25 * rng.normal(size=(600, *SHAPE))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rgb_images():
    rng = np.random.default_rng(1)
    channel_means = np.array([60, 120, 200]).reshape(1, 1, 1, 3)
    pixels = channel_means + rng.normal(scale=[10, 30, 20], size=(300, 6, 5, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _apply(layers, images):
    x = images.astype("float32")
    for layer in layers:
        x = np.asarray(layer(x))
    return x


def _covariance(x):
    flat = x.reshape(len(x), -1).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    return flat.T @ flat / len(flat)


def test_scale_is_the_default_rescaling(correlated_images):
    layers = fit_preprocessing("scale", correlated_images)
    assert [layer.name for layer in layers] == ["rescale"]
    np.testing.assert_allclose(_apply(layers, correlated_images), correlated_images / 255, rtol=1e-6)


@pytest.mark.parametrize(
    "step, layer_name, axes",
    [("center_pixel", "center", (0,)), ("center_channel", "center", (0, 1, 2)), ("standardize", "standardize", (0, 1, 2))],
)
def test_centred_training_data_has_zero_mean(rgb_images, step, layer_name, axes):
    layers = fit_preprocessing(step, rgb_images)
    assert [layer.name for layer in layers] == ["rescale", layer_name]
    out = _apply(layers, rgb_images)
    np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-5)
    if step == "center_channel":  # one mean per channel: the per-pixel means are not all zero
        assert np.abs(out.mean(axis=0)).max() > 1e-3
        np.testing.assert_allclose(out.std(axis=axes), rgb_images.std(axis=axes) / 255, rtol=1e-4)
    if step == "standardize":
        variance = (rgb_images / 255).var(axis=axes)
        np.testing.assert_allclose(out.std(axis=axes), np.sqrt(variance / (variance + EPSILON)), rtol=1e-4)


@pytest.mark.parametrize("step", ["pca", "zca"])
def test_whitened_training_data_has_identity_covariance(correlated_images, step):
    raw = correlated_images / 255
    assert np.abs(_covariance(raw) - np.diag(np.diag(_covariance(raw)))).max() > 1e-3  # correlated to start with
    out = _apply(fit_preprocessing(step, correlated_images), correlated_images)
    assert out.shape == correlated_images.shape
    np.testing.assert_allclose(out.reshape(len(out), -1).mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(_covariance(out), np.eye(16), atol=5e-3)


def test_whitening_follows_cs231n_with_epsilon_1e5(correlated_images):
    x = correlated_images.reshape(len(correlated_images), -1) / 255
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x.T @ x / len(x))
    pca_white = x @ u / np.sqrt(s + 1e-5)
    zca_white = pca_white @ u.T
    zca_layers = fit_preprocessing("zca", correlated_images)
    zca = _apply(zca_layers, correlated_images).reshape(len(x), -1)
    pca = _apply(fit_preprocessing("pca", correlated_images), correlated_images).reshape(len(x), -1)
    np.testing.assert_allclose(zca, zca_white, atol=2e-3)
    np.testing.assert_allclose(np.abs(pca), np.abs(pca_white), atol=2e-3)  # eigenvector signs are arbitrary
    matrix = np.asarray(zca_layers[1].matrix)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-3)  # ZCA's matrix is symmetric, PCA's is not


def test_a_list_fits_each_step_on_the_output_of_the_ones_before(rgb_images):
    layers = fit_preprocessing(["scale", "center_pixel", "standardize"], rgb_images)
    assert [layer.name for layer in layers] == ["rescale", "center", "standardize"]
    out = _apply(layers, rgb_images)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-5)  # still centred per pixel
    centred = rgb_images / 255 - (rgb_images / 255).mean(axis=0)
    variance = centred.var(axis=(0, 1, 2))  # the standardisation is fitted on the centred images
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), np.sqrt(variance / (variance + EPSILON)), rtol=1e-4)


SAVED_CASES = ["center_pixel", "center_channel", "standardize", "pca", "zca", ["center_channel", "zca"]]


@pytest.mark.parametrize("step", SAVED_CASES, ids=str)
def test_saved_model_given_raw_pixels_predicts_as_in_training(correlated_images, tmp_path, step):
    layers = fit_preprocessing(step, correlated_images[:500])
    model = cnnkit.build("FC16", SHAPE, 3, preprocessing=layers)
    raw = correlated_images[500:]
    expected = np.asarray(model(raw.astype("float32"), training=False))
    path = tmp_path / "model.keras"
    cnnkit.runs.atomic_save_model(model, path)
    for loaded in (keras.saving.load_model(path), cnnkit.load(path).model):
        np.testing.assert_allclose(np.asarray(loaded(raw.astype("float32"), training=False)), expected, atol=1e-6)
        for layer in layers:  # the fitted statistics came back with the model
            assert np.allclose(_apply([loaded.get_layer(layer.name)], raw), _apply([layer], raw), atol=1e-6)
    np.testing.assert_allclose(cnnkit.load(path).predict(raw), expected, atol=1e-6)  # uint8 straight in


def test_a_fresh_process_loads_a_whitened_model(correlated_images, tmp_path):
    model = cnnkit.build("FC16", SHAPE, 3, preprocessing=fit_preprocessing("zca", correlated_images))
    cnnkit.runs.atomic_save_model(model, tmp_path / "model.keras")
    np.save(tmp_path / "raw.npy", correlated_images[:20])
    script = ("import sys, numpy as np, cnnkit; run = cnnkit.load(sys.argv[1] + '/model.keras'); "
              "np.save(sys.argv[1] + '/out.npy', run.predict(np.load(sys.argv[1] + '/raw.npy')))")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True)
    expected = np.asarray(model(correlated_images[:20].astype("float32")))
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


def test_mixed_bfloat16_keeps_preprocessing_in_float32(correlated_images, tmp_path):
    layers = fit_preprocessing("zca", correlated_images, dtype="mixed_bfloat16")
    assert [layer.dtype_policy.name for layer in layers] == ["float32", "float32"]
    model = cnnkit.build("FC16", SHAPE, 3, preprocessing=layers, dtype="mixed_bfloat16")
    assert model.get_layer("fc1").compute_dtype == "bfloat16"
    raw = correlated_images[:50].astype("float32")
    whitened = keras.Model(model.input, model.get_layer("whiten").output)(raw)
    np.testing.assert_allclose(np.asarray(whitened), _apply(fit_preprocessing("zca", correlated_images), raw),
                               atol=1e-5)  # exact, not bfloat16-rounded
    probabilities = np.asarray(model(raw))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    cnnkit.runs.atomic_save_model(model, tmp_path / "model.keras")
    np.testing.assert_allclose(cnnkit.load(tmp_path / "model.keras").predict(raw), probabilities, atol=1e-6)


@pytest.mark.parametrize("step", ["center_pixel", "standardize", "zca", ["center_channel", "pca"]], ids=str)
def test_statistics_summed_over_chunks_equal_those_of_one(monkeypatch, correlated_images, step):
    expected = _apply(fit_preprocessing(step, correlated_images), correlated_images)  # 600 images: one chunk
    monkeypatch.setattr(preprocess, "CHUNK_VALUES", 7 * 16)  # 7 images a chunk: 86 chunks, the last of 5 images
    np.testing.assert_allclose(_apply(fit_preprocessing(step, correlated_images), correlated_images), expected,
                               atol=1e-5)


def test_statistics_use_every_training_image():
    values = np.random.default_rng(0).integers(0, 256, 17_000).astype(np.uint8)
    images = np.broadcast_to(values.reshape(-1, 1, 1, 1), (17_000, 64, 64, 1))  # more than 256 MiB as float32
    layer = fit_preprocessing("standardize", images)[1]
    mean, std = values.mean() / 255, np.sqrt((values / 255).var() + EPSILON)
    np.testing.assert_allclose(np.asarray(layer(np.zeros((1, 1, 1, 1), np.float32))).ravel(), [-mean / std],
                               rtol=1e-5)


def test_whitening_the_largest_images_warns_only_below_five_images_per_value(monkeypatch):
    monkeypatch.setattr(preprocess, "_fit_step", lambda *args: keras.layers.Identity())  # the 64x64 fit is slow
    images = np.broadcast_to(np.uint8(0), (5 * 4096, 64, 64, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_preprocessing("zca", images)
    with pytest.warns(UserWarning, match=r"64x64x1 = 4096 values fitted on 20479 images, fewer than 5 x 4096"):
        fit_preprocessing("zca", images[1:])


@pytest.mark.parametrize(
    "value, match",
    [
        ("zcaa", "Unknown preprocessing 'zcaa'.*Did you mean 'zca'"),
        ("", "Unknown preprocessing ''"),
        ([], "non-empty list"),
        (["center_pixel", "scale"], "'scale' can only be the first"),
        (["center_pixel", "center_channel"], "two steps making a 'center' layer"),
        (["pca", "zca"], "two steps making a 'whiten' layer"),
        (3, "Received: preprocess=3"),
    ],
)
def test_bad_names_are_refused(correlated_images, value, match):
    with pytest.raises(ValueError, match=match):
        fit_preprocessing(value, correlated_images)


def test_whitening_too_many_values_is_refused_with_the_limit():
    images = np.zeros((10, 65, 64, 1), np.uint8)
    with pytest.raises(ValueError, match=r"65x64x1 = 4160 values.*up to 4096"):
        fit_preprocessing("zca", images)
    with pytest.warns(UserWarning, match=r"channel\(s\) \[0\] of variance below"):  # black images
        assert [layer.name for layer in fit_preprocessing("standardize", images)] == ["rescale", "standardize"]


@pytest.mark.parametrize("step", ["pca", "zca"])
def test_whitening_on_no_more_images_than_values_is_refused(correlated_images, step):
    with pytest.raises(ValueError, match=r"Whitening images of 4x4x1 = 16 values needs more than 16 training images: "
                                         r"fitted on 16, it would scale the directions .* by up to 316 on new images. "
                                         r"Use more images or 'standardize'"):
        fit_preprocessing(step, correlated_images[:16])
    assert [layer.name for layer in fit_preprocessing("standardize", correlated_images[:16])] == ["rescale",
                                                                                                  "standardize"]


def test_whitening_on_fewer_than_five_images_per_value_warns(correlated_images):
    with (
        pytest.warns(UserWarning, match=r"4x4x1 = 16 values fitted on 17 images, fewer than 5 x 16: new images will "
                                        r"come out with a larger spread"),
        pytest.warns(UserWarning, match="1 of the 16 directions have a variance below 1e-05"),  # 17 barely span 16
    ):
        fit_preprocessing("zca", correlated_images[:17])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_preprocessing("zca", correlated_images[:80])


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((10, 4, 4, 1), np.float32), "raw integer pixels"),
        (np.zeros((10, 4, 4), np.uint8), r"train_images.shape=\(10, 4, 4\)"),
        (np.full((10, 4, 4, 1), 300, np.int32), "pixels 0-255"),
        (np.zeros((1, 4, 4, 1), np.uint8), "at least 2 training images"),
    ],
)
def test_bad_images_are_refused(images, match):
    with pytest.raises(ValueError, match=match):
        fit_preprocessing("center_pixel", images)


@pytest.mark.parametrize("step", ["scale", "standardize"])
@pytest.mark.parametrize("shape", [(10, 0, 4, 1), (10, 4, 0, 1)])
def test_images_with_a_side_of_zero_are_refused(step, shape):
    with pytest.raises(ValueError, match=r"N, H and W above 0 .*train_images.shape=" + re.escape(str(shape))):
        fit_preprocessing(step, np.zeros(shape, np.uint8))


def test_standardizing_a_constant_channel_warns_naming_it(rgb_images):
    images = rgb_images.copy()
    images[..., 1] = 7
    with pytest.warns(UserWarning, match=r"Standardizing channel\(s\) \[1\] of variance below 1e-05 in the training "
                                         r"images \(constant\?\): a new image that varies there is scaled up by as "
                                         r"much as 316. Use 'center_channel' or more varied images."):
        fit_preprocessing("standardize", images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_preprocessing("standardize", rgb_images)
        fit_preprocessing("center_channel", images)  # centring divides by nothing


@pytest.mark.parametrize("step", ["pca", "zca"])
def test_whitening_directions_without_variance_warn_with_their_count(correlated_images, step):
    images = correlated_images.copy()
    images[:, 0, 0], images[:, 3, 3] = 7, 9  # two constant pixels: two directions of no variance
    with pytest.warns(UserWarning, match=r"Whitening images of 4x4x1 = 16 values: 2 of the 16 directions have a "
                                         r"variance below 1e-05 in the training images \(constant\?\): a new image "
                                         r"that varies there is scaled up by as much as 316"):
        fit_preprocessing(step, images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_preprocessing(step, correlated_images)


def test_whitening_layer_checks_its_arrays_and_input():
    with pytest.raises(ValueError, match="both `mean` and `matrix`"):
        Whitening(mean=np.zeros(4))
    with pytest.raises(ValueError, match=r"matrix.shape=\(4, 3\)"):
        Whitening(np.zeros(4), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="fitted on 4 values per image; the input has 9"):
        Whitening(np.zeros(4), np.eye(4))(np.zeros((1, 3, 3, 1), np.float32))


def test_standardization_layer_checks_its_arrays_and_input():
    with pytest.raises(ValueError, match="both `mean` and `std`"):
        Standardization(mean=np.zeros(4))
    with pytest.raises(ValueError, match=r"positive std of one shape.*std.shape=\(3,\)"):
        Standardization(np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="positive std"):
        Standardization(np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match=r"fitted on statistics of shape \(2,\); the input needs \(1,\)"):
        Standardization(np.zeros(2), np.ones(2))(np.zeros((1, 3, 3, 1), np.float32))


def test_every_name_builds_a_model(correlated_images):
    for step in PREPROCESSORS:
        model = cnnkit.build("FC16", SHAPE, 3, preprocessing=fit_preprocessing(step, correlated_images))
        assert model.output_shape == (None, 3)
