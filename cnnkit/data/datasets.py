"""Named datasets: `load(name)` and `list_datasets()`.

`"mnist"` is the full MNIST (60,000 train / 10,000 test), read from a local `mnist.npz` or
downloaded by `keras.datasets.mnist`; `"mnist-long-tailed"` is that cut to a long tail
(`cnnkit.data.long_tailed`: 5,000 training images of class 0 falling to 50 of class 9, the
whole test set); `"mnist-sample"` is a stratified 5,000 / 1,000 subset of
it bundled with the package (`cnnkit/data/mnist_sample.npz`, made by
`scripts/make_mnist_sample.py`), for tests, examples and quick runs without any file or network.
"""

from __future__ import annotations

import difflib
import inspect
import os
import zipfile
from pathlib import Path

import numpy as np

from cnnkit.data.imagedata import ImageData, from_arrays

DATA_DIR_ENV = "CNNKIT_DATA_DIR"
MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
SAMPLE_FILE = "mnist_sample.npz"

_REGISTRY: dict[str, tuple[object, str]] = {}


def _register(name: str, description: str):
    """Register a loader `fn(**kwargs) -> ImageData` under `name` (lowercase, `-` separated)."""

    def decorator(fn):
        if name in _REGISTRY:
            raise ValueError(f"Dataset {name!r} is already registered. Received: name={name!r}")
        _REGISTRY[name] = (fn, description)
        return fn

    return decorator


def list_datasets() -> list[str]:
    """Names `load` accepts, sorted.

    Returns:
        The registered dataset names.

    Example:
        >>> from cnnkit.data import list_datasets
        >>> list_datasets()
        ['mnist', 'mnist-long-tailed', 'mnist-sample']
    """
    return sorted(_REGISTRY)


def load(name: str, **kwargs) -> ImageData:
    """Load a named dataset.

    Args:
        name: One of `list_datasets()` (case-insensitive; `_` may stand for `-`):
            `"mnist"`: full MNIST from `$CNNKIT_DATA_DIR/mnist.npz` when that variable is
            set, else the Keras cache (`$KERAS_HOME` or `~/.keras`, `datasets/mnist.npz`),
            else downloaded by `keras.datasets.mnist.load_data()`.
            `"mnist-long-tailed"`: `"mnist"` cut by `cnnkit.data.long_tailed` (also takes
            `largest=5000` and `smallest=50`; `seed` chooses the kept images too).
            `"mnist-sample"`: the bundled stratified subset, 500 train and 100 test images
            per digit.
        **kwargs: Passed to the loader; all take `val_split=0.1` and `seed=0` (the
            stratified validation split of `from_arrays`).

    Returns:
        An `ImageData` of 28x28x1 `uint8` images with class names `"0"`..`"9"`.

    Raises:
        ValueError: If `name` is unknown (the message lists close matches first, then the
            other known names) or a keyword is not one the loader takes.
        FileNotFoundError: If `CNNKIT_DATA_DIR` is set but holds no `mnist.npz`.

    Example:
        >>> import cnnkit
        >>> data = cnnkit.data.load("mnist-sample", val_split=0.1)
        >>> data.sizes
        {'train': 4500, 'val': 500, 'test': 1000}
    """
    loader = dataset_loader(name)
    accepted = [
        p.name
        for p in inspect.signature(loader).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"load({name.strip().lower().replace('_', '-')!r}) does not take {unknown}; it takes {accepted}. "
            f"Received: {', '.join(f'{k}={kwargs[k]!r}' for k in unknown)}"
        )
    return loader(**kwargs)


def dataset_loader(name: str):
    """The function ``load(name, **kwargs)`` calls; its keyword arguments are the options ``name`` takes.

    Raises:
        ValueError: If ``name`` is unknown (close matches first, then the other known names).

    Example:
        >>> import inspect
        >>> list(inspect.signature(dataset_loader("mnist")).parameters)
        ['val_split', 'seed']
    """
    if not isinstance(name, str):
        raise ValueError(
            f"name must be a string, one of {list_datasets()}. Received: name={name!r}"
        )
    key = name.strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=5, cutoff=0.5)
        known = close + [n for n in sorted(_REGISTRY) if n not in close]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}. "
            f"Received: name={name!r}"
        )
    return _REGISTRY[key][0]


