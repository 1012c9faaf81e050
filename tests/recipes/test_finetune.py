import shutil

import keras
import numpy as np
import pytest

import cnnkit
from cnnkit.recipes.finetune import _auto_stages, _freezer, with_lr_multipliers

SPEC = "4C3-BN-MP2-8C3-BN-FC16"


@pytest.fixture(scope="session")
def digits():
    """Digits 0-4 to pretrain on and 5-9 with 20 labels each to fine-tune on (bundled sample)."""
    sample = cnnkit.data.load("mnist-sample")
    source = sample.subset(classes=range(5), per_class=60, val_per_class=10)
    target = sample.subset(classes=range(5, 10), per_class=20, val_per_class=5)
    return source, target


@pytest.fixture(scope="session")
def pretrained(digits, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    return cnnkit.recipes.train(SPEC, digits[0], epochs=1, batch_size=32, run_dir=run_dir, verbose=0)


def _backbone_weights(model):
    features = model.layers[1]
    return {layer.name: [weight.numpy().copy() for weight in layer.weights] for layer in features.layers if layer.weights}


def test_frozen_stage_changes_only_the_head_and_unfreezing_changes_exactly_the_named_groups(digits, pretrained, tmp_path):
    pretrained_weights = {layer.name: [w.numpy().copy() for w in layer.weights]
                          for layer in pretrained.model.layers if layer.weights and layer.name != "classifier"}
    head = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-2}],
                                   batch_size=16, run_dir=tmp_path / "head", verbose=0)
    after_head = _backbone_weights(head.model)
    assert set(after_head) == set(pretrained_weights)
    for name, weights in pretrained_weights.items():  # kernels, biases and batch-norm moving statistics
        for before, after in zip(weights, after_head[name], strict=True):
            np.testing.assert_array_equal(before, after)

    both = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], batch_size=16, run_dir=tmp_path / "top", verbose=0,
                                   stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-2},
                                           {"unfreeze": ["conv2"], "epochs": 1, "learning_rate": 1e-2}])
    after_top = _backbone_weights(both.model)
    changed = {name for name in after_top
               if any(not np.array_equal(a, b) for a, b in zip(pretrained_weights[name], after_top[name], strict=True))}
    assert changed == {"conv2"}  # batch norm stays frozen by default: bn2 unchanged
    assert both.config["groups"] == ["conv1", "conv2", "fc1"]
    assert [stage["epochs_run"] for stage in both.config["stages"]] == [1, 1]
    assert len(both.history["loss"]) == 2


@pytest.mark.parametrize(("policy", "bn_changes", "statistics_change"),
                         [("frozen", False, False), ("scale_shift", True, False), ("recalibrate", True, True)])
def test_batch_norm_policies(digits, pretrained, tmp_path, policy, bn_changes, statistics_change):
    bn = pretrained.model.get_layer("bn1")
    gamma, moving_mean = bn.gamma.numpy().copy(), bn.moving_mean.numpy().copy()
    run = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], batch_norm=policy, batch_size=16, verbose=0,
                                  stages=[{"unfreeze": "all", "epochs": 1, "learning_rate": 1e-2}],
                                  run_dir=tmp_path / policy)
    tuned = run.model.layers[1].get_layer("bn1")
    assert (not np.array_equal(tuned.gamma.numpy(), gamma)) == bn_changes
    assert (not np.array_equal(tuned.moving_mean.numpy(), moving_mean)) == statistics_change


def _variables(model, *, batch_norm=False):
    """``{"layer/variable": value}`` of every (batch-norm) layer in ``model``, those in nested models included."""
    layers = [layer for layer in model._flatten_layers(include_self=False) if not isinstance(layer, keras.Model)
              and (not batch_norm or isinstance(layer, keras.layers.BatchNormalization))]
    return {f"{layer.name}/{variable.name}": variable.numpy().copy() for layer in layers for variable in layer.weights}


