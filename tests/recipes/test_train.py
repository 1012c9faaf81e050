import json

import keras
import numpy as np
import pytest
import yaml

import cnnkit


def _train(data, run_dir, **kwargs):
    options = dict(epochs=2, batch_size=32, run_dir=run_dir, verbose=0)
    options.update(kwargs)
    return cnnkit.recipes.train(options.pop("arch", "8C3-MP2-FC32"), data, **options)


def test_train_writes_a_complete_run_directory(tiny_mnist, tmp_path):
    run = _train(tiny_mnist, tmp_path / "run")
    files = {path.name for path in (tmp_path / "run").iterdir()}
    assert {"model.keras", "history.csv", "metrics.json", "config.yaml", "README.md",
            "training_curves.png", "confusion_matrix.png", "logs", "report.html", "manifest.json"} <= files
    assert "backup" not in files  # the resume backup is removed once the run finished
    assert len(run.history["loss"]) == 2 and len(run.history["epoch_seconds"]) == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_examples"] == 100
    assert metrics["test_error"] == pytest.approx(1 - metrics["test_accuracy"])
    assert 0.5 < metrics["test_accuracy"] <= 1.0  # 400 real digits, 2 epochs: far above chance
    assert len(metrics["confusion_matrix"]) == 10 and "balanced_accuracy" in metrics
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["arguments"]["arch"] == "8C3-MP2-FC32"
    assert config["arguments"]["batch_size"] == 32 and config["seed"] == 0
    assert config["data"]["fingerprint"] == tiny_mnist.fingerprint
    assert set(config["versions"]) >= {"cnnkit", "tensorflow", "keras"}


def test_saved_run_loads_back_and_predicts_the_same(tiny_mnist, tmp_path):
    run = _train(tiny_mnist, tmp_path / "run", epochs=1)
    x_test, _ = tiny_mnist.arrays("test")
    loaded = cnnkit.load(tmp_path / "run")
    np.testing.assert_allclose(loaded.predict(x_test), run.predict(x_test), atol=1e-6)
    assert loaded.metrics["test_accuracy"] == run.metrics["test_accuracy"]
    assert loaded.class_names == tiny_mnist.class_names


def test_the_same_call_returns_its_finished_run_and_another_call_is_refused(tiny_mnist, tmp_path, capsys):
    first = _train(tiny_mnist, tmp_path / "run", epochs=1)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("metrics.json", "model.keras")}
    again = _train(tiny_mnist, tmp_path / "run", epochs=1, verbose=1)  # not trained again: loaded
    assert "holds this call's finished run (same arguments and data): loaded, not trained again" in \
        capsys.readouterr().out
    assert again.metrics == first.metrics and again.run_dir == first.run_dir
    x_test, _ = tiny_mnist.arrays("test")
    np.testing.assert_allclose(again.predict(x_test), first.predict(x_test), atol=1e-6)
    with pytest.raises(ValueError, match="already holds a finished run"):
        _train(tiny_mnist, tmp_path / "run", epochs=2)
    model = cnnkit.build("8C3-MP2-FC32", tiny_mnist.image_shape, tiny_mnist.num_classes)
    with pytest.raises(ValueError, match="already holds a finished run"):  # a model object: its weights are not
        _train(tiny_mnist, tmp_path / "run", arch=model, epochs=1)          # in the key, so never reused
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before


def test_same_seed_gives_the_same_training(tiny_mnist, tmp_path):
    first = _train(tiny_mnist, tmp_path / "a", arch="FC16-D0.2", seed=3)
    second = _train(tiny_mnist, tmp_path / "b", arch="FC16-D0.2", seed=3)
    other = _train(tiny_mnist, tmp_path / "c", arch="FC16-D0.2", seed=4)
    assert first.history["loss"] == second.history["loss"]
    assert first.history["loss"] != other.history["loss"]


