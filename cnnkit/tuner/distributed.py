"""A search on several processes: Keras Tuner's chief and workers, with the trials of lost workers requeued.

Keras Tuner distributes a search through three environment variables. The chief
(``KERASTUNER_TUNER_ID=chief``) holds the oracle and serves it over gRPC at
``KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT``; each worker (``KERASTUNER_TUNER_ID=<its own
name>``) asks the chief for a trial, trains it and reports the result, until the chief says stop.
All of them share the search directory (trial checkpoints go there). ``cnnkit.tuner.search``
sets the variables from ``role=``, ``oracle_address=`` and ``worker_id=`` (or takes them as
already set), and adds what Keras Tuner leaves out:

* **Heartbeats.** While a trial trains, a thread of its worker asks the chief for the trial
  (Keras Tuner's ``GetTrial``) every ``worker_timeout / 5`` seconds. The chief counts every
  call of a worker as a sign of life.
* **Requeue.** A worker silent for ``worker_timeout`` seconds (killed, its host gone) is lost:
  its running trial goes back into the oracle's retry queue, the one Keras Tuner uses for the
  interrupted trials of a resumed search, and the next worker asking gets it, with the same id
  and hyperparameters. A lost worker that reports after all is accepted if its trial has not
  ended yet, and ignored if it has (a trial is never recorded twice).
* **Waiting, not stopping.** Keras Tuner tells a worker to stop as soon as every trial has
  been handed out; then nobody would be left to take over a lost trial. Here a worker waits
  (``IDLE``, asking again every :data:`POLL_SECONDS`) while other trials still run, and every
  worker stops once all have ended.
* **The chief's loop.** Keras Tuner's ``start_server`` checks for the end every 20 seconds
  and never ends while a lost worker is on its books; :func:`serve` runs the same gRPC
  servicer, requeues lost trials, and returns as soon as the last worker has been told to stop.
* **Results.** The chief records each trial as its worker reports it (``trials.csv``, progress
  line) and writes the search's files at the end; workers only train.

Example:
    >>> # chief (serves on 127.0.0.1:8000 unless told otherwise), then two workers:
    >>> cnnkit.tuner.search(space, "mnist-sample", role="chief", directory="/shared/tune")  # doctest: +SKIP
    >>> cnnkit.tuner.search(space, "mnist-sample", role="worker", worker_id="gpu0", directory="/shared/tune")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent import futures

import keras_tuner as kt

ROLES = ("chief", "worker")
DEFAULT_ADDRESS = "127.0.0.1:8000"
POLL_SECONDS = 0.5
"""How often an idle worker asks for a trial again, and the chief checks for lost workers."""

_VARIABLES = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


def resolve_role(role=None, oracle_address=None, worker_id=None) -> tuple[str | None, dict]:
    """The process's role and the Keras Tuner environment variables it needs.

    Args:
        role: "chief", "worker", or ``None``: the role the ``KERASTUNER_*`` variables already
            give (chief when ``KERASTUNER_TUNER_ID`` contains "chief"), else a one-process search.
        oracle_address: ``HOST:PORT`` the chief listens on and workers call, HOST a host name
            or an IPv4 address (Keras Tuner's workers cannot dial an IPv6 one); default
            ``KERASTUNER_ORACLE_IP:PORT`` when both are set, else ``127.0.0.1:8000`` (this host only).
        worker_id: a worker's name, unique in the search (without "chief"); default
            ``KERASTUNER_TUNER_ID`` when set, else ``<host>-<pid>``. A worker restarted under
            the same name takes its unfinished trial back at once.

    Returns:
        ``(role, variables)``; ``(None, {})`` for a one-process search.

    Raises:
        ValueError: a bad role, address (an IPv6 one included) or worker name, or only one of
            ``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT`` set.

    Example:
        >>> resolve_role("worker", "10.0.0.5:8000", "gpu1")
        ('worker', {'KERASTUNER_TUNER_ID': 'gpu1', 'KERASTUNER_ORACLE_IP': '10.0.0.5', 'KERASTUNER_ORACLE_PORT': '8000'})
    """
    environment = {name: os.environ[name] for name in _VARIABLES if os.environ.get(name)}
    ip_and_port = [name for name in _VARIABLES[1:] if name in environment]
    if len(ip_and_port) == 1:
        (given,), (missing,) = ip_and_port, set(_VARIABLES[1:]) - set(ip_and_port)
        raise ValueError(f"{given} is set but {missing} is not: set both (the chief's address) or neither. "
                         f"Received: {given}={environment[given]!r}")
    if role is None:
        if "KERASTUNER_ORACLE_IP" not in environment:
            if oracle_address is not None or worker_id is not None:
                raise ValueError("oracle_address and worker_id apply to a distributed search: give role='chief' or "
                                 f"'worker'. Received: oracle_address={oracle_address!r}, worker_id={worker_id!r}")
            return None, {}
        role = "chief" if "chief" in environment.get("KERASTUNER_TUNER_ID", "") else "worker"
    if role not in ROLES:
        raise ValueError(f"role must be 'chief', 'worker' or None. Received: role={role!r}")
    given = f"oracle_address={oracle_address!r}"
    if oracle_address is None and ip_and_port:
        oracle_address = f"{environment['KERASTUNER_ORACLE_IP']}:{environment['KERASTUNER_ORACLE_PORT']}"
        given = f"KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT={oracle_address!r} (from the environment)"
    host, _, port = str(oracle_address or DEFAULT_ADDRESS).rpartition(":")
    if not host.strip() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"oracle_address must be HOST:PORT, e.g. 127.0.0.1:8000. Received: {given}")
    if ":" in host or host.startswith("["):
        raise ValueError("oracle_address cannot be an IPv6 address: Keras Tuner's workers dial "
                         "KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT without brackets ('::1:8000') and never reach "
                         f"the chief; give its host name or IPv4 address. Received: {given}")
    if role == "chief":
        if worker_id is not None:
            raise ValueError(f"worker_id names a worker; the chief is 'chief'. Received: worker_id={worker_id!r}")
        name = "chief"
    else:
        if worker_id is not None:
            name, given = worker_id, f"worker_id={worker_id!r}"
        elif "KERASTUNER_TUNER_ID" in environment:
            name = environment["KERASTUNER_TUNER_ID"]
            given = f"KERASTUNER_TUNER_ID={name!r} (from the environment)"
        else:
            name = f"{socket.gethostname()}-{os.getpid()}"
            given = f"worker_id={name!r} (the default, <host>-<pid>)"
        if not isinstance(name, str) or "chief" in name or not name.strip():
            raise ValueError("worker_id must be a non-empty name without 'chief' (Keras Tuner takes any id containing "
                             f"'chief' for the chief). Received: {given}")
    return role, {"KERASTUNER_TUNER_ID": name, "KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": port}


@contextlib.contextmanager
def environment(variables: dict):
    """Set Keras Tuner's variables for the block (Keras Tuner reads them while it runs), then restore them.

    Example:
        >>> with environment({"KERASTUNER_TUNER_ID": "w1"}):
        ...     os.environ["KERASTUNER_TUNER_ID"]
        'w1'
    """
    before = {name: os.environ.get(name) for name in _VARIABLES}
    try:
        if variables:
            os.environ.update(variables)
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LivenessMixin:
    """Oracle behaviour for a distributed search: heartbeats, requeue of lost trials, wait-not-stop.

    Mixed into cnnkit's oracles before Keras Tuner's; every method is Keras Tuner's own around
    a little bookkeeping, under the oracle's lock (``keras_tuner.synchronized``).
    """

    stop_reason = None
    """Set when the search must end early (e.g. too many failures in a row); every worker is then told to stop."""

    trial_ended = None
    """Called with a trial id once a trial has ended for good (the chief's progress record)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_seen = {}  # tuner id -> time.monotonic() of its last call
        self._assigned = {}  # tuner id -> the trial it was last given (it may have been requeued since)

    def _seen_now(self, tuner_id):
        self._last_seen[tuner_id] = time.monotonic()

    def _seen_trial(self, trial_id):
        for tuner_id, assigned in self._assigned.items():
            if assigned == trial_id:
                self._seen_now(tuner_id)

    def _create_trial(self, tuner_id, create):
        """Keras Tuner's ``create_trial`` (``create``), told to wait rather than stop while others still train."""
        self._seen_now(tuner_id)
        status = kt.engine.trial.TrialStatus
        if self.stop_reason is not None and tuner_id not in self.ongoing_trials:
            self.tuner_ids.discard(tuner_id)
            return kt.engine.trial.Trial(self.get_space(), status=status.STOPPED)
        trial = create(tuner_id)
        if trial.status == status.RUNNING:
            self._assigned[tuner_id] = trial.trial_id
        if trial.status == status.STOPPED and self.ongoing_trials and self.stop_reason is None:
            self.tuner_ids.add(tuner_id)  # still a worker of this search: it may take over a lost trial
            return kt.engine.trial.Trial(self.get_space(), status=status.IDLE)
        return trial

    def _end_trial(self, trial, end):
        """Keras Tuner's ``end_trial`` (``end``) for a trial still open; a late duplicate report is dropped."""
        self._seen_trial(trial.trial_id)
        if trial.trial_id in self.end_order:
            return
        if trial.trial_id in self._retry_queue:
            self._retry_queue.remove(trial.trial_id)  # requeued as lost, but its worker finished it after all
        try:
            end(trial)
        except RuntimeError as error:  # too many failures in a row: stop every worker, the chief reports it
            self.stop_reason = str(error)
            for tuner_id, ongoing in list(self.ongoing_trials.items()):
                if ongoing.trial_id == trial.trial_id:
                    self.ongoing_trials.pop(tuner_id)
            self._save_trial(self.trials[trial.trial_id])
            self.save()
        if trial.trial_id in self.end_order and self.trial_ended is not None:
            self.trial_ended(trial.trial_id)

    @kt.synchronized
    def requeue_lost(self, timeout: float) -> list[str]:
        """Requeue the running trials of workers silent for ``timeout`` seconds; forget idle silent workers.

        Returns:
            The ids of the trials requeued.
        """
        now, requeued = time.monotonic(), []
        for tuner_id in list(self.tuner_ids | set(self.ongoing_trials)):
            if now - self._last_seen.setdefault(tuner_id, now) < timeout:
                continue
            trial = self.ongoing_trials.pop(tuner_id, None)
            self.tuner_ids.discard(tuner_id)
            if trial is not None:
                self._retry_queue.append(trial.trial_id)
                requeued.append(trial.trial_id)
                print(f"search: worker {tuner_id!r} silent for {timeout:g} s; trial {trial.trial_id} goes to the next "
                      "worker", flush=True)
        if requeued:
            self.save()
        return requeued

    @kt.synchronized
    def finished(self) -> bool:
        """Whether no trial runs and every worker has been told to stop."""
        return not self.ongoing_trials and not self.tuner_ids


class Heartbeat:
    """A worker's sign of life while a trial trains: ``oracle.get_trial(trial_id)`` every ``interval`` seconds.

    Example:
        >>> with Heartbeat(tuner.oracle, "03", interval=10.0):  # doctest: +SKIP
        ...     train()
    """

    def __init__(self, oracle, trial_id: str, *, interval: float):
        self.oracle, self.trial_id, self.interval = oracle, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self):
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # the chief away for a moment: try again next time
                self.oracle.get_trial(self.trial_id)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(self.interval)
        return False


def bound_server(servicer, address: str):
    """A gRPC server of ``servicer`` (Keras Tuner's ``OracleServicer``) bound to ``address``, not started.

    gRPC lets several processes listen on one port by default (``SO_REUSEPORT``), which would let a
    second chief start beside the first and share its workers; here the port is this server's alone.

    Raises:
        OSError: the address is in use (another chief), or not an address of this host.

    Example:
        >>> bound_server(OracleServicer(oracle), "127.0.0.1:8000").start()  # doctest: +SKIP
    """
    import grpc
    from keras_tuner.src import protos

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    problem = f"the chief cannot listen on {address} (in use, maybe by another chief, or not an address of this host)"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"{problem}: {error}") from None
    if not bound:
        raise OSError(problem)
    return server