@pytest.mark.parametrize("policy", ["frozen", "scale_shift"])
def test_batch_norm_policies_reach_into_a_nested_base_model(digits, tmp_path, policy):
    """A classifier shaped as in the Keras transfer-learning guide: ``Sequential([base_model, pooling, dense])``."""
    base = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Rescaling(1 / 255),
                             keras.layers.BatchNormalization(name="b0"),  # before any weighted layer: the first group
                             keras.layers.Conv2D(4, 3, name="c1"), keras.layers.BatchNormalization(name="b1"),
                             keras.layers.ReLU(), keras.layers.Conv2D(4, 3, name="c2"),
                             keras.layers.BatchNormalization(name="b2"), keras.layers.ReLU()], name="base_model")
    classifier = keras.Sequential([keras.Input((28, 28, 1)), base, keras.layers.GlobalAveragePooling2D(),
                                   keras.layers.Dense(3, activation="softmax")])
    classifier.save(tmp_path / "guide.keras")
    before = _variables(base, batch_norm=True)
    run = cnnkit.recipes.finetune(tmp_path / "guide.keras", digits[1], batch_norm=policy, batch_size=32, verbose=0,
                                  stages=[{"unfreeze": "all", "epochs": 1, "learning_rate": 1e-2}],
                                  run_dir=tmp_path / policy, report=False)
    after = _variables(run.model, batch_norm=True)
    assert run.config["groups"] == ["c1", "c2"]
    assert set(after) == set(before)
    for path, value in after.items():  # b0 (before any weighted layer) too
        if policy == "scale_shift" and path.endswith(("/gamma", "/beta")):
            assert not np.array_equal(value, before[path]), path
        else:  # frozen: nothing moves; scale_shift: the moving statistics stay
            np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_a_finetuned_run_as_backbone_is_grouped_by_its_blocks(digits, pretrained, tmp_path):
    first = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-2}],
                                    batch_size=32, run_dir=tmp_path / "first", verbose=0, report=False)
    before = _variables(first.model)
    second = cnnkit.recipes.finetune(first.run_dir, digits[1], stages=[{"unfreeze": 2, "epochs": 1, "learning_rate": 1e-2}],
                                     batch_size=32, run_dir=tmp_path / "second", verbose=0, report=False)
    assert second.config["groups"] == ["conv1", "conv2", "fc1"]
    backbone = next(layer for layer in second.model.layers if isinstance(layer, keras.Model))
    changed = {path for path, value in _variables(backbone).items() if not np.array_equal(value, before[path])}
    assert {path.split("/")[0] for path in changed} == {"conv2", "fc1"}  # bn2, in conv2's group, stays frozen


@pytest.mark.parametrize(("policy", "trains", "statistics_change"),
                         [("frozen", False, False), ("scale_shift", True, False), ("recalibrate", True, True)])
def test_the_batch_norm_policy_reaches_batch_norm_inside_a_group_layer(policy, trains, statistics_change):
    block = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3, name="c"),
                              keras.layers.BatchNormalization(name="b")], name="block")
    features = keras.Sequential([keras.Input((4, 4, 1)), block], name="features")
    _freezer(features, [("block", [block])], {"block"}, policy)(None)
    norm = block.get_layer("b")
    assert norm.trainable is trains and block.get_layer("c").trainable
    features(np.ones((2, 4, 4, 1), "float32"), training=True)
    assert (not np.array_equal(norm.moving_mean.numpy(), np.zeros(2))) == statistics_change


def test_saved_run_loads_and_predicts_the_same_and_takes_raw_pixels(digits, pretrained, tmp_path):
    run = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], stages=[{"unfreeze": 1, "epochs": 1, "learning_rate": 1e-3}],
                                  batch_size=16, run_dir=tmp_path / "run", verbose=0)
    images, _ = digits[1].arrays("test")
    loaded = cnnkit.load(run.run_dir)
    np.testing.assert_allclose(loaded.predict(images[:20]), run.predict(images[:20]), atol=1e-6)
    assert loaded.class_names == ["5", "6", "7", "8", "9"]
    assert run.metrics["num_examples"] == 500


def test_a_keras_file_backbone_on_an_rgb_image_folder_of_another_size(image_folder, tmp_path):
    base = cnnkit.build("4C3-MP2-FC8", (16, 16, 3), 4)
    base.save(tmp_path / "base.keras")
    data = {"path": str(image_folder), "image_size": [12, 10], "val_split": 0.2}
    run = cnnkit.recipes.finetune(str(tmp_path / "base.keras"), data, batch_size=4, run_dir=tmp_path / "folder",
                                  stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-3}], verbose=0)
    assert run.model.input_shape == (None, 12, 10, 3)
    assert run.model.get_layer("resize").output.shape[1:3] == (16, 16)
    assert run.model.output_shape == (None, 2)
    loaded = cnnkit.load(run.run_dir)
    image = np.full((1, 12, 10, 3), 200, np.uint8)
    np.testing.assert_allclose(loaded.predict(image), run.predict(image), atol=1e-6)


def test_label_smoothing_applies_to_finetuning(digits, pretrained, tmp_path):
    run = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-3}],
                                  label_smoothing=0.1, batch_size=16, run_dir=tmp_path / "run", verbose=0)
    assert run.model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)
    assert cnnkit.load(run.run_dir).config["arguments"]["label_smoothing"] == 0.1


