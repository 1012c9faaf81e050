"""``cnnkit.distribute``: the ``strategy=`` of the recipes, on one GPU, several, or several hosts.

``train``, ``finetune`` and ``ensemble`` take ``strategy=``:

* ``"auto"`` (default): the strategy whose ``scope()`` the call is made in, if any; else
  ``tf.distribute.MirroredStrategy`` when several GPUs are visible; else one device.
* ``"mirrored"``: ``MirroredStrategy`` over every visible GPU (the CPU when there is none).
* ``"multi_worker"``: ``MultiWorkerMirroredStrategy`` over the hosts ``TF_CONFIG`` names. Every
  worker runs the same call; ``TensorFlow`` needs it created before it runs anything, so a
  script calls ``get_strategy("multi_worker")`` first thing (the CLI needs nothing: ``cnnkit
  run`` creates it before it checks the recipe). ``TF_CONFIG`` must name the ``"cluster"`` and
  this process's ``"task"``.
* ``"tpu"``: ``TPUStrategy`` on the TPU ``TPUClusterResolver`` finds (``TPU_NAME``, or the
  local TPU VM). Written to TensorFlow's documented recipe, not tested here (no TPU).
* a ``tf.distribute.Strategy`` instance.

What a recipe does under a strategy (the :func:`distributed` decorator and three helpers):

* Everything it creates (model, preprocessing layers, optimisers, metrics) is created in
  ``strategy.scope()``, and so are compile and fit.
* ``batch_size`` is the global batch: each step splits it evenly across the replicas (it must be
  a multiple of their number), and the gradients are summed, so N replicas train like one
  device with the same batch as long as every batch splits evenly. A last partial batch whose
  size is not a multiple of N is weighted differently: each replica averages its own share and
  the replicas' averages count equally, so an image in a smaller share weighs more. The
  learning rate is used as given, unless
  ``scale_learning_rate=True``, which multiplies it by the number of replicas (the linear
  scaling rule of Goyal et al. 2017, "Accurate, Large Minibatch SGD": for a global batch N
  times the one the rate was tuned for; a warm-up, e.g. ``schedule="onecycle"``, helps).
* With several replicas (``"mirrored"`` on several GPUs, ``"multi_worker"``, ``"auto"`` on a
  host with several GPUs) each call into the compiled graph runs one step: the recipe's
  ``steps_per_execution`` becomes 1, and ``config.yaml`` records 1. Keras 3.15's multi-step
  loop, a ``tf.cond`` inside a ``tf.while_loop``, fails with a cross-replica all-reduce in it.
* Datasets are sharded by data (:func:`shard`): every worker reads the same cached pipeline
  and keeps its part of each global batch.
* Only the chief writes the run directory. Other workers write to a temporary copy of it
  (Keras's multi-worker checkpoint pattern), removed when the call ends; their ``Run`` has
  ``run_dir=None``. The copy starts from what the chief's directory holds, so a resumed run
  restarts every worker from the chief's backup (the run directory must then be on a
  filesystem every worker sees; without one, resume only on the chief's host with one worker).

Keras 3.15 does not run ``fit`` over several replicas out of the box (keras-team/keras#20585):
its symbolic build averages the first batch across replicas, which fails when a batch does not
split evenly (replicas of 20 and 19 images) and, across workers, on any nested batch; and under
``MultiWorkerMirroredStrategy`` its metric reduction asks for ``axis=0`` of scalars.
:func:`get_strategy` corrects both (:func:`_patch_keras_for_replicas`) when it makes or is given
a strategy with several replicas or workers.

Example:
    >>> import cnnkit.distribute  # doctest: +SKIP
    >>> strategy = cnnkit.distribute.get_strategy("multi_worker")  # first thing; TF_CONFIG set  # doctest: +SKIP
    >>> run = cnnkit.recipes.train("20C5-MP2-50C5-MP2-FC256", "mnist-sample", strategy=strategy,
    ...                            batch_size=256, run_dir="runs/mnist-2workers")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "multi_worker", "tpu")


def get_strategy(strategy="auto") -> tf.distribute.Strategy:
    """The ``tf.distribute.Strategy`` a recipe's ``strategy=`` names.

    ``"mirrored"``, ``"multi_worker"`` and ``"tpu"`` are made once per process and reused (a
    process can configure its collective ops and its TPU system only once).

    Args:
        strategy: "auto", "mirrored", "multi_worker", "tpu" or a ``tf.distribute.Strategy``
            (see the module docstring).

    Returns:
        The strategy; for "auto" on one device, TensorFlow's default strategy.

    Raises:
        ValueError: an unknown name, "multi_worker" without a ``TF_CONFIG`` that names a ``"cluster"``
            (its chief/worker addresses) and this process's ``"task"`` (type, index), or "tpu" with no TPU.
        RuntimeError: "multi_worker" asked for after TensorFlow has started running (it must
            come first in the process).

    Example:
        >>> get_strategy().num_replicas_in_sync  # doctest: +SKIP
        1
    """
    if isinstance(strategy, tf.distribute.Strategy):
        pass
    elif strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)} or a tf.distribute.Strategy. "
                         f"Received: strategy={strategy!r}")
    elif strategy != "auto":
        strategy = _create(strategy)
    elif not tf.distribute.has_strategy() and len(tf.config.list_physical_devices("GPU")) > 1:
        strategy = _create("mirrored")
    else:
        strategy = tf.distribute.get_strategy()  # the one in scope, else the default (one device)
    if _replicated(strategy):
        _patch_keras_for_replicas()
    return strategy


def _replicated(strategy) -> bool:
    """Whether ``strategy`` runs several replicas (or workers), where Keras 3.15 needs cnnkit's corrections."""
    return strategy.num_replicas_in_sync > 1 or isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


