"""What the default augmentation costs: training throughput of ``cnnkit.recipes.train`` with and without it.

Trains the seed conv net 20C5-MP2-50C5-MP2-FC256 on real MNIST through
``cnnkit.recipes.train`` with ``augment=None`` and ``augment="default"`` (random translations,
``cnnkit.recipes.augment.PRESETS["default"]``), alternating the two arms within one process so
machine noise hits both alike, and reports training images per second over whole epochs after
the first (which compiles), as the median and the best epoch, and their ratio. Augmentation runs
in the ``tf.data`` pipeline, on the same CPU cores as training. Target: with / without >= 0.8x.

Run (real MNIST; CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/augment_throughput.py --repeats 3 --epochs 3
    python bench/augment_throughput.py --quick   # smoke run on the bundled sample; writes nothing
"""

import argparse
import statistics
import tempfile

from results import machine, write_section

import cnnkit
from cnnkit.recipes.augment import PRESETS
from cnnkit.recipes.optimization import resolve_precision

ARCH = "20C5-MP2-50C5-MP2-FC256"
TARGET = 0.8


def epoch_rates(data, *, augment, epochs, batch_size, seed):
    """Training images per second of each epoch after the first, and the test error."""
    with tempfile.TemporaryDirectory() as run_dir:
        run = cnnkit.recipes.train(ARCH, data, augment=augment, epochs=epochs, batch_size=batch_size, seed=seed,
                                   run_dir=run_dir, verbose=0)
    images = data.sizes["train"]
    return [images / seconds for seconds in run.history["epoch_seconds"][1:]], run.metrics["test_error"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--augment", default="default", help="the augmentation measured against none")
    parser.add_argument("--quick", action="store_true", help="smoke run: the bundled sample, 1 repeat, 2 epochs, no write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    source = "mnist"
    if args.quick:
        source, args.repeats, args.epochs = "mnist-sample", 1, 2
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch compiles and is not timed")
    if args.augment in ("none", ""):
        parser.error("--augment names the augmentation measured against none; it cannot be none")
    data = cnnkit.data.load(source)
    arms = {"none": None, args.augment: args.augment}
    rates = {name: [] for name in arms}
    errors = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name, augment in arms.items():
            epoch, error = epoch_rates(data, augment=augment, epochs=args.epochs, batch_size=args.batch_size,
                                       seed=repeat)
            rates[name] += epoch
            errors[name].append(error)
            print(f"repeat {repeat + 1} augment={name}: {statistics.median(epoch):,.0f} img/s, test error {error:.2%}",
                  flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    best = {name: max(values) for name, values in rates.items()}
    ratio_median = median[args.augment] / median["none"]
    ratio_best = best[args.augment] / best["none"]
    verdict = "meets" if ratio_median >= TARGET else "misses"
    command = "python bench/augment_throughput.py " + (
        "--quick" if args.quick else f"--repeats {args.repeats} --epochs {args.epochs}")
    about = PRESETS[args.augment].about if args.augment in PRESETS else "a custom list"
    lines = [
        f"Command: `CNNKIT_DATA_DIR=../shared/datasets {command}`  ",
        f"Machine: {machine()}  ",
        f"{ARCH} on {source} ({data.sizes['train']} train images), batch {args.batch_size}, precision auto -> "
        f"{resolve_precision('auto')}; {args.repeats} alternating repeats x {args.epochs - 1} timed epochs "
        "(the first epoch compiles). Augmentation is a parallel map over batches in the tf.data pipeline.",
        "",
        "| augment | images/s (median) | images/s (best epoch) | test error (mean) |",
        "|---|---|---|---|",
        *[f"| `{name}` | {median[name]:,.0f} | {best[name]:,.0f} | {statistics.mean(errors[name]):.2%} |"
          for name in arms],
        "",
        f"`{args.augment}` ({about}) / none: **{ratio_median:.2f}x** median, **{ratio_best:.2f}x** best epoch "
        f"(target >= {TARGET}x median: {verdict}).",
    ]
    body = "\n".join(lines)
    print(body)
    if not (args.no_write or args.quick):
        print(f"written to {write_section('augment-throughput', 'Augmentation pipeline cost', body)}")


if __name__ == "__main__":
    main()
