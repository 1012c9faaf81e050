import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from cnnkit.recipes.augment import (
    PRESETS,
    ElasticDistortion,
    PCAColor,
    RandomPadCrop,
    RandomPixelShift,
    list_ops,
    list_presets,
    make_augmentation,
)

RGB_ONLY = {"pca_color"}


def _images(shape, count=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def _shape_for(op):
    return (8, 8, 3) if op in RGB_ONLY else (8, 8, 1)


def _augment(augment, shape, seed=0, num_classes=3):
    return make_augmentation(augment, image_shape=shape, num_classes=num_classes, seed=seed,
                             train_images=_images(shape, count=4, seed=9))


def _run(augmentation, images, labels=None):
    labels = np.arange(len(images)) % augmentation.num_classes if labels is None else labels
    out_images, out_labels = augmentation(images, labels)
    return np.asarray(out_images), np.asarray(out_labels)


def _shifted(image, down, right):
    """``image`` moved ``down`` rows and ``right`` columns, zeros in (numpy reference)."""
    height, width = image.shape[:2]
    out = np.zeros_like(image)
    out[max(down, 0):height + min(down, 0), max(right, 0):width + min(right, 0)] = \
        image[max(-down, 0):height - max(down, 0), max(-right, 0):width - max(right, 0)]
    return out


@pytest.mark.parametrize("op", list(list_ops()))
def test_every_op_is_seeded_reproducible_and_fresh_per_batch(op):
    shape = _shape_for(op)
    images = _images(shape)
    first, first_labels = _run(_augment([op], shape, seed=0), images)
    again, again_labels = _run(_augment([op], shape, seed=0), images)
    other, _ = _run(_augment([op], shape, seed=1), images)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_labels, again_labels)
    assert not np.array_equal(first, other)
    augmentation = _augment([op], shape, seed=0)
    assert not np.array_equal(_run(augmentation, images)[0], _run(augmentation, images)[0])  # new draws each batch
    assert first.shape == images.shape and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 255
    assert not np.array_equal(first, images.astype(np.float32))


@pytest.mark.parametrize("op", list(list_ops()))
def test_every_op_is_the_identity_at_inference(op):
    shape = _shape_for(op)
    images = _images(shape).astype(np.float32)
    (layer,) = _augment([op], shape).layers
    if isinstance(layer, (keras.layers.MixUp, keras.layers.CutMix)):
        labels = np.eye(3, dtype=np.float32)[np.arange(len(images)) % 3]
        out = layer({"images": images, "labels": labels}, training=False)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(out["labels"]), labels)
        out = out["images"]
    else:
        out = layer(images, training=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), images)


def test_pixel_shift_is_an_exact_integer_shift_of_at_most_pixels_in_one_direction():
    images = _images((9, 7, 2), count=64).astype(np.float32)
    out = keras.ops.convert_to_numpy(RandomPixelShift(pixels=2, seed=3)(images))
    moves = [(0, 0)] + [(sign * step, 0) for sign in (1, -1) for step in (1, 2)] \
        + [(0, sign * step) for sign in (1, -1) for step in (1, 2)]
    seen = set()
    for image, result in zip(images, out):
        matches = [move for move in moves if np.array_equal(result, _shifted(image, *move))]
        assert matches, "output is no allowed shift of its input"
        seen.add(matches[0])
    assert len(seen) >= 6  # all directions and both distances turn up among 64 images


def test_pad_crop_keeps_the_size_and_moves_each_image_independently_within_the_padding():
    images = _images((10, 10, 3), count=32).astype(np.float32)
    out = keras.ops.convert_to_numpy(RandomPadCrop(padding=2, seed=0)(images))
    assert out.shape == images.shape
    offsets = set()
    for image, result in zip(images, out):
        matches = [(down, right) for down in range(-2, 3) for right in range(-2, 3)
                   if np.array_equal(result, _shifted(image, down, right))]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > 8


def test_elastic_distortion_moves_pixels_but_keeps_the_ink():
    images = np.zeros((16, 28, 28, 1), np.float32)
    images[:, 6:22, 11:17] = 255.0  # a stroke well inside the frame, as MNIST digits are
    out = keras.ops.convert_to_numpy(ElasticDistortion(alpha=34.0, sigma=4.0, seed=0)(images))
    assert np.abs(out - images).max() > 50
    mass = out.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
    assert np.all(np.abs(mass - 1) < 0.5), mass  # local stretching changes a stroke's area
    assert abs(mass.mean() - 1) < 0.05, mass  # but not on average
    assert not np.array_equal(out[0], out[1])  # a field per image


