"""Run the reference recipes on real MNIST and record their test error and wall time.

Each recipe file runs exactly as ``cnnkit run NAME`` would; the table is printed and written
into docs/RESULTS.md between the ``reference-mnist`` markers, with the command and machine.

Run (CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/reference_mnist.py --seeds 0,1,2
    CNNKIT_DATA_DIR=../shared/datasets python bench/reference_mnist.py --only mnist_conv epochs=2   # a smoke run
"""

import argparse
import statistics
import sys
import tempfile
import time

from results import machine, write_section

from cnnkit.config import load_recipe, run_recipe

REFERENCE = {  # recipe -> (what the seed's table reports, target test error)
    "mnist_fc64": ("FC64", 0.0285),
    "mnist_fc256x2": ("FC256-FC256", 0.0183),
    "mnist_conv": ("20C5-MP2-50C5-MP2-FC256", 0.0079),
    "mnist_lenet": ("Theano LeNet 20C5-MP2-50C5-MP2-FC500, tanh (tutorial: 0.91% in 755 min)", 0.0093),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(REFERENCE), help="comma-separated recipe names to run")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each recipe runs once per seed")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every recipe (a smoke run: epochs=1)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    rows = []
    names = args.only.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for name in names:
        errors, minutes = [], []
        for seed in seeds:
            recipe = load_recipe(name, [*args.overrides, f"seed={seed}"])
            with tempfile.TemporaryDirectory() as run_dir:
                recipe.kwargs.update(run_dir=run_dir, verbose=0)
                started = time.perf_counter()
                run = run_recipe(recipe)
                minutes.append((time.perf_counter() - started) / 60)
            errors.append(run.metrics["test_error"])
            print(f"{name} seed {seed}: test error {errors[-1]:.2%}, {minutes[-1]:.1f} min", flush=True)
        label, target = REFERENCE[name]
        mean = statistics.mean(errors)
        verdict = "meets" if mean <= target else "MISSES"
        per_seed = ", ".join(f"{error:.2%}" for error in errors)
        rows.append(f"| `{name}` | {label} | {mean:.2%} ({per_seed}) | <= {target:.2%} ({verdict}) | "
                    f"{run.metrics['epochs_run']} | {statistics.mean(minutes):.1f} min | {run.config['precision']} |")
    command = "CNNKIT_DATA_DIR=../shared/datasets python bench/reference_mnist.py " + " ".join(sys.argv[1:])
    table = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}  ",
        f"Test error on the 10,000 MNIST test images: mean over seeds {args.seeds} (each seed's in brackets); "
        "the target applies to the mean. Wall time of a whole run (training, validation, evaluation, run "
        "directory), mean over seeds.",
        "",
        "| recipe | network | test error | target | epochs | wall time per run | precision |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if not args.no_write and not args.overrides and names == list(REFERENCE):
        print(f"written to {write_section('reference-mnist', 'Reference recipes on real MNIST', table)}")


if __name__ == "__main__":
    main()
