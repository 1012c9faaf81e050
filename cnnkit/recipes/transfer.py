"""``cnnkit.recipes.transfer``: does pretraining pay? Pretrain, fine-tune on few labels, compare with scratch.

The experiment behind "don't be a hero": train a network on some classes (the source task),
fine-tune it with the staged schedule on other classes with only a few labels each (the target
task), and train the same network from scratch on the same few labels. Both target runs are
evaluated on the whole target test split. ``cnnkit quickstart`` runs it on the bundled MNIST
sample (digits 0-4 -> 5-9, 50 labels per class).

Example:
    >>> result = transfer("20C5-MP2-50C5-MP2-FC256", "mnist-sample", source_classes=range(5),
    ...                   target_classes=range(5, 10), labels_per_class=50)  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cnnkit.config import validate_kwargs
from cnnkit.recipes.finetune import finetune as finetune_recipe
from cnnkit.recipes.fitting import prepare_run_dir, remove_if_failed_start
from cnnkit.recipes.options import check_call
from cnnkit.recipes.pipeline import resolve_data
from cnnkit.recipes.train import train as train_recipe
from cnnkit.runs import Run, release_run_dir


@dataclasses.dataclass
class TransferResult:
    """The three runs of a transfer experiment and the comparison.

    Attributes:
        pretrained: the run trained on the source classes.
        finetuned: the pretrained network fine-tuned on the few target labels.
        scratch: the same architecture trained from scratch on the same labels.
        run_dir: the folder holding ``pretrain/``, ``finetune/`` and ``scratch/``.
        metrics: the fine-tuned run's metrics plus ``scratch_test_accuracy`` and ``gain``.

    Example:
        >>> result.metrics["gain"]  # doctest: +SKIP
        0.112
    """

    pretrained: Run
    finetuned: Run
    scratch: Run
    run_dir: Path
    metrics: dict

    def summary(self) -> str:
        """Both target accuracies side by side.

        Example:
            >>> print(result.summary())  # doctest: +SKIP
            target test accuracy (2,000 images): fine-tuned 97.10%  from scratch 88.45%  (+8.65 points)
        """
        metrics = self.metrics
        return (f"target test accuracy ({metrics['num_examples']:,} images): fine-tuned {metrics['test_accuracy']:.2%}  "
                f"from scratch {metrics['scratch_test_accuracy']:.2%}  ({100 * metrics['gain']:+.2f} points); "
                f"runs in {self.run_dir}")


def transfer(
    arch,
    data,
    *,
    source_classes,
    target_classes,
    labels_per_class: int = 50,
    val_labels_per_class: int = 10,
    pretrain: dict | None = None,
    finetune: dict | None = None,
    scratch: dict | None = None,
    seed: int = 0,
    run_dir=None,
    verbose: int = 1,
) -> TransferResult:
    """Pretrain ``arch`` on the source classes; fine-tune and train from scratch on few target labels.

    Args:
        arch: notation or a registered name (see ``train``).
        data: an ``ImageData`` or a dataset name (see ``train``).
        source_classes: class names or indices to pretrain on.
        target_classes: class names or indices of the target task (relabelled in this order).
        labels_per_class: labelled training images per target class (drawn with ``seed``).
        val_labels_per_class: labelled validation images per target class (watched, not trained on).
        pretrain: keyword arguments of ``train`` for the source task.
        finetune: keyword arguments of ``finetune`` for the target task (stages etc.).
        scratch: keyword arguments of ``train`` for the from-scratch baseline.
        seed: seeds the label draw and every run.
        run_dir: folder for the three runs; default ``runs/transfer-<arch>-<timestamp>``.
        verbose: as for ``train``.

    Returns:
        A ``TransferResult``.

    Raises:
        ValueError: before anything runs, for an ``arch`` that is not a string (a model object), a key
            of ``pretrain``, ``finetune`` or ``scratch`` that its recipe does not take, a value of the
            wrong type or one ``check_options`` refuses (``cnnkit.recipes.options``), a key transfer
            sets itself, or ``weights`` in ``finetune`` (the pretrained run brings its own).

    Example:
        >>> result = transfer("lenet", "mnist", source_classes=range(5), target_classes=range(5, 10),
        ...                   finetune={"stages": "auto", "epochs": 10})  # doctest: +SKIP
    """
    if not isinstance(arch, str):  # one model object would be both the pretrained network and the scratch baseline
        raise ValueError("arch must be notation or a registered name: transfer builds the network twice, to pretrain "
                         f"and from scratch. Received: arch={arch!r} of type {type(arch).__name__}")
    for name, settings, recipe, passed in (("pretrain", pretrain, train_recipe, "arch"),
                                           ("finetune", finetune, finetune_recipe, "backbone"),
                                           ("scratch", scratch, train_recipe, "arch")):
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"{name} must be a mapping of {recipe.__name__} arguments. Received: {name}={settings!r}")
        validate_kwargs(recipe, settings or {}, qualname=f"transfer's {name} ({recipe.__name__})",
                        provided=(passed, "data", "seed", "verbose", "run_dir"))
        try:
            check_call(recipe, settings or {})
        except ValueError as error:
            raise ValueError(f"transfer's {name}: {error}") from None
    if "weights" in (finetune or {}):
        raise ValueError("transfer's finetune: the backbone is the pretrain run, which brings its own weights, so "
                         f"finetune may not set 'weights'. Received: weights={finetune['weights']!r}")
    source_classes, target_classes = list(source_classes), list(target_classes)  # a generator is read once
    for name, classes in (("source_classes", source_classes), ("target_classes", target_classes)):
        if len(classes) < 2:
            raise ValueError(f"{name} must name at least 2 classes (each task is a classifier). Received: "
                             f"{name}={classes!r}")
    data = resolve_data(data)
    if data.test is None:
        raise ValueError(f"transfer compares fine-tuning with scratch on the test split; the data has none "
                         f"({data.source}): give test data (from_folder's test_path, or from_arrays' x_test)")
    source = data.subset(classes=source_classes, seed=seed)
    target = data.subset(classes=target_classes, per_class=labels_per_class,
                         val_per_class=val_labels_per_class, seed=seed)
    shared = sorted(set(source.class_names) & set(target.class_names))
    if shared:  # pretraining on all of their labels would leak into the few-label comparison
        raise ValueError(f"source_classes and target_classes share {shared}: pretraining must see other classes. "
                         f"Received: source_classes={source_classes!r}, target_classes={target_classes!r}")
    run_dir = prepare_run_dir(run_dir, f"transfer-{arch}")
    common = {"seed": seed, "verbose": verbose}
    try:
        pretrained = train_recipe(arch, source, run_dir=run_dir / "pretrain", **common, **(pretrain or {}))
        finetuned = finetune_recipe(pretrained.run_dir, target, run_dir=run_dir / "finetune", **common,
                                    **(finetune or {}))
        from_scratch = train_recipe(arch, target, run_dir=run_dir / "scratch", **common, **(scratch or {}))
    except BaseException:
        remove_if_failed_start(run_dir)  # a run that got somewhere keeps the folder, to resume
        raise
    release_run_dir(run_dir)
    metrics = dict(finetuned.metrics)
    metrics["scratch_test_accuracy"] = from_scratch.metrics["test_accuracy"]
    metrics["gain"] = round(metrics["test_accuracy"] - metrics["scratch_test_accuracy"], 6)
    metrics["pretrain_test_accuracy"] = pretrained.metrics["test_accuracy"]
    result = TransferResult(pretrained, finetuned, from_scratch, run_dir, metrics)
    if verbose:
        print(result.summary())
    return result
