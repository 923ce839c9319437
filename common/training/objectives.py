"""The training objectives of the two originals, split over replicas so that the replicas'
losses add up to the loss of the global batch."""

import tensorflow as tf


def summed_xent(labels, logits, model):
    """MNIST's objective: cross-entropy summed over the batch (Adam takes it as is)."""
    return tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def xent_with_weight_decay(weight_decay, global_batch_size, num_replicas, decayed_kernels):
    """CIFAR-10's objective: mean cross-entropy of the global batch plus
    `weight_decay * sum(w**2) / 2` over `decayed_kernels(model)`, each replica adding 1/N of the
    decay so that it counts once per step."""

    def loss(labels, logits, model):
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        decay = tf.add_n([tf.nn.l2_loss(kernel) for kernel in decayed_kernels(model)])
        return tf.reduce_sum(xent) / global_batch_size + weight_decay * decay / num_replicas

    return loss