def test_elastic_field_has_simards_size_and_scales_with_alpha():
    # Bilinear interpolation of a ramp is exact, so the output minus the ramp is the field itself.
    ramp = np.tile(np.arange(28, dtype=np.float32)[None, None, :, None], (32, 28, 1, 1)) + 100
    fields = {alpha: keras.ops.convert_to_numpy(ElasticDistortion(alpha=alpha, sigma=4.0, seed=0)(ramp))[:, 8:20, 8:20]
              - ramp[:, 8:20, 8:20] for alpha in (34.0, 17.0)}
    # uniform(-1, 1) smoothed by a Gaussian of sigma 4 has std 0.577 / (2 sqrt(pi) 4) = 0.041; x 34 = 1.4 px
    assert 1.1 < fields[34.0].std() < 1.7
    np.testing.assert_allclose(fields[17.0], fields[34.0] / 2, atol=1e-3)


def test_pca_color_is_fitted_on_the_training_pixels():
    rng = np.random.default_rng(0)
    grey = rng.integers(40, 200, (20, 6, 6, 1))
    images = np.concatenate([grey, grey, grey], axis=-1).astype(np.uint8)  # all variance along (1, 1, 1)
    layer = PCAColor.from_images(images, std=0.1, seed=0)
    top = np.asarray(layer.eigenvectors)[:, 0]
    np.testing.assert_allclose(np.abs(top), np.full(3, 1 / np.sqrt(3)), atol=1e-6)
    np.testing.assert_allclose(layer.eigenvalues[0], 3 * np.var(grey / 255.0, ddof=1), rtol=1e-6)
    assert layer.eigenvalues[1] < 1e-9 and layer.eigenvalues[2] < 1e-9
    shift = keras.ops.convert_to_numpy(layer(images.astype(np.float32))) - images
    per_image = shift.reshape(len(images), -1, 3)
    np.testing.assert_allclose(per_image, np.broadcast_to(per_image[:, :1], per_image.shape), atol=1e-3)  # one colour offset per image
    np.testing.assert_allclose(per_image[..., 0], per_image[..., 2], atol=1e-3)  # along (1, 1, 1)
    assert np.abs(per_image).max() > 0


def test_pca_color_needs_rgb_and_training_pixels():
    with pytest.raises(ValueError, match="RGB"):
        make_augmentation("pca_color", image_shape=(8, 8, 1), num_classes=3, train_images=_images((8, 8, 1)))
    with pytest.raises(ValueError, match="train_images"):
        make_augmentation("pca_color", image_shape=(8, 8, 3), num_classes=3)
    with pytest.raises(ValueError, match="RGB"):
        PCAColor.from_images(_images((8, 8, 1)))


def test_pca_color_fits_on_at_most_max_pixels(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (1, 39, 50, 3), dtype=np.uint8)  # 1,950 pixels
    fitted, cov = [], np.cov
    monkeypatch.setattr(np, "cov", lambda pixels, **kwargs: fitted.append(len(pixels)) or cov(pixels, **kwargs))
    PCAColor.from_images(images, max_pixels=1000)
    PCAColor.from_images(images, max_pixels=1950)
    assert fitted == [975, 1950]  # every second pixel, then all


def test_pca_color_fit_is_recorded_and_can_be_replayed():
    augmentation = _augment("pca_color", (8, 8, 3))
    (entry,) = augmentation.config["ops"]
    assert len(entry["eigenvalues"]) == 3 and np.asarray(entry["eigenvectors"]).shape == (3, 3)
    replay = make_augmentation(augmentation.config["ops"], image_shape=(8, 8, 3), num_classes=3)
    assert replay.layers[0].eigenvalues == augmentation.layers[0].eigenvalues


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_label_mixing_gives_soft_labels_that_sum_to_one(op):
    augmentation = _augment(op, (8, 8, 1), num_classes=4)
    assert augmentation.soft_labels
    images = _images((8, 8, 1), count=32)
    out_images, labels = _run(augmentation, images, np.arange(32) % 4)
    assert labels.shape == (32, 4) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert labels.min() >= 0 and (labels.max(axis=1) < 1 - 1e-3).any()  # some labels are mixed
    assert out_images.shape == images.shape


