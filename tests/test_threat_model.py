"""The balls of the threat model against independent computations: the exact L1 projection
against a bisection on its threshold, each ball's steepest ascent against its dual norm, and each
ball's random start against the law of a point uniform in the ball, drawn on the host and in a
graph."""

import numpy as np
import pytest
import tensorflow as tf

from common.attacks import threat_model
from common.attacks.threat_model import ThreatModel


def projection_by_bisection(delta, epsilon, room):
    """The point of {|d|_1 <= epsilon, |d_i| <= room_i} nearest to `delta`: coordinate sizes
    min(|delta_i|, room_i) shrunk by the threshold at which their sum is epsilon."""
    cap = np.minimum(np.abs(delta), room)

    def total(threshold):
        return np.clip(np.abs(delta) - threshold, 0, cap).sum()

    low, high = 0.0, np.abs(delta).max()
    if total(0.0) <= epsilon:
        high = 0.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if total(middle) > epsilon else (low, middle)
    return np.sign(delta) * np.clip(np.abs(delta) - high, 0, cap)


def test_the_l1_projection_is_the_nearest_point_of_the_ball_in_the_box():
    rng = np.random.default_rng(0)
    x_nat = rng.uniform(0, 1, (40, 3, 2, 5))
    x = x_nat + rng.normal(0, 0.4, x_nat.shape)
    epsilons = np.concatenate([rng.uniform(0.05, 6, 37), [0.0, 1e-3, 100.0]])
    for pixel_range in ((0.0, 1.0), (-0.5, 2.0)):
        projected = np.stack([ThreatModel(epsilon, "L1", pixel_range).project(
            tf.constant(x[i:i + 1]), x_nat[i:i + 1]).numpy()[0]
            for i, epsilon in enumerate(epsilons)])
        x_nat32 = x_nat.astype(np.float32).astype(np.float64)  # the centre as the attacks see it
        delta = x - x_nat32
        room = np.where(delta >= 0, pixel_range[1] - x_nat32, x_nat32 - pixel_range[0])
        expected = [x_nat32[i] + projection_by_bisection(delta[i], epsilon, room[i])
                    for i, epsilon in enumerate(epsilons)]
        np.testing.assert_allclose(projected, expected, atol=1e-9)
        # The whole batch at once, epsilon per example: rows that fit (100) and rows that do not.
        batched = threat_model.l1_projection(tf.constant(delta),
                                             tf.constant(epsilons[:, None]), tf.constant(room))
        np.testing.assert_allclose(x_nat32 + batched.numpy(), expected, atol=1e-9)
        sizes = np.abs(projected - x_nat32).reshape(len(x), -1).sum(1)
        assert np.all(sizes <= epsilons * (1 + 1e-9) + 1e-12)
        assert projected.min() >= pixel_range[0] and projected.max() <= pixel_range[1]


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_a_point_of_the_ball_and_the_box_is_its_own_projection(norm):
    rng = np.random.default_rng(1)
    x_nat = rng.uniform(0.3, 0.7, (16, 10)).astype(np.float32)
    threat = ThreatModel(0.2, norm)
    inside = threat.random_start(x_nat, tf.constant([3, 4], tf.int64), tf.float32)
    np.testing.assert_allclose(threat.project(inside, x_nat), inside, atol=1e-6)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_the_step_direction_is_the_steepest_ascent_of_unit_norm(norm):
    """Over the unit ball, a linear function w.d rises at most by the dual norm of w; the
    direction reaches it."""
    gradient = tf.constant(np.random.default_rng(2).normal(size=(8, 30)))
    ball = threat_model.ball(norm)
    direction = ball.direction(gradient)
    np.testing.assert_allclose(ball.norms(direction), 1.0, rtol=1e-9)
    np.testing.assert_allclose(tf.reduce_sum(gradient * direction, axis=1),
                               ball.dual_norms(gradient), rtol=1e-9)