@functools.cache
def _create(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise ValueError(f"strategy='tpu' found no TPU to connect to ({error}); set TPU_NAME or run on a TPU "
                             "VM") from None
        return tf.distribute.TPUStrategy(resolver)
    _check_tf_config(os.environ.get("TF_CONFIG"))
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:
        if "program startup" not in str(error):
            raise
        raise RuntimeError("strategy='multi_worker' has to be created before TensorFlow runs anything in the "
                           "process (TensorFlow configures collective ops at start-up): call "
                           "cnnkit.distribute.get_strategy('multi_worker') first thing, before loading data") from None
    return strategy


_TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}\' (see docs/SCALING.md)')


def _check_tf_config(text):
    """Refuse a ``TF_CONFIG`` that is not a cluster of chief/worker tasks with this process's task.

    TensorFlow takes one without ``"cluster"`` (a typo, ``{}``, ``[]``) for a cluster of one: each
    host would then train alone and write the run directory as its chief.
    """
    if not text:
        raise ValueError("strategy='multi_worker' reads the cluster from the TF_CONFIG environment variable, which "
                         f"is not set; e.g. {_TF_CONFIG_EXAMPLE}")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Received: TF_CONFIG={text!r}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(config, dict):
        problem = 'is not a JSON object with "cluster" and "task"'
    elif not isinstance(cluster, dict) or not (cluster.get("chief") or cluster.get("worker")):
        problem = 'has no "cluster" key with the addresses of its "chief" or "worker" tasks'
    elif not isinstance(task, dict):
        problem = 'has no "task" key: this process\'s "type" and "index" in the cluster'
    elif "type" not in task or "index" not in task:
        problem = f'has no "{"type" if "type" not in task else "index"}" key in its "task"'
    else:
        return
    raise ValueError(f"strategy='multi_worker': TF_CONFIG {problem}; e.g. {_TF_CONFIG_EXAMPLE}. "
                     f"Received: TF_CONFIG={text!r}")


def is_chief(strategy=None) -> bool:
    """Whether this process writes the results: true except on the non-chief workers of a cluster.

    The chief is the ``"chief"`` task of ``TF_CONFIG``, or worker 0 when there is none
    (TensorFlow's ``strategy.extended.should_checkpoint``).

    Args:
        strategy: a strategy; default the one in scope (or the default strategy).

    Example:
        >>> is_chief()
        True
    """
    strategy = strategy if strategy is not None else tf.distribute.get_strategy()
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def shard(dataset):
    """``dataset`` set to be sharded by data across workers (``AutoShardPolicy.DATA``); ``None`` stays ``None``.

    cnnkit's pipelines cache images in memory, so there are no files to split among workers:
    each worker reads the pipeline and keeps its share of every global batch. Nothing changes
    on one worker.

    Example:
        >>> shard(tf.data.Dataset.range(4).batch(2)).options().experimental_distribute.auto_shard_policy.name
        'DATA'
    """
    if dataset is None:
        return None
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def learning_rate_scale(batch_size: int, scale_learning_rate: bool = False, strategy=None) -> int:
    """The learning-rate factor for a global ``batch_size``: the replica count with the linear scaling rule, else 1.

    Args:
        batch_size: the global batch; it must split evenly across the replicas.
        scale_learning_rate: apply the linear scaling rule (Goyal et al. 2017).
        strategy: default the one in scope.

    Raises:
        ValueError: ``batch_size`` is not a multiple of the number of replicas.

    Example:
        >>> learning_rate_scale(128, scale_learning_rate=True)  # one device
        1
    """
    strategy = strategy if strategy is not None else tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"batch_size is the global batch, split evenly across the {replicas} replicas: make it a "
                         f"multiple of {replicas}. Received: batch_size={batch_size}")
    return replicas if scale_learning_rate else 1


