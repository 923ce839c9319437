"""common.models.layers' Conv2D and Dense compute what Keras' own layers compute, gradients
included, and a model gets them only where it runs on CPUs."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import REPO, script_environment

from cifar10_challenge import model as cifar_model
from common.models import layers
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


def _operations(graph):
    """The ops of a traced graph and of every function it calls, however deeply."""
    graphs = [graph]
    while graphs:
        graph = graphs.pop()
        graphs.extend(function.graph for function in graph._functions.values())
        yield from graph.get_operations()


def _input_gradient_ops(layer, x):
    """The op types of the traced input gradient of `layer` at `x`."""
    @tf.function
    def input_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, x)

    return {op.type for op in _operations(input_gradient.get_concrete_function(x).graph)}


# (input channels, kernel size, strides, the input gradient's kind): the documented cases of
# common/models/layers.py, stride 1 with odd kernels: a forward convolution from 8 channels, a
# depthwise one below where the rule picks it ("few"); Keras' own Conv2DBackpropInput otherwise.
@pytest.mark.parametrize("depthwise_wins", [True, False])
@pytest.mark.parametrize("channels, kernel_size, strides, kind", [
    (8, 5, 1, "Conv2D"), (8, 3, 1, "Conv2D"), (8, 3, 2, "Conv2DBackpropInput"),
    (8, 2, 1, "Conv2DBackpropInput"), (3, 5, 1, "few"), (1, 3, 1, "few"), (1, 5, 1, "few"),
    (3, 3, 2, "Conv2DBackpropInput")])
def test_convolution_values_and_gradients_equal_keras(channels, kernel_size, strides, kind,
                                                      depthwise_wins, monkeypatch):
    monkeypatch.setattr(layers, "depthwise_gradient_wins", lambda features=None: depthwise_wins)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 12, 12, channels)).astype(np.float32))
    ours = Conv2D(6, kernel_size, strides=strides, padding="same")
    _assert_same_as_keras(ours, keras.layers.Conv2D(6, kernel_size, strides=strides,
                                                    padding="same"), x)
    ops = _input_gradient_ops(ours, x)
    if kind == "few":
        kind = "DepthwiseConv2dNative" if depthwise_wins else "Conv2DBackpropInput"
    kinds = {"Conv2DBackpropInput", "DepthwiseConv2dNative"} & ops
    assert kinds == ({kind} if kind != "Conv2D" else set()), sorted(ops)


def test_the_depthwise_form_is_chosen_by_the_cpus_features():
    assert layers.depthwise_gradient_wins({"avx2", "fma", "avx512f"})
    assert not layers.depthwise_gradient_wins({"avx2", "fma"})
    assert layers.depthwise_gradient_wins() == ("avx512f" in devices.cpu_features())
    assert layers.input_gradient_form(1, {"avx2", "avx512f"}) == "depthwise"
    assert layers.input_gradient_form(7, {"avx2"}) == "tensorflow"
    assert layers.input_gradient_form(8, {"avx2"}) == "convolution"
    assert layers.input_gradient_form(32, {"avx512f"}) == "convolution"


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
@pytest.mark.slow
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


def _kernel_reads_in_the_steps(model, x, y, settings):
    """How many ops inside PGD's graph loop (its body and the functions it calls) read, cast,
    flip or transpose a kernel: ops of those types whose output has the shape of a kernel, of a
    kernel with its last two axes swapped, or of a dense kernel transposed."""
    from common.attacks import pgd

    @tf.function
    def attack(x, y):
        return pgd.pgd_steps(model, x, y, x_start=tf.cast(x, tf.float64), settings=settings)

    shapes = set()
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            shape = tuple(layer.kernel.shape)
            shapes |= {shape, shape[:-2] + shape[:-3:-1]}
    outer = attack.get_concrete_function(x, y).graph
    return sum(op.type in ("ReadVariableOp", "Cast", "ReverseV2", "Transpose") and
               tuple(op.outputs[0].shape) in shapes
               for function in outer._functions.values()
               for op in _operations(function.graph))


@pytest.mark.parametrize("policy, tolerance", [("float32", 1e-5), ("mixed_bfloat16", 2e-2)])
def test_an_attack_reads_the_kernels_once_for_the_same_gradients(policy, tolerance):
    """Inside PGD's steps the CPU-tuned layers read, cast, flip and transpose no kernel: they
    take what `weights_read_once` made before the steps; with those, the model's input gradient
    is the one it has reading its weights (to the round-off of the compute dtype)."""
    from common.attacks import pgd
    from common.runtime import precision

    precision.set_precision(policy)
    try:
        keras.utils.set_random_seed(3)
        model = mnist_model.Model(on_cpu=True)
        rng = np.random.default_rng(5)
        x = tf.constant(rng.uniform(0, 1, (6, 784)).astype(np.float32))
        y = tf.constant(rng.integers(0, 10, 6))
        settings = pgd.AttackSettings(epsilon=0.3, steps=4, step_size=0.1, random_start=False)
        reads = _kernel_reads_in_the_steps(model, x, y, settings)
        with layers.weights_read_once(model):
            read_once = pgd.input_gradient(model, x, y, "xent").numpy()
        read_each_time = pgd.input_gradient(model, x, y, "xent").numpy()
    finally:
        precision.set_precision("float32")
    assert reads == 0
    assert np.abs(read_each_time).max() > 0
    np.testing.assert_allclose(read_once, read_each_time, rtol=0,
                               atol=tolerance * np.abs(read_each_time).max())


def test_the_devices_decide_which_layers_a_model_gets(two_replicas):
    assert devices.runs_on_cpu(two_replicas)
    assert devices.runs_on_cpu(tf.distribute.OneDeviceStrategy("/cpu:0"))
    assert devices.runs_on_cpu() == (not tf.config.list_logical_devices("GPU"))
    assert layer_classes(True) == (Conv2D, Dense)
    assert layer_classes(False) == (keras.layers.Conv2D, keras.layers.Dense)


@pytest.mark.slow
def test_the_attack_predicts_the_same_with_either_layer_path(mnist_fixture, mnist_data):
    """On the fixture's weights and test images, PGD-40 from the same starts through the
    CPU-tuned layers and through Keras' own (as on GPUs) leaves the model predicting the same
    classes."""
    from common.attacks import pgd
    from common.io import checkpoints
    from mnist_challenge import mnist_input

    data = mnist_input.MNISTData(mnist_data)
    x, y = data.test_images[:50].astype(np.float32), data.test_labels[:50]
    start = pgd.start_point(x, pgd.AttackSettings(epsilon=0.3, steps=40, step_size=0.01,
                                                  random_start=True), np.random.default_rng(4))
    predictions = []
    for on_cpu in (True, False):
        model = mnist_model.Model(on_cpu)
        checkpoints.load_weights(model, f"{mnist_fixture}/checkpoint-300",
                                 mnist_model.tf1_variables)
        attack = pgd.PGD(model, epsilon=0.3, steps=40, step_size=0.01, loss="xent")
        x_adv = attack.perturb(x, y, start=start)
        predictions.append(np.argmax(model.predict(x_adv.astype(np.float32), verbose=0), 1))
    np.testing.assert_array_equal(predictions[0], predictions[1])
    assert np.mean(predictions[0] == y) < 0.95  # the attack did something


@pytest.mark.slow
def test_every_process_of_a_machine_picks_the_same_variants():
    """The choices are rules of the devices and the CPU's flags, never timings: two new
    processes choose alike."""
    code = ("from common.runtime import devices; "
            "from common.models.layers import layer_classes; "
            "from common.models import layers; "
            "print([c.__module__ for c in layer_classes(devices.runs_on_cpu())], "
            "layers.depthwise_gradient_wins())")
    outputs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=script_environment()).stdout
               for _ in range(2)]
    assert outputs[0] == outputs[1] and outputs[0].strip(), outputs
    assert "common.models.layers" in outputs[0]  # no GPU here: the CPU-tuned layers
