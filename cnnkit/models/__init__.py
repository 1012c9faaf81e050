"""Architectures: registered networks, the notation builder, custom layers.

Example:
    >>> from cnnkit import models
    >>> "resnet20" in models.list_models()
    True
"""

from cnnkit.models.registry import Architecture, describe, get_architecture, list_models, register_model

__all__ = ["Architecture", "describe", "get_architecture", "list_backbones", "list_models", "register_model",
           "to_fully_convolutional"]


def __getattr__(name):
    if name == "to_fully_convolutional":  # loads Keras, so only on first use
        from cnnkit.models.convert import to_fully_convolutional

        return to_fully_convolutional
    if name == "list_backbones":
        from cnnkit.models.backbones import list_backbones

        return list_backbones
    raise AttributeError(f"module 'cnnkit.models' has no attribute {name!r}")
