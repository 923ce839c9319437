"""Spreading a batch over all local devices (every visible GPU, or the CPU) for the attack and
scoring scripts: each device takes a consecutive slice, and the results are put back in order."""

import numpy as np
import tensorflow as tf


def local_strategy(cpu_only=False):
    """MirroredStrategy over the local devices: all visible GPUs, or the CPU where there is none
    (or where `cpu_only`)."""
    return tf.distribute.MirroredStrategy(["/cpu:0"] if cpu_only else None)


class Spread:
    """Calls `function` (a `tf.function` taking any batch size, returning per-example tensors)
    on one consecutive slice of the batch per replica of `strategy`, each on its device, and
    returns the results concatenated in order as numpy arrays."""

    def __init__(self, strategy, function):
        self.strategy = strategy
        self.function = function
        self._distributed = tf.function(
            lambda batch: strategy.run(lambda part: function(*part), args=(batch,)),
            reduce_retracing=True)

    def __call__(self, *arrays):
        strategy = self.strategy
        replicas = strategy.num_replicas_in_sync
        if replicas == 1:
            with strategy.scope():
                return tf.nest.map_structure(lambda tensor: tensor.numpy(), self.function(*arrays))
        bounds = np.linspace(0, len(arrays[0]), replicas + 1).astype(int)

        def replica_slice(context):
            replica = context.replica_id_in_sync_group
            return tuple(array[bounds[replica]:bounds[replica + 1]] for array in arrays)

        results = self._distributed(
            strategy.experimental_distribute_values_from_function(replica_slice))
        return tf.nest.map_structure(
            lambda result: np.concatenate([part.numpy() for part in
                                           strategy.experimental_local_results(result)]),
            results)
