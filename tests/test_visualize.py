"""cnnkit.visualize on the seed's conv net trained for an epoch on the bundled MNIST sample."""

import io

import keras
import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit import visualize
from cnnkit.cli import main

SEED_NET = "20C5-MP2-50C5-MP2-FC256"


@pytest.fixture(scope="session")
def mnist():
    sample = cnnkit.data.load("mnist-sample")
    return sample.arrays("train"), sample.arrays("test")


@pytest.fixture(scope="session")
def net(mnist):
    """The seed's net, float32, one epoch on the 4,500 training images of the sample (about 93% accuracy)."""
    (x, y), _ = mnist
    keras.utils.set_random_seed(0)
    model = cnnkit.build(SEED_NET, (28, 28, 1), 10)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    return model


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L"), dtype=np.float64)


def test_kernels_tile_every_filter_with_zero_at_mid_grey(tmp_path):
    model = cnnkit.build("4C3-FC8", (8, 8, 1), 2)
    kernel = np.zeros((3, 3, 1, 4), np.float32)
    kernel[1, 1, 0, 0], kernel[0, 0, 0, 3] = 2.0, -1.0
    model.get_layer("conv1").kernel.assign(kernel)
    grid = visualize.kernels(model, save=tmp_path / "k.png")
    assert grid.shape == (7, 7)  # 4 tiles of 3x3 in 2 columns, 1-pixel gaps
    assert grid[1, 1] == 1.0 and grid[4, 4] == 0.0 and grid[0, 0] == 0.5  # each tile's +-max -> white/black, 0 grey
    assert np.all(grid[4:7, 4:7][grid[4:7, 4:7] != 0.0] == 0.5) and np.all(grid[0:3, 4:7] == 0.5)  # an empty kernel
    assert grid[3, 0] == 1.0  # a gap
    assert _png(tmp_path / "k.png").std() > 10
    assert [p.name for p in tmp_path.iterdir()] == ["k.png"]  # written atomically: no temporary file left


def test_kernels_of_a_deeper_layer_give_a_row_per_filter(net):
    assert visualize.kernels(net, "conv2").shape == (50 * 6 - 1, 20 * 6 - 1)  # 50 filters x 20 input channels
    with pytest.raises(ValueError, match="no 4-D convolution kernel"):
        visualize.kernels(net, "fc1")


def test_kernels_default_to_the_first_convolution_with_a_4d_kernel():
    model = cnnkit.build("4LC3-8C3-FC8", (10, 10, 1), 2)  # a locally connected layer first: a kernel per position
    np.testing.assert_array_equal(visualize.kernels(model), visualize.kernels(model, "conv1"))
    assert visualize.kernels(model).shape == (8 * 4 - 1, 4 * 4 - 1)  # 8 filters x 4 input channels
    with pytest.raises(ValueError, match="has no convolution with a 4-D kernel"):
        visualize.kernels(cnnkit.build("4LC3-FC8", (8, 8, 1), 2))
    # a nested backbone that ends in flat features (a saved cnnkit net cut before its classifier)
    inner = cnnkit.build("8C3-FC8", (10, 10, 1), 2)
    features = keras.Model(inner.inputs, inner.get_layer("fc1").output, name="backbone")
    outer = keras.Model(inner.inputs, keras.layers.Dense(2)(features(inner.inputs[0])))
    np.testing.assert_array_equal(visualize.kernels(outer), visualize.kernels(inner, "conv1"))


def test_filter_patterns_default_to_the_last_main_path_convolution_not_a_shortcut(tmp_path):
    model = cnnkit.build("8C3p1-R16s2", (8, 8, 1), 2)  # the block projects: residual1_proj comes last
    assert visualize.conv_layers(model)[-1] == "residual1_proj"
    keras.utils.set_random_seed(0)
    default = visualize.filter_patterns(model, filters=[0], steps=2)
    keras.utils.set_random_seed(0)
    np.testing.assert_array_equal(default, visualize.filter_patterns(model, "residual1_conv2", filters=[0], steps=2))


