"""A search killed with SIGKILL in the middle of a trial resumes with the same command (random and grid)."""

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

work, algorithm = Path(sys.argv[1]), sys.argv[2]


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
if algorithm == "grid":  # k=9 does not fit the 8x8 input: two invalid trials in the grid
    space = {"arch": "{f}C{k}-MP2-FC4", "hyperparameters": {"f": [2, 4], "k": [3, 9, 5], "learning_rate": 0.05}}
else:
    space = {"arch": "{f}C3-MP2-FC{units}", "hyperparameters": {"f": [2, 4], "units": [4, 8], "learning_rate": 0.05}}
result = cnnkit.tuner.search(space, data, algorithm=algorithm, max_trials=4 if algorithm == "random" else None,
                             epochs=1, precision="float32", verbose=0, directory=work / "search",
                             callbacks=[BlockThirdTraining()])
print("done", len(result.trials))
'''


def _trials(directory):
    trials = {}
    for path in sorted((directory / "keras_tuner").glob("trial_*/trial.json")):
        state = json.loads(path.read_text())
        trials[state["trial_id"]] = (state["status"], state["score"], state["hyperparameters"]["values"])
    return trials


def _kill_in_third_training(tmp_path, algorithm):
    """Run the search until its third training starts, SIGKILL it; the command and env to run it again."""
    script = tmp_path / "search.py"
    script.write_text(SCRIPT)
    (tmp_path / "block").write_text("")
    command = [sys.executable, str(script), str(tmp_path), algorithm]
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
    (tmp_path / "block").unlink()
    return command, env


def test_sigkill_mid_trial_then_the_same_command_finishes_the_search(tmp_path):
    command, env = _kill_in_third_training(tmp_path, "random")
    before = _trials(tmp_path / "search")
    assert {trial_id: state[0] for trial_id, state in before.items()} == {
        "0": "COMPLETED", "1": "COMPLETED", "2": "RUNNING"}

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


def test_sigkill_mid_trial_of_a_grid_search_then_the_same_command_trains_the_rest_of_the_grid(tmp_path):
    # Keras Tuner's grid oracle kept its place in the grid in memory only: the resumed search
    # reran the interrupted trial, then failed (KeyError), and a further resume stopped early.
    command, env = _kill_in_third_training(tmp_path, "grid")
    before = _trials(tmp_path / "search")
    assert [(state[0], state[2]["f"], state[2]["k"]) for _, state in sorted(before.items())] == [
        ("COMPLETED", 2, 3), ("INVALID", 2, 9), ("COMPLETED", 2, 5), ("RUNNING", 4, 3)]

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    after = _trials(tmp_path / "search")
    combinations = sorted((state[2]["f"], state[2]["k"], state[0]) for state in after.values())
    # the uninterrupted search's grid: every combination once, those with k=9 invalid (not trained)
    assert combinations == [(f, k, "INVALID" if k == 9 else "COMPLETED") for f in (2, 4) for k in (3, 5, 9)]
    assert int((tmp_path / "trainings").read_text()) == 3 + 2  # the second run trained (4, 3) again and (4, 5)
    assert "done 6" in finished.stdout

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "done 6" in again.stdout, again.stdout + again.stderr
    assert _trials(tmp_path / "search") == after and int((tmp_path / "trainings").read_text()) == 5


def _oracle(tmp_path):
    """A random-search oracle over 12 combinations, its state in ``tmp_path`` (reloaded from there if it is)."""
    import keras_tuner as kt

    from cnnkit.tuner.tuning import _make_oracle

    oracle = _make_oracle("random", objective="val_accuracy", max_trials=4, epochs=1, factor=3, hyperband_iterations=1,
                          seed=0, max_consecutive_failed_trials=3)
    oracle._set_project_dir(str(tmp_path), "keras_tuner")
    if (tmp_path / "keras_tuner" / "oracle.json").exists():
        oracle.reload()
    else:
        space = kt.HyperParameters()
        space.Choice("f", [2, 4, 8, 16])
        space.Choice("units", [4, 8, 16])
        oracle.update_space(space)
    return oracle


def test_a_kill_between_a_new_trials_file_and_the_oracles_state_proposes_that_trial_again(tmp_path):
    first = _oracle(tmp_path)
    first.create_trial("tuner0")
    state = (tmp_path / "keras_tuner" / "oracle.json").read_text()
    orphan = first.create_trial("tuner1")  # its trial.json written ...
    (tmp_path / "keras_tuner" / "oracle.json").write_text(state)  # ... and killed before the oracle's state
    resumed = _oracle(tmp_path)
    assert sorted(resumed.trials) == ["0"] and resumed._retry_queue == ["0"]
    assert resumed.create_trial("tuner0").trial_id == "0"  # the interrupted trial first
    again = resumed.create_trial("tuner1")
    assert again.trial_id == orphan.trial_id == "1" and again.hyperparameters.values == orphan.hyperparameters.values


def test_an_ended_trial_is_not_run_again_after_a_reload(tmp_path):
    import keras_tuner as kt

    first = _oracle(tmp_path)
    trial = first.create_trial("tuner0")
    first.update_trial(trial.trial_id, {"val_accuracy": 0.5})
    first.end_trial(kt.engine.trial.Trial(trial.hyperparameters, trial_id=trial.trial_id, status="COMPLETED"))
    resumed = _oracle(tmp_path)  # Keras Tuner saved its state with the ended trial still running
    assert resumed._retry_queue == [] and resumed.trials["0"].status == "COMPLETED"
    assert resumed.create_trial("tuner0").trial_id == "1"
