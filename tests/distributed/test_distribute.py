"""cnnkit.distribute in one process: naming strategies, the global batch, sharding, the recipe decorator."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import cnnkit
from cnnkit import distribute


def _tiny_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (64, 8, 8), dtype=np.uint8)
    y = np.arange(64) % 2
    x[y == 1, :4] += 150
    return cnnkit.data.from_arrays(x, y, x_test=x[:16], y_test=y[:16], val_split=0.25)


def test_auto_is_one_device_here_and_the_chief_writes():
    strategy = distribute.get_strategy("auto")
    assert strategy is tf.distribute.get_strategy()
    assert distribute.is_chief(strategy)
    assert distribute.describe(strategy) == {"strategy": "default (one device)", "replicas": 1, "workers": 1}


def test_auto_inside_a_scope_is_that_strategy():
    mirrored = distribute.get_strategy("mirrored")
    with mirrored.scope():
        assert distribute.get_strategy("auto") is mirrored
    assert distribute.get_strategy("mirrored") is mirrored  # made once per process


def test_bad_names_and_a_missing_cluster_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="Received: strategy='ring'"):
        distribute.get_strategy("ring")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.get_strategy("multi_worker")


@pytest.mark.parametrize("config, problem", [
    ("null", 'is not a JSON object with "cluster" and "task"'),
    ("[]", 'is not a JSON object with "cluster" and "task"'),
    ("{}", 'has no "cluster" key'),
    ('{"clusters": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 0}}', 'has no "cluster" key'),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', 'has no "cluster" key'),
    ('{"cluster": {"worker": ["h:1", "h:2"]}}', 'has no "task" key'),
    ('{"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker"}}', 'has no "index" key in its "task"'),
])
def test_a_tf_config_without_a_cluster_or_task_is_refused(monkeypatch, config, problem):
    # TensorFlow would make a cluster of one of each: every host training alone, as its chief.
    monkeypatch.setenv("TF_CONFIG", config)
    with pytest.raises(ValueError, match=f"TF_CONFIG {problem}.*Received: TF_CONFIG='{re.escape(config)}'"):
        distribute.get_strategy("multi_worker")


def test_multi_worker_after_tensorflow_started_says_to_create_it_first(monkeypatch):
    tf.constant(1.0) + 1  # TensorFlow has run something in this process
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    with pytest.raises(RuntimeError, match=r"get_strategy\('multi_worker'\) first thing"):
        distribute.get_strategy("multi_worker")


def test_the_global_batch_splits_evenly_and_the_rate_scales_only_when_asked():
    four = types.SimpleNamespace(num_replicas_in_sync=4)
    assert distribute.learning_rate_scale(128, False, strategy=four) == 1
    assert distribute.learning_rate_scale(128, True, strategy=four) == 4
    with pytest.raises(ValueError, match="multiple of 4. Received: batch_size=30"):
        distribute.learning_rate_scale(30, strategy=four)


def test_shard_sets_data_sharding():
    assert distribute.shard(None) is None
    dataset = distribute.shard(tf.data.Dataset.range(8).batch(4))
    assert dataset.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.DATA
    assert [batch.tolist() for batch in dataset.as_numpy_iterator()] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_train_under_mirrored_records_the_strategy(tmp_path):
    run = cnnkit.recipes.train("4C3-MP2-FC8", _tiny_data(), strategy="mirrored", scale_learning_rate=True, epochs=1,
                               batch_size=16, precision="float32", run_dir=tmp_path / "run", verbose=0)
    assert run.config["distribution"] == {"strategy": "MirroredStrategy", "replicas": 1, "workers": 1}
    assert run.config["arguments"]["strategy"] == "mirrored"
    assert run.model.distribute_strategy is distribute.get_strategy("mirrored")
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_finetune_and_ensemble_train_under_the_strategy(tmp_path):
    data, mirrored = _tiny_data(), distribute.get_strategy("mirrored")
    cnnkit.recipes.train("4C3-MP2-FC8", data, epochs=1, batch_size=16, precision="float32",
                         run_dir=tmp_path / "base", verbose=0)
    tuned = cnnkit.recipes.finetune(tmp_path / "base", data, strategy="mirrored", batch_size=16, precision="float32",
                                    stages=[{"unfreeze": "all", "epochs": 1, "learning_rate": 1e-3}],
                                    run_dir=tmp_path / "tuned", verbose=0)
    assert tuned.model.distribute_strategy is mirrored
    assert tuned.config["distribution"]["strategy"] == "MirroredStrategy"
    members = cnnkit.recipes.ensemble(2, data, arch="4C3-MP2-FC8", strategy=mirrored, run_dir=tmp_path / "ensemble",
                                      train_options={"epochs": 1, "batch_size": 16, "precision": "float32"}, verbose=0)
    assert members.config["arguments"]["strategy"] == "MirroredStrategy"
    member = cnnkit.load(tmp_path / "ensemble" / "members" / "1")
    assert member.config["distribution"]["strategy"] == "MirroredStrategy"  # members inherit the ensemble's
    with pytest.raises(ValueError, match="may not set 'strategy'"):
        cnnkit.recipes.ensemble(2, data, arch="4C3-MP2-FC8", train_options={"strategy": "mirrored"})


def test_a_model_built_outside_the_strategy_scope_is_refused(tmp_path):
    model = cnnkit.build("FC4", (8, 8, 1), 2)
    with pytest.raises(ValueError, match="built outside the scope"):
        cnnkit.recipes.train(model, _tiny_data(), strategy="mirrored", epochs=1, run_dir=tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()
    with distribute.get_strategy("mirrored").scope():
        inside = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                                   keras.layers.Dense(2, activation="softmax")])
    run = cnnkit.recipes.train(inside, _tiny_data(), strategy="mirrored", epochs=1, batch_size=16,
                               run_dir=tmp_path / "run", verbose=0)
    assert run.metrics["epochs_run"] == 1


# Two logical CPUs must be configured before TensorFlow initialises, hence a fresh process.
MIRRORED_VS_ONE_DEVICE = """
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import cnnkit