def describe(strategy=None) -> dict:
    """The strategy as ``config.yaml`` records it: its class, replicas, workers and this task.

    Example:
        >>> describe()["replicas"]
        1
    """
    strategy = strategy if strategy is not None else tf.distribute.get_strategy()
    record = {"strategy": _name(strategy), "replicas": strategy.num_replicas_in_sync, "workers": 1}
    resolver = getattr(strategy, "cluster_resolver", None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver is not None:
        spec = resolver.cluster_spec()
        record["workers"] = sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)
        record["task"] = f"{resolver.task_type}:{resolver.task_id}"
    return record


def _name(strategy) -> str:
    """The public name of a strategy's class (TensorFlow's classes have private names)."""
    for public in ("MultiWorkerMirroredStrategy", "MirroredStrategy", "TPUStrategy", "OneDeviceStrategy"):
        if isinstance(strategy, getattr(tf.distribute, public)):
            return public
    name = type(strategy).__name__
    return "default (one device)" if name.startswith("_Default") else name


def distributed(recipe):
    """Decorate a recipe taking ``strategy`` and ``run_dir`` to run under that strategy.

    The call runs in ``strategy.scope()``; a non-chief worker's ``run_dir`` becomes a temporary
    copy of the chief's, removed afterwards, and its ``Run`` comes back with ``run_dir=None``.
    The recipe sees ``strategy`` as a name (for its records) and reads the strategy itself from
    ``tf.distribute.get_strategy()``. A ``keras.Model`` argument must have been built in the
    same strategy's scope.

    Example:
        >>> @distributed
        ... def recipe(arch, *, strategy="auto", run_dir=None): ...
    """
    signature = inspect.signature(recipe)

    @functools.wraps(recipe)
    def run(*args, **kwargs):
        import keras

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments["strategy"]
        strategy = get_strategy(given)
        bound.arguments["strategy"] = given if isinstance(given, str) else _name(given)
        if _replicated(strategy) and "steps_per_execution" in bound.arguments:
            bound.arguments["steps_per_execution"] = 1  # Keras's multi-step loop cannot hold cross-replica ops
        if bound.arguments["run_dir"] is None and describe(strategy)["workers"] > 1:
            raise ValueError("with several workers give run_dir: the path the chief writes and every worker resumes "
                             "from (on a filesystem they all see, to resume). Received: run_dir=None")
        with strategy.scope():
            if tf.distribute.has_strategy():
                for name, value in bound.arguments.items():
                    if isinstance(value, keras.Model) and getattr(value, "_distribute_strategy", None) is not strategy:
                        raise ValueError(f"{name} is a keras.Model built outside the scope of the strategy it would "
                                         "train under: build it inside `with cnnkit.distribute.get_strategy(...)"
                                         f".scope():`. Received: strategy={given!r}")
            if is_chief(strategy):
                return recipe(*bound.args, **bound.kwargs)
            chief_dir = bound.arguments["run_dir"]
            with tempfile.TemporaryDirectory(prefix="cnnkit-worker-") as scratch:
                bound.arguments["run_dir"] = Path(scratch) / "run"
                if chief_dir is not None and Path(chief_dir).is_dir():
                    shutil.copytree(chief_dir, bound.arguments["run_dir"])
                result = recipe(*bound.args, **bound.kwargs)
            result.run_dir = None
            if bound.arguments.get("verbose"):
                print(f"{describe(strategy).get('task', 'this worker')} is not the chief: its copy of the run "
                      f"directory was temporary and is gone; the chief writes {chief_dir}", flush=True)
            return result

    return run


def _patch_keras_for_replicas():
    """Let Keras 3 ``fit``/``evaluate`` run over several replicas or workers (keras-team/keras#20585).

    Two corrections to Keras's TensorFlow trainer; one device is left to Keras as it is:

    * Before the first step Keras builds the model, optimiser and metrics from the shapes of the
      first batch, which it gets by averaging the batch across replicas: that fails when the
      replicas' shares differ in size (a batch that does not split evenly), and across workers on
      a nested structure. Here the first local replica's share gives the shapes. This applies
      under every strategy with several replicas, and under ``MultiWorkerMirroredStrategy``.
    * Under ``MultiWorkerMirroredStrategy`` each step's metrics are averaged across replicas with
      ``reduce("MEAN", axis=0)``, which fails on scalars; here ``axis=None``, the mean of the
      replicas' values. (On one host Keras averages the local values itself, which works.)

    Example:
        >>> _patch_keras_for_replicas()  # doctest: +SKIP
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "cnnkit_replicas", False):
        return
    symbolic_build, reduce_per_replica = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def multi_worker(strategy) -> bool:
        return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def local(value, strategy):
        return strategy.experimental_local_results(value)[0] if isinstance(value, tf.distribute.DistributedValues) else value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not _replicated(strategy):
            return symbolic_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = tree.map_structure(lambda value: local(value, strategy), next(batches))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce(values, strategy, reduction):
        if reduction in ("auto", "mean") and multi_worker(strategy):
            return tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    reduce.cnnkit_replicas = True
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce


__all__ = ["STRATEGIES", "describe", "distributed", "get_strategy", "is_chief", "learning_rate_scale", "shard"]