class _StageAverages(keras.callbacks.Callback):
    """Per stage (one ``fit`` each): the weights it starts from and its optimiser's average at its end."""

    def __init__(self):
        super().__init__()
        self.starts, self.averages, self.raws = [], [], []

    def on_train_begin(self, logs=None):
        self.starts.append(self._weights(self.model.trainable_variables))
        self.averages.append(None)
        self.raws.append(None)

    def on_epoch_end(self, epoch, logs=None):  # the last epoch's values stay
        self.averages[-1] = self._weights(self.model.optimizer._model_variables_moving_average)
        self.raws[-1] = self._weights(self.model.trainable_variables)

    def _weights(self, values):
        names = [variable.path for variable in self.model.trainable_variables]
        return {name: value.numpy() for name, value in zip(names, values, strict=True)}


def test_ema_averages_within_each_stage_and_the_next_starts_from_the_average(digits, pretrained, tmp_path):
    probe = _StageAverages()
    run = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], ema=0.9, batch_size=16, callbacks=[probe],
                                  stages=[{"unfreeze": 0, "epochs": 2, "learning_rate": 1e-2},
                                          {"unfreeze": "all", "epochs": 2, "learning_rate": 1e-3}],
                                  run_dir=tmp_path / "run", verbose=0)
    assert len(probe.starts) == 2
    head = list(probe.averages[0])  # stage 1 trains the head alone
    assert head and all(name in probe.starts[1] for name in head)
    for name in head:  # stage 2 starts from stage 1's average, not its last step
        np.testing.assert_array_equal(probe.starts[1][name], probe.averages[0][name])
        assert not np.allclose(probe.averages[0][name], probe.raws[0][name])
    final = {variable.path: variable.numpy() for variable in run.model.trainable_variables}
    assert len(probe.averages[1]) > len(head)  # stage 2 also averages the unfrozen backbone
    for name, average in probe.averages[1].items():
        np.testing.assert_array_equal(final[name], average)
    assert cnnkit.load(run.run_dir).config["arguments"]["ema"] == 0.9


def test_two_stage_imbalance_adds_a_balanced_stage_after_the_others(digits, pretrained, tmp_path):
    source = digits[1]
    x, y = source.arrays("train")
    keep = np.concatenate([np.flatnonzero(y == label)[:count] for label, count in enumerate([20, 12, 8, 4, 2])])
    skewed = cnnkit.data.from_arrays(x[keep], y[keep], x_test=source.arrays("test")[0][:50],
                                     y_test=source.arrays("test")[1][:50], class_names=source.class_names, val_split=0)
    imbalance = {"strategy": "two_stage", "second_stage_epochs": 2, "second_stage_lr_factor": 0.5}
    run = cnnkit.recipes.finetune(pretrained.run_dir, skewed, imbalance=imbalance, batch_size=8,
                                  stages=[{"unfreeze": 1, "epochs": 1, "learning_rate": 1e-3}],
                                  run_dir=tmp_path / "run", verbose=0)
    stages = run.config["stages"]
    assert [(stage["name"], stage["epochs_run"]) for stage in stages] == [("stage1", 1), ("balanced", 2)]
    assert stages[1]["unfreeze"] == 1 and stages[1]["learning_rate"] == pytest.approx(5e-4)
    assert len(run.history["loss"]) == 3
    counts = run.config["train_class_counts"]
    assert counts["before"] == [20, 12, 8, 4, 2] and max(counts["second_stage"]) - min(counts["second_stage"]) <= 1


def test_mixed_float16_stages_train_with_loss_scaling(digits, pretrained, tmp_path):
    class Optimizers(keras.callbacks.Callback):
        seen = []

        def on_train_begin(self, logs=None):
            self.seen.append(type(self.model.optimizer).__name__)

    run = cnnkit.recipes.finetune(pretrained.run_dir, digits[1], precision="mixed_float16", batch_size=16,
                                  callbacks=[Optimizers()], run_dir=tmp_path / "run", verbose=0,
                                  stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-3},
                                          {"unfreeze": 1, "epochs": 1, "learning_rate": 1e-4}])
    assert Optimizers.seen == ["LossScaleOptimizer"] * 2 and np.isfinite(run.history["loss"]).all()