def test_cutmix_labels_are_the_share_of_pixels_pasted():
    values = np.arange(8, dtype=np.uint8) * 30  # one flat image per class, each its own grey
    images = np.repeat(values, 28 * 28).reshape(8, 28, 28, 1)
    for seed in range(4):
        out_images, labels = _run(_augment("cutmix", (28, 28, 1), seed=seed, num_classes=8), images, np.arange(8))
        pixel_share = (out_images[..., 0, None] == values[None, None, None, :]).mean(axis=(1, 2))
        np.testing.assert_allclose(labels, pixel_share, atol=1e-6)


def test_color_contrast_and_randaugment_ranges_go_both_ways():
    augmentation = _augment([{"name": "color", "brightness": 0, "contrast": 0.2}], (8, 8, 1))
    images = (128 + np.random.default_rng(1).integers(-20, 21, (64, 8, 8, 1))).astype(np.uint8)
    out_images, _ = _run(augmentation, images)
    centred = images - images.mean(axis=(1, 2, 3), keepdims=True)
    ratios = (out_images - out_images.mean(axis=(1, 2, 3), keepdims=True)).std(axis=(1, 2, 3)) / centred.std(axis=(1, 2, 3))
    assert 0.79 < ratios.min() < 0.9 and 1.1 < ratios.max() < 1.21  # x(1 +- 0.2), not x(1 + [0, 0.2])
    randaugment = _augment([{"name": "randaugment", "factor": 0.1}], (8, 8, 1)).layers[0]
    assert randaugment.random_rotation.factor == randaugment.random_brightness.factor == (-0.1, 0.1)
    assert randaugment.random_translation.height_factor == randaugment.random_translation.width_factor == (-0.1, 0.1)
    assert randaugment.random_contrast.factor == (0.1, 0.1)  # Keras: x(1 - 0.1 .. 1 + 0.1)


def test_label_preserving_ops_leave_labels_alone():
    augmentation = _augment("affine", (8, 8, 1))
    assert not augmentation.soft_labels
    _, labels = _run(augmentation, _images((8, 8, 1)), np.arange(16) % 3)
    np.testing.assert_array_equal(labels, np.arange(16) % 3)


def test_list_and_mapping_form_from_yaml():
    augment = yaml.safe_load("[shift, {name: rotation, degrees: 15}, affine, {name: zoom}]")
    augmentation = make_augmentation(augment, image_shape=(8, 8, 1), num_classes=10, seed=0)
    kinds = [type(layer).__name__ for layer in augmentation.layers]
    assert kinds == ["RandomPixelShift", "RandomRotation", "RandomRotation", "RandomShear", "RandomTranslation",
                     "RandomZoom", "RandomZoom"]
    assert augmentation.layers[1].factor == (-15 / 360, 15 / 360)
    ops = augmentation.config["ops"]
    assert ops[0] == {"name": "shift", "pixels": 1}
    assert ops[1] == {"name": "rotation", "degrees": 15, "fill_mode": "constant"}
    assert augmentation.config["preset"] is None and augmentation.config["seed"] == 0
    assert len({layer.seed for layer in augmentation.layers}) == len(augmentation.layers)  # a stream per layer
    yaml.safe_dump(augmentation.config)  # plain data


def test_presets_and_defaults_resolve_to_recorded_values():
    augmentation = make_augmentation("default", image_shape=(28, 28, 1), num_classes=10)
    assert augmentation.config == {"preset": "default", "ops": [{"name": "crop", "padding": 3}], "seed": 0}
    assert make_augmentation("crop_flip", image_shape=(32, 32, 3), num_classes=10).config["ops"][0]["padding"] == 4


@pytest.mark.parametrize("augment", [None, "none", [], ["none"]])
def test_no_augmentation_is_none(augment):
    assert make_augmentation(augment, image_shape=(8, 8, 1), num_classes=3) is None


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_and_is_documented(preset):
    assert list_presets()[preset]
    augmentation = _augment(preset, (8, 8, 3))
    assert (augmentation is None) == (preset == "none")
    if augmentation is not None:
        images, _ = _run(augmentation, _images((8, 8, 3)))
        assert images.shape == (16, 8, 8, 3)


