"""AWP (Wu et al., 2020) in the one training core: the offsets and the update of a linear model
against their numpy closed forms, the weights restored after the update, batch norm's statistics
moved once a step, the CPU-tuned layers perturbed as Keras' own, and the errors (the loop's step
equal to fit's, and two replicas taking one device's step: tests/test_fit.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_fit import EPSILON, data, small_model

from common.attacks import PGD
from common.runtime.errors import UserError
from common.scripts import config
from common.training import fit, objectives, steps
from mnist_challenge import model as mnist_model

LEARNING_RATE = 0.1


def linear_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(3)])


def context(model, size, method="pgd"):
    optimizer = keras.optimizers.SGD(LEARNING_RATE)
    optimizer.build(model.trainable_variables)
    return steps.StepContext(model=model, optimizer=optimizer, method=method,
                             settings=PGD(model, epsilon=EPSILON, steps=2,
                                          step_size=0.04).settings,
                             weight_perturbation=size)


def xent_gradients(x, y, kernel, bias):
    """The summed cross-entropy's gradients with respect to the kernel and the bias of
    softmax(x @ kernel + bias), in float64."""
    logits = x @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return x.T @ p, p.sum(axis=0)


def test_a_linear_models_offset_and_update_are_their_closed_forms():
    x, y = data(16)
    x_adv = np.clip(x + np.random.default_rng(1).uniform(-EPSILON, EPSILON, x.shape), 0, 1)
    model = linear_model()
    kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    step_context = context(model, 0.5)
    offsets = steps.weight_offsets(step_context, x, y, x_adv=tf.constant(x_adv, tf.float32),
                                   objective=objectives.summed_xent)
    gradient, _ = xent_gradients(x_adv.astype(np.float64), y, kernel, bias)
    expected = 0.5 * np.linalg.norm(kernel) * gradient / np.linalg.norm(gradient)
    assert [weight.path for weight, _ in offsets] == [model.layers[0].kernel.path]  # no bias
    np.testing.assert_allclose(offsets[0][1].numpy(), expected, rtol=1e-4, atol=1e-6)

    steps.update(step_context, x, y, x_adv=tf.constant(x_adv, tf.float32),
                 objective=objectives.summed_xent)
    at_moved = xent_gradients(x_adv.astype(np.float64), y, kernel + expected, bias)
    for weight, before, moved_gradient in zip(model.get_weights(), (kernel, bias), at_moved):
        np.testing.assert_allclose(weight, before - LEARNING_RATE * moved_gradient, rtol=1e-4,
                                   atol=1e-5)


def test_batch_norms_statistics_move_once_a_step_at_the_moved_weights():
    x, y = data(16)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(momentum=0.5),
                              keras.layers.Dense(3)])
    step_context = context(model, 0.5)
    x_adv = tf.constant(x)
    (first, moved), _ = steps.weight_offsets(step_context, x, y, x_adv=x_adv,
                                             objective=objectives.summed_xent)
    features = x @ (first.numpy() + moved.numpy()) + model.layers[0].bias.numpy()
    steps.update(step_context, x, y, x_adv=x_adv, objective=objectives.summed_xent)
    moving_mean = model.layers[1].moving_mean.numpy()
    np.testing.assert_allclose(moving_mean, 0.5 * features.mean(axis=0), rtol=1e-4, atol=1e-6)


def test_the_cpu_layers_are_perturbed_as_keras_own():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 784)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    x_adv = tf.constant(np.clip(x + rng.uniform(-0.3, 0.3, x.shape), 0, 1), tf.float32)
    updates = {}
    for size, on_cpu in ((0.1, True), (0.1, False), (0.0, False)):
        keras.utils.set_random_seed(1)
        model = mnist_model.Model(on_cpu)
        model(x[:1])
        before = model.get_weights()
        steps.update(context(model, size), x, y, x_adv=x_adv, objective=objectives.summed_xent)
        updates[size, on_cpu] = [after - w for after, w in zip(model.get_weights(), before)]
    for mine, keras_own in zip(updates[0.1, True], updates[0.1, False]):
        np.testing.assert_allclose(mine, keras_own, rtol=1e-3, atol=1e-7)
    assert not np.allclose(updates[0.1, False][0], updates[0.0, False][0], rtol=1e-2)


def test_a_negative_perturbation_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="Received: weight_perturbation=-0.1"):
        fit.AdversarialModel(model, PGD(model, epsilon=EPSILON), weight_perturbation=-0.1)
    with pytest.raises(UserError, match="awp_gamma"):
        config.validate({"awp_gamma": -0.1})
