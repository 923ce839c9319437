"""FAB-T: its projection onto a hyperplane within the pixel range against a bisection done
here, and on a linear model, where the smallest L-infinity perturbation is known in closed form,
the distance it finds and the examples it breaks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.attacks import fab, threat_model
from common.attacks.threat_model import ThreatModel


def smallest_step_by_bisection(point, weights, needed, pixel_range):
    """The smallest delta whose clipped moves change weights . x by `needed`, or None."""
    low, high = pixel_range
    direction = np.sign(weights) * np.sign(needed)
    room = np.where(direction > 0, high - point, point - low) * (direction != 0)

    def reach(delta):
        return np.sum(np.abs(weights) * np.minimum(delta, room))

    if reach(room.max()) < abs(needed):
        return None
    lower, upper = 0.0, room.max()
    for _ in range(60):
        middle = (lower + upper) / 2
        lower, upper = (middle, upper) if reach(middle) < abs(needed) else (lower, middle)
    return upper


def test_the_projection_is_the_smallest_step_within_the_range():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (60, 20)).astype(np.float32)
    weights = rng.normal(size=(60, 20)).astype(np.float32)
    weights[:, :3] = 0
    biases = (weights * points).sum(1) + 2 * rng.normal(size=60).astype(np.float32)
    steps = fab.project_onto_hyperplane(tf.constant(points), tf.constant(weights),
                                       tf.constant(biases), pixel_range=(0.0, 1.0)).numpy()
    moved = points + steps
    assert moved.min() >= 0 and moved.max() <= 1 and np.all(steps[:, :3] == 0)
    checked = 0
    for point, weight, bias, step in zip(points, weights, biases, steps):
        needed = bias - weight @ point
        smallest = smallest_step_by_bisection(point, weight, needed, (0.0, 1.0))
        if smallest is None:  # out of reach: every coordinate goes to its bound
            np.testing.assert_allclose(np.abs(step)[weight != 0],
                                       np.where(step > 0, 1 - point, point)[weight != 0],
                                       atol=1e-6)
            continue
        checked += 1
        np.testing.assert_allclose(weight @ (point + step), bias, atol=1e-4)
        np.testing.assert_allclose(np.abs(step).max(), smallest, atol=1e-5)
    assert checked > 40


def linear_model():
    """Logits (0, w.x - sum(w) / 2) on 64 inputs; x = 1/2 - t sign(w) needs exactly t in the
    L-infinity norm to reach class 1."""
    rng = np.random.default_rng(0)
    weights = rng.choice([-1.0, 1.0], 64) * rng.uniform(0.5, 1.5, 64)
    inputs = keras.Input((64,))
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(inputs))
    dense.kernel.assign(np.stack([np.zeros(64), weights], axis=1).astype(np.float32))
    dense.bias.assign(np.array([0.0, -weights.sum() / 2], np.float32))
    return model, np.sign(weights)


@pytest.mark.slow
def test_fab_finds_the_smallest_perturbation_of_a_linear_model():
    model, signs = linear_model()
    needed = np.linspace(0.05, 0.15, 16)
    x = (0.5 - needed[:, None] * signs).astype(np.float32)
    labels = tf.zeros(16, tf.int64)
    for targeted in (True, False):
        # In a graph, as the attacks run it (step by step, eagerly, it takes minutes).
        x_adv, distance = tf.function(fab.fab_steps)(
            model, tf.constant(x), labels, targets=tf.ones(16, tf.int64),
            noise=tf.zeros_like(x), settings=fab.FABSettings(threat_model=ThreatModel(0.1)),
            targeted=targeted)
        assert np.all(distance.numpy() >= needed * (1 - 1e-5))
        assert np.all(distance.numpy() <= needed * 1.01)
        assert np.all(np.argmax(model(x_adv).numpy(), axis=1) == 1)


@pytest.mark.slow
def test_fab_and_fab_t_break_exactly_the_examples_within_epsilon():
    model, signs = linear_model()
    needed = np.linspace(0.05, 0.15, 16)
    x = (0.5 - needed[:, None] * signs).astype(np.float32)
    for options in ({"targets": 1}, {"restarts": 3}):
        x_adv = fab.FAB(model, epsilon=0.1, seed=2, **options).perturb(x, np.zeros(16, np.int64))
        robust = np.argmax(model(x_adv).numpy(), axis=1) == 0
        np.testing.assert_array_equal(robust, needed * 1.01 > 0.1)
        np.testing.assert_array_equal(x_adv[robust], x[robust])
        assert np.all(np.abs(x_adv - x).max(axis=1) <= 0.1 + 1e-6)


def test_the_l2_projection_is_the_orthogonal_step_or_clipped_by_the_range():
    """Far from the range's bounds the smallest L2 step onto w.x = b is (b - w.x) w / |w|^2;
    where the range stops a coordinate, the others take up the rest."""
    rng = np.random.default_rng(1)
    points = rng.uniform(-1, 1, (20, 6)).astype(np.float32)
    weights = rng.normal(size=(20, 6)).astype(np.float32)
    biases = (weights * points).sum(1) + rng.normal(size=20).astype(np.float32)
    needed = biases - (weights * points).sum(1)
    free = fab.project_onto_hyperplane(tf.constant(points), tf.constant(weights),
                                       tf.constant(biases), pixel_range=(-100.0, 100.0),
                                       ball=threat_model.ball("L2")).numpy()
    np.testing.assert_allclose(free, needed[:, None] * weights /
                               (weights ** 2).sum(1, keepdims=True), rtol=1e-4, atol=1e-5)
    boxed = fab.project_onto_hyperplane(tf.constant(points), tf.constant(weights),
                                        tf.constant(biases), pixel_range=(-1.0, 1.0),
                                        ball=threat_model.ball("L2")).numpy()
    moved = points + boxed
    assert moved.min() >= -1 - 1e-6 and moved.max() <= 1 + 1e-6
    reached = np.abs((weights * moved).sum(1) - biases) < 1e-4
    assert reached.any()
    # A reached projection in the box is no longer than the free one only where nothing clips.
    assert np.all(np.linalg.norm(boxed, axis=1)[reached] >=
                  np.linalg.norm(free, axis=1)[reached] * (1 - 1e-4))