@pytest.mark.parametrize("augment, message", [
    ("shfit", "unknown augmentation 'shfit'.*presets are none, default, shift"),
    (["shift", "rotate"], "unknown augmentation 'rotate'.*ops are .*rotation"),
    ([{"name": "rotation", "degree": 5}], "no parameter 'degree'; its parameters are degrees, fill_mode"),
    ([{"name": "spin"}], "unknown augmentation 'spin'"),
    ([{"name": "spin", "speed": 2}], "needs 'name', one of the ops"),
    ([{"name": "affine", "degrees": 5}], "presets take no parameters"),
    ([{"degrees": 5}], "needs 'name'"),
    ([{"name": "shift", "pixels": 0}], "augment op .*pixels must be an integer >= 1"),
    ([{"name": "rotation", "fill_mode": "mirrorball"}], "augment op .*mirrorball"),
    ([{"name": "mixup", "alpha": "strong"}], "augment op .*alpha must be a finite number > 0"),
    ([{"name": "randaugment", "num_ops": 0}], "augment op .*num_ops must be an integer >= 1"),
    ([{"name": "rotation", "degrees": "ten"}], "augment op {'name': 'rotation', 'degrees': 'ten'}"),
    ([{"name": "color", "saturation": 0.3}], "saturation and hue jitter need RGB"),
    ([{"name": "color", "contrast": 1.5}], r"contrast must be a number in \[0, 1\]. Received: contrast=1.5"),
    ([{"name": "cutmix", "alpha": 2}], r"alpha must be a number in \(0, 1\]"),
    (5, "augment must be None, a preset name"),
])
def test_bad_augment_is_a_clear_error(augment, message):
    with pytest.raises(ValueError, match=message):
        make_augmentation(augment, image_shape=(8, 8, 1), num_classes=3)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match=f"seed must be a non-negative integer. Received: seed={seed}"):
        make_augmentation("shift", image_shape=(8, 8, 1), num_classes=3, seed=seed)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("op, message", [
    ({"name": "elastic", "alpha": NAN}, r"'elastic'.*alpha must be a finite number > 0. Received: alpha=nan"),
    ({"name": "elastic", "alpha": INF}, r"'elastic'.*alpha must be a finite number > 0. Received: alpha=inf"),
    ({"name": "elastic", "sigma": NAN}, r"'elastic'.*sigma must be a finite number > 0. Received: sigma=nan"),
    ({"name": "elastic", "sigma": INF}, r"'elastic'.*sigma must be a finite number > 0. Received: sigma=inf"),
    ({"name": "mixup", "alpha": NAN}, r"'mixup'.*alpha must be a finite number > 0. Received: alpha=nan"),
    ({"name": "mixup", "alpha": INF}, r"'mixup'.*alpha must be a finite number > 0. Received: alpha=inf"),
    ({"name": "pca_color", "std": NAN}, r"'pca_color'.*std must be a finite number >= 0. Received: std=nan"),
    ({"name": "pca_color", "std": INF}, r"'pca_color'.*std must be a finite number >= 0. Received: std=inf"),
    ({"name": "rotation", "degrees": NAN}, r"'rotation'.*degrees must be a number in \[0, 180\]. Received: degrees=nan"),
    ({"name": "rotation", "degrees": True}, r"'rotation'.*degrees must be a number in \[0, 180\]. Received: degrees=True"),
    ({"name": "rotation", "degrees": -10}, r"'rotation'.*degrees must be a number in \[0, 180\]. Received: degrees=-10"),
    ({"name": "shear", "factor": NAN}, r"'shear'.*factor must be a number in \[0, 1\]. Received: factor=nan"),
    ({"name": "translation", "fraction": NAN}, r"'translation'.*fraction must be a number in \[0, 1\]"),
    ({"name": "zoom", "fraction": INF}, r"'zoom'.*fraction must be a number in \[0, 1\]. Received: fraction=inf"),
    ({"name": "randaugment", "factor": NAN}, r"'randaugment'.*factor must be a number in \[0, 1\]"),
    ({"name": "elastic", "sigma": 1e308}, r"augment op .*'sigma': 1e\+308}: sigma must be at most the image's longer side"),
], ids=str)
def test_non_finite_and_out_of_range_numbers_are_refused(op, message):
    with pytest.raises(ValueError, match=message):
        make_augmentation([op], image_shape=(8, 8, 3), num_classes=3, train_images=_images((8, 8, 3), count=4))


@pytest.mark.parametrize("name, key", [("shift", "pixels"), ("crop", "padding")])
def test_shifts_that_move_images_out_of_the_frame_are_refused(name, key):
    with pytest.raises(ValueError, match=rf"augment op .*{key} must be less than the image's shorter side: images "
                                         rf"moved that far come out blank. Received: {key}=8, image_shape=\(8, 12, 1\)"):
        make_augmentation([{"name": name, key: 8}], image_shape=(8, 12, 1), num_classes=3)
    (layer,) = make_augmentation([{"name": name, key: 7}], image_shape=(8, 12, 1), num_classes=3).layers
    assert getattr(layer, key) == 7  # one row still in the frame