@pytest.mark.parametrize("precision, compute", [("float32", "float32"), ("mixed_bfloat16", "bfloat16")])
def test_precision_sets_the_compute_dtype_and_keeps_a_float32_output(tiny_mnist, tmp_path, precision, compute):
    run = _train(tiny_mnist, tmp_path / "run", epochs=1, precision=precision)
    assert run.model.get_layer("conv1").compute_dtype == compute
    assert run.model.get_layer("conv1").variable_dtype == "float32"
    assert run.model.output.dtype == "float32"
    assert run.config["precision"] == precision


def test_model_options_reach_the_builder(tiny_mnist, tmp_path):
    run = _train(tiny_mnist, tmp_path / "run", epochs=1, model_options={"activation": "tanh", "batch_norm": True})
    assert run.model.get_layer("bn1").name == "bn1"
    assert run.model.get_layer("bn1_act").get_config()["activation"] == "tanh"


def test_a_keras_model_is_trained_as_given(tiny_mnist, tmp_path):
    model = cnnkit.build("FC8", (28, 28, 1), 10)
    run = _train(tiny_mnist, tmp_path / "run", arch=model, epochs=1)
    assert run.model is model and run.config["arch"] == f"<keras.Model {model.name}>"
    with pytest.raises(ValueError, match="model_options"):
        _train(tiny_mnist, tmp_path / "other", arch=model, model_options={"activation": "tanh"})


def test_data_from_a_folder_mapping(image_folder, tmp_path):
    run = _train({"path": str(image_folder), "image_size": [8, 8], "val_split": 0.2}, tmp_path / "run",
                 arch="FC4", epochs=1)
    assert run.class_names == ["cat", "dog"]
    assert run.model.input_shape == (None, 8, 8, 3)
    assert "test_accuracy" not in run.metrics and run.metrics["epochs_run"] == 1


def test_early_stopping_restores_and_stops(tiny_mnist, tmp_path):
    run = _train(tiny_mnist, tmp_path / "run", arch="FC8", epochs=30, early_stopping=1, learning_rate=0.3)
    val_loss = run.history["val_loss"]
    assert len(val_loss) < 30  # stopped early once validation loss rose
    assert val_loss[-1] >= min(val_loss[:-1])


class _AverageAtTheEnd(keras.callbacks.Callback):
    """Records the raw weights and the optimiser's moving average after the last epoch."""

    def on_epoch_end(self, epoch, logs=None):
        self.raw = [variable.numpy() for variable in self.model.trainable_variables]
        self.average = [variable.numpy() for variable in self.model.optimizer._model_variables_moving_average]


def test_ema_validates_and_ends_with_the_averaged_weights(tiny_mnist, tmp_path):
    probe = _AverageAtTheEnd()
    run = _train(tiny_mnist, tmp_path / "run", arch="FC16", epochs=3, learning_rate=0.01, ema=0.9,
                 callbacks=[probe])
    final = [variable.numpy() for variable in run.model.trainable_variables]
    for weights, average, raw in zip(final, probe.average, probe.raw):
        np.testing.assert_array_equal(weights, average)
        assert not np.allclose(average, raw)  # the average is not the last step's weights
    val_loss, _ = run.model.evaluate(tiny_mnist.arrays("val")[0], tiny_mnist.arrays("val")[1], verbose=0)
    assert val_loss == pytest.approx(run.history["val_loss"][-1], rel=1e-3)  # validated on the average
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["arguments"]["ema"] == 0.9


