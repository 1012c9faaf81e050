"""One worker of a multi-worker training run: ``python train_worker.py OUT_DIR`` with ``TF_CONFIG`` set.

It writes ``OUT_DIR/result-<task index>.npz`` (the final weights) and ``.json`` (the Run's
metrics, history, run_dir and recorded distribution). The test imports :func:`train_and_record`
to make the one-process reference with the same data and arguments.
"""

import json
import os
import sys
from pathlib import Path

import cnnkit.distribute


def tiny_digits(seed=0):
    """384 + 128 12x12 images of 4 classes, each class a bright quadrant over noise."""
    import numpy as np

    import cnnkit

    rng = np.random.default_rng(seed)

    def draw(count):
        labels = np.arange(count) % 4
        images = rng.integers(0, 90, (count, 12, 12), dtype=np.uint8)
        for label in range(4):
            row, column = divmod(label, 2)
            images[labels == label, row * 6:row * 6 + 6, column * 6:column * 6 + 6] += 120
        return images, labels

    x, y = draw(384)
    x_test, y_test = draw(128)
    return cnnkit.data.from_arrays(x, y, x_test=x_test, y_test=y_test, val_split=0.25, seed=seed)


def train_and_record(out: Path, name: str, *, strategy: str, run_dir: Path):
    """Train the test's network on :func:`tiny_digits` (global batch 32) and write ``result-<name>.*``."""
    import numpy as np

    import cnnkit

    run = cnnkit.recipes.train("8C5-MP2-FC32", tiny_digits(), strategy=strategy, epochs=2, batch_size=32,
                               learning_rate=3e-3, precision="float32", seed=0, run_dir=run_dir, verbose=0)
    np.savez(out / f"result-{name}.npz", *run.model.get_weights())
    (out / f"result-{name}.json").write_text(json.dumps({
        "run_dir": None if run.run_dir is None else str(run.run_dir),
        "metrics": {key: run.metrics[key] for key in ("test_accuracy", "best_val_accuracy", "epochs_run")},
        "history": {key: run.history[key] for key in ("loss", "val_loss")},
        "distribution": run.config.get("distribution"),
    }))


if __name__ == "__main__":
    # TensorFlow configures collective ops at start-up: the strategy comes before any data.
    cnnkit.distribute.get_strategy("multi_worker")
    out = Path(sys.argv[1])
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    train_and_record(out, str(index), strategy="multi_worker", run_dir=out / "run")
