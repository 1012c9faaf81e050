import subprocess
import sys

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.data import long_tailed
from cnnkit.recipes.imbalance import STRATEGIES, LogitAdjustedCrossentropy, resample
from cnnkit.recipes.resume import training_epoch

COUNTS = [40, 15, 5]


def _blobs(labels, size=12, seed=0):
    """One bright blob per image, its position set by the class plus noise: real structure to crop."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = []
    for label in labels:
        centre = np.array([3 + 3 * label, 4]) + rng.uniform(-1.5, 1.5, 2)
        blob = 230 * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / 6) + rng.uniform(0, 20, (size, size))
        images.append(blob)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., np.newaxis]


@pytest.fixture(scope="module")
def skewed():
    labels = np.repeat(np.arange(3), COUNTS)
    return cnnkit.data.from_arrays(_blobs(labels), labels, val_split=0)


def _collect(dataset):
    images, labels = zip(*dataset.as_numpy_iterator())
    return np.stack(images), np.array(labels)


def test_none_and_class_weight_keep_the_data_as_it_is(skewed):
    x, y = skewed.arrays("train")
    for strategy in (None, "none", "class_weight"):
        resampled = resample(strategy, skewed)
        images, labels = _collect(resampled.dataset)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        assert resampled.size == 60 and resampled.counts_before == resampled.counts_after == COUNTS
    assert resample(None, skewed).class_weight is None


def test_class_weight_is_sklearns_balanced_formula(skewed):
    weights = resample("class_weight", skewed).class_weight
    assert weights == pytest.approx({0: 60 / (3 * 40), 1: 60 / (3 * 15), 2: 60 / (3 * 5)})
    assert sum(weights[c] * n for c, n in enumerate(COUNTS)) == pytest.approx(60)  # every class weighs the same


def test_class_weight_reaches_the_loss_through_tf_data(skewed):
    resampled = resample("class_weight", skewed)
    keras.utils.set_random_seed(0)
    model = cnnkit.build("FC8", (12, 12, 1), 3)
    model.compile(keras.optimizers.SGD(learning_rate=0.0), "sparse_categorical_crossentropy")
    history = model.fit(resampled.dataset.batch(60), class_weight=resampled.class_weight, epochs=1,
                        shuffle=False, verbose=0)
    x, y = skewed.arrays("train")
    losses = keras.losses.sparse_categorical_crossentropy(y, model(x.astype("float32")))
    weighted = np.mean(np.asarray(losses) * np.array([resampled.class_weight[label] for label in y]))
    assert history.history["loss"][0] == pytest.approx(weighted, rel=1e-4)
    assert abs(weighted - float(np.mean(losses))) > 1e-3  # the weights changed the loss


def test_oversample_replicates_every_class_up_to_the_largest(skewed):
    resampled = resample("oversample", skewed)
    assert resampled.counts_after == [40, 40, 40] and resampled.size == 120 and resampled.class_weight is None
    images, labels = _collect(resampled.dataset)
    assert np.bincount(labels).tolist() == [40, 40, 40]
    x, y = skewed.arrays("train")
    minority = {image.tobytes() for image in x[y == 2]}
    seen = [image.tobytes() for image in images[labels == 2]]
    assert set(seen) == minority and all(seen.count(key) == 8 for key in minority)  # 5 examples x 8
    assert sorted(image.tobytes() for image in images[labels == 0]) == sorted(image.tobytes() for image in x[y == 0])
    assert labels[:40].tolist() != sorted(labels[:40].tolist())  # shuffled once, not grouped by class


def test_oversample_remainder_is_drawn_without_repeats(skewed):
    images, labels = _collect(resample("oversample", skewed).dataset)
    seen = [image.tobytes() for image in images[labels == 1]]  # 40 = 2 x 15 + 10 more
    assert sorted(seen.count(key) for key in set(seen)) == [2] * 5 + [3] * 10


def test_augmented_copies_differ_while_originals_stay(skewed):
    resampled = resample({"strategy": "oversample", "augmented_copies": True}, skewed, seed=3)
    assert resampled.options == {"augmented_copies": True} and resampled.counts_after == [40, 40, 40]
    images, labels = _collect(resampled.dataset)
    x, y = skewed.arrays("train")
    for label in range(3):
        originals = x[y == label]
        keys = [image.tobytes() for image in images[labels == label]]
        assert all(keys.count(image.tobytes()) == 1 for image in originals)  # each original once, unchanged
        copies = [image for image in images[labels == label] if image.tobytes() not in {o.tobytes() for o in originals}]
        assert len(copies) == 40 - len(originals)
        for copy in copies:  # a crop of an original of its class: close to one of them, not equal
            distances = np.abs(originals.astype(float) - copy).mean(axis=(1, 2, 3))
            assert 0 < distances.min() < 40
    again, _ = _collect(resample({"strategy": "oversample", "augmented_copies": True}, skewed, seed=3).dataset)
    np.testing.assert_array_equal(images, again)


def test_minority_crops_are_made_in_float32_under_a_global_mixed_bfloat16_policy(skewed):
    oversample = {"strategy": "oversample", "augmented_copies": True}
    expected, _ = _collect(resample(oversample, skewed, seed=3).dataset)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        images, _ = _collect(resample(oversample, skewed, seed=3).dataset)
    finally:
        keras.config.set_dtype_policy(previous)
    np.testing.assert_array_equal(images, expected)  # not rounded to bfloat16's 8 significant bits


def test_augmented_copies_take_an_augmentation(skewed):
    elastic = {"strategy": "oversample", "augmented_copies": "elastic"}
    resampled = resample(elastic, skewed, seed=3)
    assert resampled.config == elastic and resampled.counts_after == [40, 40, 40]
    images, labels = _collect(resampled.dataset)
    x, y = skewed.arrays("train")
    originals = {image.tobytes() for image in x}
    assert sum(image.tobytes() in originals for image in images) == len(x)  # the originals, unchanged
    crops, _ = _collect(resample({"strategy": "oversample", "augmented_copies": True}, skewed, seed=3).dataset)
    copies = [image.tobytes() for image in images if image.tobytes() not in originals]
    assert len(copies) == 120 - len(x) and not set(copies) & {image.tobytes() for image in crops}
    again, _ = _collect(resample(elastic, skewed, seed=3).dataset)
    np.testing.assert_array_equal(images, again)


def test_pca_colour_copies_are_fitted_on_the_training_images():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 12 + [1] * 4)
    data = cnnkit.data.from_arrays(rng.integers(0, 256, (16, 6, 6, 3), dtype=np.uint8), labels, val_split=0)
    resampled = resample({"strategy": "oversample", "augmented_copies": "pca_color"}, data, seed=0)
    images, drawn = _collect(resampled.dataset)
    assert np.bincount(drawn).tolist() == [12, 12]
    originals = {image.tobytes() for image in data.arrays("train")[0]}
    assert sum(image.tobytes() not in originals for image in images) == 8  # the minority's 8 replicas are new


def test_undersample_keeps_the_smallest_count_of_distinct_examples(skewed):
    resampled = resample("undersample", skewed)
    assert resampled.counts_after == [5, 5, 5] and resampled.size == 15 and resampled.dropped == 45
    images, labels = _collect(resampled.dataset)
    assert np.bincount(labels).tolist() == [5, 5, 5]
    x, _ = skewed.arrays("train")
    originals = {image.tobytes() for image in x}
    keys = {image.tobytes() for image in images}
    assert len(keys) == 15 and keys <= originals


@pytest.mark.parametrize("strategy", ["oversample", "undersample"])
def test_resampling_is_seeded(skewed, strategy):
    first, first_labels = _collect(resample(strategy, skewed, seed=1).dataset)
    again, _ = _collect(resample(strategy, skewed, seed=1).dataset)
    other, other_labels = _collect(resample(strategy, skewed, seed=2).dataset)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.bincount(first_labels).tolist() == np.bincount(other_labels).tolist()


def test_balanced_batches_draw_classes_uniformly_and_afresh_each_epoch(skewed):
    resampled = resample("balanced_batches", skewed, seed=0)
    assert resampled.size == 60 and resampled.counts_after == [20, 20, 20]
    epochs = []
    for epoch in range(20):
        training_epoch().assign(epoch)  # what EpochCheckpoint does at each epoch's start
        epochs.append(_collect(resampled.dataset)[1])
    assert all(len(labels) == 60 for labels in epochs)  # an epoch is the original training size
    assert not np.array_equal(epochs[0], epochs[1])  # a new draw every epoch
    frequencies = np.bincount(np.concatenate(epochs), minlength=3) / 1200
    np.testing.assert_allclose(frequencies, 1 / 3, atol=0.04)
    same = resample("balanced_batches", skewed, seed=0)  # a resumed run draws epoch 19 as the first did
    np.testing.assert_array_equal(_collect(same.dataset)[1], epochs[19])
    training_epoch().assign(0)
    images, labels = _collect(resampled.dataset)
    x, y = skewed.arrays("train")
    by_key = {image.tobytes(): label for image, label in zip(x, y)}
    assert all(by_key[image.tobytes()] == label for image, label in zip(images, labels))  # pairs intact


def test_two_stage_trains_as_is_then_on_balanced_batches(skewed):
    resampled = resample({"strategy": "two_stage", "second_stage_epochs": 2}, skewed)
    assert resampled.options == {"second_stage_epochs": 2, "second_stage_lr_factor": 0.1}
    assert resampled.config == {"strategy": "two_stage", "second_stage_epochs": 2, "second_stage_lr_factor": 0.1}
    assert resampled.counts_after == COUNTS and resampled.size == 60
    second = resampled.second_stage
    assert second.strategy == "balanced_batches" and second.size == 60 and second.counts_after == [20, 20, 20]
    assert resample("oversample", skewed).second_stage is None


def test_train_runs_wei_two_stage_schedule(skewed, tmp_path):
    run = cnnkit.recipes.train("FC8", skewed, imbalance={"strategy": "two_stage", "second_stage_epochs": 2},
                               epochs=1, batch_size=16, run_dir=tmp_path / "run", verbose=0)
    assert len(run.history["loss"]) == 3  # 1 epoch as is + 2 balanced
    assert run.config["train_class_counts"] == {"before": COUNTS, "after": COUNTS, "second_stage": [20, 20, 20]}
    assert [stage["name"] for stage in run.config["stages"]] == ["train", "balanced"]


def test_logit_adjusted_loss_shifts_logits_by_the_log_prior():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]], np.float32)
    labels = np.array([2, 0])
    prior = np.array(COUNTS) / sum(COUNTS)
    for tau in (0.0, 1.0, 2.0):
        adjusted = np.log(probabilities) + tau * np.log(prior)
        expected = np.mean([-(row[y] - np.log(np.exp(row).sum())) for row, y in zip(adjusted, labels)])
        loss = LogitAdjustedCrossentropy(COUNTS, tau=tau)
        assert float(loss(labels, probabilities)) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)
    assert float(LogitAdjustedCrossentropy(COUNTS, tau=0.0)(labels, probabilities)) == pytest.approx(float(plain), rel=1e-5)
    soft = LogitAdjustedCrossentropy(COUNTS, sparse=False)(np.eye(3)[labels], probabilities)
    assert float(soft) == pytest.approx(float(LogitAdjustedCrossentropy(COUNTS)(labels, probabilities)), rel=1e-5)
    # a rare class's true logit is pushed up harder: its loss is larger at the same probability
    rare, common = (float(LogitAdjustedCrossentropy(COUNTS)(np.array([y]), np.full((1, 3), 1 / 3, np.float32)))
                    for y in (2, 0))
    assert rare > common


def test_train_with_logit_adjustment_keeps_the_data_and_saves_a_plain_model(skewed, tmp_path):
    resampled = resample("logit_adjusted", skewed)
    assert resampled.counts_after == COUNTS and resampled.class_weight is None and resampled.config == {
        "strategy": "logit_adjusted", "tau": 1.0}
    assert isinstance(resampled.loss(), LogitAdjustedCrossentropy) and resample("none", skewed).loss() == (
        "sparse_categorical_crossentropy")
    run = cnnkit.recipes.train("FC8", skewed, imbalance="logit_adjusted", epochs=2, batch_size=16,
                               run_dir=tmp_path / "run", verbose=0)
    assert run.model.loss.get_config()["class_counts"] == COUNTS
    loaded = cnnkit.load(tmp_path / "run")
    x, _ = skewed.arrays("train")
    np.testing.assert_allclose(loaded.predict(x[:8]), run.predict(x[:8]), atol=1e-6)
    assert loaded.config["imbalance"] == {"strategy": "logit_adjusted", "tau": 1.0}
    # a fresh process has imported nothing of cnnkit.recipes: load must register the loss itself
    code = f"import cnnkit; print(type(cnnkit.load({str(tmp_path / 'run')!r}).model.loss).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "LogitAdjustedCrossentropy"


def test_a_class_without_examples_is_left_out():
    labels = np.array([0] * 6 + [2] * 2)
    data = cnnkit.data.from_arrays(_blobs(labels), labels, class_names=["a", "b", "c"], val_split=0)
    assert resample("oversample", data).counts_after == [6, 0, 6]
    assert resample("undersample", data).counts_after == [2, 0, 2]
    assert resample("class_weight", data).class_weight == pytest.approx({0: 8 / 12, 2: 8 / 4})
    _, drawn = _collect(resample("balanced_batches", data).dataset)
    assert 1 not in drawn and len(drawn) == 8


@pytest.mark.parametrize(
    "imbalance, match",
    [
        ("smote", "Unknown imbalance strategy 'smote'"),
        ({"second_stage_epochs": 2}, "Unknown imbalance strategy None"),
        ({"strategy": "two_stage", "second_stage_epoch": 2}, "Unknown option 'second_stage_epoch'.*second_stage_epochs"),
        ({"strategy": "undersample", "augmented_copies": True}, "Unknown option 'augmented_copies'"),
        ({"strategy": "oversample", "augmented_copies": 1}, "augmented_copies must be True, False or an augmentation"),
        ({"strategy": "oversample", "augmented_copies": "yes"}, "augmented_copies: unknown augmentation 'yes'"),
        ({"strategy": "oversample", "augmented_copies": ["shift", "mixup"]}, "mixes labels"),
        ({"strategy": "oversample", "augmented_copies": []}, "augments nothing"),
        ({"strategy": "two_stage", "second_stage_epochs": 0}, "second_stage_epochs=0"),
        ({"strategy": "two_stage", "second_stage_lr_factor": -1}, "second_stage_lr_factor=-1"),
        (["oversample"], "imbalance must be None"),
        ({"strategy": "logit_adjusted", "tau": -0.5}, "tau=-0.5"),
        ({"strategy": "logit_adjusted", "tau": float("inf")}, r"tau must be a finite number >= 0. Received: tau=inf"),
        ({"strategy": "logit_adjusted", "tau": float("nan")}, r"tau must be a finite number >= 0. Received: tau=nan"),
        ({"strategy": "two_stage", "second_stage_lr_factor": float("inf")},
         r"second_stage_lr_factor must be a finite number > 0. Received: second_stage_lr_factor=inf"),
        ({"strategy": "two_stage", "second_stage_lr_factor": True}, r"second_stage_lr_factor=True"),
    ],
)
def test_bad_imbalance_names_the_key(skewed, imbalance, match):
    with pytest.raises(ValueError, match=match):
        resample(imbalance, skewed)


@pytest.mark.parametrize("strategy", ["class_weight", "oversample", "balanced_batches"])
def test_negative_seed_is_named(skewed, strategy):
    with pytest.raises(ValueError, match="seed must be a non-negative integer. Received: seed=-1"):
        resample(strategy, skewed, seed=-1)


def test_strategies_have_documented_defaults():
    assert set(STRATEGIES) == {"none", "class_weight", "oversample", "undersample", "balanced_batches", "two_stage",
                               "logit_adjusted"}
    assert STRATEGIES["logit_adjusted"] == {"tau": 1.0}
    assert STRATEGIES["two_stage"] == {"second_stage_epochs": 3, "second_stage_lr_factor": 0.1}


@pytest.fixture(scope="module")
def balanced():
    labels = np.repeat(np.arange(5), 100)
    test_labels = np.repeat(np.arange(5), 7)
    return cnnkit.data.from_arrays(_blobs(labels % 4, size=8, seed=1), labels, x_test=_blobs(test_labels % 4, size=8),
                                   y_test=test_labels, val_split=0.2)


def test_long_tailed_counts_fall_geometrically(balanced):
    tail = long_tailed(balanced, largest=80, smallest=5, seed=0)
    assert tail.class_counts["train"] == [80, 40, 20, 10, 5]  # ratio (5/80) ** (1/4) = 0.5
    assert tail.class_counts["val"] == [20, 10, 5, 2, 1]  # the same fractions of the 20 a class
    assert tail.class_counts["test"] == [7] * 5
    x, y = tail.arrays("train")
    assert np.bincount(y).tolist() == [80, 40, 20, 10, 5]
    x_all, y_all = balanced.arrays("train")
    originals = {(image.tobytes(), label) for image, label in zip(x_all, y_all)}
    assert {(image.tobytes(), label) for image, label in zip(x, y)} <= originals
    assert tail.fingerprint != balanced.fingerprint and "long-tailed 80->5" in tail.source
    again = long_tailed(balanced, largest=80, smallest=5, seed=0).arrays("train")[0]
    other = long_tailed(balanced, largest=80, smallest=5, seed=1).arrays("train")[0]
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)


def test_long_tailed_defaults_fall_from_5000_to_50(balanced):
    labels = np.repeat(np.arange(10), 5000)
    data = cnnkit.data.from_arrays(np.zeros((50000, 2, 2, 1), np.uint8), labels, val_split=0)
    counts = long_tailed(data).class_counts["train"]
    assert counts == [5000, 2997, 1797, 1077, 646, 387, 232, 139, 83, 50]
    np.testing.assert_allclose(np.array(counts[1:]) / counts[:-1], 0.01 ** (1 / 9), rtol=0.01)
    with pytest.raises(ValueError, match="Class '0' has 80 training examples; the long tail needs 5000"):
        long_tailed(balanced)


@pytest.mark.parametrize(
    "options, match",
    [({"largest": 0}, "largest=0"), ({"largest": 10, "smallest": 20}, "smallest must not exceed largest"),
     ({"smallest": 2.5}, "smallest=2.5"), ({"largest": 10, "smallest": 5, "seed": -1}, "seed must be a non-negative "
                                                                                      "integer. Received: seed=-1"),
     ({"largest": 10, "smallest": 5, "seed": "0"}, "Received: seed='0'")],
)
def test_long_tailed_refuses_bad_counts(balanced, options, match):
    with pytest.raises(ValueError, match=match):
        long_tailed(balanced, **options)


def test_logit_adjustment_combines_with_label_smoothing(skewed):
    from cnnkit.recipes.pipeline import prepare_inputs

    loss = prepare_inputs(skewed, imbalance="logit_adjusted", label_smoothing=0.2).loss
    assert isinstance(loss, LogitAdjustedCrossentropy) and loss.get_config()["label_smoothing"] == 0.2
    probabilities = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]], np.float32)
    one_hot = np.eye(3, dtype=np.float32)[[2, 0]]
    adjusted = np.log(probabilities) + np.log(np.array(COUNTS) / sum(COUNTS))
    log_softmax = adjusted - np.log(np.exp(adjusted).sum(axis=1, keepdims=True))
    targets = 0.8 * one_hot + 0.2 / 3
    assert float(loss(one_hot, probabilities)) == pytest.approx(float(np.mean(-np.sum(targets * log_softmax, 1))),
                                                                rel=1e-5)
    with pytest.raises(ValueError, match="label smoothing needs one-hot labels"):
        LogitAdjustedCrossentropy(COUNTS, sparse=True, label_smoothing=0.1)


def test_throughput_counts_the_images_each_epoch_trained_on(skewed, tmp_path):
    imbalance = {"strategy": "two_stage", "second_stage_epochs": 2}
    run = cnnkit.recipes.train("FC8", skewed, imbalance="undersample", epochs=3, batch_size=16,
                               run_dir=tmp_path / "under", verbose=0)
    (stage,) = run.config["stages"]
    assert stage["images_per_epoch"] == run.config["train_class_counts"]["after"][0] * 3 < sum(COUNTS)
    rates = [stage["images_per_epoch"] / seconds for seconds in run.history["epoch_seconds"][1:]]
    assert run.metrics["train_images_per_second"] == pytest.approx(np.median(rates), rel=1e-3)
    run = cnnkit.recipes.train("FC8", skewed, imbalance=imbalance, epochs=2, batch_size=16,
                               run_dir=tmp_path / "two", verbose=0)
    sizes = [stage["images_per_epoch"] for stage in run.config["stages"]]
    assert sizes[0] == sum(COUNTS) and sizes[1] == sum(run.config["train_class_counts"]["second_stage"])
    images = [sizes[0]] * 2 + [sizes[1]] * 2
    assert run.history["epoch_compiled"] == [1.0, 0.0, 1.0, 0.0]  # each stage's fit compiles in its first epoch
    rates = [count / seconds for count, seconds in zip(images, run.history["epoch_seconds"])]
    assert run.metrics["train_images_per_second"] == pytest.approx(np.median([rates[1], rates[3]]), rel=1e-3)
