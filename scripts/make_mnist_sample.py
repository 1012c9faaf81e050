"""Make `cnnkit/data/mnist_sample.npz`, the MNIST subset bundled with cnnkit.

The sample is a stratified, seeded subset of real MNIST: 500 training images per digit
(5,000) and 100 test images per digit (1,000), kept in their original order, saved with
`np.savez_compressed` under the keys of `mnist.npz` (`x_train`, `y_train`, `x_test`,
`y_test`; uint8, 28x28) and nothing else. Zip entry timestamps are fixed, so the same
source and arguments always give the same bytes (the printed sha256 is reproducible, given the same zlib).
`cnnkit.data.load("mnist-sample")` reads it.

Rerun it from the repository root (the default source is `$CNNKIT_DATA_DIR/mnist.npz`, else
`../shared/datasets/mnist.npz` beside the repository):

    python scripts/make_mnist_sample.py
    python scripts/make_mnist_sample.py --source /data/mnist.npz --out /tmp/sample.npz

Example:
    $ python scripts/make_mnist_sample.py
    wrote /.../cnnkit/data/mnist_sample.npz: 5000 train + 1000 test images, 995,947 bytes
    sha256 88f22ec5866b2f514b179894921961ee0b23ff3a3108b5a96726daccbd6677fb
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "cnnkit" / "data" / "mnist_sample.npz"
KEYS = ("x_train", "y_train", "x_test", "y_test")
MAX_BYTES = 2 * 1024 * 1024


def default_source() -> Path:
    """`$CNNKIT_DATA_DIR/mnist.npz` if the variable is set, else `../shared/datasets/mnist.npz`."""
    data_dir = os.environ.get("CNNKIT_DATA_DIR")
    if data_dir:
        return Path(data_dir).expanduser() / "mnist.npz"
    return REPO.parent / "shared" / "datasets" / "mnist.npz"


def stratified_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples of every class, drawn with `seed`, in original order.

    Raises:
        ValueError: If a class has fewer than `per_class` examples.
    """
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(
                f"class {c} has only {idx.size} examples. Received: per_class={per_class}"
            )
        rng = np.random.default_rng([seed, int(c)])
        chosen.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def make_sample(source, out, *, train_per_class=500, test_per_class=100, seed=0) -> dict:
    """Write the subset of `source` to `out` (atomically); return size, sha256 and counts."""
    with np.load(source, allow_pickle=False) as npz:
        data = {k: npz[k] for k in KEYS}
    train = stratified_subset(data["y_train"], train_per_class, seed)
    test = stratified_subset(data["y_test"], test_per_class, seed + 1)
    subset = {
        "x_train": data["x_train"][train],
        "y_train": data["y_train"][train],
        "x_test": data["x_test"][test],
        "y_test": data["y_test"][test],
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **subset)
    payload = _fixed_timestamps(buffer.getvalue())

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, out)
    return {
        "path": out,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "train": len(train),
        "test": len(test),
    }


def _fixed_timestamps(npz_bytes: bytes) -> bytes:
    """Rewrite a zip with every entry dated 1980-01-01, so the bytes are reproducible."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(npz_bytes)) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            dst.writestr(entry, src.read(info.filename))
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="mnist.npz to sample from")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="file to write")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source = args.source or default_source()
    if not source.is_file():
        print(f"error: {source} not found; pass --source or set CNNKIT_DATA_DIR", file=sys.stderr)
        return 2
    try:
        info = make_sample(
            source,
            args.out,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            seed=args.seed,
        )
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {info['path']}: {info['train']} train + {info['test']} test images, "
        f"{info['bytes']:,} bytes"
    )
    print(f"sha256 {info['sha256']}")
    if info["bytes"] > MAX_BYTES:
        print(f"error: larger than the {MAX_BYTES:,}-byte limit for package data", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
