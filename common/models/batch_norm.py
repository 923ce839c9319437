"""Batch normalization as the CIFAR-10 original ran it, synchronized across replicas.

`tf.contrib.layers.batch_norm` (decay 0.9, epsilon 1e-3, centre and scale, fused): in training
mode it normalizes with the batch mean and (biased) variance and, at every forward pass, moves
the averages towards the batch mean and the Bessel-corrected variance (the fused kernel's
`batch_variance`). Keras' own layer moves towards the biased variance.

Under a `tf.distribute` strategy with several replicas, the batch statistics are those of the
whole global batch (two all-reduces: the sums, then the squared deviations from the global mean),
so a step equals the step of one device.
"""

import keras
import tensorflow as tf

from common.runtime.devices import global_sum


def batch_moments(inputs):
    """Mean, biased variance and count over every axis but the last, across all replicas."""
    axes = list(range(len(inputs.shape) - 1))
    count = global_sum(tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), inputs.dtype))
    mean = global_sum(tf.reduce_sum(inputs, axis=axes)) / count
    deviations = global_sum(tf.reduce_sum(tf.math.squared_difference(inputs, mean), axis=axes))
    return mean, deviations / count, count


class BatchNorm(keras.layers.Layer):
    """The original's batch norm, with its variable names: beta, gamma, moving_mean and
    moving_variance."""

    def __init__(self, decay=0.9, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.decay = decay
        self.epsilon = epsilon

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta")
        self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma")
        # Each replica updates its own copy (the statistics are global, so the copies agree);
        # that works inside the attack's loop, where a cross-replica update cannot run.
        # (add_weight cannot set the synchronization.)
        moving = {"shape": shape, "trainable": False, "synchronization": "on_read",
                  "aggregation": "mean"}
        self.moving_mean = keras.Variable("zeros", name="moving_mean", **moving)
        self.moving_variance = keras.Variable("ones", name="moving_variance", **moving)

    def call(self, inputs, training=False):
        if not training:
            mean, variance = self.moving_mean, self.moving_variance
        else:
            mean, variance, count = batch_moments(inputs)
            unbiased = variance * count / tf.maximum(count - 1, 1)
            self.moving_mean.assign_sub((self.moving_mean - mean) * (1 - self.decay))
            self.moving_variance.assign_sub((self.moving_variance - unbiased) * (1 - self.decay))
        return tf.nn.batch_normalization(inputs, mean, variance, self.beta, self.gamma,
                                         self.epsilon)

    def get_config(self):
        return {**super().get_config(), "decay": self.decay, "epsilon": self.epsilon}