rng = np.random.default_rng(0)
x = rng.integers(0, 255, (79, 8, 8, 1), dtype=np.uint8)
y = np.arange(79) % 3
x[y == 1] //= 2
data = cnnkit.data.from_arrays(x, y, x_test=x[:20], y_test=y[:20], val_split=0.25)
result = {"sizes": data.sizes}
for name, strategy in (("one", "auto"), ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    run = cnnkit.recipes.train("4C3-FC8", data, epochs=2, batch_size=16, optimizer="sgd", learning_rate=0.05,
                               precision="float32", strategy=strategy, run_dir=f"{sys.argv[1]}/{name}", verbose=0,
                               report=False)
    result[name] = {"steps_per_execution": run.config["arguments"]["steps_per_execution"],
                    "replicas": run.config["distribution"]["replicas"], "val_loss": run.history["val_loss"],
                    "weights": [w.numpy().ravel().tolist() for w in run.model.trainable_variables]}
print(json.dumps(result))
"""


def test_train_over_two_replicas_with_an_odd_validation_split_matches_one_device(tmp_path):
    # Keras 3.15 alone fails here: its build averages the first validation batch of 21 over the
    # replicas (11 vs 10 images), and its multi-step loop (steps_per_execution=16) cannot run.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    env.pop("TF_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", MIRRORED_VS_ONE_DEVICE, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])
    # 58 training images in batches of 16, 16, 16, 10: every batch splits evenly over 2 replicas.
    assert result["sizes"] == {"train": 58, "val": 21, "test": 20}
    one, two = result["one"], result["two"]
    assert (one["replicas"], one["steps_per_execution"]) == (1, 16)
    assert (two["replicas"], two["steps_per_execution"]) == (2, 1)  # forced to one step per call
    for a, b in zip(one["weights"], two["weights"], strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-4)
