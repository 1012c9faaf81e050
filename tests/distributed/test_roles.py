"""Distributed search pieces in one process: roles, the CLI flags, and the chief's oracle requeueing lost trials."""

import json
import os
import threading

import keras_tuner as kt
import pytest

from cnnkit.cli import main
from cnnkit.config import validate_kwargs
from cnnkit.tuner import distributed, search
from cnnkit.tuner.tuning import _make_oracle

KT_VARIABLES = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


@pytest.fixture(autouse=True)
def no_keras_tuner_environment(monkeypatch):
    for name in KT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_roles_from_arguments_and_from_keras_tuner_variables(monkeypatch):
    assert distributed.resolve_role() == (None, {})
    assert distributed.resolve_role("chief") == ("chief", {"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP":
                                                           "127.0.0.1", "KERASTUNER_ORACLE_PORT": "8000"})
    role, variables = distributed.resolve_role("worker", "10.1.2.3:9000")
    assert role == "worker" and variables["KERASTUNER_ORACLE_PORT"] == "9000"
    assert variables["KERASTUNER_TUNER_ID"].endswith(f"-{os.getpid()}")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner7")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "10.0.0.9")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8123")
    assert distributed.resolve_role() == ("worker", {"KERASTUNER_TUNER_ID": "tuner7", "KERASTUNER_ORACLE_IP":
                                                     "10.0.0.9", "KERASTUNER_ORACLE_PORT": "8123"})


@pytest.mark.parametrize("arguments, match", [
    ({"role": "boss"}, "Received: role='boss'"),
    ({"role": "worker", "oracle_address": "localhost"}, "HOST:PORT"),
    ({"role": "worker", "oracle_address": "h:99999"}, "HOST:PORT"),
    ({"role": "worker", "worker_id": "chief-2"}, "without 'chief'"),
    ({"role": "chief", "worker_id": "w1"}, "the chief is 'chief'"),
    ({"oracle_address": "h:1"}, "give role="),
    ({"role": "worker", "oracle_address": " :8000"}, "HOST:PORT"),
    ({"role": "chief", "oracle_address": "[::1]:8000"},
     r"cannot be an IPv6 address.*never reach the chief.*Received: oracle_address='\[::1\]:8000'$"),
    ({"role": "worker", "worker_id": ""}, "non-empty name without 'chief'.*Received: worker_id=''$"),
    ({"role": "worker", "worker_id": 0}, "non-empty name without 'chief'.*Received: worker_id=0$"),
])
def test_bad_roles_are_refused(arguments, match):
    with pytest.raises(ValueError, match=match):
        distributed.resolve_role(**arguments)


@pytest.mark.parametrize("variables, arguments, match", [
    ({"KERASTUNER_ORACLE_IP": "10.0.0.5", "KERASTUNER_TUNER_ID": "gpu1"}, {},
     "KERASTUNER_ORACLE_IP is set but KERASTUNER_ORACLE_PORT is not.*Received: KERASTUNER_ORACLE_IP='10.0.0.5'$"),
    ({"KERASTUNER_ORACLE_PORT": "9000"}, {"role": "chief"},
     "KERASTUNER_ORACLE_PORT is set but KERASTUNER_ORACLE_IP is not.*Received: KERASTUNER_ORACLE_PORT='9000'$"),
    ({"KERASTUNER_TUNER_ID": "chief"}, {"role": "worker"},
     r"without 'chief'.*Received: KERASTUNER_TUNER_ID='chief' \(from the environment\)$"),
    ({"KERASTUNER_TUNER_ID": "w1", "KERASTUNER_ORACLE_IP": "::1", "KERASTUNER_ORACLE_PORT": "8000"}, {},
     r"cannot be an IPv6 address.*Received: KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT='::1:8000' \(from the "),
])
def test_bad_keras_tuner_variables_are_refused_naming_them(monkeypatch, variables, arguments, match):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        distributed.resolve_role(**arguments)


def test_the_environment_is_restored():
    with distributed.environment({"KERASTUNER_TUNER_ID": "w1", "KERASTUNER_ORACLE_IP": "h"}):
        assert os.environ["KERASTUNER_TUNER_ID"] == "w1"
    assert not any(name in os.environ for name in KT_VARIABLES)


