"""Precise batch norm on finished runs: test accuracy before and after, alone and as one ensemble.

Each run's batch-norm statistics are re-estimated on ``--images`` clean images of its training
split drawn at random with the run's seed, in batches of its training batch size: what ``train(precise_bn=N)`` does once
fitting ends, so a finished run gives the figure its recipe with ``precise_bn`` would have given
(fitting itself does not change). The runs are then combined by mean probability
(``cnnkit.recipes.ensemble``), before and after.

Run (real MNIST; CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/precise_bn.py runs/a runs/b ... --images 10000
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from results import machine, write_section

import cnnkit
from cnnkit.recipes.batchnorm import recalibrate_batch_norm
from cnnkit.recipes.pipeline import resolve_data, training_subsample


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories (trained on the same data)")
    parser.add_argument("--images", type=int, default=10000, help="clean training images to re-estimate on")
    parser.add_argument("--key", default="precise-bn", help="the docs/RESULTS.md section to write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    runs = [cnnkit.load(path) for path in args.runs]
    data_arguments = {repr(run.config["arguments"]["data"]) for run in runs}
    if len(data_arguments) != 1:
        sys.exit(f"the runs were trained on different data: {sorted(data_arguments)}")
    data = resolve_data(runs[0].config["arguments"]["data"])
    ensembles = {}
    with tempfile.TemporaryDirectory() as folder:
        def combined(name):  # the runs' models as they are now, in one model
            ensemble = cnnkit.recipes.ensemble([run.model for run in runs], data, run_dir=Path(folder) / name, verbose=0)
            return ensemble.metrics["test_accuracy"]

        ensembles["as trained"] = combined("as_trained")
        rows, plain, precise = [], [], []
        for path, run in zip(args.runs, runs):
            before = run.evaluate(data)["test_accuracy"]
            images = training_subsample(data, args.images, run.config["seed"])
            layers = recalibrate_batch_norm(run.model, images, batch_size=run.config["arguments"]["batch_size"])
            after = cnnkit.Run(run.model, class_names=data.class_names).evaluate(data)["test_accuracy"]
            plain.append(before)
            precise.append(after)
            rows.append(f"| `{path}` (seed {run.config['seed']}) | {before:.2%} | {after:.2%} | {layers} |")
            print(rows[-1], flush=True)
        ensembles["precise BN"] = combined("precise_bn")
    body = "\n".join([
        f"Command: `CNNKIT_DATA_DIR=../shared/datasets python bench/precise_bn.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}  ",
        f"Batch-norm statistics re-estimated on {len(images):,} clean images of the training split "
        f"({data.source}) drawn with each run's seed, dropout off; test accuracy on the {data.sizes['test']:,} test images.",
        "",
        "| run | test accuracy, as trained | with precise BN | batch-norm layers |",
        "|---|---|---|---|",
        *rows,
        f"| mean of {len(runs)} | {statistics.mean(plain):.2%} | {statistics.mean(precise):.2%} | |",
        f"| ensemble of {len(runs)} (mean probability) | {ensembles['as trained']:.2%} | {ensembles['precise BN']:.2%} | |",
    ])
    print(body)
    if not args.no_write:
        print(f"written to {write_section(args.key, 'Precise batch norm on finished runs', body)}")


if __name__ == "__main__":
    main()
