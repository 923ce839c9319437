"""Which devices run the work: the local strategy, the training and evaluation strategies (one
machine or a cluster named by `TF_CONFIG`), the chief task of a cluster, the same CPU kernels in
every process (`loop_step`), and `Spread`, which runs a function on one consecutive slice of a
batch per replica, on this machine or over a cluster."""

import functools
import json
import os

import numpy as np
import tensorflow as tf

from common.runtime.errors import UserError

# How long a collective of an evaluation over a cluster waits for the other workers: longer than
# any worker's share of one attack's call takes beyond the others'.
COLLECTIVE_TIMEOUT_SECONDS = 3600


def local_strategy(cpu_only=False):
    """MirroredStrategy over the local devices: all visible GPUs, or the CPU where there is none
    (or where `cpu_only`)."""
    return tf.distribute.MirroredStrategy(["/cpu:0"] if cpu_only else None)


def default_strategy():
    """The strategy of the attacks when the caller names none: the one in scope, if any; else
    over several local GPUs, one MirroredStrategy for the whole process (strategies made anew
    would number their collectives alike and collide); else the default, one device."""
    if tf.distribute.has_strategy() or len(tf.config.list_logical_devices("GPU")) < 2:
        return tf.distribute.get_strategy()
    return _local_gpus_strategy()


@functools.cache
def _local_gpus_strategy():
    return local_strategy()


