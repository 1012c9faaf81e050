"""Hyperband on 10,000 real MNIST digits against the seed's conv net trained for the same epochs.

The search runs the space of ``tuner/mnist_conv.yaml`` (filters, kernels, units, dropout,
learning rate, batch norm, augmentation) with Hyperband and a fixed epoch budget (``--max-epochs``:
no network trains longer). Then, on the same training and validation images:

* the best configuration's ``best_recipe.yaml`` is run as written (``cnnkit run``'s code path)
  with each of ``--retrain-seeds``: its best validation accuracy should reproduce the search's
  score within noise (the spread over those seeds is the noise);
* the best configuration and the seed's 20C5-MP2-50C5-MP2-FC256 (Adam 1e-3, batch 128, constant
  rate) are each trained for ``--max-epochs`` epochs with every seed of ``--retrain-seeds`` and
  compared on mean validation accuracy (the claim: best >= seed) and on the 10,000 test digits.
  One seed each would compare two draws of the training noise, not two configurations.

Run (CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/tune_mnist.py
    CNNKIT_DATA_DIR=../shared/datasets python bench/tune_mnist.py --train-per-class 100 --val-per-class 50 \\
        --max-epochs 2 --no-write      # a smoke run
"""

import argparse
import statistics
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
    parser.add_argument("--executions", type=int, default=1, help="trainings per trial (seeds seed, seed+1, ...), scored by their mean")
    parser.add_argument("--retrain-seeds", default="0,1,2", help="seeds of the retrained comparison")
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
                                     hyperband_iterations=args.iterations, executions_per_trial=args.executions,
                                     max_trials=None, precision=args.precision, seed=args.seed, directory=directory)
        search_minutes = (time.perf_counter() - started) / 60
        trained = [trial for trial in result.trials if trial.status == "COMPLETED"]
        search_epochs = sum(trial.epochs - trial.initial_epoch for trial in trained)

        retrain_seeds = [int(seed) for seed in args.retrain_seeds.split(",")]
        recipe = load_recipe(result.files["best_recipe"])
        written_epochs = recipe.kwargs["epochs"]
        best, baseline = [], []
        for seed in retrain_seeds:
            recipe.kwargs.update(data=data, seed=seed, epochs=args.max_epochs, run_dir=Path(scratch) / f"best{seed}",
                                 report=False, verbose=0)
            best.append(run_recipe(recipe))
            baseline.append(cnnkit.recipes.train(SEED_NET, data, optimizer="adam", learning_rate=1e-3,
                                                 epochs=args.max_epochs, batch_size=128, precision=args.precision,
                                                 seed=seed, run_dir=Path(scratch) / f"seed{seed}", report=False,
                                                 verbose=0))
            print(f"seed {seed}: best found {best[-1].metrics['best_val_accuracy']:.2%}, seed net "
                  f"{baseline[-1].metrics['best_val_accuracy']:.2%} (best val accuracy)", flush=True)

    def percents(values):
        return ", ".join(f"{value:.2%}" for value in values)

    def summary(runs, metric):
        values = [run.metrics[metric] for run in runs]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values

    best_val, best_spread, best_vals = summary(best, "best_val_accuracy")
    seed_val, seed_spread, seed_vals = summary(baseline, "best_val_accuracy")
    best_test, seed_test = summary(best, "test_accuracy")[0], summary(baseline, "test_accuracy")[0]
    gap = best_val - result.best_score
    reproduced = "within noise" if abs(gap) <= 2 * max(best_spread, 1e-4) else "NOT within noise"
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
        f"Both networks retrained for {args.max_epochs} epochs with seeds {args.retrain_seeds}; validation accuracy "
        "is the best epoch's (as the search scores), test accuracy the last epoch's.",
        "",
        "| network | epochs | best val accuracy: mean ± std (per seed) | test accuracy (mean) |",
        "|---|---|---|---|",
        f"| best found: `{result.best_arch}` {yaml.safe_dump(knobs, default_flow_style=True).strip()} | "
        f"{args.max_epochs} | {best_val:.2%} ± {best_spread:.2%} ({percents(best_vals)}) | "
        f"{best_test:.2%} |",
        f"| seed's `{SEED_NET}` (Adam 1e-3) | {args.max_epochs} | {seed_val:.2%} ± {seed_spread:.2%} "
        f"({percents(seed_vals)}) | {seed_test:.2%} |",
        "",
        f"Best >= seed on mean validation accuracy: {verdict} ({best_val - seed_val:+.2%}).  ",
        f"Reproduction: the search scored trial {result.best_trial.trial_id} at {result.best_score:.2%} (best epoch "
        f"{result.best_trial.best_epoch} of {result.best_trial.epochs}, mean of {args.executions} training(s)); its "
        f"`best_recipe.yaml` ({written_epochs} epochs) run with the retrain seeds gave {best_val:.2%} ± {best_spread:.2%} "
        f"({gap:+.2%}: {reproduced}, within 2 std).",
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
