"""Recipes: the field's best practice as one call each.

Example:
    >>> import cnnkit
    >>> run = cnnkit.recipes.train("lenet", "mnist-sample", epochs=2)  # doctest: +SKIP
"""

from cnnkit.recipes.ensemble import ensemble
from cnnkit.recipes.finetune import finetune
from cnnkit.recipes.train import train
from cnnkit.recipes.transfer import transfer

__all__ = ["ensemble", "finetune", "train", "transfer"]