def test_feature_maps_are_each_convolution_after_its_activation(net, mnist):
    _, (x_test, _) = mnist
    maps = visualize.feature_maps(net, x_test[0, :, :, 0])  # no channel axis: added
    assert {name: m.shape for name, m in maps.items()} == {"conv1": (24, 24, 20), "conv2": (8, 8, 50)}
    expected = keras.Model(net.inputs[0], net.get_layer("conv2_act").output)(x_test[:1].astype("float32"))
    np.testing.assert_allclose(maps["conv2"], np.asarray(expected)[0], rtol=1e-5, atol=1e-5)
    assert maps["conv1"].min() >= 0  # after the ReLU
    batch = visualize.feature_maps(net, x_test[:3], ["pool1"])
    assert batch["pool1"].shape == (3, 12, 12, 20)


def test_grad_cam_puts_its_mass_on_the_digit(net, mnist):
    _, (x_test, y_test) = mnist
    images = x_test[:100]
    cams = visualize.grad_cam(net, images)
    assert cams.shape == (100, 28, 28) and cams.dtype == np.float32
    peaks = cams.reshape(100, -1).max(axis=1)
    assert cams.min() >= 0 and set(np.unique(peaks)) <= {0.0, 1.0}  # scaled to a peak of 1, or all 0 (no evidence)
    assert np.mean(peaks == 1.0) > 0.8  # a class whose logit this layer only lowers gets an empty map
    digit = images[..., 0] > 127
    ratio = cams[digit].mean() / cams[~digit].mean()
    inverted = (1 - cams)[digit].mean() / (1 - cams)[~digit].mean()
    print(f"Grad-CAM mean on digit pixels / background: {ratio:.2f} (inverted map: {inverted:.2f})")
    assert ratio > 2.0 and ratio > inverted
    uniform = visualize.grad_cam(net, np.full((28, 28), 0, np.uint8))  # a blank image: no evidence, no NaN
    assert np.isfinite(uniform).all()


def test_grad_cam_places_valid_convolution_features_at_their_receptive_field_centres(net):
    # conv1 (5x5 valid) -> pool (2) -> conv2 (5x5 valid): feature i of conv2 centres on pixel 6.5 + 2i.
    assert visualize._geometry(net, net.get_layer("conv2_act").output) == [(6.5, 2.0), (6.5, 2.0)]
    same = cnnkit.build("4C3p1-MP2", (8, 8, 1), 2)
    assert visualize._geometry(same, same.get_layer("pool1").output) == [(0.5, 2.0), (0.5, 2.0)]
    cam = visualize._project(np.eye(2, dtype=np.float32)[np.newaxis], [(1.0, 2.0), (1.0, 2.0)], (6, 6))[0]
    assert cam[1, 1] == cam[3, 3] == cam[4, 4] == 1.0 and cam[2, 2] == 0.5
    assert cam[5, 5] == 0.0  # more than half a stride past the last feature centre


def test_grad_cam_of_another_class_and_a_chosen_layer(net, mnist, tmp_path):
    _, (x_test, y_test) = mnist
    other = (int(y_test[0]) + 1) % 10
    cam = visualize.grad_cam(net, x_test[0], class_index=other, layer="conv1", save=tmp_path / "cam.png")
    assert cam.shape == (28, 28)
    assert _png(tmp_path / "cam.png").std() > 10
    with pytest.raises(ValueError, match=r"class_index.*\[0, 9\]"):
        visualize.grad_cam(net, x_test[0], class_index=10)
    with pytest.raises(ValueError, match="needs a layer with"):
        visualize.grad_cam(net, x_test[0], layer="fc1")


@pytest.fixture(scope="module")
def resnet8():
    keras.utils.set_random_seed(1)
    return cnnkit.build("resnet8", (28, 28, 1), 10)


def test_a_residual_block_is_read_after_its_shortcut_is_added(resnet8):
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1)).astype(np.float32)
    maps = visualize.feature_maps(resnet8, images)
    assert list(maps) == ["conv1", "residual1_conv1", "residual1", "residual2_conv1", "residual2",
                          "residual3_conv1", "residual3"]  # residual2 once, not once per conv2 and projection
    pooled = keras.Model(resnet8.inputs[0], resnet8.get_layer("gap1").input)(images)
    np.testing.assert_allclose(maps["residual3"], np.asarray(pooled), rtol=1e-5, atol=1e-5)
    named = visualize.feature_maps(resnet8, images, ["residual3_conv2"])  # a name asked for is kept
    np.testing.assert_array_equal(named["residual3_conv2"], maps["residual3"])


