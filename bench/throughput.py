"""Training throughput of ``cnnkit.recipes.train`` against hand-written ``model.fit`` scripts.

Measures, in one process with alternating repeats (so machine noise hits all three alike):

(a) the recipe against a hand-written ``model.fit`` with the same model and settings
    (same precision and steps_per_execution), fed two ways: NumPy arrays straight to Keras
    (what most scripts do), and a hand-written tf.data pipeline (cache, shuffle, batch,
    prefetch: the recipe's own input path without its callbacks and run directory). The
    tf.data arm isolates the recipe's overhead; target >= 0.97x against both;
(b) the recipe against the same hand-written script at Keras defaults (float32,
    steps_per_execution=1): what the recipe's defaults buy, target >= 1.8x on this CPU.

Throughput is training images per second over whole epochs (training plus the validation
pass, the same work in every arm) after the first (which compiles). Both the median and the best
epoch are reported: on a shared machine the best is the estimate least disturbed by other load
(as timeit advises), the median the typical experience.

Run (real MNIST; CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/throughput.py --repeats 3 --epochs 3
"""

import argparse
import statistics
import tempfile

import keras
import numpy as np
import tensorflow as tf
from results import machine, write_section

import cnnkit
from cnnkit.recipes.fitting import EpochTimer
from cnnkit.recipes.optimization import resolve_precision

ARCH = "20C5-MP2-50C5-MP2-FC256"


def hand_written(data, *, epochs, batch_size, precision, steps_per_execution, seed, feed="numpy"):
    """What a user would write by hand: build, compile, fit on NumPy arrays or on tf.data."""
    keras.utils.set_random_seed(seed)
    x_train, y_train = data.arrays("train")
    x_val, y_val = data.arrays("val")
    if feed == "tf.data":
        train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).cache().shuffle(len(x_train), seed=seed)
        inputs = {"x": train.batch(batch_size).prefetch(tf.data.AUTOTUNE), "shuffle": False,
                  "validation_data": tf.data.Dataset.from_tensor_slices((x_val, y_val)).cache().batch(1024)}
    else:
        inputs = {"x": x_train, "y": y_train, "batch_size": batch_size, "validation_data": (x_val, y_val)}
    dtype = None if precision == "float32" else precision
    model = cnnkit.build(ARCH, data.image_shape, data.num_classes, dtype=dtype)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    timer = EpochTimer()
    model.fit(**inputs, epochs=epochs, callbacks=[timer], verbose=0)
    x_test, y_test = data.arrays("test")
    error = 1 - model.evaluate(x_test, y_test, batch_size=1024, verbose=0)[1]
    return timer.seconds, error


def recipe(data, *, epochs, batch_size, seed):
    with tempfile.TemporaryDirectory() as run_dir:
        run = cnnkit.recipes.train(ARCH, data, epochs=epochs, batch_size=batch_size, seed=seed,
                                   run_dir=run_dir, verbose=0)
    return run.history["epoch_seconds"], run.metrics["test_error"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    data = cnnkit.data.load("mnist")
    images = data.sizes["train"]
    precision = resolve_precision("auto")
    arms = {
        "recipe (defaults)": lambda seed: recipe(data, epochs=args.epochs, batch_size=args.batch_size, seed=seed),
        "hand-written tf.data, same settings": lambda seed: hand_written(
            data, epochs=args.epochs, batch_size=args.batch_size, precision=precision, steps_per_execution=16,
            seed=seed, feed="tf.data"),
        "hand-written NumPy, same settings": lambda seed: hand_written(
            data, epochs=args.epochs, batch_size=args.batch_size, precision=precision, steps_per_execution=16,
            seed=seed),
        "hand-written NumPy, Keras defaults": lambda seed: hand_written(
            data, epochs=args.epochs, batch_size=args.batch_size, precision="float32", steps_per_execution=1,
            seed=seed),
    }
    rates = {name: [] for name in arms}
    errors = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name, arm in arms.items():
            seconds, error = arm(repeat)
            rates[name].extend(images / s for s in seconds[1:])
            errors[name].append(error)
            print(f"repeat {repeat + 1} {name}: {statistics.median(images / s for s in seconds[1:]):,.0f} img/s, "
                  f"test error {error:.2%}", flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    best = {name: max(values) for name, values in rates.items()}

    def ratio(other):
        return (f"**{median['recipe (defaults)'] / median[other]:.2f}x** median, "
                f"**{best['recipe (defaults)'] / best[other]:.2f}x** best")

    lines = [
        f"Command: `CNNKIT_DATA_DIR=../shared/datasets python bench/throughput.py --repeats {args.repeats} "
        f"--epochs {args.epochs}`  ",
        f"Machine: {machine()}  ",
        f"{ARCH} on MNIST ({images} train images), batch {args.batch_size}, precision auto -> {precision}; "
        f"{args.repeats} alternating repeats x {args.epochs - 1} timed epochs (the first epoch compiles).",
        "",
        "| arm | images/s (median) | images/s (best epoch) | test error (mean) |",
        "|---|---|---|---|",
        *[f"| {name} | {median[name]:,.0f} | {best[name]:,.0f} | {np.mean(errors[name]):.2%} |" for name in arms],
        "",
        f"- (a) recipe / hand-written tf.data at equal settings: {ratio('hand-written tf.data, same settings')} "
        "(target >= 0.97x)",
        f"- (a) recipe / hand-written NumPy at equal settings: {ratio('hand-written NumPy, same settings')} "
        "(target >= 0.97x)",
        "- (b) recipe / hand-written NumPy at Keras defaults (float32, steps_per_execution=1): "
        f"{ratio('hand-written NumPy, Keras defaults')} (target >= 1.8x)",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        print(f"written to {write_section('throughput', 'Training throughput: recipe against hand-written fit', body)}")


if __name__ == "__main__":
    main()
