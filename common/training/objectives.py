"""The training objectives of the two originals, split over replicas so that the replicas'
losses add up to the loss of the global batch."""

import dataclasses
from collections.abc import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True, kw_only=True)
class Xent:
    """Cross-entropy summed over the replica's examples and divided by `divisor` (1: MNIST's sum;
    the global batch size: CIFAR-10's mean), plus `weight_decay * sum(w**2) / 2` over
    `decayed_kernels(model)`, each of `num_replicas` replicas adding 1/N of it so that it counts
    once per step. `reduce` sums other per-example terms (TRADES' KL) the same way."""

    divisor: float = 1.0
    weight_decay: float = 0.0
    decayed_kernels: Callable = None
    num_replicas: int = 1

    def reduce(self, values):
        return tf.reduce_sum(values) / self.divisor

    def __call__(self, labels, logits, model):
        loss = self.reduce(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        if self.decayed_kernels is None:
            return loss
        decay = tf.add_n([tf.nn.l2_loss(kernel) for kernel in self.decayed_kernels(model)])
        return loss + self.weight_decay * decay / self.num_replicas


# MNIST's objective: cross-entropy summed over the batch (Adam takes it as is).
summed_xent = Xent()


def xent_with_weight_decay(weight_decay, global_batch_size, num_replicas, decayed_kernels):
    """CIFAR-10's objective: mean cross-entropy of the global batch plus the weight decay."""
    return Xent(divisor=global_batch_size, weight_decay=weight_decay,
                decayed_kernels=decayed_kernels, num_replicas=num_replicas)