def test_an_elastic_sigma_wider_than_the_image_is_refused():
    with pytest.raises(ValueError, match=r"sigma must be at most the image's longer side: a wider Gaussian smooths the "
                                         r"displacement field to about zero \(no distortion\). Received: sigma=12.5, "
                                         r"image_shape=\(8, 12, 1\)"):
        make_augmentation([{"name": "elastic", "sigma": 12.5}], image_shape=(8, 12, 1), num_classes=3)
    (layer,) = make_augmentation([{"name": "elastic", "sigma": 12}], image_shape=(8, 12, 1), num_classes=3).layers
    assert layer.sigma == 12.0


def test_every_op_works_in_float32_under_a_global_mixed_bfloat16_policy():
    images = _images((28, 28, 3), count=8)
    ops = [*list_ops(), {"name": "color", "saturation": 0.3, "hue": 0.1}]
    expected = [_run(_augment([op], (28, 28, 3)), images) for op in ops]
    batches = tf.data.Dataset.from_tensor_slices((images, np.zeros(8, np.int32))).batch(4)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # as a user training in mixed precision sets it
    try:
        got = [_run(_augment([op], (28, 28, 3)), images) for op in ops]
        mapped = np.concatenate([batch for batch, _ in _augment("elastic", (28, 28, 3)).apply(batches)])
    finally:
        keras.config.set_dtype_policy(previous)
    for op, (want_images, want_labels), (got_images, got_labels) in zip(ops, expected, got):
        assert got_images.dtype == np.float32, op
        np.testing.assert_array_equal(got_images, want_images, err_msg=str(op))
        np.testing.assert_array_equal(got_labels, want_labels, err_msg=str(op))
    assert mapped.shape == images.shape and mapped.dtype == np.float32


def test_elastic_positions_stay_float32_in_a_bfloat16_layer():
    # bfloat16 holds 8 significant bits: a flat index 783 computed in it rounds to 784, out of a 28x28 image
    ramp = np.tile(np.arange(28, dtype=np.float32)[None, None, :, None] * 9, (4, 28, 1, 1))
    exact = keras.ops.convert_to_numpy(ElasticDistortion(seed=0)(ramp))
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(ElasticDistortion(seed=0, dtype="mixed_bfloat16")(ramp),
                                                        "float32"))
    np.testing.assert_allclose(rounded, exact, rtol=2e-2, atol=1.0)  # the same field; only the values rounded


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="image_shape"):
        make_augmentation("shift", image_shape=(8, 8), num_classes=3)
    with pytest.raises(ValueError, match="batch of images"):
        RandomPixelShift(seed=0)(np.zeros((8, 8, 1), np.float32))


@pytest.mark.parametrize("layer", [
    RandomPixelShift(pixels=2, seed=5),
    RandomPadCrop(padding=3, seed=5),
    ElasticDistortion(alpha=20.0, sigma=3.0, seed=5),
    PCAColor([0.2, 0.02, 0.004], np.eye(3).tolist(), std=0.2, seed=5),
], ids=lambda layer: type(layer).__name__)
def test_custom_layers_round_trip_through_their_config(layer):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == layer.get_config()
    images = _images((10, 10, 3), count=4).astype(np.float32)
    fresh = type(layer).from_config(layer.get_config())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored(images)),
                                  keras.ops.convert_to_numpy(fresh(images)))


def test_apply_maps_a_batched_uint8_pipeline_in_parallel():
    images, labels = _images((8, 8, 1), count=10), (np.arange(10) % 3).astype(np.int32)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    augmentation = _augment("shift", (8, 8, 1))
    out = list(augmentation.apply(batches).as_numpy_iterator())
    assert [batch.shape for batch, _ in out] == [(4, 8, 8, 1), (4, 8, 8, 1), (2, 8, 8, 1)]
    assert all(batch.dtype == np.float32 for batch, _ in out)
    np.testing.assert_array_equal(np.concatenate([batch_labels for _, batch_labels in out]), labels)
    assert np.concatenate([batch for batch, _ in out]).sum() != images.sum()  # moved, zeros in
    mixed = next(iter(_augment("mixup", (8, 8, 1)).apply(batches)))
    assert tuple(mixed[1].shape) == (4, 3) and mixed[1].dtype == tf.float32
