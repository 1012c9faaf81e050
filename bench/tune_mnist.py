"""Hyperband on 10,000 real MNIST digits against the seed's conv net trained for the same epochs.

The search runs the space of ``tuner/mnist_conv.yaml`` (filters, kernels, units, dropout,
learning rate, batch norm, augmentation) with Hyperband and a fixed epoch budget (``--max-epochs``:
no network trains longer). Then, on the same training and validation images:

* the best configuration's ``best_recipe.yaml`` is run as written (``cnnkit run``'s code path):
  its best validation accuracy should reproduce the search's score within noise;
* the best configuration and the seed's 20C5-MP2-50C5-MP2-FC256 (Adam 1e-3, batch 128, constant
  rate) are each trained for ``--max-epochs`` epochs and compared on validation accuracy (the
  claim: best >= seed) and on the 10,000 test digits.

Run (CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/tune_mnist.py
    CNNKIT_DATA_DIR=../shared/datasets python bench/tune_mnist.py --train-per-class 100 --val-per-class 50 \\
        --max-epochs 2 --no-write      # a smoke run
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml
from results import machine, write_section

import cnnkit
from cnnkit.config import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]
SEED_NET = "20C5-MP2-50C5-MP2-FC256"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-per-class", type=int, default=1000, help="training digits per class (10,000 in all)")
    parser.add_argument("--val-per-class", type=int, default=500, help="validation digits per class")
    parser.add_argument("--max-epochs", type=int, default=6, help="Hyperband's epoch budget, and the comparison's epochs")
    parser.add_argument("--factor", type=int, default=3, help="Hyperband's reduction factor")
    parser.add_argument("--iterations", type=int, default=2, help="Hyperband sweeps over its brackets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--space", default=str(ROOT / "tuner" / "mnist_conv.yaml"), help="the search-space file")
    parser.add_argument("--directory", default=None, help="keep the search here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()

    data = cnnkit.data.load("mnist").subset(per_class=args.train_per_class, val_per_class=args.val_per_class,
                                            seed=args.seed)
    print(data.summary(), flush=True)
    space = load_recipe(args.space, kind="tuner").kwargs["space"]
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(args.directory or Path(scratch) / "search")
        started = time.perf_counter()
        result = cnnkit.tuner.search(space, data, algorithm="hyperband", epochs=args.max_epochs, factor=args.factor,
                                     hyperband_iterations=args.iterations, max_trials=None, precision=args.precision, seed=args.seed, directory=directory)
        search_minutes = (time.perf_counter() - started) / 60
        trained = [trial for trial in result.trials if trial.status == "COMPLETED"]
        search_epochs = sum(trial.epochs - trial.initial_epoch for trial in trained)

        recipe = load_recipe(result.files["best_recipe"])
        recipe.kwargs.update(data=data, run_dir=Path(scratch) / "recipe", verbose=0)
        reproduced = run_recipe(recipe)
        if recipe.kwargs["epochs"] == args.max_epochs:
            best = reproduced
        else:
            recipe.kwargs.update(epochs=args.max_epochs, run_dir=Path(scratch) / "best")
            best = run_recipe(recipe)
        baseline = cnnkit.recipes.train(SEED_NET, data, optimizer="adam", learning_rate=1e-3, epochs=args.max_epochs,
                                        batch_size=128, precision=args.precision, seed=args.seed,
                                        run_dir=Path(scratch) / "seed", verbose=0)

    best_val, seed_val = best.metrics["best_val_accuracy"], baseline.metrics["best_val_accuracy"]
    knobs = {name: value for name, value in result.best_hyperparameters.items() if name not in result.space.placeholders}
    verdict = "meets" if best_val >= seed_val else "MISSES"
    command = "CNNKIT_DATA_DIR=../shared/datasets python bench/tune_mnist.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}  ",
        f"Data: {data.sizes['train']:,} training and {data.sizes['val']:,} validation digits drawn from the MNIST "
        f"training set (seed {args.seed}), the 10,000 MNIST test digits. Search: Hyperband, max {args.max_epochs} "
        f"epochs per network, factor {args.factor}, {args.iterations} sweeps, space `{Path(args.space).name}`: {len(result.trials)} trials "
        f"({len(trained)} trained, {search_epochs} epochs in all), {search_minutes:.1f} min. Precision "
        f"{result.settings['precision']}.",
        "",
        "| network | epochs | best val accuracy | test accuracy |",
        "|---|---|---|---|",
        f"| best found: `{result.best_arch}` {yaml.safe_dump(knobs, default_flow_style=True).strip()} | "
        f"{args.max_epochs} | {best_val:.2%} | {best.metrics['test_accuracy']:.2%} |",
        f"| seed's `{SEED_NET}` (Adam 1e-3) | {args.max_epochs} | {seed_val:.2%} | "
        f"{baseline.metrics['test_accuracy']:.2%} |",
        "",
        f"Best >= seed on validation accuracy: {verdict} ({best_val - seed_val:+.2%}).  ",
        f"Reproduction: the search scored trial {result.best_trial.trial_id} at {result.best_score:.2%} (best epoch "
        f"{result.best_trial.best_epoch} of {result.best_trial.epochs}); its `best_recipe.yaml` run as written gave "
        f"{reproduced.metrics['best_val_accuracy']:.2%} ({reproduced.metrics['best_val_accuracy'] - result.best_score:+.2%}).",
        "",
        "Sensitivity (from the search's trials):",
        "",
        "```",
        result.sensitivity.table(),
        "```",
    ])
    print(body)
    if not args.no_write:
        print(f"written to {write_section('tune-mnist', 'Hyperband on 10,000 MNIST digits vs the seed net', body)}")


if __name__ == "__main__":
    main()
