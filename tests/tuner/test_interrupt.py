"""A search killed with SIGKILL in the middle of a trial resumes with the same command."""

import json
import os
import signal
import subprocess
import sys
import time

SCRIPT = '''
import sys, time
from pathlib import Path

import keras
import numpy as np

import cnnkit

work = Path(sys.argv[1])


class BlockThirdTraining(keras.callbacks.Callback):
    """Counts trainings in a file; the third one blocks while the file 'block' exists."""

    def on_train_begin(self, logs=None):
        counter = work / "trainings"
        count = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(count))
        if count == 3 and (work / "block").exists():
            (work / "blocked").write_text("")
            time.sleep(600)


rng = np.random.default_rng(0)
x = rng.integers(0, 100, (64, 8, 8), dtype=np.uint8)
y = np.arange(64) % 2
x[y == 1, :4] += 150
data = cnnkit.data.from_arrays(x, y, val_split=0.25)
space = {"arch": "{f}C3-MP2-FC{units}", "hyperparameters": {"f": [2, 4], "units": [4, 8], "learning_rate": 0.05}}
result = cnnkit.tuner.search(space, data, max_trials=4, epochs=1, precision="float32", verbose=0,
                             directory=work / "search", callbacks=[BlockThirdTraining()])
print("done", len(result.trials))
'''


def _trials(directory):
    trials = {}
    for path in sorted((directory / "keras_tuner").glob("trial_*/trial.json")):
        state = json.loads(path.read_text())
        trials[state["trial_id"]] = (state["status"], state["score"], state["hyperparameters"]["values"])
    return trials


def test_sigkill_mid_trial_then_the_same_command_finishes_the_search(tmp_path):
    script = tmp_path / "search.py"
    script.write_text(SCRIPT)
    (tmp_path / "block").write_text("")
    command = [sys.executable, str(script), str(tmp_path)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "blocked").exists():
        assert process.poll() is None, f"the search ended before the third training:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "the third training never started"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()

    before = _trials(tmp_path / "search")
    assert {trial_id: state[0] for trial_id, state in before.items()} == {
        "0": "COMPLETED", "1": "COMPLETED", "2": "RUNNING"}

    (tmp_path / "block").unlink()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "done 4" in finished.stdout
    after = _trials(tmp_path / "search")
    assert sorted(after) == ["0", "1", "2", "3"]
    assert all(status == "COMPLETED" for status, _, _ in after.values())
    assert after["0"] == before["0"] and after["1"] == before["1"]  # completed trials kept as they were
    assert after["2"][2] == before["2"][2]  # the interrupted trial ran again with its values
    assert int((tmp_path / "trainings").read_text()) == 3 + 2  # the second run trained trials 2 and 3 only
    rows = (tmp_path / "search" / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
