"""A search served by a chief to two workers on localhost: every trial once, even when a worker is killed."""

import csv
import os
import signal


def _start(processes, tmp_path, port, *, kill=False):
    search, address = str(tmp_path / "search"), f"127.0.0.1:{port}"
    # Lost after 3 s of silence when a worker is to be killed; long enough never to happen otherwise.
    timeout = {"TUNE_WORKER_TIMEOUT": 3 if kill else 30}
    processes.start("chief", ["tune_worker.py", search, "chief", address], **timeout)
    processes.start("wa", ["tune_worker.py", search, "worker", address, "wa", *(["--block"] if kill else [])], **timeout)
    processes.start("wb", ["tune_worker.py", search, "worker", address, "wb", *(["--after-block"] if kill else [])],
                    **timeout)


def _check_search(tmp_path, processes):
    """The chief's trials.csv: the 4 requested trials, each completed, no two alike."""
    with open(tmp_path / "search" / "trials.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["trial_id"] for row in rows] == ["0", "1", "2", "3"], processes.logs()
    assert {row["status"] for row in rows} == {"COMPLETED"}
    assert len({(row["f"], row["units"]) for row in rows}) == 4
    assert (tmp_path / "search" / "best_recipe.yaml").is_file()
    assert "done chief 4 ['COMPLETED', 'COMPLETED', 'COMPLETED', 'COMPLETED']" in processes.log("chief")


def _trainings(tmp_path, worker):
    return len(list(tmp_path.glob(f"trained-{worker}-*")))


def test_chief_and_two_workers_run_each_trial_once(tmp_path, processes, free_ports):
    _start(processes, tmp_path, free_ports(1)[0])
    assert processes.wait_all(timeout=150) == {"chief": 0, "wa": 0, "wb": 0}, processes.logs()
    _check_search(tmp_path, processes)
    assert _trainings(tmp_path, "wa") + _trainings(tmp_path, "wb") == 4  # no trial trained twice
    for worker in ("wa", "wb"):
        assert "done worker 4" in processes.log(worker)
    assert "silent" not in processes.log("chief")


def test_a_worker_killed_mid_trial_has_its_trial_finished_by_the_other(tmp_path, processes, free_ports):
    _start(processes, tmp_path, free_ports(1)[0], kill=True)
    processes.wait_for(lambda: (tmp_path / "blocked-wa").exists(), timeout=120, what="worker wa's first training")
    os.kill(processes.running["wa"].pid, signal.SIGKILL)

    assert processes.wait("chief", timeout=120) == 0, processes.logs()
    assert processes.wait("wb", timeout=30) == 0, processes.logs()
    _check_search(tmp_path, processes)
    assert "search: worker 'wa' silent for 3 s" in processes.log("chief")
    assert _trainings(tmp_path, "wa") == 1 and _trainings(tmp_path, "wb") == 4  # wb also ran wa's lost trial
