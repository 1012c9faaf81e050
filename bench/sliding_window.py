"""Sliding-window inference (CS231n's dense-to-convolution conversion): speed and a multi-digit demo.

1. Speed: one forward of the converted network over an 84x84 canvas against the original
   network over every 28x28 crop at the native stride (4 pixels: 15 x 15 = 225 crops), both
   as compiled calls, the crops (a) batched in one call and (b) one call per crop, as a
   sliding window written by hand would. Alternating repeats, medians.
2. Demo: MNIST test digits of distinct classes pasted at random, non-overlapping places on
   84x84 canvases; the score map (stride 1) of each pasted digit's class peaks within
   ``--tolerance`` pixels of where it was pasted, for the printed share of digits. One canvas
   and its maps are saved to docs/sliding_window.png.

Run (CNNKIT_DATA_DIR names the folder holding mnist.npz):
    CNNKIT_DATA_DIR=../shared/datasets python bench/sliding_window.py
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from results import machine, write_section

import cnnkit
from cnnkit.models.convert import native_stride, predict_map, to_fully_convolutional
from cnnkit.report import _new_figure, _save_figure

ARCH = "20C5-MP2-50C5-MP2-FC256"
CANVAS = 84
PICTURE = Path(__file__).resolve().parents[1] / "docs" / "sliding_window.png"


def median_seconds(function, argument, repeats):
    function(argument)  # trace and warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(argument)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speed(model, converted, repeats):
    canvas = np.random.default_rng(0).integers(0, 256, (1, CANVAS, CANVAS, 1)).astype("float32")
    stride = native_stride(model, converted)
    crops = np.stack([canvas[0, y:y + 28, x:x + 28] for y in range(0, CANVAS - 27, stride)
                      for x in range(0, CANVAS - 27, stride)])
    dense = tf.function(lambda x: converted(x, training=False), autograph=False)
    original = tf.function(lambda x: model(x, training=False), autograph=False)
    one_by_one = [crop[None] for crop in crops]
    results = {"converted, one forward": [], "original, crops batched": [], "original, one call per crop": []}
    for _ in range(3):  # alternate the arms
        results["converted, one forward"].append(median_seconds(dense, canvas, repeats))
        results["original, crops batched"].append(median_seconds(original, crops, repeats))
        results["original, one call per crop"].append(
            median_seconds(lambda items: [original(item) for item in items], one_by_one, max(3, repeats // 10)))
    return len(crops), {name: statistics.median(values) for name, values in results.items()}


def paste_canvas(images, labels, rng, digits):
    """An 84x84 canvas with ``digits`` test digits of distinct classes at non-overlapping places."""
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    placed = []
    for index in rng.permutation(len(images)):
        if len(placed) == digits:
            break
        if any(labels[index] == label for label, _, _ in placed):
            continue
        y, x = (int(v) for v in rng.integers(0, CANVAS - 27, 2))
        if any(abs(y - py) < 28 and abs(x - px) < 28 for _, py, px in placed):
            continue
        canvas[y:y + 28, x:x + 28] = np.maximum(canvas[y:y + 28, x:x + 28], images[index][..., 0])
        placed.append((int(labels[index]), y, x))
    return canvas, placed


def demo(model, converted, data, canvases, digits, tolerance, seed):
    images, labels = data.arrays("test")
    rng = np.random.default_rng(seed)
    hits, total, example = 0, 0, None
    for number in range(canvases):
        canvas, placed = paste_canvas(images, labels, rng, digits)
        scores = predict_map(model, canvas, stride=1, converted=converted)
        for label, y, x in placed:
            peak_y, peak_x = np.unravel_index(scores[..., label].argmax(), scores.shape[:2])
            hits += max(abs(peak_y - y), abs(peak_x - x)) <= tolerance
            total += 1
        if number == 0:
            example = (canvas, placed, scores)
    return hits, total, example


def save_picture(canvas, placed, scores):
    figure = _new_figure(4 * (len(placed) + 1), 4.2)
    axes = figure.subplots(1, len(placed) + 1)
    axes[0].imshow(canvas, cmap="gray")
    axes[0].set_title("canvas (boxes: where the map peaks)")
    for axis, (label, y, x) in zip(axes[1:], placed):
        peak_y, peak_x = np.unravel_index(scores[..., label].argmax(), scores.shape[:2])
        axes[0].add_patch(_box(peak_x, peak_y, "lime"))
        axes[0].text(peak_x + 1, peak_y + 6, str(label), color="lime", fontsize=12)
        # position (i, j) of the map is the crop whose top-left is (i, j): centre it on the crop
        axis.imshow(canvas, cmap="gray", extent=(0, CANVAS, CANVAS, 0))
        axis.imshow(scores[..., label], cmap="magma", alpha=0.6, vmin=0, vmax=1,
                    extent=(14, 14 + scores.shape[1], 14 + scores.shape[0], 14))
        axis.set_title(f"P(class {label}) per crop centre; pasted at ({y}, {x})")
    for axis in axes:
        axis.set_xlim(0, CANVAS)
        axis.set_ylim(CANVAS, 0)
    return _save_figure(figure, PICTURE)


def _box(x, y, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 28, 28, fill=False, edgecolor=colour, linewidth=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of training on real MNIST")
    parser.add_argument("--canvases", type=int, default=200)
    parser.add_argument("--digits", type=int, default=3, help="digits pasted on each canvas")
    parser.add_argument("--tolerance", type=int, default=3, help="pixels between the map's peak and the paste")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    data = cnnkit.data.load("mnist")
    with tempfile.TemporaryDirectory() as run_dir:
        run = cnnkit.recipes.train(ARCH, data, epochs=args.epochs, schedule="cosine", precision="float32",
                                   run_dir=run_dir, verbose=0)
    model = run.model
    converted = to_fully_convolutional(model)
    crops, seconds = speed(model, converted, args.repeats)
    hits, total, example = demo(model, converted, data, args.canvases, args.digits, args.tolerance, seed=0)
    dense = seconds["converted, one forward"]
    body = "\n".join([
        f"Command: `CNNKIT_DATA_DIR=../shared/datasets python bench/sliding_window.py --epochs {args.epochs} "
        f"--canvases {args.canvases}`  ",
        f"Machine: {machine()}  ",
        f"{ARCH} trained {args.epochs} epochs on real MNIST (float32; test error {run.metrics['test_error']:.2%}); "
        f"{CANVAS}x{CANVAS} canvas, native stride {native_stride(model, converted)} = {crops} crop positions; compiled calls, "
        f"median of {args.repeats} calls x 3 alternating rounds.",
        "",
        "| how | time per canvas | converted is faster by |",
        "|---|---|---|",
        *[f"| {name} | {value * 1000:.2f} ms | {value / dense:.1f}x |" for name, value in seconds.items()],
        "",
        f"Demo: {args.canvases} canvases x {args.digits} test digits of distinct classes at random non-overlapping "
        f"places; the stride-1 map of each digit's class peaks within {args.tolerance} px of the paste for "
        f"**{hits}/{total} = {hits / total:.1%}** of digits. One canvas: `docs/sliding_window.png`.",
    ])
    print(body)
    if not args.no_write:
        print(f"written to {save_picture(*example)}")
        print(f"written to {write_section('sliding-window', 'Sliding-window inference (dense to convolution)', body)}")


if __name__ == "__main__":
    main()