def test_an_ema_run_killed_after_its_last_checkpoint_resumes_to_the_average(tiny_mnist, tmp_path):
    class KilledAtTheEnd(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            raise KeyboardInterrupt

    options = dict(arch="FC16", epochs=2, learning_rate=0.01, ema=0.9)
    reference = _train(tiny_mnist, tmp_path / "reference", **options)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_mnist, tmp_path / "run", callbacks=[KilledAtTheEnd()], **options)
    assert (tmp_path / "run" / "backup" / "stage1" / "epoch002.weights.h5").exists()
    resumed = _train(tiny_mnist, tmp_path / "run", **options)  # fits no epoch: the average must still go in
    for weights, expected in zip(resumed.model.trainable_variables, reference.model.trainable_variables):
        np.testing.assert_allclose(weights.numpy(), expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1. Received: epochs=0"),
        ({"batch_size": "32"}, "batch_size must be an integer"),
        ({"steps_per_execution": 0}, "steps_per_execution"),
        ({"early_stopping": 0}, "early_stopping"),
        ({"early_stopping": True}, "early_stopping must be a patience in epochs (>= 1) or None. "
                                   "Received: early_stopping=True"),
        ({"early_stopping": 2, "ema": 0.99}, "early_stopping and ema do not combine"),
        ({"ema": 1.0}, "ema must be a momentum between 0 and 1"),
        ({"optimizer": "adamax"}, "optimizer must be one of"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"precision": "float16"}, "precision must be one of"),
        ({"model_options": {"colour": "red"}}, "unknown build option 'colour'"),
        ({"arch": "8C3-MP30"}, "window is larger"),
    ],
)
def test_bad_arguments_are_named(tiny_mnist, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _train(tiny_mnist, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_early_stopping_without_validation_is_refused(tmp_path):
    x = np.zeros((20, 8, 8), np.uint8)
    data = cnnkit.data.from_arrays(x, np.arange(20) % 2, val_split=0)
    with pytest.raises(ValueError, match="needs a validation split"):
        _train(data, tmp_path / "run", early_stopping=2)
    assert not (tmp_path / "run").exists()


def test_unknown_dataset_name_is_named(tmp_path):
    with pytest.raises(ValueError, match="mnst"):
        _train("mnst", tmp_path / "run")
    keras.backend.clear_session()


def _smoothed_cross_entropy(one_hot, probabilities, smoothing):
    targets = (1 - smoothing) * one_hot + smoothing / one_hot.shape[1]
    return float(np.mean(-np.sum(targets * np.log(probabilities), axis=1)))


def test_label_smoothing_gives_one_hot_batches_and_the_smoothed_loss(tiny_mnist):
    from cnnkit.recipes.pipeline import prepare_inputs

    inputs = prepare_inputs(tiny_mnist, label_smoothing=0.1)
    images, labels = next(iter(inputs.train_pipeline(batch_size=8, seed=0)))
    assert labels.shape == (8, 10) and set(np.unique(labels.numpy())) == {0.0, 1.0}  # hard: the loss smooths
    _, val_labels = next(iter(inputs.validation_pipeline()))
    assert val_labels.shape[1] == 10
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), size=8).astype("float32")
    assert float(inputs.loss(labels, probabilities)) == pytest.approx(
        _smoothed_cross_entropy(labels.numpy(), probabilities, 0.1), rel=1e-5)
    assert prepare_inputs(tiny_mnist).loss == "sparse_categorical_crossentropy"
    assert prepare_inputs(tiny_mnist, label_smoothing=np.float32(0.1)).soft_labels  # NumPy numbers are numbers


def test_label_smoothing_lowers_confidence_and_is_saved_with_the_run(tiny_mnist, tmp_path):
    hard = _train(tiny_mnist, tmp_path / "hard", epochs=4)
    smooth = _train(tiny_mnist, tmp_path / "smooth", epochs=4, label_smoothing=0.3)
    x_test, _ = tiny_mnist.arrays("test")
    # the smoothed target caps the true class at 1 - 0.3 + 0.03: confident predictions are pulled down
    assert smooth.predict(x_test).max(axis=1).mean() < hard.predict(x_test).max(axis=1).mean() - 0.05
    assert smooth.metrics["test_accuracy"] > 0.5
    loaded = cnnkit.load(tmp_path / "smooth")
    assert loaded.model.loss.get_config()["label_smoothing"] == pytest.approx(0.3)
    assert loaded.config["arguments"]["label_smoothing"] == 0.3


@pytest.mark.parametrize("value", [-0.1, 1, 1.5, True, "0.1"])
def test_bad_label_smoothing_is_named(tiny_mnist, tmp_path, value):
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        _train(tiny_mnist, tmp_path / "run", label_smoothing=value)
    assert not (tmp_path / "run").exists()