class _ReleasingLock:
    """The oracle as the chief's gRPC servicer calls it: a call that raises releases the oracle's lock.

    ``keras_tuner.synchronized`` releases the lock only when the method returns, so one exception in
    a worker's call (a report without the objective, a trial id the oracle does not know) would
    leave every later call, of every worker and of the chief's own loop, waiting forever.
    """

    def __init__(self, oracle):
        self._oracle = oracle

    def __getattr__(self, name):
        method = getattr(self._oracle, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except BaseException:
                from keras_tuner.src.engine import oracle as kt_oracle

                if kt_oracle.THREADS[self._oracle] == threading.current_thread().name:  # the lock is this call's
                    kt_oracle.THREADS[self._oracle] = None
                    kt_oracle.LOCKS[self._oracle].release()
                raise

        return call


def serve(oracle, address: str, *, worker_timeout: float, verbose: int = 1):
    """Serve ``oracle`` to the workers at ``address`` until the search has ended; requeue lost workers' trials.

    Keras Tuner's gRPC servicer (``keras_tuner``'s ``OracleServicer``) answers the workers; this
    loop replaces Keras Tuner's ``start_server``.

    Args:
        oracle: the chief's oracle (with :class:`LivenessMixin`).
        address: ``HOST:PORT`` to listen on.
        worker_timeout: seconds of silence after which a worker is taken as lost.
        verbose: print where the chief listens.

    Raises:
        OSError: the address cannot be bound.

    Example:
        >>> serve(tuner.oracle, "127.0.0.1:8000", worker_timeout=60)  # doctest: +SKIP
    """
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    servicer = OracleServicer(_ReleasingLock(oracle))
    server = bound_server(servicer, address)
    server.start()
    if verbose:
        print(f"search chief: serving the oracle on {address}; start workers with role='worker' (cnnkit tune ... "
              f"--role worker --oracle-address {address})", flush=True)
    try:
        while not (servicer.stop_triggered or oracle.stop_reason is not None) or not oracle.finished():
            time.sleep(POLL_SECONDS)
            oracle.requeue_lost(worker_timeout)
    finally:
        server.stop(grace=1.0).wait()


__all__ = ["DEFAULT_ADDRESS", "ROLES", "Heartbeat", "LivenessMixin", "bound_server", "environment", "resolve_role",
           "serve"]
