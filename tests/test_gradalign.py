"""GradAlign's penalty (Andriushchenko & Flammarion, 2020) in the one training core: its closed
forms (0 for a two-class linear model, whose input gradient never turns; 1 where the gradient is
0), its second derivative through the CPU-tuned layers equal to Keras' own layers', and the
errors for what it cannot run with (the loop's step equal to fit's: tests/test_fit.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_fit import EPSILON, data, small_model

from common.attacks import PGD
from common.runtime.errors import UserError
from common.scripts import config
from common.training import fit, loop, objectives, steps
from mnist_challenge import model as mnist_model

SEED = tf.constant([3, 4], tf.int64)


def context(model, method="pgd", alignment=1.0, epsilon=EPSILON):
    attack = PGD(model, epsilon=epsilon, steps=2, step_size=0.04)
    optimizer = keras.optimizers.SGD(0.0)
    optimizer.build(model.trainable_variables)
    return steps.StepContext(model=model, optimizer=optimizer, settings=attack.settings,
                             method=method, alignment=alignment)


def linear_model(classes, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(classes)])


def test_a_two_class_linear_models_gradient_never_turns():
    # The input gradient of the cross-entropy is (p_y - 1)(w_y - w_other): always along the same
    # line and the same way, wherever the point is.
    x, y = data(16)
    penalty = steps.misalignment(context(linear_model(2)), x, y % 2, seed=SEED).numpy()
    np.testing.assert_allclose(penalty, 0.0, atol=1e-6)


def test_a_gradient_of_zero_is_orthogonal_to_everything_and_differentiable():
    # With the first kernel 0 the input gradient is 0 everywhere, where a plain norm's gradient
    # is not a number; the kernel's own gradient still exists and must be finite.
    x, y = data(16)
    model = small_model()
    kernel, bias, head, head_bias = model.get_weights()
    model.set_weights([np.zeros_like(kernel), np.ones_like(bias), head, head_bias])
    with tf.GradientTape() as tape:
        penalty = steps.misalignment(context(model), x, y, seed=SEED)
        mean = tf.reduce_mean(penalty)
    np.testing.assert_allclose(penalty.numpy(), 1.0)
    gradient = tape.gradient(mean, model.trainable_variables[0])
    assert np.all(np.isfinite(gradient.numpy()))


def test_a_three_class_linear_models_penalty_is_the_cosine_of_its_numpy_gradients():
    x, y = data(16)
    x_near = np.clip(x + np.random.default_rng(2).uniform(-0.5, 0.5, x.shape), 0, 1)
    model = linear_model(3)
    kernel, bias = (w.astype(np.float64) for w in model.get_weights())

    def gradient(points):  # of the cross-entropy of softmax(points @ kernel + bias)
        logits = points @ kernel + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        return p @ kernel.T

    here, near = gradient(x.astype(np.float64)), gradient(x_near.astype(np.float64))
    cosine = np.sum(here * near, axis=1) / np.linalg.norm(here, axis=1) / np.linalg.norm(
        near, axis=1)
    penalty = steps.gradient_misalignment(model, x, tf.constant(x_near, tf.float32), y).numpy()
    assert 1 - cosine.min() > 1e-2
    np.testing.assert_allclose(penalty, 1 - cosine, atol=1e-5)
    zero_radius = steps.misalignment(context(model, epsilon=0.0), x, y, seed=SEED).numpy()
    np.testing.assert_allclose(zero_radius, 0.0, atol=1e-6)  # the ball is the point itself


def test_the_cpu_layers_second_derivative_equals_keras_own():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 784)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    gradients = []
    for on_cpu in (True, False):
        keras.utils.set_random_seed(1)
        model = mnist_model.Model(on_cpu)
        model(x[:1])
        with tf.GradientTape() as tape:
            penalty = tf.reduce_mean(steps.misalignment(context(model, epsilon=0.3), x, y,
                                                        seed=SEED))
        gradients.append([g.numpy() for g in tape.gradient(penalty, model.trainable_variables)])
    assert np.abs(gradients[0][0]).max() > 0
    for mine, keras_own in zip(*gradients):
        np.testing.assert_allclose(mine, keras_own, rtol=1e-3, atol=1e-6)


def test_the_penalty_is_added_with_its_weight_to_the_methods_loss():
    x, y = data()
    losses = {}
    for alignment in (0.0, 3.0):
        model = small_model()
        step_context = context(model, alignment=alignment)
        x_adv = steps.attack(step_context, x, y, start=tf.cast(x, tf.float64))
        losses[alignment] = float(steps.update(step_context, x, y, x_adv=x_adv, seed=SEED,
                                               objective=objectives.Xent(divisor=32)).loss)
        penalty = steps.misalignment(step_context, x, y, seed=SEED).numpy()
    np.testing.assert_allclose(losses[3.0] - losses[0.0], 3.0 * penalty.mean(), rtol=1e-4)


def test_what_gradalign_cannot_run_with_is_refused():
    model = small_model()
    settings = PGD(model, epsilon=EPSILON).settings
    with pytest.raises(ValueError, match="Received: alignment=-1"):
        fit.AdversarialModel(model, PGD(model, epsilon=EPSILON), alignment=-1)
    with pytest.raises(ValueError, match="Received: method='free', alignment=0.5"):
        loop.build_train_step(tf.distribute.get_strategy(), model, keras.optimizers.SGD(0.1),
                              method="free", batch_size=32, alignment=0.5, settings=settings,
                              loss_fn=objectives.Xent(divisor=32))
    with pytest.raises(TypeError, match="Received: loss_fn="):
        loop.TrainStep(tf.distribute.get_strategy(), model, keras.optimizers.SGD(0.1),
                       settings=settings, loss_fn=lambda labels, logits, model: 0.0,
                       alignment=0.5)
    x, y = data()
    with pytest.raises(ValueError, match="Received: seed=None"):
        steps.update(context(model), x, y, x_adv=tf.constant(x),
                     objective=objectives.Xent(divisor=32))


def test_a_config_with_gradalign_and_free_training_is_refused():
    with pytest.raises(UserError, match="'gradalign_weight' must be 0 with training_method "
                                        "free.*got 0.5"):
        config.validate({"training_method": "free", "gradalign_weight": 0.5})
    assert config.validate({"training_method": "trades", "gradalign_weight": 0.5})
