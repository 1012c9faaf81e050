import numpy as np
import pytest

import cnnkit


@pytest.fixture(scope="session")
def tiny_mnist():
    """400 train / 100 test real MNIST digits from the bundled sample."""
    sample = cnnkit.data.load("mnist-sample")
    x, y = sample.arrays("train")
    x_test, y_test = sample.arrays("test")
    return cnnkit.data.from_arrays(x[:400], y[:400], x_test=x_test[:100], y_test=y_test[:100], seed=0)


@pytest.fixture
def image_folder(tmp_path):
    """A folder of 2 classes x 6 PNGs (one subfolder per class)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "images" / name).mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 80, (12, 10, 3), dtype=np.uint8) + 150 * label
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / name / f"{index}.png")
    return tmp_path / "images"
