"""Two workers on localhost train with MultiWorkerMirroredStrategy like one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml


def test_two_workers_match_one_process_and_only_the_chief_writes(tmp_path, processes, free_ports, train_worker):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.start(f"worker{index}", ["train_worker.py", str(tmp_path)], TF_CONFIG=config, TMPDIR=scratch)
    train_worker.train_and_record(tmp_path, "single", strategy="auto", run_dir=tmp_path / "single")  # meanwhile, in this process
    assert processes.wait_all(timeout=150) == {"worker0": 0, "worker1": 0}, processes.logs()

    chief, other, single = (json.loads((tmp_path / f"result-{task}.json").read_text()) for task in (0, 1, "single"))
    assert chief["run_dir"] == str(tmp_path / "run") and other["run_dir"] is None
    assert chief["distribution"] == {"strategy": "MultiWorkerMirroredStrategy", "replicas": 2, "workers": 2,
                                     "task": "worker:0"}
    # The same global batch of 32, split 16 + 16, sums to the same gradients as one process.
    for result in (chief, other):
        np.testing.assert_allclose(result["history"]["loss"], single["history"]["loss"], rtol=1e-4)
        np.testing.assert_allclose(result["history"]["val_loss"], single["history"]["val_loss"], rtol=1e-4)
        assert result["metrics"] == single["metrics"]
    weights = [np.load(tmp_path / f"result-{task}.npz") for task in (0, 1, "single")]
    for name in weights[2].files:
        np.testing.assert_array_equal(weights[0][name], weights[1][name])
        np.testing.assert_allclose(weights[0][name], weights[2][name], atol=1e-5)

    # Exactly one run directory from the two workers, the chief's, complete; the other's scratch copy is gone.
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["run", "single", "tmp"]
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "model.keras").is_file()
    assert not (tmp_path / "run" / "backup").exists()
    assert list(scratch.glob("cnnkit-worker-*")) == []  # (TensorFlow's autograph may leave __pycache__)


def test_the_cli_runs_a_recipe_under_multi_worker(tmp_path, free_ports):
    # `cnnkit run ... strategy=multi_worker` as docs/SCALING.md shows it, on a cluster of one worker (no one to wait
    # for): the strategy has to exist before the recipe's checks start TensorFlow (they build the optimizer).
    config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{free_ports(1)[0]}"]}, "task": {"type": "worker", "index": 0}})
    env = {**os.environ, "TF_CONFIG": config, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "cnnkit", "run", "mnist_fc64", "data=mnist-sample", "epochs=1",
                           "batch_size=512", "strategy=multi_worker", f"run_dir={tmp_path / 'run'}", "report=false",
                           "verbose=0"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["distribution"] == {"strategy": "MultiWorkerMirroredStrategy", "replicas": 1, "workers": 1,
                                        "task": "worker:0"}
    assert (tmp_path / "run" / "model.keras").is_file()