def test_a_projection_shortcut_resolves_to_the_block_output_once():
    inputs = keras.Input((8, 8, 2))
    main = keras.layers.Conv2D(4, 3, padding="same", name="block_conv")(inputs)
    shortcut = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1, name="block_proj")(inputs))
    block = keras.layers.ReLU(name="block")(keras.layers.Add()([main, shortcut]))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(block))
    model = keras.Model(inputs, outputs)
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 2))
    assert list(visualize.feature_maps(model, image)) == ["block"]
    np.testing.assert_array_equal(visualize.grad_cam(model, image), visualize.grad_cam(model, image, layer="block"))


def test_grad_cam_of_a_residual_net_defaults_to_the_last_block_output(resnet8):
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype(np.float32)
    block = resnet8.get_layer("gap1").input  # the last block's output, after its Add and ReLU
    probe = keras.Model(resnet8.inputs[0], [block, resnet8.get_layer("classifier").output])  # logits
    with tf.GradientTape() as tape:
        features, logits = probe(images, training=False)
        score = tf.reduce_sum(tf.reduce_max(logits, axis=-1))  # the predicted class's logit
    weights = tf.reduce_mean(tape.gradient(score, features), axis=[1, 2], keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
    assert cams.reshape(4, -1).max(axis=1).min() > 0
    # receptive-field placement through the blocks' Add layers (not a plain resize): two stride-2 3x3 "same"
    # convolutions put feature i at pixel 3 + 4i
    assert visualize._geometry(resnet8, block) == [(3.0, 4.0), (3.0, 4.0)]
    cams = visualize._project(cams, visualize._geometry(resnet8, block), (28, 28))
    expected = cams / cams.reshape(4, -1).max(axis=1).reshape(-1, 1, 1)
    np.testing.assert_allclose(visualize.grad_cam(resnet8, images), expected, atol=1e-5)


def test_activation_maximisation_raises_the_filter_activation_tenfold(net, tmp_path):
    filters = list(range(8))
    start = visualize.filter_patterns(net, "conv2", filters, steps=0)
    patterns = visualize.filter_patterns(net, "conv2", filters, steps=48, save=tmp_path / "filters.png")
    assert patterns.shape == (8, 28, 28, 1) and patterns.min() >= 0 and patterns.max() <= 255

    def activation(images):
        maps = visualize.feature_maps(net, images, ["conv2"])["conv2"]
        return np.array([maps[i, ..., f].mean() for i, f in enumerate(filters)])

    before, after = activation(start), activation(patterns)
    print(f"activation of conv2 filters 0-7: x{after.sum() / before.sum():.1f} in all, "
          f"each from {before.round(3)} to {after.round(3)}")
    assert after.sum() >= 10 * before.sum()
    assert np.all(after >= 2 * before) and np.all(after > 0.1)
    assert _png(tmp_path / "filters.png").std() > 10


def test_mixed_precision_models_give_float32_arrays():
    model = cnnkit.build("4C3-MP2-6C3-FC8", (12, 12, 1), 3, dtype="mixed_bfloat16")
    image = np.random.default_rng(0).integers(0, 256, (12, 12, 1))
    cam = visualize.grad_cam(model, image)
    maps = visualize.feature_maps(model, image)
    patterns = visualize.filter_patterns(model, filters=2, steps=2)
    for array in (cam, *maps.values(), patterns, visualize.kernels(model)):
        assert array.dtype == np.float32 and np.isfinite(array).all()


def test_a_nested_backbone_counts_as_one_convolution():
    inner_input = keras.Input((10, 10, 1))
    inner = keras.Model(inner_input, keras.layers.Conv2D(3, 3, name="inner_conv")(inner_input), name="backbone")
    inputs = keras.Input((10, 10, 1))
    x = inner(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    assert visualize.conv_layers(model) == ["backbone"]
    assert visualize.kernels(model).shape == (7, 7)  # the first convolution inside the backbone: 3 tiles
    assert visualize._geometry(model, model.get_layer("backbone").output) == [(1.0, 1.0)] * 2
    assert visualize.grad_cam(model, np.zeros((10, 10))).shape == (10, 10)


def test_a_nested_backbone_ending_in_flat_features_is_opened(net, mnist):
    # The trained seed net as finetune makes it of a saved run: cut before its classifier, nested, a head on top.
    features = keras.Model(net.inputs, net.get_layer("fc1_act").output, name="backbone")
    inputs = keras.Input((28, 28, 1), name="image")
    x = features(inputs)
    for layer in net.layers[net.layers.index(net.get_layer("fc1_act")) + 1:]:
        x = layer(x)
    nested = keras.Model(inputs, x)
    _, (x_test, _) = mnist
    images = x_test[:8]
    np.testing.assert_allclose(nested(images.astype("float32")), net(images.astype("float32")), atol=1e-6)
    assert visualize.conv_layers(nested) == visualize.conv_layers(net) == ["conv1", "conv2"]
    np.testing.assert_allclose(visualize.grad_cam(nested, images), visualize.grad_cam(net, images), atol=1e-5)
    for name, maps in visualize.feature_maps(nested, images[0]).items():
        np.testing.assert_allclose(maps, visualize.feature_maps(net, images[0])[name], atol=1e-6)
    assert [layer.name for layer in nested.layers] == ["image", "backbone", *[layer.name for layer in net.layers[
        net.layers.index(net.get_layer("fc1_act")) + 1:]]]  # the model itself is left as it was
    calls = len(net.get_layer("conv1")._inbound_nodes)
    visualize.grad_cam(nested, images[:1])
    assert len(net.get_layer("conv1")._inbound_nodes) == calls  # opened once: no call added to its layers again
    # A Sequential backbone cannot be re-called layer by layer: the clear refusal, as before.
    sequential = keras.Sequential([keras.Input((10, 10, 1)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()])
    inputs = keras.Input((10, 10, 1))
    outer = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(sequential(inputs)))
    with pytest.raises(ValueError, match="has no convolution with a spatial output at its own level"):
        visualize.grad_cam(outer, np.zeros((10, 10)))


def test_filter_patterns_open_a_nested_backbone_ending_in_flat_features():
    inner = cnnkit.build("4C3-6C3-FC8", (10, 10, 1), 2)  # as finetune nests a saved run: cut before its classifier
    features = keras.Model(inner.inputs, inner.get_layer("fc1").output, name="backbone")
    inputs = keras.Input((10, 10, 1))
    outer = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(features(inputs)))
    for layer in (None, "conv1"):  # by default the last convolution, conv2
        patterns = visualize.filter_patterns(outer, layer, 2, steps=2)
        assert patterns.shape == (2, 10, 10, 1)
        np.testing.assert_allclose(patterns, visualize.filter_patterns(inner, layer, 2, steps=2), atol=1e-3)


def test_kernels_name_a_layer_inside_a_nested_backbone_ending_in_flat_features():
    inner = cnnkit.build("4C3-6C3-FC8", (10, 10, 1), 2)  # as finetune nests a saved run: cut before its classifier
    features = keras.Model(inner.inputs, inner.get_layer("fc1").output, name="backbone")
    inputs = keras.Input((10, 10, 1))
    outer = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(features(inputs)))
    for layer in ("conv1", "conv2", inner.get_layer("conv2")):  # looked up where conv_layers finds them
        grid = visualize.kernels(outer, layer)
        np.testing.assert_array_equal(grid, visualize.kernels(inner, layer))
    assert grid.shape == (23, 15)  # conv2: 6 filters x 4 input channels of 3x3, a row per filter