def test_ema_with_early_stopping_is_refused_before_any_work(digits, pretrained, tmp_path):
    with pytest.raises(ValueError, match="early_stopping and ema do not combine"):
        cnnkit.recipes.finetune(pretrained.run_dir, digits[1], ema=0.9, early_stopping=2, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="ema must be a momentum between 0 and 1"):
        cnnkit.recipes.finetune(pretrained.run_dir, digits[1], ema=1.5, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_grayscale_data_on_an_rgb_backbone_repeats_the_channel(digits, tmp_path):
    base = cnnkit.build("4C3-MP2-FC8", (28, 28, 3), 4)
    base.save(tmp_path / "rgb.keras")
    run = cnnkit.recipes.finetune(tmp_path / "rgb.keras", digits[1], batch_size=32, run_dir=tmp_path / "gray",
                                  stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-3}], verbose=0)
    assert run.model.get_layer("gray_to_rgb").output.shape[-1] == 3


def test_discriminative_rates_scale_each_groups_update():
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1, use_bias=False, name="b")(keras.layers.Dense(2, use_bias=False, name="a")(inputs))
    model = keras.Model(inputs, outputs)
    a, b = model.get_layer("a").kernel, model.get_layer("b").kernel
    start = [a.numpy().copy(), b.numpy().copy()]
    for factor in (1.0, 0.25):
        a.assign(start[0])
        b.assign(start[1])
        optimizer = with_lr_multipliers(keras.optimizers.SGD(0.1), [(a, factor)])
        model.compile(optimizer=optimizer, loss="mse")
        model.train_on_batch(np.ones((4, 2), np.float32), np.zeros((4, 1), np.float32))
        if factor == 1.0:
            full_step = start[0] - a.numpy()
            b_step = start[1] - b.numpy()
        else:
            np.testing.assert_allclose(start[0] - a.numpy(), 0.25 * full_step, rtol=1e-3)
            np.testing.assert_allclose(start[1] - b.numpy(), b_step, rtol=1e-3)


def test_discriminative_rates_keep_biases_and_batch_norm_out_of_weight_decay():
    from cnnkit.recipes.optimization import make_optimizer

    model = cnnkit.build("4C3-BN-FC4", (6, 6, 1), 2)
    for variable in model.trainable_variables:
        variable.assign(np.ones(variable.shape, "float32"))
    optimizer = with_lr_multipliers(make_optimizer("adamw", learning_rate=0.1, weight_decay=0.5, steps_per_epoch=1,
                                                   epochs=1), [(model.trainable_variables[0], 0.5)])
    optimizer.apply([np.zeros(variable.shape, "float32") for variable in model.trainable_variables],
                    model.trainable_variables)  # a zero gradient: only weight decay moves a variable
    moved = {variable.path.split("/")[-1] for variable in model.trainable_variables if not np.all(variable.numpy() == 1)}
    assert moved == {"kernel"}


@pytest.mark.parametrize(("per_class", "similarity", "case", "unfreezes"), [
    (50, "similar", 1, [0, 1]),
    (5000, "similar", 2, [0, 2, "all"]),
    (50, "different", 3, [0, 2]),
    (5000, "different", 4, [0, "all"]),
])
def test_auto_stages_follow_weis_four_cases(per_class, similarity, case, unfreezes):
    data = cnnkit.data.from_arrays(np.zeros((per_class * 2, 4, 4), np.uint8), np.arange(per_class * 2) % 2, val_split=0)
    plan = _auto_stages(data, similarity, 1e-3, 3, ["g1", "g2", "g3", "g4"])
    assert plan["case"] == case
    assert [stage["unfreeze"] for stage in plan["stages"]] == unfreezes
    assert plan["stages"][0]["learning_rate"] == 1e-3 and plan["stages"][1]["learning_rate"] < 1e-3
    assert f"Wei's case {case}" in plan["message"]


def test_auto_prints_the_case_it_chose(digits, pretrained, tmp_path, capsys):
    cnnkit.recipes.finetune(pretrained.run_dir, digits[1], epochs=1, batch_size=32, run_dir=tmp_path / "auto", verbose=1)
    assert "Wei's case 1 (small, similar)" in capsys.readouterr().out


