"""Hyperparameter search with Keras Tuner: search spaces, the search, its results and sensitivity.

Example:
    >>> import cnnkit
    >>> space = {"arch": "{f}C{k}-MP2-FC64", "hyperparameters": {"f": [8, 16], "k": [3, 5]}}
    >>> result = cnnkit.tuner.search(space, "mnist-sample", max_trials=4, epochs=2)  # doctest: +SKIP
    >>> result.best_arch, result.best_score  # doctest: +SKIP
"""

from cnnkit.tuner.metrics import BalancedAccuracy
from cnnkit.tuner.result import SearchResult, TrialRecord
from cnnkit.tuner.sensitivity import Sensitivity, sensitivity
from cnnkit.tuner.space import KNOBS, SearchSpace
from cnnkit.tuner.tuning import ALGORITHMS, OBJECTIVES, SearchError, search

__all__ = [
    "ALGORITHMS",
    "KNOBS",
    "OBJECTIVES",
    "BalancedAccuracy",
    "SearchError",
    "SearchResult",
    "SearchSpace",
    "Sensitivity",
    "TrialRecord",
    "search",
    "sensitivity",
]