class _KilledAt(keras.callbacks.Callback):
    """Raises ``KeyboardInterrupt`` at the start of 0-based epoch ``epoch`` (after its checkpoints), or with
    ``epoch=None`` at the end of the first ``fit`` (after the last checkpoint, before the run is written)."""

    def __init__(self, epoch=None):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt

    def on_train_end(self, logs=None):
        if self.epoch is None:
            raise KeyboardInterrupt


def _resumes_to_the_uninterrupted_run(data, tmp_path, kill, **options):
    """Train once through and once killed by ``kill`` then resumed; assert both end alike; the reference run."""
    options = dict(arch="FC16", learning_rate=0.1, early_stopping=3, report=False, **options)
    reference = _train(data, tmp_path / "reference", **options)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "run", callbacks=[kill], **options)
    resumed = _train(data, tmp_path / "run", **options)
    assert resumed.config["stages"] == reference.config["stages"]  # the epochs run, stage by stage
    np.testing.assert_allclose(resumed.history["val_loss"], reference.history["val_loss"], rtol=1e-6)
    for weights, expected in zip(resumed.model.get_weights(), reference.model.get_weights()):
        np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert not (tmp_path / "run" / "backup").exists()
    return reference


def _best_epoch(run):
    return int(np.argmin(run.history["val_loss"])) + 1


def test_early_stopping_killed_mid_stage_resumes_with_its_best_and_wait(tiny_mnist, tmp_path):
    reference = _resumes_to_the_uninterrupted_run(tiny_mnist, tmp_path, _KilledAt(5), epochs=10)
    stopped = reference.metrics["epochs_run"]
    assert stopped < 10 and _best_epoch(reference) < 5 - 1 < stopped  # the best epoch's file is not a newest two


def test_early_stopping_killed_after_the_stop_restores_the_best_epoch(tiny_mnist, tmp_path):
    reference = _resumes_to_the_uninterrupted_run(tiny_mnist, tmp_path, _KilledAt(None), epochs=10)
    assert reference.metrics["epochs_run"] < 10 and _best_epoch(reference) < reference.metrics["epochs_run"] - 1


def test_early_stopping_killed_after_the_last_epoch_restores_the_best_epoch(tiny_mnist, tmp_path):
    reference = _resumes_to_the_uninterrupted_run(tiny_mnist, tmp_path, _KilledAt(None), epochs=5)
    assert reference.metrics["epochs_run"] == 5 and _best_epoch(reference) < 5 - 1  # no stop; the best is older


@pytest.mark.parametrize("kill", [9, None], ids=["mid-stage-2", "after-stage-1-stopped"])
def test_early_stopping_of_each_stage_resumes_in_a_two_stage_run(tiny_mnist, tmp_path, kill):
    two_stage = {"strategy": "two_stage", "second_stage_epochs": 6, "second_stage_lr_factor": 1.0}
    reference = _resumes_to_the_uninterrupted_run(tiny_mnist, tmp_path, _KilledAt(kill), epochs=8, imbalance=two_stage)
    first, second = (stage["epochs_run"] for stage in reference.config["stages"])
    assert first < 8 and second < 6  # each stage stopped early


def test_mixed_float16_trains_with_loss_scaling_and_loads_back(tiny_mnist, tmp_path):
    run = _train(tiny_mnist, tmp_path / "run", precision="mixed_float16", epochs=1)
    assert isinstance(run.model.optimizer, keras.optimizers.LossScaleOptimizer)  # else float16 gradients underflow
    assert run.model.get_layer("conv1").compute_dtype == "float16" and np.isfinite(run.history["loss"]).all()
    assert run.metrics["test_accuracy"] > 0.3
    x_test, _ = tiny_mnist.arrays("test")
    np.testing.assert_allclose(cnnkit.load(tmp_path / "run").predict(x_test), run.predict(x_test), atol=1e-6)


