"""common.layers.Conv2D computes what keras.layers.Conv2D computes, gradients included."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.layers import Conv2D


@pytest.mark.parametrize("kernel_size, strides", [(5, 1), (3, 1), (3, 2), (2, 1)])
def test_values_and_gradients_equal_keras(kernel_size, strides):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 12, 12, 3)).astype(np.float32))
    ours = Conv2D(8, kernel_size, strides=strides, padding="same")
    theirs = keras.layers.Conv2D(8, kernel_size, strides=strides, padding="same")
    ours.build(x.shape)
    theirs.build(x.shape)
    theirs.set_weights(ours.get_weights())
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)))
        results.append([loss, *tape.gradient(loss, [x, layer.kernel, layer.bias])])
    for mine, reference in zip(*results):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)
    assert ours._gradient_as_convolution() == (strides == 1 and kernel_size % 2 == 1)