@pytest.mark.parametrize(("stages", "message"), [
    ([{"unfreeze": ["conv9"], "epochs": 1, "learning_rate": 1e-3}], "unknown group 'conv9'"),
    ([{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-3, "lr": 2}], "unknown key 'lr'"),
    ([{"unfreeze": 0, "learning_rate": 1e-3}], "missing key 'epochs'"),
    ([{"unfreeze": 0, "epochs": 1, "learning_rate": float("nan")}], "learning_rate must be positive"),
    ([{"unfreeze": 1, "epochs": 1, "learning_rate": 1e-3, "lr_multipliers": {"fc1": float("inf")}}],
     r"lr_multipliers\['fc1'\] must be positive"),
    ([{"unfreeze": 7, "epochs": 1, "learning_rate": 1e-3}], "between 0 and the 3 groups"),
    ([{"unfreeze": False, "epochs": 1, "learning_rate": 1e-3}], "Received: unfreeze=False"),
    ([{"unfreeze": 1, "epochs": 1, "learning_rate": 1e-3, "lr_multipliers": {"fc9": 0.1}}], "unknown group 'fc9'"),
    ([{"unfreeze": 1, "epochs": 1, "learning_rate": 1e-3, "lr_multipliers": {"conv1": 0.1}}],
     r"names group 'conv1', which the stage leaves frozen \(unfreeze=1 trains \['fc1'\]\)"),
    ([{"unfreeze": 1, "epochs": 1, "learning_rate": 1e-3, "lr_multipliers": [("fc1", 0.1)]}],
     r"lr_multipliers must be a mapping \{group: factor\}"),
    ("fast", "stages must be 'auto' or a non-empty list"),
])
def test_bad_stages_are_named(digits, pretrained, tmp_path, stages, message):
    with pytest.raises(ValueError, match=message):
        cnnkit.recipes.finetune(pretrained.run_dir, digits[1], stages=stages, run_dir=tmp_path / "bad", verbose=0)
    assert not (tmp_path / "bad").exists()


def test_bad_arguments_are_named(digits, tmp_path):
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        cnnkit.recipes.finetune("mobilenet_v2", digits[1], batch_norm="train", run_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="similarity must be one of"):
        cnnkit.recipes.finetune("mobilenet_v2", digits[1], similarity="close", run_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"No run directory or .keras file at '.*missing\.keras'"):
        cnnkit.recipes.finetune(tmp_path / "missing.keras", digits[1], run_dir=tmp_path / "x")


@pytest.mark.parametrize("input_size", [[64], (32, 0), "64", (32.5, 32), (32, 32, 3), True])
def test_a_bad_input_size_is_named_before_anything_is_built(digits, tmp_path, input_size):
    with pytest.raises(ValueError, match=r"input_size must be \(height, width\) in pixels, or one int"):
        cnnkit.recipes.finetune("mobilenet_v2", digits[1], weights=None, input_size=input_size, run_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_one_int_input_size_is_a_square(digits, pretrained):
    from cnnkit.recipes.finetune import build_finetune_model

    built = build_finetune_model("mobilenet_v2", digits[1], weights=None, input_size=32)
    assert built.source["input_size"] == [32, 32] and built.features.input_shape == (None, 32, 32, 3)
    assert build_finetune_model(pretrained.run_dir, digits[1], input_size=28).features.input_shape == (None, 28, 28, 1)


def test_the_cli_names_a_bad_input_size_in_one_line(image_folder, tmp_path, capsys):
    from cnnkit.cli import main

    overrides = ["backbone=mobilenet_v2", f"data.path={image_folder}", "input_size=[64]", f"run_dir={tmp_path / 'run'}"]
    assert main(["run", "finetune_folder", *overrides]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("cnnkit: error: input_size must be")


def test_transfer_compares_finetuning_with_scratch_and_the_same_call_finishes_an_interrupted_one(tmp_path):
    sample = cnnkit.data.load("mnist-sample")

    def call():
        return cnnkit.recipes.transfer(
            SPEC, sample, source_classes=[0, 1], target_classes=[7, 8], labels_per_class=10, val_labels_per_class=2,
            pretrain={"epochs": 1}, finetune={"stages": [{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-3}]},
            scratch={"epochs": 1}, run_dir=tmp_path / "transfer", verbose=0)

    result = call()
    assert {path.name for path in (tmp_path / "transfer").iterdir()} == {"pretrain", "finetune", "scratch"}
    assert result.finetuned.config["data"]["class_counts"]["train"] == [10, 10]
    assert result.scratch.config["data"]["class_counts"]["train"] == [10, 10]
    assert result.metrics["gain"] == pytest.approx(result.metrics["test_accuracy"] - result.metrics["scratch_test_accuracy"])
    assert "fine-tuned" in result.summary() and "from scratch" in result.summary()

    shutil.rmtree(tmp_path / "transfer" / "scratch")  # as if killed before the scratch run began
    kept = {name: (tmp_path / "transfer" / name / "model.keras").read_bytes() for name in ("pretrain", "finetune")}
    again = call()  # the finished pretraining and fine-tuning are loaded, the scratch run trained
    assert {name: (tmp_path / "transfer" / name / "model.keras").read_bytes() for name in kept} == kept
    assert again.metrics == result.metrics


def test_the_same_finetune_call_returns_its_finished_run_and_a_changed_backbone_file_is_another_call(
        digits, pretrained, tmp_path, capsys):
    backbone = tmp_path / "backbone.keras"
    shutil.copy(pretrained.run_dir / "model.keras", backbone)

    def call(**options):
        return cnnkit.recipes.finetune(backbone, digits[1], stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-2}],
                                       batch_size=16, run_dir=tmp_path / "run", **{"verbose": 0, **options})

    first = call()
    written = {name: (tmp_path / "run" / name).read_bytes() for name in ("metrics.json", "model.keras")}
    again = call(verbose=1)  # not trained again: loaded
    assert "holds this call's finished run (same arguments and data): loaded, not trained again" in \
        capsys.readouterr().out
    assert again.metrics == first.metrics and again.run_dir == first.run_dir
    x_test, _ = digits[1].arrays("test")
    np.testing.assert_allclose(again.predict(x_test), first.predict(x_test), atol=1e-6)

    model = keras.saving.load_model(backbone)
    model.get_layer("conv1").kernel.assign(model.get_layer("conv1").kernel * 2)
    model.save(backbone)  # the same path, other weights: another call
    with pytest.raises(ValueError, match="already holds a finished run"):
        call()
    assert {name: (tmp_path / "run" / name).read_bytes() for name in written} == written