def test_precise_bn_sets_the_statistics_to_the_clean_training_images(tiny_mnist, tmp_path):
    run = _train(tiny_mnist, tmp_path / "run", arch="8C3-BN-MP2-D0.5-FC16", augment="affine", precise_bn=256,
                 batch_size=128)
    norm = run.model.get_layer("bn1")
    clean, _ = tiny_mnist.arrays("train")
    sample = clean[np.random.default_rng(0).permutation(len(clean))[:256]]  # drawn with the run's seed
    inputs = keras.Model(run.model.input, norm.input)(sample.astype("float32")).numpy()
    inputs = inputs.astype("float64").reshape(2, -1, 8)  # bfloat16 sums in NumPy lose everything
    # the average of the two batches' means and variances, not an exponential average of augmented batches
    np.testing.assert_allclose(norm.moving_mean.numpy(), inputs.mean(axis=1).mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), inputs.var(axis=1).mean(axis=0), rtol=1e-3, atol=1e-5)
    assert run.model.get_layer("dropout1").rate == 0.5 and norm.momentum == 0.99  # restored after the pass
    loaded = cnnkit.load(tmp_path / "run")
    np.testing.assert_array_equal(loaded.model.get_layer("bn1").moving_mean.numpy(), norm.moving_mean.numpy())
    assert loaded.metrics["test_accuracy"] == run.metrics["test_accuracy"]


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_precise_bn_is_named(tiny_mnist, tmp_path, value):
    with pytest.raises(ValueError, match="precise_bn must be an integer >= 0"):
        _train(tiny_mnist, tmp_path / "run", precise_bn=value)


def test_precise_bn_reaches_a_batch_norm_inside_a_custom_layer():
    from cnnkit.recipes.batchnorm import recalibrate_batch_norm

    class Block(keras.layers.Layer):  # a hand-written block holding its batch norm as an attribute
        def __init__(self):
            super().__init__()
            self.norm = keras.layers.BatchNormalization()

        def call(self, x, training=None):
            return self.norm(x, training=training)

    inputs = keras.Input((4,))
    block = Block()
    model = keras.Model(inputs, keras.layers.BatchNormalization()(block(inputs)))
    images = np.random.default_rng(0).normal(5.0, 2.0, (256, 4)).astype("float32")
    assert recalibrate_batch_norm(model, images, batch_size=64) == 2
    np.testing.assert_allclose(block.norm.moving_mean.numpy(), images.mean(axis=0), atol=1e-4)  # not 1% of the way


def test_precise_bn_weighs_a_short_last_batch_by_its_images():
    from cnnkit.recipes.batchnorm import recalibrate_batch_norm

    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3)
    norm = keras.layers.BatchNormalization()
    model = keras.Model(inputs, norm(dense(inputs)))
    images = np.random.default_rng(0).normal(0.0, 10.0, (9, 4)).astype("float32")
    recalibrate_batch_norm(model, images, batch_size=4)  # batches of 4, 4 and 1 (a batch of 1 has variance 0)
    batches = np.split(dense(images).numpy().astype("float64"), [4, 8])
    sizes = [len(batch) for batch in batches]
    mean = np.average([batch.mean(axis=0) for batch in batches], axis=0, weights=sizes)
    variance = np.average([batch.var(axis=0) for batch in batches], axis=0, weights=sizes)
    np.testing.assert_allclose(norm.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(norm.moving_variance.numpy(), variance, rtol=1e-5, atol=1e-4)


def test_precise_bn_draws_a_random_sample_not_the_first_images(tmp_path):
    rng = np.random.default_rng(0)
    y = np.sort(rng.integers(0, 4, 600))  # stored sorted by class: the first images are all class 0
    x = (rng.integers(0, 40, (600, 8, 8)) + y[:, None, None] * 60).astype(np.uint8)
    data = cnnkit.data.from_arrays(x, y, val_split=0.1)
    run = _train(data, tmp_path / "run", arch="BN-FC8", epochs=1, batch_size=64, precise_bn=150,
                 precision="float32", report=False)
    clean, _ = data.arrays("train")
    assert clean[:150].mean() / 255 < 0.2 < 0.4 < clean.mean() / 255  # the first 150 are far from the whole
    moving_mean = float(run.model.get_layer("bn1").moving_mean.numpy()[0])
    assert moving_mean == pytest.approx(clean.mean() / 255, abs=0.05)
