"""A training job the reliability tests start, kill and start again: ``python train_job.py RUN_DIR [FAULT]``.

FAULT: ``kill@E.B`` sends SIGKILL to this process after batch B of epoch E (1-based);
``kill-in-save@E`` writes half of epoch E's checkpoint, then sends SIGKILL;
``fsize@E`` limits file size (RLIMIT_FSIZE) from epoch E on, so its checkpoint cannot be written.
``augment`` trains with elastic augmentation and ``balanced`` with class-balanced batches.
The job prints ``WEIGHTS <sha256 of the final weights>`` at the end.
"""

import hashlib
import os
import resource
import signal
import sys

import keras
import numpy as np

import cnnkit


class Fault(keras.callbacks.Callback):
    def __init__(self, spec):
        super().__init__()
        self.kind, _, where = spec.partition("@")
        self.epoch, _, batch = where.partition(".")
        self.epoch, self.batch = int(self.epoch), int(batch or 0)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 != self.epoch:
            return
        if self.kind == "fsize":
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        if self.kind == "kill-in-save":
            save = self.model.save_weights

            def half_then_die(path, *args, **kwargs):
                save(path, *args, **kwargs)
                with open(path, "r+b") as file:
                    file.truncate(os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

            self.model.save_weights = half_then_die

    def on_train_batch_end(self, batch, logs=None):
        if self.kind == "kill" and self._epoch_now + 1 == self.epoch and batch + 1 >= self.batch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_now = epoch + 1

    _epoch_now = 0


def main(run_dir, *faults):
    sample = cnnkit.data.load("mnist-sample")
    x, y = sample.arrays("train")
    if "balanced" in faults:  # a skewed split, so that balancing draws something
        keep = np.concatenate([np.flatnonzero(y == c)[: 60 if c < 5 else 12] for c in range(10)])
        x, y = x[keep], y[keep]
    else:
        x, y = x[:480], y[:480]
    data = cnnkit.data.from_arrays(x, y, val_split=0.1, seed=0)
    callbacks = [Fault(spec) for spec in faults if "@" in spec]
    run = cnnkit.recipes.train(
        "6C5-MP2-D0.3-FC32-D0.3", data, epochs=3, batch_size=32, steps_per_execution=4, seed=3,
        deterministic=True, augment="elastic" if "augment" in faults else None,
        imbalance="balanced_batches" if "balanced" in faults else None,
        callbacks=callbacks, run_dir=run_dir, report=False, verbose=0,
    )
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in run.model.get_weights())).hexdigest()
    print("WEIGHTS", digest, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
