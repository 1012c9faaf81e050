"""Run the reference recipes on real MNIST and record their test error and wall time.

Each recipe file runs exactly as ``cnnkit run NAME`` would; the table is printed and written
into docs/RESULTS.md between the ``reference-mnist`` markers, with the command and machine.

Run (CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/reference_mnist.py
    CNNKIT_DATA_DIR=../shared/datasets python bench/reference_mnist.py --only mnist_conv epochs=2   # a smoke run
"""

import argparse
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
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every recipe (a smoke run: epochs=1)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    rows = []
    names = args.only.split(",")
    for name in names:
        recipe = load_recipe(name, args.overrides)
        with tempfile.TemporaryDirectory() as run_dir:
            recipe.kwargs.update(run_dir=run_dir, verbose=0)
            started = time.perf_counter()
            run = run_recipe(recipe)
            seconds = time.perf_counter() - started
        label, target = REFERENCE[name]
        error = run.metrics["test_error"]
        verdict = "meets" if error <= target else "MISSES"
        rows.append(f"| `{name}` | {label} | {error:.2%} | <= {target:.2%} ({verdict}) | "
                    f"{run.metrics['epochs_run']} | {seconds / 60:.1f} min | {run.config['precision']} |")
        print(rows[-1], flush=True)
    command = "CNNKIT_DATA_DIR=../shared/datasets python bench/reference_mnist.py " + " ".join(sys.argv[1:])
    table = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}  ",
        "Test error on the 10,000 MNIST test images; wall time of the whole run (training, validation, "
        "evaluation, run directory).",
        "",
        "| recipe | network | test error | target | epochs | wall time | precision |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if not args.no_write and not args.overrides and names == list(REFERENCE):
        print(f"written to {write_section('reference-mnist', 'Reference recipes on real MNIST', table)}")


if __name__ == "__main__":
    main()