def test_the_l1_step_moves_the_largest_coordinates_by_a_unit_of_l1():
    """The exact L1 steepest ascent (one coordinate, the largest gradient) is the sparsest
    cut; the default cut moves the largest fifth of the coordinates alike."""
    gradient = np.random.default_rng(3).normal(size=(8, 30))
    ball = threat_model.ball("L1")
    sparsest = threat_model.sparse_direction(tf.constant(gradient), 0.0).numpy()
    np.testing.assert_allclose((gradient * sparsest).sum(1), np.abs(gradient).max(1),
                               rtol=1e-9)
    direction = ball.direction(tf.constant(gradient)).numpy()
    np.testing.assert_allclose(np.abs(direction).sum(1), 1.0, rtol=1e-9)
    moved = direction != 0
    assert np.all(moved.sum(1) == 30 - int((1 - threat_model.L1_STEP_FRACTION) * 30))
    smallest_moved = np.where(moved, np.abs(gradient), np.inf).min(1)
    assert np.all(smallest_moved > np.where(moved, 0, np.abs(gradient)).max(1))
    assert np.all(np.sign(direction[moved]) == np.sign(gradient[moved]))


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_random_starts_are_uniform_in_the_ball_on_the_host_and_in_a_graph(norm):
    """For a point uniform in a ball of n dimensions, P(|d| <= r epsilon) = r^n; around a
    centre far from the pixel bounds both draws follow it, and near the bounds both stay in the
    ball and the box."""
    dimensions, count, epsilon = 3, 20000, 0.3
    threat = ThreatModel(epsilon, norm)
    centre = np.full((count, dimensions), 0.5, np.float32)
    host = threat.uniform_start(centre, np.random.default_rng(4)) - 0.5
    graph = threat.random_start(centre, tf.constant([5, 6], tf.int64)).numpy() - 0.5
    for draw in (host, graph):
        sizes = threat.norms(tf.constant(draw)).numpy() / epsilon
        assert sizes.max() <= 1 + 1e-12
        for radius in (0.5, 0.8, 0.95):
            assert abs(np.mean(sizes <= radius) - radius ** dimensions) < 0.015, radius
        assert abs(np.mean(draw > 0) - 0.5) < 0.01
    edge = np.random.default_rng(7).choice([0.0, 1.0, 0.05], (500, 12)).astype(np.float32)
    for draw in (threat.uniform_start(edge, np.random.default_rng(8)),
                 threat.random_start(edge, tf.constant([1, 2], tf.int64)).numpy()):
        assert draw.min() >= 0 and draw.max() <= 1
        assert threat.norms(tf.constant(draw - edge)).numpy().max() <= epsilon * (1 + 1e-9)


def test_the_linf_host_start_is_the_originals_draw():
    """The challenge loop's parity rests on x_nat + rng.uniform(-epsilon, epsilon, shape),
    clipped, in float64."""
    x_nat = np.random.default_rng(9).uniform(0, 1, (6, 28, 28)).astype(np.float32)
    start = ThreatModel(0.3).uniform_start(x_nat, np.random.default_rng(10))
    expected = np.clip(x_nat.astype(np.float64)
                       + np.random.default_rng(10).uniform(-0.3, 0.3, x_nat.shape), 0, 1)
    assert start.dtype == np.float64
    np.testing.assert_array_equal(start, expected)


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_apgd_and_fab_starts_lie_in_the_ball_and_the_box(norm):
    rng = np.random.default_rng(11)
    x_nat = tf.constant(rng.choice([0.0, 0.5, 1.0], (50, 20)).astype(np.float32))
    threat = ThreatModel(0.7, norm)
    noise = tf.constant(threat.noise(rng, (50, 20)))
    for start in (threat.noise_start(x_nat, noise), threat.start_on_sphere(x_nat, noise, 0.5)):
        assert tf.reduce_min(start) >= 0 and tf.reduce_max(start) <= 1
        assert tf.reduce_max(threat.norms(start - x_nat)) <= 0.7 * (1 + 1e-6)


def test_an_unknown_norm_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^Unknown norm: use one of Linf, L2, L1\. "
                                         r"Received: norm='L3'$"):
        ThreatModel(0.1, "L3")
