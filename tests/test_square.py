"""Square: the square sizes, the margin, and on a linear model, where the smallest L-infinity
perturbation that breaks an example is known in closed form, it breaks the examples whose
smallest perturbation is well inside the ball and never those whose smallest lies outside."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.attacks import losses, square
from common.attacks.threat_model import ThreatModel


def test_square_sizes_follow_the_reference_schedule():
    settings = square.SquareSettings(threat_model=ThreatModel(0.3))
    assert [square.square_fraction(query, 0.8) for query in (0, 10, 11, 50, 51, 8001)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512]
    sizes = square.square_sizes(settings, 28, 28)
    assert len(sizes) == 5000 and sizes[0] == 25 and sizes[11] == round(np.sqrt(0.4 * 784))
    assert sizes[-1] == 2 and min(sizes) >= 1


def test_margin():
    logits = tf.constant([[1.0, 4.0, 2.0], [5.0, 0.0, -1.0]])
    np.testing.assert_allclose(losses.logit_margin(logits, tf.constant([1, 1], tf.int64)).numpy(),
                               [2.0, -5.0])


def linear_model(weights):
    """Logits (0, w.x - sum(w) / 2) on 8x8 images: class 1 once w.(x - 1/2) > 0."""
    inputs = keras.Input((8, 8, 1))
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.kernel.assign(np.stack([np.zeros(64), weights], axis=1).astype(np.float32))
    dense.bias.assign(np.array([0.0, -weights.sum() / 2], np.float32))
    return model


def test_on_a_linear_model_it_finds_what_the_closed_form_allows():
    """Logits (0, w.x + b), true class 0: broken once w.x + b > 0, so an example needs at least
    -(w.x + b) / |w|_1 in the L-infinity norm (away from the pixel bounds). With
    b = -sum(w) / 2 and x = 1/2 - t sign(w), that is t."""
    rng = np.random.default_rng(0)
    weights = rng.choice([-1.0, 1.0], 64) * rng.uniform(0.5, 1.5, 64)
    model = linear_model(weights)
    needed = np.linspace(0.05, 0.15, 16)
    x = (0.5 - needed[:, None] * np.sign(weights)).reshape(16, 8, 8, 1).astype(np.float32)
    epsilon = 0.1
    x_adv = square.Square(model, epsilon=epsilon, seed=1).perturb(x, np.zeros(16, np.int64))
    robust = np.argmax(model(x_adv).numpy(), axis=1) == 0
    assert np.all(np.abs(x_adv - x) <= epsilon * (1 + 1e-6))
    np.testing.assert_array_equal(x_adv[robust], x[robust])
    np.testing.assert_array_equal(robust[needed > epsilon], True)
    np.testing.assert_array_equal(robust[needed < 0.7 * epsilon], False)
    np.testing.assert_array_equal(np.argmax(model(x_adv).numpy(), axis=1)[~robust], 1)


@pytest.mark.slow
def test_l2_square_on_a_linear_model_finds_what_the_closed_form_allows():
    """Logits (0, w.x + b), true class 0: an example x = 1/2 - t w / |w|_2 with b = -w.1 / 2 needs
    an L2 perturbation of at least t (far from the pixel bounds)."""
    rng = np.random.default_rng(1)
    weights = rng.normal(size=64)
    model = linear_model(weights)
    needed = np.linspace(0.2, 0.6, 16)
    unit = weights / np.linalg.norm(weights)
    x = (0.5 - needed[:, None] * unit).reshape(16, 8, 8, 1).astype(np.float32)
    epsilon = 0.4
    x_adv = square.Square(model, epsilon=epsilon, norm="L2", seed=1).perturb(
        x, np.zeros(16, np.int64))
    robust = np.argmax(model(x_adv).numpy(), axis=1) == 0
    assert np.all(np.linalg.norm((x_adv - x).reshape(16, -1), axis=1) <= epsilon * (1 + 1e-5))
    np.testing.assert_array_equal(robust[needed > epsilon], True)
    np.testing.assert_array_equal(robust[needed < 0.6 * epsilon], False)
    np.testing.assert_array_equal(np.argmax(model(x_adv).numpy(), axis=1)[~robust], 1)


def test_the_l2_window_is_the_references():
    """The reference's eta(5) (fra31/auto-attack, square.py), up to its random transpose: rings
    of weight 1/(k+1)^2 around the centre of each half, the lower half negative, unit norm."""
    window = square.l2_window(5)
    np.testing.assert_allclose(np.sqrt((window ** 2).sum()), 1.0, rtol=1e-6)
    np.testing.assert_allclose(window[:2, 2], [0.160, 0.602], atol=1e-3)
    np.testing.assert_allclose(window[2:, 2], [-0.148, -0.558, -0.148], atol=1e-3)
    np.testing.assert_allclose(window[1], [0.049, 0.160, 0.602, 0.160, 0.049], atol=1e-3)
