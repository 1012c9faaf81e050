"""What k-member ensembles of finished runs score: every subset of k runs, combined by mean probability.

Picking the best k runs by their test accuracy would choose on the test set; this script does
not pick. It scores every k-run subset of the runs given (each run's test probabilities are
computed once, so thousands of subsets take seconds) and prints the distribution: mean, median,
range and the share of subsets that reach ``--target``. The members' own accuracies and the
ensemble of all runs are printed too.

Run (real MNIST; CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/ensemble_subsets.py runs/a runs/b ... --k 5 --target 0.9967
"""

import argparse
import itertools
import math
import statistics
import sys

import numpy as np
from results import machine, write_section

import cnnkit
from cnnkit.recipes.pipeline import resolve_data


def subset_accuracies(probabilities: np.ndarray, labels: np.ndarray, k: int) -> list[float]:
    """The accuracy of the mean probability of every k-subset of ``probabilities`` (runs, images, classes).

    Example:
        >>> p = np.array([[[0.6, 0.4]], [[0.2, 0.8]], [[0.7, 0.3]]])
        >>> subset_accuracies(p, np.array([0]), 2)
        [0.0, 1.0, 0.0]
    """
    return [float((probabilities[list(subset)].mean(axis=0).argmax(axis=1) == labels).mean())
            for subset in itertools.combinations(range(len(probabilities)), k)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories, evaluated on the same test split")
    parser.add_argument("--k", type=int, default=5, help="members per ensemble")
    parser.add_argument("--data", default="mnist", help="the dataset whose test split scores them")
    parser.add_argument("--target", type=float, default=None, help="report the share of subsets at or above it")
    parser.add_argument("--key", default="ensemble-subsets", help="the docs/RESULTS.md section to write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    if not 1 <= args.k <= len(args.runs):
        sys.exit(f"--k must be between 1 and the {len(args.runs)} runs given. Received: --k {args.k}")
    data = resolve_data(args.data)
    images, labels = data.arrays("test")
    members = []
    for path in args.runs:
        probabilities = cnnkit.load(path).predict(images)
        members.append(probabilities)
        print(f"{(probabilities.argmax(axis=1) == labels).mean():.2%}  {path}", flush=True)
    stacked = np.stack(members)
    scores = subset_accuracies(stacked, labels, args.k)
    every = float((stacked.mean(axis=0).argmax(axis=1) == labels).mean())
    singles = [float((member.argmax(axis=1) == labels).mean()) for member in members]
    lines = [
        f"Command: `CNNKIT_DATA_DIR=../shared/datasets python bench/ensemble_subsets.py <{len(args.runs)} run "
        f"directories> --k {args.k}{f' --target {args.target}' if args.target else ''} --key {args.key}`  ",
        f"Machine: {machine()}  ",
        f"Test split of {data.source}: {len(labels):,} images; mean probability.",
        "",
        "| ensemble | test accuracy |",
        "|---|---|",
        f"| one run (the {len(singles)}) | mean {statistics.mean(singles):.2%}, range {min(singles):.2%}-{max(singles):.2%} |",
        f"| {args.k} runs (all {math.comb(len(args.runs), args.k):,} subsets) | mean {statistics.mean(scores):.2%}, "
        f"median {statistics.median(scores):.2%}, range {min(scores):.2%}-{max(scores):.2%} |",
        f"| all {len(args.runs)} runs | {every:.2%} |",
    ]
    if args.target is not None:
        share = sum(score >= args.target for score in scores) / len(scores)
        lines.append(f"\n{share:.1%} of the {args.k}-run subsets reach {args.target:.2%}.")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"written: {write_section(args.key, f'Ensembles of {args.k} of {len(args.runs)} runs', text)}")


if __name__ == "__main__":
    main()