def test_a_test_time_augmentation_model_is_seen_through_the_model_inside_it():
    from cnnkit.recipes.ensemble import with_tta

    model = cnnkit.build("4C3-FC8", (8, 8, 1), 3)
    tta = with_tta(model, "crops")  # five views of each image through model: one batch of 5 N
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1))
    assert visualize.conv_layers(tta) == ["conv1"]
    maps = visualize.feature_maps(tta, images)
    assert maps["conv1"].shape == (2, 6, 6, 4)  # one map per image, not per view
    np.testing.assert_allclose(maps["conv1"], visualize.feature_maps(model, images)["conv1"], atol=1e-6)
    np.testing.assert_allclose(visualize.grad_cam(tta, images), visualize.grad_cam(model, images), atol=1e-6)
    np.testing.assert_array_equal(visualize.kernels(tta, "conv1"), visualize.kernels(model))
    assert visualize.filter_patterns(tta, filters=1, steps=1).shape == (1, 8, 8, 1)


def test_filter_patterns_of_a_model_of_any_image_size_are_refused_naming_what_to_do():
    from cnnkit.models.convert import to_fully_convolutional

    model = to_fully_convolutional(cnnkit.build("4C3-FC8", (8, 8, 1), 3))
    with pytest.raises(ValueError, match=r"The model '.*' takes images of any size: filter patterns need a fixed "
                                         r"height and width\. Draw them from the model it was made from .* Received: "
                                         r"a model with input shape \(None, None, 1\)"):
        visualize.filter_patterns(model, filters=1, steps=1)


