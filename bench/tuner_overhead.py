"""Per-trial overhead of cnnkit.tuner.search, and resident memory across many tiny trials.

A random search over small conv nets on a few hundred MNIST-sample digits, one epoch a trial,
one training step per graph call so every step is timed. For each trial the search records:
build (data inputs, cnnkit.build, compile), first step (start of fit to the end of the first
training step: tracing and graph compilation included), a steady step, and the overhead (build +
first step - one steady step). The process's resident memory (VmRSS) is read at the end of every
trial's training; memory that does not grow from trial to trial keeps RSS after the last trial
within 1.3x of RSS after the second.

Run:
    python bench/tuner_overhead.py                     # 20 trials
    python bench/tuner_overhead.py --trials 6 --no-write   # a smoke run
"""

import argparse
import statistics
import sys
import tempfile
import time

import keras
from results import machine, write_section

import cnnkit

SPACE = {"name": "overhead", "arch": "{f1}C{k}-MP2-{f2}C3-MP2-FC{units}",
         "hyperparameters": {"f1": [4, 8, 12, 16], "k": [3, 5], "f2": [8, 16, 24, 32], "units": [16, 32, 64],
                             "batch_norm": [False, True], "learning_rate": {"min": 1e-3, "max": 1e-2, "sampling": "log"}}}
MEMORY_LIMIT = 1.3


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


class RecordMemory(keras.callbacks.Callback):
    """Reads the resident memory when each trial's training ends (shared across Keras Tuner's copies)."""

    readings = []

    def on_train_end(self, logs=None):
        RecordMemory.readings.append(rss_mib())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=512, help="training digits (from the bundled sample)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()

    sample = cnnkit.data.load("mnist-sample")
    x, y = sample.arrays("train")
    data = cnnkit.data.from_arrays(x[:args.train_size], y[:args.train_size], val_split=0.2)
    space = {**SPACE, "hyperparameters": {**SPACE["hyperparameters"], "batch_size": args.batch_size}}
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        result = cnnkit.tuner.search(space, data, algorithm="random", max_trials=args.trials, epochs=1,
                                     steps_per_execution=1, directory=directory, callbacks=[RecordMemory()],
                                     verbose=0)
        minutes = (time.perf_counter() - started) / 60
    trials = [trial for trial in result.trials if trial.status == "COMPLETED"]
    readings = RecordMemory.readings
    steps = -(-round(args.train_size * 0.8) // args.batch_size)
    rows = []
    for trial, memory in zip(trials, readings):
        timing = trial.timing
        rows.append(f"| {trial.trial_id} | `{trial.arch}` | {timing['build_seconds'] * 1000:.0f} | "
                    f"{timing['first_step_seconds'] * 1000:.0f} | {timing['step_seconds'] * 1000:.1f} | "
                    f"{timing['overhead_seconds'] * 1000:.0f} | {trial.seconds:.2f} | {memory:.0f} |")

    def median(key):
        return statistics.median(trial.timing[key] for trial in trials) * 1000

    ratio = readings[-1] / readings[1]
    verdict = "meets" if ratio <= MEMORY_LIMIT else "MISSES"
    command = "python bench/tuner_overhead.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}  ",
        f"{len(trials)} trials of a random search, 1 epoch each on {data.sizes['train']} MNIST-sample digits "
        f"({steps} steps of {args.batch_size}), one step per graph call, precision {result.settings['precision']}; "
        f"{minutes:.1f} min in all.",
        "",
        f"Median per trial: build {median('build_seconds'):.0f} ms, first step {median('first_step_seconds'):.0f} ms, "
        f"steady step {median('step_seconds'):.1f} ms, overhead {median('overhead_seconds'):.0f} ms "
        "(build + first step - one steady step).  ",
        f"Resident memory after trial 2: {readings[1]:.0f} MiB; after trial {len(readings)}: {readings[-1]:.0f} MiB; "
        f"ratio {ratio:.2f} (<= {MEMORY_LIMIT}: {verdict}).",
        "",
        "| trial | network | build ms | first step ms | steady step ms | overhead ms | trial s | RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        print(f"written to {write_section('tuner-overhead', 'Tuner: per-trial overhead and memory', body)}")


if __name__ == "__main__":
    main()
