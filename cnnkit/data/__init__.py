"""Data sources: arrays, folders and named datasets, each returned as an `ImageData`.

An `ImageData` holds unbatched `tf.data.Dataset`s of `(uint8 image [H, W, C], int32 label)`
for train/val/test, with class names, image shape, per-class counts, a source line and a
content fingerprint. TensorFlow and PIL load on first use, so importing this is cheap.

Example:
    >>> import cnnkit
    >>> data = cnnkit.data.load("mnist-sample")
    >>> print(data.summary())  # doctest: +SKIP
    >>> data = cnnkit.data.from_folder("pets/", image_size=(128, 128))  # doctest: +SKIP
    >>> print(cnnkit.data.audit("pets/", test_path="pets-test/"))  # doctest: +SKIP
"""

from cnnkit.data.audit import AuditReport, audit
from cnnkit.data.datasets import list_datasets, load
from cnnkit.data.folder import MAX_IMAGE_PIXELS, from_folder
from cnnkit.data.imagedata import ImageData, from_arrays
from cnnkit.data.long_tailed import long_tailed

__all__ = [
    "MAX_IMAGE_PIXELS",
    "AuditReport",
    "ImageData",
    "audit",
    "from_arrays",
    "from_folder",
    "list_datasets",
    "load",
    "long_tailed",
]
