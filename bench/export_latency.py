"""Exported-model speed and quantisation cost: SavedModel latency, predict overhead, int8 accuracy.

1. The seed's conv net (20C5-MP2-50C5-MP2-FC256, float32) trained ``--epochs`` on the bundled
   MNIST sample, exported as a SavedModel (``cnnkit.export``, checked in a fresh process), then
   loaded with plain ``tf.saved_model.load``: ``serving_default`` latency at batch 1 (p50 and
   p99 over ``--calls`` calls, outputs fetched to NumPy) and throughput at batch 256.
2. The per-image cost at batch 1 of ``cnnkit.inference`` (what ``cnnkit predict`` runs: one
   compiled call) against ``model.predict``, medians over ``--predict-calls`` calls each,
   alternating; target ratio >= 20x.
3. The same network trained ``--mnist-epochs`` on real MNIST, exported as full-int8 TFLite
   (calibrated on 256 training images): accuracy change on the 10,000-image test split,
   measured by the export's own fresh-process check; target <= 0.5 points.

Run (CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/export_latency.py
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from results import machine, write_section

import cnnkit
from cnnkit.inference import load_predictor

ARCH = "20C5-MP2-50C5-MP2-FC256"


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def savedmodel_speed(path, images, calls, batches):
    """Batch-1 latencies (seconds, one per call) and batch-256 images per second."""
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    one = tf.constant(images[:1])
    full = tf.constant(np.resize(images, (256, *images.shape[1:])))
    for batch in (one, full):  # warm up both shapes
        serve(images=batch)["probabilities"].numpy()
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        serve(images=one)["probabilities"].numpy()
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(batches):
        serve(images=full)["probabilities"].numpy()
    return latencies, 256 * batches / (time.perf_counter() - started)


def per_image_costs(run_dir, model, image, calls):
    """Median seconds per call at batch 1: cnnkit.inference vs model.predict, alternating rounds."""
    predictor = load_predictor(run_dir)
    arms = {"cnnkit.inference (compiled call)": lambda: predictor.predict(image),
            "model.predict": lambda: model.predict(image, verbose=0)}
    times = {name: [] for name in arms}
    for function in arms.values():
        function()
    for _ in range(5):
        for name, function in arms.items():
            for _ in range(max(1, calls // 5)):
                started = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def int8_on_mnist(epochs, out_dir):
    run = cnnkit.recipes.train(ARCH, "mnist", epochs=epochs, schedule="cosine", precision="float32",
                               run_dir=out_dir / "mnist-run", verbose=0)
    export = cnnkit.export(run, out_dir / "mnist-int8", format="tflite", quantize="int8", verbose=1)
    return run, json.loads((export / "verification.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs on the bundled MNIST sample (speed part)")
    parser.add_argument("--mnist-epochs", type=int, default=3, help="epochs on real MNIST (int8 part)")
    parser.add_argument("--calls", type=int, default=2000, help="batch-1 SavedModel calls for p50/p99")
    parser.add_argument("--batches", type=int, default=100, help="batch-256 SavedModel calls for throughput")
    parser.add_argument("--predict-calls", type=int, default=100, help="calls per arm of the predict comparison")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        run = cnnkit.recipes.train(ARCH, "mnist-sample", epochs=args.epochs, precision="float32",
                                   run_dir=scratch / "run", verbose=0)
        exported = cnnkit.export(run, scratch / "savedmodel", verbose=1)
        parity = json.loads((exported / "verification.json").read_text())
        images = cnnkit.data.load("mnist-sample").arrays("test")[0]
        latencies, throughput = savedmodel_speed(exported, images, args.calls, args.batches)
        costs = per_image_costs(run.run_dir, run.model, images[:1], args.predict_calls)
        mnist_run, int8 = int8_on_mnist(args.mnist_epochs, scratch)

    compiled, keras_predict = costs["cnnkit.inference (compiled call)"], costs["model.predict"]
    ratio = keras_predict / compiled
    change = int8["accuracy_change_points"]
    body = "\n".join([
        f"Command: `CNNKIT_DATA_DIR=../shared/datasets python bench/export_latency.py --epochs {args.epochs} "
        f"--mnist-epochs {args.mnist_epochs} --calls {args.calls} --batches {args.batches} "
        f"--predict-calls {args.predict_calls}`  ",
        f"Machine: {machine()}  ",
        f"{ARCH}, float32, trained {args.epochs} epochs on the bundled MNIST sample; SavedModel from `cnnkit.export` "
        f"(fresh-process parity: max |diff| {parity['max_abs_diff']:.3g}, bytes signature agrees on "
        f"{parity['bytes_class_agreement']:.0%}), loaded with plain `tf.saved_model.load`, outputs fetched to NumPy.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| SavedModel `serving_default`, batch 1, p50 | {percentile(latencies, 50) * 1000:.3f} ms |",
        f"| SavedModel `serving_default`, batch 1, p99 | {percentile(latencies, 99) * 1000:.3f} ms |",
        f"| SavedModel `serving_default`, batch 256 | {throughput:,.0f} images/s |",
        f"| `cnnkit.inference` (`cnnkit predict`), batch 1 | {compiled * 1000:.3f} ms per image |",
        f"| `model.predict`, batch 1 | {keras_predict * 1000:.3f} ms per image |",
        f"| per-image cost ratio (target >= 20x) | **{ratio:.1f}x** ({'met' if ratio >= 20 else 'NOT met'}) |",
        "",
        f"Full-int8 TFLite on real MNIST ({ARCH} trained {args.mnist_epochs} epochs, float32, cosine; calibrated "
        f"on {int8['calibration_images']} training images; checked with {int8['runtime']} in a fresh process on the "
        f"{int8['examples']:,}-image test split): Keras {int8['keras_accuracy']:.2%}, int8 "
        f"{int8['export_accuracy']:.2%}, change **{change:+.2f} points** (target within 0.5: "
        f"{'met' if abs(change) <= 0.5 else 'NOT met'}); {int8['size_bytes']:,} bytes; run test accuracy "
        f"{mnist_run.metrics['test_accuracy']:.2%}.",
    ])
    print(body)
    if not args.no_write:
        print(f"written to {write_section('export-latency', 'Export: SavedModel latency, predict cost, int8', body)}")


if __name__ == "__main__":
    main()