def test_an_ensemble_is_refused_naming_how_to_see_one_member():
    from cnnkit.recipes.ensemble import combine_models

    members = [cnnkit.build("4C3-FC8", (8, 8, 1), 3) for _ in range(2)]  # the same layer names in each
    model = combine_models(members)
    image = np.zeros((8, 8), np.uint8)
    refusal = (r"The model 'ensemble' is an ensemble: its convolutions are in 2 nested models \(member_0, member_1\)\. "
               r"Visualise one member: model.get_layer\('member_0'\)")
    for draw in (lambda: visualize.conv_layers(model), lambda: visualize.kernels(model),
                 lambda: visualize.feature_maps(model, image), lambda: visualize.grad_cam(model, image),
                 lambda: visualize.filter_patterns(model, filters=1, steps=1)):
        with pytest.raises(ValueError, match=refusal):
            draw()
    member = model.get_layer("member_0")
    assert visualize.conv_layers(member) == ["conv1"] and visualize.grad_cam(member, image).shape == (8, 8)
    np.testing.assert_array_equal(visualize.kernels(member), visualize.kernels(members[0]))


def test_pictures_of_two_channel_images_show_the_mean_of_the_channels(tmp_path):
    model = cnnkit.build("4C3-FC8", (6, 6, 2), 3)
    images = np.zeros((2, 6, 6, 2), np.uint8)
    images[..., 1] = 255
    np.testing.assert_array_equal(visualize._rgb(images), np.full((2, 6, 6, 3), 0.5, np.float32))
    cams = visualize.grad_cam(model, images, class_index=[0, 1], save=tmp_path / "cam.png")
    assert cams.shape == (2, 6, 6) and _png(tmp_path / "cam.png").std() > 10
    worst = visualize.top_losses(model, images, [0, 1], probabilities=[[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]],
                                 save=tmp_path / "worst.png")
    np.testing.assert_array_equal(worst.indices, [0, 1])
    assert _png(tmp_path / "worst.png").std() > 10


def test_the_blur_of_filter_patterns_fits_inside_a_small_image():
    import tensorflow as tf

    flat = visualize._blur(tf.fill((1, 8, 8, 1), 7.0), 4.0)  # a 2-sigma radius of 8 pixels: cut to 7
    np.testing.assert_allclose(flat.numpy(), np.full((1, 8, 8, 1), 7.0), rtol=1e-6)
    patterns = visualize.filter_patterns(cnnkit.build("4C3-FC8", (8, 8, 1), 3), filters=1, steps=2, blur_every=1,
                                         blur_sigma=4)
    assert patterns.shape == (1, 8, 8, 1) and np.isfinite(patterns).all()


