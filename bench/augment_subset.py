"""What augmentation buys on little data: each preset against none on a 1,000-image MNIST subset.

Trains the seed conv net 20C5-MP2-50C5-MP2-FC256 with ``cnnkit.recipes.train(..., augment=preset)``
on the same 1,000 real MNIST training images (a random draw, fixed seed), with
the same epochs, optimiser and seeds for every preset, and reports test accuracy on the full
10,000-image test set: the mean over seeds, and the gain over no augmentation in points.
Target: the best preset beats none by >= 1.5 points. Presets that need RGB images (pca_color)
are listed and skipped on grey digits; crop_flip and color are run to show what does not suit
digits.

Run (real MNIST; CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/augment_subset.py --seeds 0,1,2 --epochs 60
    CNNKIT_DATA_DIR=../shared/datasets python bench/augment_subset.py --quick   # a smoke run, a minute
"""

import argparse
import statistics
import tempfile
import time

import numpy as np
from results import machine, write_section

import cnnkit
from cnnkit.recipes.augment import PRESETS

ARCH = "20C5-MP2-50C5-MP2-FC256"
TARGET_POINTS = 1.5


def subset(data, size, *, seed, test_size=None):
    """``size`` training images drawn at random without replacement (fixed seed); the test split kept."""
    x, y = data.arrays("train")
    picked = np.sort(np.random.default_rng(seed).choice(len(y), size, replace=False))
    x_test, y_test = data.arrays("test")
    if test_size:
        x_test, y_test = x_test[:test_size], y_test[:test_size]
    return cnnkit.data.from_arrays(x[picked], y[picked], x_test=x_test, y_test=y_test, val_split=0,
                                   class_names=data.class_names)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated; 'none' is always run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=1000, help="training images")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the bundled sample, 3 presets, 1 seed, 3 epochs, 500 test images; no write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    presets = ["none"] + [name for name in args.presets.split(",") if name != "none"]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    source, test_size = "mnist", None
    if args.quick:
        presets, seeds, args.epochs, source, test_size = ["none", "default", "mixup"], [0], 3, "mnist-sample", 500
    data = subset(cnnkit.data.load(source), args.size, seed=0, test_size=test_size)
    skipped = [name for name in presets if "pca_color" in PRESETS[name].ops and data.image_shape[-1] != 3]
    presets = [name for name in presets if name not in skipped]

    accuracy = {name: [] for name in presets}
    seconds = {name: [] for name in presets}
    for seed in seeds:
        for name in presets:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as run_dir:
                run = cnnkit.recipes.train(ARCH, data, augment=name, epochs=args.epochs, batch_size=args.batch_size,
                                           seed=seed, run_dir=run_dir, verbose=0)
            accuracy[name].append(run.metrics["test_accuracy"])
            seconds[name].append(time.perf_counter() - started)
            print(f"seed {seed} {name}: test accuracy {accuracy[name][-1]:.2%} ({seconds[name][-1]:.0f} s)", flush=True)

    mean = {name: statistics.mean(values) for name, values in accuracy.items()}
    best = max((name for name in presets if name != "none"), key=mean.get)
    gain = 100 * (mean[best] - mean["none"])
    command = "CNNKIT_DATA_DIR=../shared/datasets python bench/augment_subset.py " + (
        "--quick" if args.quick else f"--seeds {args.seeds} --epochs {args.epochs}")
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"{ARCH} on {data.sizes['train']} {source} training images (random draw, seed 0), tested on "
        f"{data.sizes['test']} test images; Adam 1e-3, batch {args.batch_size}, {args.epochs} epochs, "
        f"seeds {args.seeds if not args.quick else '0'}; the same for every preset.",
        "",
        "| augment | what it is | test accuracy (mean) | per seed | gain over none | wall time per run |",
        "|---|---|---|---|---|---|",
        *[f"| `{name}` | {PRESETS[name].about} | {mean[name]:.2%} | "
          f"{', '.join(f'{value:.2%}' for value in accuracy[name])} | "
          f"{100 * (mean[name] - mean['none']):+.2f} | {statistics.mean(seconds[name]):.0f} s |" for name in presets],
        "",
        f"Best preset: `{best}`, {gain:+.2f} points over none (target >= +{TARGET_POINTS} points: "
        f"{'meets' if gain >= TARGET_POINTS else 'misses'}).",
    ]
    if skipped:
        lines.append(f"Not run (need RGB images): {', '.join(f'`{name}`' for name in skipped)}.")
    body = "\n".join(lines)
    print(body)
    if not (args.no_write or args.quick):
        print(f"written to {write_section('augment-subset', 'Augmentation on a 1,000-image MNIST subset', body)}")


if __name__ == "__main__":
    main()
