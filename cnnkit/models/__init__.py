"""Architectures: registered networks, the notation builder, custom layers.

Example:
    >>> from cnnkit import models
    >>> "resnet20" in models.list_models()
    True
"""

from cnnkit.models.registry import Architecture, describe, get_architecture, list_models, register_model

__all__ = ["Architecture", "describe", "get_architecture", "list_models", "register_model"]
