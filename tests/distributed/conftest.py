"""Starting and stopping the helper processes of the distributed tests (fixtures ``processes``, ``free_ports``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def find_free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on localhost (bound to port 0, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def environment(**extra) -> dict:
    """The environment of a helper process: CPU only, quiet TensorFlow, this checkout importable."""
    root = str(HERE.parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path,
           "PYTHONUNBUFFERED": "1"}
    for name in ("TF_CONFIG", "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        env.pop(name, None)
    env.update({key: str(value) for key, value in extra.items()})
    return env


class Processes:
    """Helper processes, each logging to a file; all are killed when the block ends.

    Example:
        >>> with Processes(tmp_path) as processes:  # doctest: +SKIP
        ...     processes.start("w0", ["train_worker.py", str(tmp_path)], TF_CONFIG=...)
        ...     processes.wait_all(timeout=120)
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.running: dict[str, subprocess.Popen] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for process in self.running.values():
            if process.poll() is None:
                process.kill()
            process.wait()
        return False

    def start(self, name: str, arguments: list[str], **env) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "w")  # noqa: SIM115  (closed by the child's exit)
        process = subprocess.Popen([sys.executable, str(HERE / arguments[0]), *arguments[1:]], env=environment(**env),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        log.close()
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"----- {name}\n{self.log(name)[-4000:]}" for name in self.running)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.running[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish in {timeout} s\n{self.logs()}") from None

    def wait_all(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        return {name: self.wait(name, max(0.1, deadline - time.monotonic())) for name in self.running}

    def wait_for(self, condition, timeout: float, what: str):
        """Poll ``condition()`` until true; fail if it times out or every process has ended."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen in {timeout} s\n{self.logs()}")
            if all(process.poll() is not None for process in self.running.values()):
                raise AssertionError(f"every process ended before {what}\n{self.logs()}")
            time.sleep(0.1)


@pytest.fixture
def free_ports():
    return find_free_ports


@pytest.fixture
def processes(tmp_path):
    """A :class:`Processes` logging to ``tmp_path``; whatever still runs at the end is killed."""
    with Processes(tmp_path) as running:
        yield running


def load_helper(name: str):
    """Import the helper script ``tests/distributed/<name>.py`` as a module (pytest runs with importlib mode)."""
    spec = importlib.util.spec_from_file_location(f"cnnkit_test_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train_worker():
    return load_helper("train_worker")