def test_a_sequential_model_with_augmentation_and_batch_norm():
    model = keras.Sequential([
        keras.Input((12, 12, 1)), keras.layers.Rescaling(1 / 255), keras.layers.RandomFlip(),
        keras.layers.Conv2D(4, 3, name="conv_a"), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(), keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_b"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    image = np.random.default_rng(0).integers(0, 256, (12, 12, 1))
    maps = visualize.feature_maps(model, image)
    assert {name: m.shape for name, m in maps.items()} == {"conv_a": (10, 10, 4), "conv_b": (5, 5, 6)}
    assert maps["conv_a"].min() >= 0  # read after the batch norm and the ReLU
    again = visualize.feature_maps(model, image)
    assert all(np.array_equal(again[name], maps[name]) for name in maps)  # RandomFlip is off at inference
    assert visualize._geometry(model, model.layers[-3].output) == [(1.5, 2.0), (1.5, 2.0)]
    assert visualize.grad_cam(model, image).shape == (12, 12)


def test_top_losses_are_the_most_confident_mistakes(tmp_path):
    model = cnnkit.build("FC4", (4, 4, 1), 3)
    images = np.zeros((5, 4, 4, 1), np.uint8)
    probabilities = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.25, 0.7, 0.05], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    worst = visualize.top_losses(model, images, [0, 0, 2, 1, 2], k=3, probabilities=probabilities,
                                 class_names=["$", "$$", "a$$b"], save=tmp_path / "worst.png")  # not mathtext
    np.testing.assert_array_equal(worst.indices, [2, 1, 3])  # p(true) 0.05, 0.1, 0.3; images 0 and 4 are right
    np.testing.assert_array_equal(worst.predicted, [1, 1, 0])
    np.testing.assert_allclose(worst.losses, -np.log([0.05, 0.1, 0.3]))
    np.testing.assert_allclose(worst.confidence, [0.7, 0.8, 0.6])
    assert (tmp_path / "worst.png").is_file()
    names = np.array(["cat", "dog", "bird"])  # any sequence of names; whole-number float labels
    same = visualize.top_losses(model, images, np.array([0.0, 0.0, 2.0, 1.0, 2.0]), k=3, probabilities=probabilities,
                                class_names=names, save=tmp_path / "named.png")
    np.testing.assert_array_equal(same.indices, worst.indices)
    assert (tmp_path / "named.png").is_file()
    with pytest.raises(ValueError, match=r"`labels` must hold integer class indices\. Received: labels=\[0\. +1\.5"):
        visualize.top_losses(model, images, [0, 1.5, 2, 1, 2], probabilities=probabilities)
    with pytest.raises(ValueError, match=r"`labels` values must lie in \[0, 2\] \(one per class\)\. Received: labels "
                                         r"containing \[5\]"):
        visualize.top_losses(model, images, [0, 5, 2, 1, 2], probabilities=probabilities)
    with pytest.raises(ValueError, match=r"`class_names` must have one name per class \(3\)"):
        visualize.top_losses(model, images, [0, 0, 2, 1, 2], probabilities=probabilities, class_names=["a", "b"])


def test_bad_arguments_say_what_was_received(net, tmp_path):
    with pytest.raises(ValueError, match=r"no layer 'conv9'.*Received: layer='conv9'"):
        visualize.feature_maps(net, np.zeros((28, 28)), ["conv9"])
    with pytest.raises(ValueError, match="has no convolution"):
        visualize.grad_cam(cnnkit.build("FC8", (28, 28, 1), 10), np.zeros((28, 28)))
    with pytest.raises(ValueError, match=r"image.shape=\(32, 32\)"):
        visualize.grad_cam(net, np.zeros((32, 32)))
    with pytest.raises(ValueError, match="must be a .png"):
        visualize.kernels(net, save=tmp_path / "k.jpg")
    with pytest.raises(ValueError, match=r"filters.*\[0, 49\]"):
        visualize.filter_patterns(net, "conv2", [50])
    with pytest.raises(ValueError, match="`model` must be"):
        visualize.kernels(42)
    with pytest.raises(ValueError, match=r"`layers` names no layer.*Received: layers=\[\]"):
        visualize.feature_maps(net, np.zeros((28, 28)), [])
    with pytest.raises(ValueError, match=r"`columns` must be None or an integer >= 1. Received: columns=-1"):
        visualize.image_grid(np.zeros((4, 3, 3)), columns=-1)
    with pytest.raises(ValueError, match=r"`pad` must be an integer >= 0. Received: pad=-2"):
        visualize.image_grid(np.zeros((4, 3, 3)), pad=-2)


def test_the_visualize_command_draws_each_picture(net, mnist, tmp_path, capsys):
    _, (x_test, y_test) = mnist
    net.save(tmp_path / "net.keras")
    buffer = io.BytesIO()
    Image.fromarray(x_test[0, :, :, 0]).save(buffer, format="PNG")
    (tmp_path / "digit.png").write_bytes(buffer.getvalue())
    model, digit = str(tmp_path / "net.keras"), str(tmp_path / "digit.png")
    for what, extra in (("kernels", []), ("feature-maps", [digit]), ("grad-cam", [digit, "--class", "3"]),
                        ("filters", ["--filters", "2", "--steps", "2", "--layer", "conv2"])):
        out = tmp_path / f"{what}.png"
        assert main(["visualize", what, model, *extra, "--out", str(out)]) == 0
        assert _png(out).std() > 10
    assert "class 3 (probability" in capsys.readouterr().out
    assert main(["visualize", "grad-cam", model, "--out", str(tmp_path / "x.png")]) == 2
    assert "needs an IMAGE file" in capsys.readouterr().err