def test_the_packaged_finetune_recipe_runs_with_overrides(image_folder, tmp_path):
    from cnnkit.cli import main

    cnnkit.build("4C3-MP2-FC8", (12, 10, 3), 3).save(tmp_path / "own.keras")
    overrides = [f"backbone={tmp_path / 'own.keras'}", f"data.path={image_folder}", "data.image_size=[12, 10]",
                 "data.val_split=0.2", "epochs=1", "batch_size=4", f"run_dir={tmp_path / 'run'}", "verbose=0"]
    assert main(["run", "finetune_folder", *overrides]) == 0
    run = cnnkit.load(tmp_path / "run")
    assert run.class_names == ["cat", "dog"]
    assert run.config["recipe"] == "finetune" and run.config["wei_case"] == 1



class _WeightsAfterFirstEpoch(keras.callbacks.Callback):
    """Keeps a copy of every backbone weight at the end of the first epoch (the frozen stage)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            backbone = next(layer for layer in self.model.layers if isinstance(layer, keras.Model))
            self.weights = [[weight.numpy().copy() for weight in layer.weights] for layer in backbone.layers]


@pytest.fixture(scope="module")
def rgb_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    return cnnkit.data.from_arrays(x, np.arange(12) % 2, val_split=0)  # no test split: nothing to evaluate


@pytest.mark.parametrize("name", cnnkit.models.list_backbones())
def test_every_applications_backbone_loads_a_local_weights_file_and_a_stage_trains_exactly_its_groups(
        name, rgb_images, untrained_backbone, tmp_path):
    """What differs from backbone to backbone: the weights file, the cut and the groups. Training itself is
    the same code for all; the next test runs it end to end on three families."""
    from cnnkit.models.backbones import get_backbone
    from cnnkit.recipes.finetune import build_finetune_model, finetune_stage

    source = untrained_backbone(name)  # built with weights=None (random) at the smallest input
    source.save_weights(tmp_path / "w.weights.h5")
    built = build_finetune_model(name, rgb_images, weights=str(tmp_path / "w.weights.h5"),
                                 input_size=get_backbone(name).min_input_size)
    for loaded, saved in zip(built.features.weights, source.weights, strict=True):  # by position
        np.testing.assert_array_equal(loaded.numpy(), saved.numpy(), err_msg=loaded.path)
    trainable = {id(variable) for variable in built.model.trainable_weights}  # every layer, before a stage
    inside = {id(variable) for variable in built.features.weights}
    head = trainable - inside
    assert head and all(isinstance(layer, keras.layers.Dense) for layer in built.model.layers
                        if any(id(variable) in head for variable in layer.weights))

    def trained_by(unfreeze):
        stage = finetune_stage(built, {"name": "s", "unfreeze": unfreeze, "epochs": 1, "learning_rate": 1e-3},
                               train=None, steps_per_epoch=1)
        stage.prepare(built.model)
        return {id(variable) for variable in built.model.trainable_weights}

    def weights_of(group):  # trainable variables of the group's layers, batch norm's left out (batch_norm="frozen")
        layers = dict(built.groups)[group]
        norms = {id(variable) for layer in layers for norm in layer._flatten_layers(include_self=True)
                 if isinstance(norm, keras.layers.BatchNormalization) for variable in norm.weights}
        return {id(variable) for layer in layers for variable in layer.weights} & trainable - norms

    assert trained_by(0) == head
    groups = [group for group in built.group_names if weights_of(group)]
    for group in {groups[0], groups[-1]}:
        assert trained_by([group]) == head | weights_of(group), group
    assert trained_by("all") == head | set().union(*map(weights_of, built.group_names))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "resnet50"])
def test_applications_backbones_fine_tune_from_a_local_weights_file(name, rgb_images, untrained_backbone, tmp_path,
                                                                    monkeypatch):
    from cnnkit.models.backbones import get_backbone, layer_groups

    monkeypatch.setenv("CNNKIT_EAGER", "1")  # two one-step stages: skip tracing a graph per stage

    size = get_backbone(name).min_input_size
    source = untrained_backbone(name)  # built with weights=None at the smallest input
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    groups = layer_groups(source, get_backbone(name))
    trainable = [group for group, layers in groups.items()
                 if any(layer.weights and not isinstance(layer, keras.layers.BatchNormalization) for layer in layers)]
    unfrozen = trainable[-1]
    snapshot = _WeightsAfterFirstEpoch()
    run = cnnkit.recipes.finetune(name, rgb_images, weights=str(path), input_size=size, batch_size=12, verbose=0,
                                  stages=[{"unfreeze": 0, "epochs": 1, "learning_rate": 1e-2},
                                          {"unfreeze": [unfrozen], "epochs": 1, "learning_rate": 1e-2}],
                                  callbacks=[snapshot], run_dir=tmp_path / "run", report=False)
    # Layers correspond by position (auto-numbered layer names differ from build to build).
    start = [[weight.numpy() for weight in layer.weights] for layer in source.layers]
    for before, after in zip(start, snapshot.weights, strict=True):  # the frozen stage: as loaded, statistics too
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
    backbone = next(layer for layer in run.model.layers if isinstance(layer, keras.Model))
    position = {id(layer): index for index, layer in enumerate(source.layers)}
    changed = {group for group, layers in groups.items() for layer in layers
               if any(not np.array_equal(weight.numpy(), before) for weight, before in
                      zip(backbone.layers[position[id(layer)]].weights, start[position[id(layer)]], strict=True))}
    assert changed == {unfrozen}
    assert run.model.input_shape == (None, 32, 32, 3) and run.model.output_shape == (None, 2)
    assert not (run.run_dir / "report.html").exists()  # report=False


def test_transfer_refuses_shared_classes_and_data_without_a_test_split_before_training(tmp_path):
    sample = cnnkit.data.load("mnist-sample")
    with pytest.raises(ValueError, match=r"source_classes and target_classes share \['1'\]: pretraining must see "
                                         r"other classes"):
        cnnkit.recipes.transfer("4C3-MP2-FC16", sample, source_classes=["0", "1"], target_classes=(c for c in [1, 2]),
                                run_dir=tmp_path / "shared", verbose=0)
    x, y = sample.arrays("train")
    no_test = cnnkit.data.from_arrays(x[:300], y[:300], seed=0)
    with pytest.raises(ValueError, match="transfer compares fine-tuning with scratch on the test split; the data has none"):
        cnnkit.recipes.transfer("4C3-MP2-FC16", no_test, source_classes=[0, 1], target_classes=[2, 3],
                                run_dir=tmp_path / "no_test", verbose=0)
    assert list(tmp_path.iterdir()) == []  # refused before any folder or training


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_discriminative_rates_scale_decoupled_weight_decay_and_spare_biases(optimizer):
    from cnnkit.recipes.optimization import make_optimizer

    slow, fast = (keras.Variable(np.ones((3, 3), "float32"), name="kernel") for _ in range(2))
    bias = keras.Variable(np.ones(3, "float32"), name="bias")
    base = make_optimizer(optimizer, learning_rate=0.1, weight_decay=0.5, steps_per_epoch=1, epochs=1)
    discriminative = with_lr_multipliers(base, [(slow, 0.01), (bias, 0.01)])
    discriminative.apply([np.zeros((3, 3), "float32"), np.zeros((3, 3), "float32"), np.zeros(3, "float32")],
                         [slow, fast, bias])  # zero gradients: only the decay moves them
    np.testing.assert_allclose(1 - slow.numpy(), 0.1 * 0.01 * 0.5, rtol=1e-3)  # at the group's rate
    np.testing.assert_allclose(1 - fast.numpy(), 0.1 * 0.5, rtol=1e-3)
    np.testing.assert_array_equal(bias.numpy(), 1.0)


def test_a_saved_model_with_keras_s_own_layer_names_gets_one_group_per_weighted_layer(tmp_path):
    from cnnkit.recipes.finetune import build_finetune_model

    model = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(2, 3), keras.layers.Conv2D(2, 3),
                              keras.layers.BatchNormalization(), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(8), keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "auto_named.keras")  # conv2d, conv2d_1, batch_normalization, conv2d_2, flatten, dense, dense_1
    data = cnnkit.data.from_arrays(np.zeros((6, 12, 12, 1), np.uint8), np.arange(6) % 2, val_split=0)
    built = build_finetune_model(tmp_path / "auto_named.keras", data)
    assert [name.split("_")[0] for name in built.group_names] == ["conv2d"] * 3 + ["dense"]
    assert len(set(built.group_names)) == 4  # not one group for every conv2d_<n>


def test_a_saved_backbone_of_any_input_size_and_a_dense_layer_inside_the_network(tmp_path):
    from cnnkit.recipes.finetune import build_finetune_model

    data = cnnkit.data.from_arrays(np.zeros((6, 20, 20, 1), np.uint8), np.arange(6) % 2, val_split=0)
    image = keras.Input((None, None, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="c1")(image))
    keras.Model(image, keras.layers.Dense(3, activation="softmax")(x)).save(tmp_path / "any_size.keras")
    built = build_finetune_model(tmp_path / "any_size.keras", data)  # no resize: the data's own size
    assert built.model.input_shape == (None, 20, 20, 1) and built.model.predict(np.zeros((1, 20, 20, 1)), verbose=0).shape == (1, 2)
    resized = build_finetune_model(tmp_path / "any_size.keras", data, input_size=12)
    assert resized.model.get_layer("resize").get_config()["height"] == 12

    image = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, name="c1")(image)
    squeeze = keras.layers.Dense(4, name="se_up")(keras.layers.GlobalAveragePooling2D()(conv))
    excited = keras.layers.Multiply()([conv, keras.layers.Reshape((1, 1, 4))(squeeze)])
    logits = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 1, name="logits")(excited))
    keras.Model(image, keras.layers.Softmax()(logits)).save(tmp_path / "se.keras")
    with pytest.raises(ValueError, match=r"its last dense layer, 'se_up', is not its classifier: weighted layers "
                                         r"\['logits'\] follow it"):
        build_finetune_model(tmp_path / "se.keras", data)


@pytest.mark.parametrize("weights", [None, "/nonexistent/other.weights.h5"])
def test_weights_for_a_saved_backbone_are_refused_before_data_loads(tmp_path, weights):
    from cnnkit.recipes.finetune import build_finetune_model

    missing = {"path": str(tmp_path / "no_images")}  # loading it would fail otherwise
    message = (r"weights applies to keras.applications backbones; a saved backbone \(.*model.keras\) brings its own "
               rf"weights. Received: weights={weights!r}")
    with pytest.raises(ValueError, match=message):
        cnnkit.recipes.finetune(tmp_path / "model.keras", missing, weights=weights, run_dir=tmp_path / "x", verbose=0)
    with pytest.raises(ValueError, match=message):
        build_finetune_model(str(tmp_path / "model.keras"), missing, weights=weights)
    assert list(tmp_path.iterdir()) == []


def test_a_saved_backbone_without_weighted_layers_before_its_classifier_is_refused(tmp_path):
    from cnnkit.recipes.finetune import build_finetune_model

    keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                      keras.layers.Dense(3, activation="softmax", name="linear")]).save(tmp_path / "linear.keras")
    data = cnnkit.data.from_arrays(np.zeros((6, 6, 6, 1), np.uint8), np.arange(6) % 2, val_split=0)
    with pytest.raises(ValueError, match=r"linear.keras: no weighted layer comes before its classifier, 'linear', so "
                                         r"there are no features to fine-tune"):
        build_finetune_model(tmp_path / "linear.keras", data)


def test_transfer_refuses_a_model_object_and_finetune_weights_before_data_loads(tmp_path):
    missing = {"path": str(tmp_path / "no_images")}  # loading it would fail otherwise
    model = cnnkit.build("4C3-MP2-FC16", (28, 28, 1), 2)
    with pytest.raises(ValueError, match=r"arch must be notation or a registered name: transfer builds the network "
                                         r"twice, to pretrain and from scratch. Received: arch=<Functional "
                                         r"name=cnnkit_net, built=True> of type Functional"):
        cnnkit.recipes.transfer(model, missing, source_classes=[0, 1], target_classes=[2, 3], run_dir=tmp_path / "x")
    with pytest.raises(ValueError, match=r"transfer's finetune: the backbone is the pretrain run, which brings its own "
                                         r"weights, so finetune may not set 'weights'. Received: weights=None"):
        cnnkit.recipes.transfer("4C3-MP2-FC16", missing, source_classes=[0, 1], target_classes=[2, 3],
                                finetune={"weights": None}, run_dir=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
