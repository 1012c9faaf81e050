"""cnnkit: convolutional image classifiers with Keras 3 and TensorFlow.

Importing ``cnnkit`` is cheap: TensorFlow loads on first use of a name that needs it.

Example:
    >>> import cnnkit
    >>> print(cnnkit.plan("20C5-MP2-50C5-MP2-FC256", (28, 28, 1), 10))  # doctest: +SKIP
    >>> model = cnnkit.build("lenet", (28, 28, 1), 10)  # doctest: +SKIP
"""

import importlib

__version__ = "0.1.0"

from cnnkit.spec import SpecError  # noqa: E402  (pure Python, no TensorFlow)

_LAZY = {
    "build": ("cnnkit.models.builder", "build"),
    "plan": ("cnnkit.planner", "plan"),
    "Plan": ("cnnkit.planner", "Plan"),
    "load": ("cnnkit.runs", "load"),
    "Run": ("cnnkit.runs", "Run"),
    "TrainingDiverged": ("cnnkit.runs", "TrainingDiverged"),
    "predict_map": ("cnnkit.models.convert", "predict_map"),
    "export": ("cnnkit.exporting", "export"),
}
_SUBPACKAGES = {"models", "data", "recipes", "tuner", "visualize", "distribute"}

__all__ = ["SpecError", "__version__", *_LAZY, *sorted(_SUBPACKAGES)]


def __getattr__(name):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"cnnkit.{name}")
    else:
        raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
    globals()[name] = value
    return value