@_register("mnist", "MNIST digits, 60,000 train / 10,000 test, 28x28 grayscale")
def _load_mnist(*, val_split: float = 0.1, seed: int = 0) -> ImageData:
    path = mnist_path()
    if path is not None:
        arrays = _read_mnist_npz(path)
        source = f"mnist ({path})"
    else:  # the real code path of a user with internet; never taken in tests
        import keras

        from cnnkit.downloads import keras_download

        with keras_download("MNIST", f"set {DATA_DIR_ENV} to a folder holding mnist.npz, or use 'mnist-sample'"):
            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        source = "mnist (keras.datasets.mnist.load_data)"
    return _mnist_image_data(arrays, source, val_split, seed)


@_register("mnist-sample", "bundled MNIST subset, 500 train + 100 test images per digit")
def _load_mnist_sample(*, val_split: float = 0.1, seed: int = 0) -> ImageData:
    from importlib import resources

    resource = resources.files("cnnkit.data").joinpath(SAMPLE_FILE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"The bundled MNIST sample {resource} is missing from the installed cnnkit. "
            "Recreate it with `python scripts/make_mnist_sample.py` in a source checkout."
        )
    with resources.as_file(resource) as path:
        arrays = _read_mnist_npz(path)
    source = f"mnist-sample ({resource}; 500 train + 100 test per digit)"
    return _mnist_image_data(arrays, source, val_split, seed)


@_register("mnist-long-tailed", "MNIST cut to a long tail: 5,000 train images of 0 falling to 50 of 9; full test set")
def _load_mnist_long_tailed(*, largest: int = 5000, smallest: int = 50, val_split: float = 0.1,
                            seed: int = 0) -> ImageData:
    from cnnkit.data.long_tailed import long_tailed

    return long_tailed(_load_mnist(val_split=val_split, seed=seed), largest=largest, smallest=smallest, seed=seed)


def mnist_path() -> Path | None:
    """The local `mnist.npz` that `load("mnist")` reads, or None to download.

    Returns:
        `$CNNKIT_DATA_DIR/mnist.npz` when the variable is set (and non-empty), else the Keras
        cache file when it exists, else `None`.

    Raises:
        FileNotFoundError: If `CNNKIT_DATA_DIR` is set but has no `mnist.npz`.
    """
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        path = Path(data_dir).expanduser() / "mnist.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={data_dir!r} but {path.resolve()} does not exist. Put mnist.npz "
                f"(keys {', '.join(MNIST_KEYS)}) in that folder, set {DATA_DIR_ENV} to the "
                f"folder that holds it, or unset {DATA_DIR_ENV} to use the Keras cache "
                "(~/.keras/datasets/mnist.npz) or download."
            )
        return path.resolve()
    keras_home = os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
    cached = Path(keras_home).expanduser() / "datasets" / "mnist.npz"
    return cached.resolve() if cached.is_file() else None


def _read_mnist_npz(path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"Cannot read {path} as an .npz file: {exc}. Received: path={str(path)!r}"
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} is a single .npy array, not an .npz archive. Received: path={str(path)!r}"
        )
    with npz:
        missing = [k for k in MNIST_KEYS if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path} lacks the MNIST arrays {missing} (it has {sorted(npz.files)}); "
                f"expected keys {list(MNIST_KEYS)}. Received: path={str(path)!r}"
            )
        arrays = {}
        for key in MNIST_KEYS:
            try:
                arrays[key] = npz[key]
            except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:  # a damaged or pickled member
                raise ValueError(f"Cannot read the array {key!r} of {path}: {exc}. Received: path={str(path)!r}") from exc
        return arrays


def _mnist_image_data(arrays, source, val_split, seed) -> ImageData:
    try:
        data = from_arrays(
            arrays["x_train"],
            arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
            val_split=val_split,
            class_names=[str(d) for d in range(10)],
            seed=seed,
        )
    except ValueError as exc:  # arrays that are not MNIST's: say which file holds them
        raise ValueError(f"{source}: {exc}") from exc
    data.source = source
    return data