def cluster_size():
    """The number of tasks `TF_CONFIG` names (0 where it names no cluster)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        return sum(len(tasks) for tasks in cluster.values())
    except (json.JSONDecodeError, AttributeError, TypeError) as error:
        raise UserError(f"TF_CONFIG is not a JSON object with a cluster: {error}") from error


def training_strategy():
    """MultiWorkerMirroredStrategy where `TF_CONFIG` names a cluster of several tasks, otherwise
    the local strategy (all visible GPUs, or the CPU)."""
    if cluster_size() > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return local_strategy()


def evaluation_strategy(cpu_only=False):
    """The strategy of the attack and evaluation scripts: where `TF_CONFIG` names a cluster of
    several tasks, MultiWorkerMirroredStrategy whose collectives give up after
    COLLECTIVE_TIMEOUT_SECONDS (a hung worker stops the job instead of holding it forever; a
    dead one is found sooner, by the strategy's own health checks); otherwise the local
    strategy."""
    if cluster_size() > 1:
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS))
    return local_strategy(cpu_only)


def spans_workers(strategy):
    """True where `strategy` has replicas in other tasks of a cluster."""
    replicas = strategy.num_replicas_in_sync
    return replicas > 1 and replicas > len(strategy.extended.worker_devices)


def is_chief(strategy):
    """True for the task that writes checkpoints, summaries and the config copy: the only task,
    the `chief` task, or worker 0 of a cluster without one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster or resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


@functools.cache
def cpu_features():
    """The CPU's instruction-set extensions as the kernel lists them (/proc/cpuinfo's flags):
    a fact of the machine, so every process of it makes the same speed choices (a timing probe
    could choose differently in two processes). Empty where the system does not say."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_vendor():
    """The CPU's maker as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"), where the
    same instructions run at different speeds; empty where the system does not say."""
    return _cpuinfo_field("vendor_id").strip()


def _cpuinfo_field(name):
    """The value of /proc/cpuinfo's first `name` line, empty where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value
    except OSError:
        pass
    return ""


def runs_on_cpu(strategy=None):
    """True where the devices of `strategy` are all CPUs; without one (or with the default
    strategy), where no GPU is visible."""
    try:
        workers = strategy.extended.worker_devices if strategy is not None else None
    except RuntimeError:  # the default strategy: ops go where TensorFlow places them
        workers = None
    if workers is None:
        return not tf.config.list_logical_devices("GPU")
    return all(tf.DeviceSpec.from_string(device).device_type == "CPU" for device in workers)


def loop_step(function):
    """`function`, where the strategy in scope runs on CPUs (`runs_on_cpu`), as a function that
    TensorFlow calls rather than inlines: for the model's forward and backward pass inside an
    attack's graph loop.

    oneDNN's layout pass gives a max-pool gradient oneDNN's kernel only where it has already
    rewritten the max-pool that the gradient comes from, and it visits the nodes in an order
    that is topological only where the graph has no cycle. Inlined into a graph loop, the
    model's passes lie on the loop's cycle, and where the pass enters that cycle changes from
    one process to the next: in some processes it meets a max-pool gradient first and leaves it
    to TensorFlow's generic kernel, which runs the attack slower (benchmarks/README.md). A
    function the loop calls is a graph of its own, without a cycle. GPUs keep the inlined form.
    """
    if not runs_on_cpu(tf.distribute.get_strategy()):
        return function
    return tf.function(function, experimental_attributes={"_noinline": True})


def global_sum(value):
    """The sum of `value` (a tensor or a nest of them) over the replicas of a distributed step,
    the value itself outside one or with one replica."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def split_batch(strategy, batch):
    """Gives replica r the r-th consecutive slice of each tensor of the global batch."""
    replicas = strategy.num_replicas_in_sync
    size = len(batch[0])
    if size % replicas:
        raise UserError(f"training_batch_size {size} does not split over {replicas} replicas")
    local = size // replicas

    def replica_slice(context):
        first = context.replica_id_in_sync_group * local
        return tuple(tensor[first:first + local] for tensor in batch)

    return strategy.experimental_distribute_values_from_function(replica_slice)


class Spread:
    """Calls `function` (taking tensors of any batch size, returning per-example tensors) on one
    consecutive slice of the batch per replica of `strategy`, each on its device, and returns the
    results concatenated in order as numpy arrays. Over a cluster (MultiWorkerMirroredStrategy)
    every worker passes the same batch, attacks its replicas' slices and receives the whole
    result. A 0-d argument (a scalar, such as an attack's epsilon scale) goes whole to every
    replica. The function is traced once per shape of one example, so it serves inputs of any
    shape and any scalar's value; `jit_compile` compiles it with XLA."""

    def __init__(self, strategy, function, jit_compile=False):
        self.strategy = strategy or default_strategy()
        self._python_function = function
        self._jit_compile = jit_compile
        self._traced = {}

    def _functions(self, arrays):
        """(the function, its distributed call) for arrays of these example shapes."""
        key = tuple(tf.TensorSpec(() if array.ndim == 0 else (None, *array.shape[1:]),
                                  array.dtype) for array in arrays)
        if key not in self._traced:
            # TensorFlow counts the traces of every function of the same code together and warns
            # of retracing after five; each Spread traces once per example shape, so a partial
            # gives it its own count (a sweep building one attack per epsilon is no retracing).
            function = tf.function(functools.partial(self._python_function),
                                   jit_compile=self._jit_compile,
                                   input_signature=key)
            strategy = self.strategy
            gather = spans_workers(strategy)

            def run(batch):
                results = strategy.run(lambda part: function(*part), args=(batch,))
                return tf.nest.map_structure(lambda result: _gathered(strategy, result),
                                             results) if gather else results

            distributed = tf.function(functools.partial(run), reduce_retracing=True)
            self._traced[key] = function, distributed
        return self._traced[key]

    def tracing_count(self):
        """How often the function was traced, over every example shape it has seen."""
        return sum(function.experimental_get_tracing_count()
                   for function, _ in self._traced.values())

    def __call__(self, *arrays):
        arrays = tuple(np.asarray(array) for array in arrays)
        function, distributed = self._functions(arrays)
        strategy = self.strategy
        replicas = strategy.num_replicas_in_sync
        if replicas == 1 or not len(arrays[0]):  # every worker alike: no collective for nothing
            with strategy.scope():
                return tf.nest.map_structure(lambda tensor: tensor.numpy(), function(*arrays))
        bounds = np.linspace(0, len(arrays[0]), replicas + 1).astype(int)
        counts = np.diff(bounds)
        # A replica left without examples (a batch smaller than the replicas) works on the first
        # example instead, its result dropped: layers may refuse an empty batch.
        kept = np.concatenate([np.full(max(count, 1), count > 0) for count in counts])

        def replica_slice(context):
            replica = context.replica_id_in_sync_group
            first, end = (bounds[replica], bounds[replica + 1]) if counts[replica] else (0, 1)
            return tuple(array[first:end] if array.ndim else array for array in arrays)

        results = distributed(strategy.experimental_distribute_values_from_function(replica_slice))
        if spans_workers(strategy):
            return tf.nest.map_structure(lambda result: result.numpy()[kept], results)
        return tf.nest.map_structure(
            lambda result: np.concatenate([part.numpy() for part in
                                           strategy.experimental_local_results(result)])[kept],
            results)


def _gathered(strategy, result):
    """The per-replica `result` of every replica of the cluster, concatenated in replica order
    (booleans travel as int32: the collectives take numbers only)."""
    if result.dtype != tf.bool:
        return strategy.gather(result, axis=0)
    return tf.cast(strategy.gather(tf.cast(result, tf.int32), axis=0), tf.bool)


def spread_logits(model, strategy=None):
    """The float32 logits of `model` (a Keras model, in evaluation mode, or any callable), each
    batch spread over `strategy`."""
    return Spread(strategy, lambda x: tf.cast(call_model(model, x), tf.float32))


def call_model(model, x, training=False):
    """`model(x)`; a Keras model runs in evaluation mode unless `training`, a plain callable as
    it is."""
    if hasattr(model, "trainable_variables"):
        return model(x, training=training)
    return model(x)
