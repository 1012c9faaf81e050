"""Does pretraining pay on real MNIST? Digits 0-4 -> 5-9 with 50 labels per class, against scratch.

A VGG-style net (``--arch``, default 32C3-32C3-MP2-64C3-64C3-MP2-FC256-D0.5) is trained on
every digit 0-4 of the MNIST training set (with ``--pretrain-augment``, default elastic
distortions: the backbone is built once, so it may take the expensive augmentation), fine-tuned
on 50 labelled images of each digit 5-9 (two schedules: "auto", which picks Wei's case 1 and
unfreezes only the top layer, and head-then-all), and trained from scratch on the same 250
images. The fine-tuned and scratch runs share every target-side setting (``--augment``, default
none; 50 epochs; batch 32). All are tested on the 4,861 test images of digits 5-9.
Targets: fine-tuned >= 97%, at least 5 points above scratch.

Run (CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/transfer_mnist.py --seeds 0,1
    CNNKIT_DATA_DIR=../shared/datasets python bench/transfer_mnist.py --arch 20C5-MP2-50C5-MP2-FC256 \
        --pretrain-augment none --seeds 0   # the seed's conv net, as the quickstart uses it
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results import machine, write_section

import cnnkit

ARCH = "32C3-32C3-MP2-64C3-64C3-MP2-FC256-D0.5"
SCHEDULES = {
    "auto (Wei's case 1: head, then top layer at lr/10)": {"stages": "auto", "epochs": 15},
    "head 10 epochs, then all layers 40": {"stages": [
        {"name": "head", "unfreeze": 0, "epochs": 10, "learning_rate": 1e-3},
        {"name": "all", "unfreeze": "all", "epochs": 40, "learning_rate": 1e-3},
    ]},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (label draw and training)")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--scratch-epochs", type=int, default=50)
    parser.add_argument("--arch", default=ARCH, help="the network, in notation or a registered name")
    parser.add_argument("--pretrain-augment", default="elastic", help="augmentation of the pretraining on 0-4 (none: none)")
    parser.add_argument("--augment", default=None, help="augmentation of the fine-tuned and scratch arms (e.g. default)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    pretrain_augment = None if args.pretrain_augment == "none" else args.pretrain_augment
    mnist = cnnkit.data.load("mnist")
    scores = {name: [] for name in [*SCHEDULES, "from scratch"]}
    started = time.perf_counter()
    for seed in (int(seed) for seed in args.seeds.split(",")):
        source = mnist.subset(classes=range(5), seed=seed)
        target = mnist.subset(classes=range(5, 10), per_class=50, val_per_class=10, seed=seed)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            pretrained = cnnkit.recipes.train(args.arch, source, epochs=args.pretrain_epochs, schedule="cosine",
                                              augment=pretrain_augment, seed=seed, run_dir=folder / "pretrain",
                                              report=False, verbose=0)
            print(f"seed {seed}: pretrained on digits 0-4: {pretrained.metrics['test_accuracy']:.2%}", flush=True)
            for index, (name, options) in enumerate(SCHEDULES.items()):
                run = cnnkit.recipes.finetune(pretrained.run_dir, target, batch_size=32, seed=seed, augment=args.augment,
                                              run_dir=folder / f"finetune{index}", report=False, verbose=0, **options)
                scores[name].append(run.metrics["test_accuracy"])
                print(f"seed {seed}: fine-tuned, {name}: {scores[name][-1]:.2%}", flush=True)
            scratch = cnnkit.recipes.train(args.arch, target, epochs=args.scratch_epochs, schedule="cosine", batch_size=32,
                                           augment=args.augment, seed=seed, run_dir=folder / "scratch", report=False,
                                           verbose=0)
            scores["from scratch"].append(scratch.metrics["test_accuracy"])
            print(f"seed {seed}: from scratch: {scores['from scratch'][-1]:.2%}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    scratch_mean = statistics.mean(scores["from scratch"])
    rows = []
    for name, values in scores.items():
        mean = statistics.mean(values)
        gain = "" if name == "from scratch" else f"{100 * (mean - scratch_mean):+.2f}"
        verdict = "" if name == "from scratch" else (
            "meets" if mean >= 0.97 and mean - scratch_mean >= 0.05 else "misses")
        per_seed = ", ".join(f"{value:.2%}" for value in values)
        rows.append(f"| {name} | {mean:.2%} ({per_seed}) | {gain} | {verdict} |")
    command = "CNNKIT_DATA_DIR=../shared/datasets python bench/transfer_mnist.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}  ",
        f"`{args.arch}` pretrained {args.pretrain_epochs} epochs on all MNIST training digits 0-4 (augmentation: "
        f"{pretrain_augment or 'none'}); fine-tuned on 50 labelled images per digit 5-9 (10 more per digit for "
        f"validation, not trained on); scratch: the same net, same images, {args.scratch_epochs} epochs. Augmentation "
        f"of the fine-tuned and scratch arms: {args.augment or 'none'}. Test accuracy on every MNIST test digit 5-9 (4,861 images), "
        f"mean over seeds {args.seeds}. Target: >= 97% and >= 5 points above scratch. {minutes:.1f} min in all.",
        "",
        "| target model | test accuracy on digits 5-9 | points vs scratch | target |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        arch = "" if args.arch == ARCH else "-" + args.arch
        suffix = f"-{args.augment}" if args.augment else ""
        write_section(f"transfer-mnist{arch}{suffix}", "Fine-tuning vs scratch: MNIST 0-4 -> 5-9, 50 labels per class"
                      + (f", `{args.arch}`" if arch else "") + (f", {args.augment} augmentation" if args.augment else ""),
                      body)


if __name__ == "__main__":
    main()
