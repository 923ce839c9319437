"""common.models.layers' Conv2D and Dense compute what Keras' own layers compute, gradients
included, and a model gets them only where it runs on CPUs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cifar10_challenge import model as cifar_model
from common.models.layers import Conv2D, Dense, layer_classes
from common.runtime import devices
from mnist_challenge import model as mnist_model


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


def _input_gradient_ops(layer, x):
    """The op types of the traced input gradient of `layer` at `x`."""
    @tf.function
    def input_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, x)

    graph = input_gradient.get_concrete_function(x).graph
    return {op.type for op in graph.get_operations()} | {
        op.type for function in graph._functions.values()
        for op in function.graph.get_operations()}


# (input channels, kernel size, strides, the input gradient's kind): the documented cases of
# common/models/layers.py, stride 1 with odd kernels: a forward convolution from 8 channels, a
# depthwise one below; Keras' own Conv2DBackpropInput otherwise.
@pytest.mark.parametrize("channels, kernel_size, strides, kind", [
    (8, 5, 1, "Conv2D"), (8, 3, 1, "Conv2D"), (8, 3, 2, "Conv2DBackpropInput"),
    (8, 2, 1, "Conv2DBackpropInput"), (3, 5, 1, "DepthwiseConv2dNative"),
    (1, 3, 1, "DepthwiseConv2dNative"), (1, 5, 1, "DepthwiseConv2dNative"),
    (3, 3, 2, "Conv2DBackpropInput")])
def test_convolution_values_and_gradients_equal_keras(channels, kernel_size, strides, kind):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 12, 12, channels)).astype(np.float32))
    ours = Conv2D(6, kernel_size, strides=strides, padding="same")
    _assert_same_as_keras(ours, keras.layers.Conv2D(6, kernel_size, strides=strides,
                                                    padding="same"), x)
    ops = _input_gradient_ops(ours, x)
    kinds = {"Conv2DBackpropInput", "DepthwiseConv2dNative"} & ops
    assert kinds == ({kind} if kind != "Conv2D" else set()), sorted(ops)


def test_dense_values_and_gradients_equal_keras():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(5, 7)).astype(np.float32))
    _assert_same_as_keras(Dense(3, activation="relu"), keras.layers.Dense(3, activation="relu"), x)


def _logits_and_input_gradient(model, x, y):
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x, training=False)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    return logits.numpy(), tape.gradient(loss, x).numpy()


@pytest.mark.parametrize("build, shape", [
    (lambda on_cpu: mnist_model.Model(on_cpu), (16, 784)),
    (lambda on_cpu: cifar_model.Model("eval", cifar_model.SIMPLE_FILTERS, on_cpu), (8, 32, 32, 3)),
])
def test_both_layer_paths_give_the_same_logits_and_input_gradients(build, shape):
    """The CPU-tuned layers (used where the model runs on CPUs) and Keras' own (GPUs)."""
    keras.utils.set_random_seed(1)
    tuned, plain = build(True), build(False)
    plain.set_weights(tuned.get_weights())
    assert any(type(layer) is Conv2D for layer in tuned.layers)
    assert not any(type(layer) in (Conv2D, Dense) for layer in plain.layers)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.uniform(0, 1 if len(shape) == 2 else 255, shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, shape[0]))
    (tuned_logits, tuned_gradient), (logits, gradient) = (
        _logits_and_input_gradient(model, x, y) for model in (tuned, plain))
    np.testing.assert_allclose(tuned_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tuned_gradient, gradient, rtol=0,
                               atol=1e-5 * np.abs(gradient).max())


def test_the_devices_decide_which_layers_a_model_gets(two_replicas):
    assert devices.runs_on_cpu(two_replicas)
    assert devices.runs_on_cpu(tf.distribute.OneDeviceStrategy("/cpu:0"))
    assert devices.runs_on_cpu() == (not tf.config.list_logical_devices("GPU"))
    assert layer_classes(True) == (Conv2D, Dense)
    assert layer_classes(False) == (keras.layers.Conv2D, keras.layers.Dense)