def test_cli_flags_become_search_arguments(monkeypatch):
    seen = {}

    def fake_run(recipe):
        seen.update(recipe.kwargs)
        raise KeyboardInterrupt  # stop before anything runs

    monkeypatch.setattr("cnnkit.cli._run_recipe", fake_run)
    code = main(["tune", "mnist_conv", "max_trials=2", "--role", "worker", "--oracle-address", "10.0.0.5:8001",
                 "--worker-id", "gpu1", "--worker-timeout", "30"])
    assert code == 130
    assert {key: seen[key] for key in ("role", "oracle_address", "worker_id", "worker_timeout", "max_trials")} == {
        "role": "worker", "oracle_address": "10.0.0.5:8001", "worker_id": "gpu1", "worker_timeout": 30.0,
        "max_trials": 2}
    validate_kwargs(search, seen)
    assert main(["tune", "mnist_conv", "--role", "boss"]) == 2


def _chief_oracle(tmp_path, max_trials=3):
    oracle = _make_oracle("random", objective="val_accuracy", max_trials=max_trials, epochs=1, factor=3,
                          hyperband_iterations=1, seed=0, max_consecutive_failed_trials=3)
    oracle._set_project_dir(str(tmp_path), "keras_tuner")
    space = kt.HyperParameters()
    space.Choice("f", [2, 4, 8])
    space.Choice("units", [4, 8])
    oracle.update_space(space)
    oracle.distributed = True
    return oracle


def _finish(oracle, trial_id, score=0.5):
    oracle.update_trial(trial_id, {"val_accuracy": score})
    trial = kt.engine.trial.Trial(oracle.trials[trial_id].hyperparameters, trial_id=trial_id, status="COMPLETED")
    oracle.end_trial(trial)


