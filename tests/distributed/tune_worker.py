"""One process of a distributed search: ``python tune_worker.py DIRECTORY ROLE ADDRESS [WORKER_ID] [FLAG]``.

ROLE is "chief" or "worker". A worker leaves ``DIRECTORY/../trained-<WORKER_ID>-<n>`` when its
n-th training starts. FLAG ``--block``: the first training also writes ``blocked-<WORKER_ID>``
and hangs there (for the test to kill it mid-trial); ``--after-block``: the first training
waits until some worker has blocked (so the blocking one surely gets a trial).
``TUNE_WORKER_TIMEOUT`` in the environment sets ``worker_timeout`` (default 30 s).
"""

import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

import cnnkit

SPACE = {"name": "tiny", "arch": "{f}C3-MP2-FC{units}",
         "hyperparameters": {"f": [2, 4], "units": [4, 8], "learning_rate": 0.05, "batch_size": 8}}
WORKER_TIMEOUT = float(os.environ.get("TUNE_WORKER_TIMEOUT", "30"))


class Marks(keras.callbacks.Callback):
    """Leaves ``trained-<worker>-<n>`` for the n-th training; with ``block``, hangs in the first one."""

    count = 0  # across the deep copies Keras Tuner makes per trial

    def __init__(self, folder, worker, flags):
        super().__init__()
        self.folder, self.worker, self.flags = Path(folder), worker, flags

    def on_train_begin(self, logs=None):
        Marks.count += 1
        (self.folder / f"trained-{self.worker}-{Marks.count}").write_text("")
        if "--block" in self.flags:
            (self.folder / f"blocked-{self.worker}").write_text("")
            time.sleep(600)
        deadline = time.monotonic() + 120
        while "--after-block" in self.flags and Marks.count == 1 and not any(self.folder.glob("blocked-*")):
            if time.monotonic() > deadline:
                raise RuntimeError("no worker blocked")
            time.sleep(0.1)


def tiny_data():
    """64 8x8 grey images, 2 classes (class 1 has a bright top half), 48 train / 16 validation."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (64, 8, 8), dtype=np.uint8)
    y = np.arange(64) % 2
    x[y == 1, :4] += 150
    return cnnkit.data.from_arrays(x, y, val_split=0.25, seed=0)


if __name__ == "__main__":
    directory, role, address = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    worker_id = sys.argv[4] if len(sys.argv) > 4 and not sys.argv[4].startswith("--") else None
    callbacks = [Marks(directory.parent, worker_id, sys.argv[5:])] if role == "worker" else []
    result = cnnkit.tuner.search(SPACE, tiny_data(), max_trials=4, epochs=1, precision="float32", directory=directory,
                                 role=role, oracle_address=address, worker_id=worker_id,
                                 worker_timeout=WORKER_TIMEOUT, callbacks=callbacks, verbose=1)
    print("done", role, len(result.trials), sorted(trial.status for trial in result.trials), flush=True)
