"""Class-imbalance strategies on long-tailed MNIST: balanced accuracy of each against none.

The training split of real MNIST is cut to a long tail with
``cnnkit.data.load("mnist-long-tailed")``: counts fall geometrically from 5,000 images of class 0
to 50 of class 9 (12,408 in all; validation thinned by the same fractions), while the full
10,000-image test set stays as balanced as it is. The seed conv net 20C5-MP2-50C5-MP2-FC256 is
trained with ``cnnkit.recipes.train(..., imbalance=strategy)`` for every strategy, with the same
epochs, optimiser and seeds; the table gives balanced accuracy (mean recall over the classes),
test accuracy, the lowest per-class recall, the rarest class's recall and the training time.
Target: the best strategy beats none by >= 3 points of balanced accuracy (means over seeds).

Run (real MNIST; CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/long_tailed_mnist.py --seeds 0,1,2 --epochs 10
    CNNKIT_DATA_DIR=../shared/datasets python bench/long_tailed_mnist.py --quick   # smoke run: 1 epoch, no write
"""

import argparse
import statistics
import tempfile
import time

from results import machine, write_section

import cnnkit

ARCH = "20C5-MP2-50C5-MP2-FC256"
TARGET_POINTS = 3.0
STRATEGIES = {  # label -> (imbalance argument, what it is)
    "none": (None, "the long-tailed data as it is"),
    "class_weight": ("class_weight", "loss weights n / (K n_c)"),
    "oversample": ("oversample", "replicate every class up to 5,000"),
    "oversample_crops": ({"strategy": "oversample", "augmented_copies": True},
                         "oversample; replicas are random 85-90% crops, shifted"),
    "oversample_elastic": ({"strategy": "oversample", "augmented_copies": "elastic"},
                           "oversample; replicas are elastic distortions (Simard: alpha 34, sigma 4)"),
    "undersample": ("undersample", "every class cut to 50"),
    "balanced_batches": ("balanced_batches", "each epoch draws classes uniformly"),
    "two_stage": ("two_stage", "Wei: as is, then balanced batches at 0.1x lr (+3 epochs)"),
    "logit_adjusted": ("logit_adjusted", "Menon et al.: loss on logits + log prior (tau 1)"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated; 'none' is always run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--largest", type=int, default=5000, help="training images of class 0")
    parser.add_argument("--smallest", type=int, default=50, help="training images of class 9")
    parser.add_argument("--augment", help="an augment preset for every arm: a control showing how much of a "
                        "strategy's gain augmentation alone gives (written to its own section)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch (two_stage: +1); no write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    args = parser.parse_args()
    labels = ["none"] + [name for name in args.strategies.split(",") if name != "none"]
    unknown = [name for name in labels if name not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategy {unknown[0]!r}; choose from {list(STRATEGIES)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    strategies = {name: STRATEGIES[name][0] for name in labels}
    if args.quick:
        seeds, args.epochs = [0], 1
        strategies["two_stage"] = {"strategy": "two_stage", "second_stage_epochs": 1}
    data = cnnkit.data.load("mnist-long-tailed", largest=args.largest, smallest=args.smallest)
    print(data.summary(), flush=True)
    rarest = data.class_names[-1]

    results = {name: [] for name in labels}
    for seed in seeds:
        for name in labels:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as run_dir:
                run = cnnkit.recipes.train(ARCH, data, imbalance=strategies[name], optimizer="adamw",
                                           learning_rate=1e-3, weight_decay=1e-4, schedule="cosine",
                                           augment=args.augment, epochs=args.epochs, batch_size=args.batch_size,
                                           seed=seed, run_dir=run_dir, verbose=0)
            metrics = run.metrics
            recalls = {label: scores["recall"] for label, scores in metrics["per_class"].items()}
            counts = run.config.get("train_class_counts", {}).get("after", data.class_counts["train"])
            results[name].append({
                "balanced": metrics["balanced_accuracy"], "accuracy": metrics["test_accuracy"],
                "min_recall": min(recalls.values()), "min_class": min(recalls, key=recalls.get),
                "rarest": recalls[rarest], "epochs": len(run.history["loss"]), "images": sum(counts),
                "seconds": time.perf_counter() - started,
            })
            print(f"seed {seed} {name}: balanced accuracy {metrics['balanced_accuracy']:.2%}, test accuracy "
                  f"{metrics['test_accuracy']:.2%}, lowest recall {min(recalls.values()):.2%} "
                  f"(class {results[name][-1]['min_class']}), {results[name][-1]['seconds']:.0f} s", flush=True)

    def mean(name, key):
        return statistics.mean(result[key] for result in results[name])

    best = max((name for name in labels if name != "none"), key=lambda name: mean(name, "balanced"), default="none")
    gain = 100 * (mean(best, "balanced") - mean("none", "balanced"))
    command = "CNNKIT_DATA_DIR=../shared/datasets python bench/long_tailed_mnist.py " + (
        "--quick" if args.quick else f"--seeds {args.seeds} --epochs {args.epochs}") + (
        f" --strategies {','.join(labels[1:])}" if args.strategies != ",".join(STRATEGIES) else "") + (
        f" --augment {args.augment}" if args.augment else "")
    rows = []
    for name in labels:
        per_seed = ", ".join(f"{result['balanced']:.2%}" for result in results[name])
        weakest = ", ".join(sorted({result["min_class"] for result in results[name]}))
        rows.append(
            f"| `{name}` | {STRATEGIES[name][1]} | {mean(name, 'balanced'):.2%} | {per_seed} | "
            f"{100 * (mean(name, 'balanced') - mean('none', 'balanced')):+.2f} | {mean(name, 'accuracy'):.2%} | "
            f"{mean(name, 'min_recall'):.2%} ({weakest}) | {mean(name, 'rarest'):.2%} | "
            f"{results[name][0]['epochs']} x {results[name][0]['images']:,} | {mean(name, 'seconds'):.0f} s |")
    body = "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"{ARCH} on long-tailed MNIST: training counts {data.class_counts['train']} "
        f"({data.sizes['train']:,} images; validation thinned alike, {data.sizes['val']:,}), tested on all "
        f"{data.sizes['test']:,} MNIST test images. AdamW 1e-3 (weight decay 1e-4), cosine schedule, batch "
        f"{args.batch_size}, {args.epochs} epochs, seeds {','.join(map(str, seeds))}, augmentation "
        f"{args.augment or 'none'}; the same for every strategy. Means over seeds; the lowest recall names its "
        "class(es); time is the whole run.",
        "",
        "| imbalance | what it is | balanced accuracy | per seed | gain over none (points) | test accuracy | "
        f"lowest class recall | recall of class {rarest} ({args.smallest} images) | epochs x images | time per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Best strategy: `{best}`, {gain:+.2f} points of balanced accuracy over none " + (
            "(a control for how much augmentation alone gives; the target is judged without --augment)."
            if args.augment else
            f"(target >= +{TARGET_POINTS} points: {'meets' if gain >= TARGET_POINTS else 'misses'})."),
    ])
    print(body)
    if not (args.no_write or args.quick):
        key, title = "long-tailed-mnist", "Class imbalance on long-tailed MNIST"
        if args.augment:
            key, title = f"{key}-augment-{args.augment}", f"{title}, augment {args.augment} in every arm"
        print(f"written to {write_section(key, title, body)}")


if __name__ == "__main__":
    main()
