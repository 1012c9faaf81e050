import json
import re
import zipfile

import keras
import numpy as np
import pytest

from cnnkit.cli import main
from cnnkit.recipes import optimization
from cnnkit.recipes.optimization import make_optimizer, make_schedule, resolve_precision
from cnnkit.recipes.options import check_options


def _rate(schedule, step):
    return float(schedule(step)) if callable(schedule) else schedule


def test_constant_schedule_is_the_rate():
    assert make_schedule("constant", 0.1, steps_per_epoch=10, epochs=5) == 0.1


def test_step_schedule_drops_tenfold_at_half_and_three_quarters():
    schedule = make_schedule("step", 0.1, steps_per_epoch=10, epochs=8)
    assert [round(_rate(schedule, step), 6) for step in (0, 39, 40, 59, 60, 79)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    every = make_schedule({"name": "step", "every": 2, "factor": 0.5}, 1.0, steps_per_epoch=1, epochs=6)
    assert [_rate(every, step) for step in (1, 3, 5)] == [1.0, 0.5, 0.25]


def _rates_used(schedule, *, steps_per_epoch, epochs):
    """The rate each optimiser step of each epoch applies: SGD on a gradient of -1 moves a weight by it."""
    optimizer = make_optimizer("sgd", learning_rate=1.0, schedule=schedule, steps_per_epoch=steps_per_epoch,
                               epochs=epochs)
    weight = keras.Variable(np.zeros(1, "float32"))
    optimizer.build([weight])
    moves = []
    for _ in range(steps_per_epoch * epochs):
        before = float(weight.numpy()[0])
        optimizer.apply([np.array([-1.0], "float32")], [weight])
        moves.append(round(float(weight.numpy()[0]) - before, 4))
    return [moves[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch] for epoch in range(epochs)]


def test_step_schedule_drops_on_the_first_step_of_the_epoch():
    assert _rates_used("step", steps_per_epoch=4, epochs=4) == [[1.0] * 4, [1.0] * 4, [0.1] * 4, [0.01] * 4]
    every = _rates_used({"name": "step", "every": 1, "factor": 0.5}, steps_per_epoch=3, epochs=3)
    assert every == [[1.0] * 3, [0.5] * 3, [0.25] * 3]


def test_warmup_and_restarts_turn_at_the_epoch_boundary():
    warm = _rates_used({"name": "cosine", "warmup_epochs": 1}, steps_per_epoch=4, epochs=4)
    assert max(warm[0]) < 1.0 and warm[1][0] == 1.0  # warms up over epoch 1, peaks on epoch 2's first step
    restarts = _rates_used({"name": "cosine", "cycles": 2}, steps_per_epoch=4, epochs=4)
    assert restarts[0][0] == restarts[2][0] == 1.0 and restarts[2] == restarts[0] and restarts[3] == restarts[1]


@pytest.mark.parametrize(
    "schedule, message",
    [({"name": "step", "every": 2.5}, "step every must be an integer >= 1 (epochs). Received: every=2.5"),
     ({"name": "step", "every": 0}, "step every must be an integer >= 1 (epochs). Received: every=0"),
     ({"name": "step", "every": -2}, "step every must be an integer >= 1 (epochs). Received: every=-2"),
     ({"name": "step", "every": True}, "step every must be an integer >= 1 (epochs). Received: every=True"),
     ({"name": "step", "every": 10}, "step every must be below epochs (10), else the rate never drops. Received: "
                                     "every=10"),
     ({"name": "step", "every": 20}, "step every must be below epochs (10), else the rate never drops. Received: "
                                     "every=20"),
     ({"name": "step", "factor": 10}, "step factor must be a number in (0, 1]. Received: factor=10"),
     ({"name": "step", "factor": 0}, "step factor must be a number in (0, 1]. Received: factor=0"),
     ({"name": "cosine", "warmup_epochs": 10}, "cosine warmup_epochs must be a number >= 0 and below epochs (10). "
                                              "Received: warmup_epochs=10"),
     ({"name": "cosine", "warmup_epochs": -2}, "Received: warmup_epochs=-2"),
     ({"name": "cosine", "warmup_epochs": float("nan")}, "Received: warmup_epochs=nan"),
     (["cosine"], "schedule must be one of ('constant', 'step', 'cosine', 'onecycle') or a dict with 'name'. "
                  "Received: schedule=['cosine']"),
     ({"name": ["step"]}, "Received: schedule={'name': ['step']}")],
)
def test_bad_schedule_options_are_named(schedule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_schedule(schedule, 0.1, steps_per_epoch=10, epochs=10)


def test_edge_schedule_options_are_accepted():
    assert make_schedule({"name": "step", "every": 2, "factor": 1}, 0.1, steps_per_epoch=2, epochs=4)(3) == 0.1
    half = make_schedule({"name": "cosine", "warmup_epochs": 0.5}, 0.1, steps_per_epoch=10, epochs=2)
    assert _rate(half, 5) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "options, message",
    [({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0. Received: learning_rate=nan"),
     ({"learning_rate": float("inf")}, "Received: learning_rate=inf"),
     ({"learning_rate": -0.1}, "Received: learning_rate=-0.1"),
     ({"learning_rate": True}, "Received: learning_rate=True"),
     ({"weight_decay": -0.5}, "weight_decay must be a finite number >= 0. Received: weight_decay=-0.5"),
     ({"weight_decay": float("nan")}, "Received: weight_decay=nan")],
)
def test_bad_optimizer_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_optimizer("sgd", **{"learning_rate": 0.1, **options}, steps_per_epoch=1, epochs=1)


@pytest.mark.parametrize(
    "override, message",
    [("schedule={name: step, every: 2.5}", "step every must be an integer >= 1 (epochs). Received: every=2.5"),
     ("schedule=[cosine]", "schedule must be one of ('constant', 'step', 'cosine', 'onecycle') or a dict with 'name'. "
                           "Received: schedule=['cosine']"),
     ("schedule={name: [step]}", "schedule must be one of ('constant', 'step', 'cosine', 'onecycle') or a dict with "
                                 "'name'. Received: schedule={'name': ['step']}")],
)
def test_cli_names_a_bad_schedule_option_in_one_line(tmp_path, monkeypatch, capsys, override, message):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "mnist_fc64", override, "epochs=1", "data=mnist-sample"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("cnnkit: error: ") and lines[-1].endswith(f"mnist_fc64.yaml: {message}")  # file named
    assert not any("Traceback" in line for line in lines) and not (tmp_path / "runs").exists()


def test_cosine_decays_to_zero_on_the_last_step_trained_and_warms_up():
    schedule = make_schedule("cosine", 0.1, steps_per_epoch=10, epochs=10)
    rates = np.array([_rate(schedule, step) for step in range(100)])  # Keras trains steps 0..99
    np.testing.assert_allclose(rates, 0.05 * (1 + np.cos(np.pi * np.arange(100) / 99)), rtol=1e-5, atol=1e-7)
    assert rates[99] == pytest.approx(0.0, abs=1e-7)
    warm = make_schedule({"name": "cosine", "warmup_epochs": 2}, 0.1, steps_per_epoch=10, epochs=10)
    assert _rate(warm, 0) == pytest.approx(0.001)
    assert _rate(warm, 20) == pytest.approx(0.1)
    assert _rate(warm, 99) == pytest.approx(0.0, abs=1e-7)


def test_onecycle_peaks_at_thirty_percent_and_ends_on_the_last_step_trained():
    schedule = make_schedule("onecycle", 1.0, steps_per_epoch=10, epochs=10)
    rates = np.array([_rate(schedule, step) for step in range(100)])  # Keras trains steps 0..99
    assert rates[0] == pytest.approx(1 / 25)
    assert rates.argmax() == 30 and rates.max() == pytest.approx(1.0)
    assert rates[99] == pytest.approx(1 / 25e4, rel=1e-3)
    assert _rate(make_schedule("onecycle", 1.0, steps_per_epoch=1, epochs=1), 0) == 1.0  # one step: at the peak
    assert [_rate(make_schedule("onecycle", 1.0, steps_per_epoch=1, epochs=3), step) for step in range(3)] == (
        pytest.approx([1 / 25, 1.0, 1 / 25e4]))


def test_schedule_options_are_checked():
    with pytest.raises(ValueError, match="unknown option 'every' for schedule 'cosine'"):
        make_schedule({"name": "cosine", "every": 3}, 0.1, steps_per_epoch=1, epochs=3)


@pytest.mark.parametrize(
    "name, kind, momentum",
    [("sgd", keras.optimizers.SGD, 0.0), ("momentum", keras.optimizers.SGD, 0.9),
     ("nesterov", keras.optimizers.SGD, 0.9), ("adam", keras.optimizers.Adam, None),
     ("adamw", keras.optimizers.AdamW, None), ("rmsprop", keras.optimizers.RMSprop, 0.9)],
)
def test_optimizers(name, kind, momentum):
    optimizer = make_optimizer(name, learning_rate=0.01, steps_per_epoch=1, epochs=1)
    assert type(optimizer) is kind
    if momentum is not None:
        assert optimizer.momentum == momentum
    assert getattr(optimizer, "nesterov", False) == (name == "nesterov")


@pytest.mark.parametrize("name", ["momentum", "nesterov", "rmsprop"])
def test_an_integer_momentum_is_taken_as_a_float(name):  # YAML's 0 and 1 are ints; Keras's SGD wants a float
    assert make_optimizer(name, learning_rate=0.01, momentum=0, steps_per_epoch=1, epochs=1).momentum == 0.0
    assert make_optimizer(name, learning_rate=0.01, momentum=1, steps_per_epoch=1, epochs=1).momentum == 1.0


@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan"), True, "0.9"])
def test_momentum_must_be_in_zero_to_one_and_a_recipe_is_refused_before_its_data_loads(momentum):
    message = re.escape(f"momentum must be a number in [0, 1]. Received: momentum={momentum!r}")
    with pytest.raises(ValueError, match=message):
        make_optimizer("momentum", learning_rate=0.01, momentum=momentum, steps_per_epoch=1, epochs=1)
    with pytest.raises(ValueError, match=message):
        check_options(optimizer="momentum", momentum=momentum)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_ema_turns_on_keras_weight_averaging(name):
    optimizer = make_optimizer(name, learning_rate=0.01, ema=0.999, steps_per_epoch=1, epochs=1)
    assert optimizer.use_ema and optimizer.ema_momentum == 0.999
    assert not make_optimizer(name, learning_rate=0.01, steps_per_epoch=1, epochs=1).use_ema


@pytest.mark.parametrize("ema", [0, 1, 1.5, True, "0.99"])
def test_ema_must_be_a_momentum(ema):
    with pytest.raises(ValueError, match=f"ema must be a momentum between 0 and 1.*Received: ema={ema!r}"):
        make_optimizer("adam", learning_rate=0.01, ema=ema, steps_per_epoch=1, epochs=1)


def test_weight_decay_skips_biases_and_batchnorm():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
    optimizer = make_optimizer("adamw", learning_rate=0.1, weight_decay=0.5, steps_per_epoch=1, epochs=1)
    optimizer.build(model.trainable_variables)
    decayed = {variable.name for variable in model.trainable_variables if optimizer._use_weight_decay(variable)}
    assert decayed == {"kernel"}


def test_resolve_precision(monkeypatch):
    assert resolve_precision("float32") == "float32"
    monkeypatch.setattr(optimization, "_fast_bfloat16", lambda: True)
    assert resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(optimization, "_fast_bfloat16", lambda: False)
    assert resolve_precision("auto") == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("bf16")


def test_cosine_cycles_restart_at_each_cycle_boundary():
    schedule = make_schedule({"name": "cosine", "cycles": 2}, 0.1, steps_per_epoch=10, epochs=4)
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecayRestarts)
    rates = np.array([_rate(schedule, step) for step in range(40)])
    assert rates[0] == pytest.approx(0.1) and rates[20] == pytest.approx(0.1)  # the restart
    assert rates[10] == pytest.approx(0.05, rel=1e-4) and rates[30] == pytest.approx(0.05, rel=1e-4)
    assert rates[19] < 0.001 and rates[39] < 0.001  # each cycle anneals nearly to zero
    assert np.all(np.diff(rates[:20]) < 0) and np.allclose(rates[:20], rates[20:])


def test_one_cosine_cycle_is_plain_cosine_decay():
    plain = make_schedule("cosine", 0.1, steps_per_epoch=10, epochs=4)
    single = make_schedule({"name": "cosine", "cycles": 1}, 0.1, steps_per_epoch=10, epochs=4)
    assert [_rate(single, step) for step in (0, 13, 39)] == [_rate(plain, step) for step in (0, 13, 39)]


@pytest.mark.parametrize("cycles", [0, 3, 2.0, True])
def test_cosine_cycles_must_divide_epochs(cycles):
    with pytest.raises(ValueError, match=f"cosine cycles must be an integer >= 1 that divides epochs \\(4\\).*"
                                         f"Received: cycles={cycles!r}"):
        make_schedule({"name": "cosine", "cycles": cycles}, 0.1, steps_per_epoch=10, epochs=4)


def test_cosine_cycles_take_no_warmup():
    with pytest.raises(ValueError, match="take no warmup_epochs"):
        make_schedule({"name": "cosine", "cycles": 2, "warmup_epochs": 1}, 0.1, steps_per_epoch=10, epochs=4)
    with pytest.raises(ValueError, match="take no warmup_epochs"):  # a warmup shorter than a step too
        make_schedule({"name": "cosine", "cycles": 2, "warmup_epochs": 0.05}, 0.1, steps_per_epoch=10, epochs=4)


def test_a_warmup_shorter_than_a_step_still_warms_up():
    schedule = make_schedule({"name": "cosine", "warmup_epochs": 0.2}, 1.0, steps_per_epoch=3, epochs=4)
    assert _rate(schedule, 0) == pytest.approx(0.01)  # starts at lr / 100, as a whole-epoch warmup does
    assert _rate(schedule, 1) == pytest.approx(1.0)


def test_a_step_the_loss_scaling_skips_still_counts_for_the_schedule(tmp_path):
    # Uniform outputs, and gradients (about 670) that overflow float16 at every loss scale from 2**15 down
    # to 128: Keras skips each of the 8 steps and halves the scale
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, kernel_initializer="zeros", dtype="mixed_float16"),
                              keras.layers.Activation("softmax", dtype="float32")])
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3], [0.1, 0.01])
    optimizer = optimization.loss_scaled(keras.optimizers.SGD(schedule), "mixed_float16")
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    x = np.full((64, 4), 1000.0, np.float32)
    model.fit(x, np.zeros(64, int), batch_size=8, epochs=1, verbose=0)
    assert float(optimizer.dynamic_scale.numpy()) == 128.0 and not model.layers[0].kernel.numpy().any()
    assert int(optimizer.iterations.numpy()) == 8 and float(optimizer.learning_rate.numpy()) == pytest.approx(0.01)
    model.save(tmp_path / "model.keras")  # the class stays Keras's: it loads without cnnkit's names
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert config["compile_config"]["optimizer"]["class_name"] == "LossScaleOptimizer"