def test_a_silent_workers_trial_goes_to_the_next_worker_and_is_recorded_once(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(distributed.time, "monotonic", lambda: clock[0])
    ended = []
    oracle = _chief_oracle(tmp_path)
    oracle.trial_ended = ended.append
    lost = oracle.create_trial("a")
    kept = oracle.create_trial("b")
    assert (lost.trial_id, kept.trial_id) == ("0", "1")

    clock[0] += 8
    oracle.get_trial("1")  # b's heartbeat; a stays silent
    assert oracle.requeue_lost(10) == []
    clock[0] += 4
    assert oracle.requeue_lost(10) == ["0"]
    assert oracle.tuner_ids == {"b"} and list(oracle.ongoing_trials) == ["b"]

    _finish(oracle, "1")
    again = oracle.create_trial("b")
    assert again.trial_id == "0" and again.hyperparameters.values == lost.hyperparameters.values
    last = oracle.create_trial("c")
    assert last.trial_id == "2"
    # The budget is spent but trials still run: a worker asking waits, it is not stopped.
    assert oracle.create_trial("d").status == "IDLE" and "d" in oracle.tuner_ids

    _finish(oracle, "0", score=0.9)
    _finish(oracle, "0", score=0.1)  # a's late report of the same trial: dropped
    _finish(oracle, "2")
    assert ended == ["1", "0", "2"] and oracle.trials["0"].score == 0.9
    assert len({tuple(sorted(trial.hyperparameters.values.items())) for trial in oracle.trials.values()}) == 3
    for tuner_id in ("b", "c", "d"):
        assert oracle.create_trial(tuner_id).status == "STOPPED"
    assert oracle.finished()


def test_a_lost_worker_that_reports_after_all_is_accepted(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(distributed.time, "monotonic", lambda: clock[0])
    oracle = _chief_oracle(tmp_path, max_trials=1)
    oracle.create_trial("a")
    clock[0] += 100
    assert oracle.requeue_lost(10) == ["0"]
    _finish(oracle, "0", score=0.7)  # before anyone took it over
    assert oracle.trials["0"].status == "COMPLETED" and oracle._retry_queue == []
    assert oracle.create_trial("a").status == "STOPPED" and oracle.finished()


def test_failures_in_a_row_stop_every_worker_with_the_workers_messages(tmp_path):
    oracle = _chief_oracle(tmp_path, max_trials=6)
    trials = [oracle.create_trial(tuner_id) for tuner_id in ("a", "b", "c", "d")]
    for trial in trials[:3]:
        record = tmp_path / "keras_tuner" / f"trial_{trial.trial_id}" / "cnnkit.json"
        record.write_text(json.dumps({"seconds": 1.0, "message": f"Traceback ...\nRuntimeError: boom {trial.trial_id}"}))
        oracle.end_trial(kt.engine.trial.Trial(trial.hyperparameters, trial_id=trial.trial_id, status="FAILED"))
    assert "consecutive failures" in oracle.stop_reason and "boom 2" in oracle.stop_reason
    assert oracle.trials["0"].message.endswith("boom 0")  # the message came through the worker's record
    assert oracle.create_trial("a").status == "STOPPED"
    assert oracle.create_trial("d").trial_id == "3"  # a running trial is still its worker's to finish
    _finish(oracle, "3")
    assert [oracle.create_trial(tuner_id).status for tuner_id in "bcd"] == ["STOPPED"] * 3
    assert oracle.finished()


def test_a_second_chief_cannot_listen_on_the_first_ones_port(free_ports):
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    address = f"127.0.0.1:{free_ports(1)[0]}"
    first = distributed.bound_server(OracleServicer(None), address)
    first.start()
    try:
        with pytest.raises(OSError, match=f"the chief cannot listen on {address} \\(in use, maybe by another chief"):
            distributed.bound_server(OracleServicer(None), address)
    finally:
        first.stop(grace=None).wait()


def test_a_call_that_raises_inside_the_oracle_releases_its_lock(tmp_path):
    oracle = _chief_oracle(tmp_path)
    served = distributed._ReleasingLock(oracle)  # as the chief's gRPC servicer calls it
    with pytest.raises(KeyError):
        served.update_trial("no such trial", {"val_accuracy": 0.5})  # inside keras_tuner.synchronized
    other = threading.Thread(target=oracle.create_trial, args=("b",))  # another worker's call, another thread
    other.start()
    other.join(timeout=10)
    assert not other.is_alive() and list(oracle.ongoing_trials) == ["b"]


def test_a_worker_started_before_its_chief_waits_for_the_settings_and_refuses_others(tmp_path, capsys):
    from cnnkit.runs import atomic_write_text
    from cnnkit.tuner.tuning import SETTINGS_FILE, _prepare_directory

    chief = threading.Timer(0.5, lambda: atomic_write_text(  # as the chief writes it: the worker never sees it half-written
        tmp_path / SETTINGS_FILE, "settings: {epochs: 1, seed: 0, distributed: true}\n"))
    chief.start()
    with pytest.raises(ValueError, match="holds a search with epochs=1; this call has epochs=3"):
        _prepare_directory(tmp_path, {"epochs": 3, "seed": 0, "distributed": True}, overwrite=False, max_trials=4,
                           source="x", write=False)
    chief.join()
    assert f"worker: waiting for the chief to write {tmp_path / SETTINGS_FILE}" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == [SETTINGS_FILE]  # a worker writes nothing


def test_a_worker_gives_up_waiting_for_its_chief_with_the_path_named(tmp_path, monkeypatch):
    from cnnkit.tuner import tuning

    monkeypatch.setattr(tuning, "WORKER_WAIT_SECONDS", 0.3)
    with pytest.raises(TimeoutError, match=f"no chief wrote {tmp_path / 'search.yaml'} in 0.3 s: start the chief"):
        tuning._prepare_directory(tmp_path, {"epochs": 1}, overwrite=False, max_trials=4, source="x", write=False,
                                  verbose=0)


def test_a_chiefs_search_of_an_earlier_cnnkit_is_known_by_its_keras_tuner_files(tmp_path):
    from cnnkit.tuner.tuning import SETTINGS_FILE, _prepare_directory

    (tmp_path / SETTINGS_FILE).write_text("settings: {epochs: 1}\n")  # written before `distributed` was recorded
    (tmp_path / "keras_tuner").mkdir()
    (tmp_path / "keras_tuner" / "chief.json").write_text("{}")
    for write in (False, True):  # a worker, then the chief
        _prepare_directory(tmp_path, {"epochs": 1, "distributed": True}, overwrite=False, max_trials=4, source="x",
                           write=write, verbose=0)
    (tmp_path / SETTINGS_FILE).write_text("settings: {epochs: 1}\n")
    with pytest.raises(ValueError, match="holds a search with a chief and workers; this call has one process"):
        _prepare_directory(tmp_path, {"epochs": 1}, overwrite=False, max_trials=4, source="x", verbose=0)
