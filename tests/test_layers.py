"""common.layers' Conv2D and Dense compute what Keras' own layers compute, gradients included."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.layers import Conv2D, Dense


def _values_and_gradients(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.sin(layer(x)))
    return [loss, *tape.gradient(loss, [x, layer.kernel, layer.bias])]


def _assert_same_as_keras(ours, theirs, x):
    ours.build(x.shape)
    theirs.build(x.shape)
    theirs.set_weights(ours.get_weights())
    for mine, reference in zip(_values_and_gradients(ours, x), _values_and_gradients(theirs, x)):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels, kernel_size, strides",
                         [(8, 5, 1), (8, 3, 1), (8, 3, 2), (8, 2, 1), (3, 5, 1), (1, 3, 1)])
def test_convolution_values_and_gradients_equal_keras(channels, kernel_size, strides):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 12, 12, channels)).astype(np.float32))
    ours = Conv2D(6, kernel_size, strides=strides, padding="same")
    _assert_same_as_keras(ours, keras.layers.Conv2D(6, kernel_size, strides=strides,
                                                    padding="same"), x)
    expected = strides == 1 and kernel_size % 2 == 1 and channels >= 8
    assert ours._gradient_as_convolution(ours.kernel) == expected


def test_dense_values_and_gradients_equal_keras():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(5, 7)).astype(np.float32))
    _assert_same_as_keras(Dense(3, activation="relu"), keras.layers.Dense(3, activation="relu"), x)
