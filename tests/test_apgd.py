"""APGD: the checkpoint schedule, the DLR losses, the step-size rule, the epsilon ball and the
pixel range, reproducibility, and its strength against PGD on the MNIST TF1 fixture."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.attacks import apgd, losses, pgd
from common.attacks.threat_model import ThreatModel
from common.io import checkpoints
from mnist_challenge import mnist_input
from mnist_challenge import model as mnist_model


def test_the_checkpoints_of_100_iterations():
    intervals = apgd.checkpoint_intervals(100)
    assert intervals == {21: 22, 40: 19, 56: 16, 69: 13, 79: 10, 86: 7, 92: 6, 98: 6}
    assert [iteration + 1 for iteration in intervals] == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_losses_by_hand():
    logits = tf.constant([[1.0, 5.0, 2.0, 0.5], [1.0, 5.0, 2.0, 0.5]])
    labels = tf.constant([1, 2], tf.int64)
    # Label on top: -(5 - 2) / (5 - 1); label second: -(2 - 5) / (5 - 1).
    np.testing.assert_allclose(losses.dlr(logits, labels).numpy(), [-0.75, 0.75], rtol=1e-6)
    targets = tf.constant([3, 0], tf.int64)
    # -(z_y - z_t) / (z1 - (z3 + z4) / 2): -(5 - 0.5) / 4.25 and -(2 - 1) / 4.25.
    np.testing.assert_allclose(losses.dlr_targeted(logits, labels, targets).numpy(),
                               [-4.5 / 4.25, -1 / 4.25], rtol=1e-6)
    moved = 3.0 * logits - 7.0
    np.testing.assert_allclose(losses.dlr(moved, labels).numpy(), [-0.75, 0.75], rtol=1e-5)


def test_the_step_size_rule():
    rising = tf.constant([16.0, 17.0, 17.0, 17.0])
    halved_at_last = tf.constant([False, False, True, False])
    best_at_last = tf.constant([1.0, 1.0, 1.0, 0.5])
    best = tf.constant([2.0, 1.0, 1.0, 0.9])
    # 16 <= 0.75 * 22 rises: halve; 17 > 16.5 and no improvement since a checkpoint that did not
    # halve: halve; the same after a halving: keep; improved: keep.
    halve = apgd.halve_step(rising, 22, halved_at_last=halved_at_last,
                            best_at_last=best_at_last, best=best).numpy()
    np.testing.assert_array_equal(halve, [True, True, False, False])


def linear_model(weights):
    inputs = keras.Input((len(weights[0]),))
    layer = keras.layers.Dense(len(weights), use_bias=False)
    model = keras.Model(inputs, layer(inputs))
    layer.kernel.assign(np.asarray(weights, np.float32).T)
    return model


def test_on_a_loss_that_stops_rising_the_step_size_halves_at_every_checkpoint():
    """Logits (0, w.x): the loss of class 0 rises along sign(w) until the corner of the ball,
    reached at the first step, and never rises again, so every checkpoint halves."""
    model = linear_model([[0.0] * 6, [1.0, -2.0, 0.5, 3.0, -1.0, 2.0]])
    x = np.full((4, 6), 0.5, np.float32)
    y = np.zeros(4, np.int64)
    settings = apgd.APGDSettings(threat_model=ThreatModel(0.1), num_iterations=100, loss="xent")
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    x_adv, robust, step_size = (t.numpy() for t in tf.function(apgd.apgd_steps)(
        model, tf.constant(x), tf.constant(y), targets=tf.constant(y), noise=tf.constant(noise),
        settings=settings))
    np.testing.assert_allclose(step_size, 2 * 0.1 / 2**8, rtol=1e-6)
    corner = x + 0.1 * np.sign([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    np.testing.assert_allclose(x_adv, np.broadcast_to(corner, x.shape), atol=1e-6)
    assert not robust.any()


@pytest.mark.parametrize("pixel_range, epsilon, options", [
    ((0.0, 1.0), 0.3, {"loss": "xent"}), ((0.0, 255.0), 8.0, {"loss": "dlr"}),
    ((0.0, 255.0), 8.0, {"targets": 2})])
@pytest.mark.slow
def test_results_stay_in_the_ball_and_the_pixel_range(pixel_range, epsilon, options):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Dense(16, "relu")(inputs)))
    rng = np.random.default_rng(1)
    x = rng.uniform(*pixel_range, (32, 12)).astype(np.float32)
    y = np.argmax(model(x).numpy(), axis=1)

    def attack(seed):
        return apgd.APGD(model, epsilon=epsilon, steps=20, pixel_range=pixel_range, seed=seed,
                         **options).perturb(x, y)

    x_adv = attack(3)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.all(np.abs(x_adv - x) <= epsilon * (1 + 1e-6))
    assert x_adv.min() >= pixel_range[0] and x_adv.max() <= pixel_range[1]
    np.testing.assert_array_equal(x_adv, attack(3))
    assert not np.array_equal(x_adv, attack(4))
    # An example keeps its clean image exactly where the attack did not break it.
    wrong = np.argmax(model(x_adv).numpy(), axis=1) != y
    assert wrong.any()
    np.testing.assert_array_equal(x_adv[~wrong], x[~wrong])
    assert np.all(np.abs(x_adv[wrong] - x[wrong]).max(axis=1) > 0)


@pytest.mark.slow
def test_apgd_is_at_least_as_strong_as_pgd_on_the_mnist_fixture(mnist_data, mnist_fixture):
    data = mnist_input.MNISTData(mnist_data)
    x, y = data.test_images[:100], data.test_labels[:100]
    model = mnist_model.Model()
    checkpoints.load_latest_weights(model, mnist_fixture, mnist_model.tf1_variables)
    epsilon = 0.05
    x_pgd = pgd.LinfPGDAttack(model, epsilon, 40, 0.01, True, "xent", seed=0).perturb(x, y)
    pgd_accuracy = np.mean(np.argmax(model(x_pgd.astype(np.float32)).numpy(), axis=1) == y)
    x_apgd = apgd.APGD(model, epsilon=epsilon, seed=0).perturb(x, y)
    apgd_accuracy = np.mean(np.argmax(model(x_apgd).numpy(), axis=1) == y)
    assert 0 < apgd_accuracy <= pgd_accuracy < 1, (apgd_accuracy, pgd_accuracy)


def test_apgd_t_keeps_the_clean_image_where_it_fails_and_the_break_where_it_succeeds():
    """Logits (4, 3, 2, x0, -1) for true class 0: within a small ball no target breaks it and
    the clean image is returned; within a large one the run reaches class 3 (the 4th highest
    clean logit, the third target) and the example is broken."""
    weights = np.zeros((5, 4), np.float32)
    weights[3, 0] = 1.0  # class 3's logit grows with x0
    model = linear_model(weights)
    x = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
    bias = keras.layers.Lambda(lambda logits: logits + tf.constant([[4.0, 3.0, 2.0, 0.0, -1.0]]))
    model = keras.Sequential([model, bias])
    model.build((None, 4))
    x_adv = apgd.APGD(model, epsilon=0.3, steps=10, targets=2,
                      pixel_range=(-10.0, 10.0)).perturb(x, np.array([0]))
    np.testing.assert_array_equal(x_adv, x)
    x_adv = apgd.APGD(model, epsilon=5.0, steps=10, targets=3,
                      pixel_range=(-10.0, 10.0)).perturb(x, np.array([0]))
    assert np.argmax(model(x_adv).numpy()) == 3


@pytest.mark.parametrize("norm, epsilon, options", [
    ("Linf", 0.3, {"restarts": 2}), ("L2", 1.0, {"targets": 2}),
    ("L1", 3.0, {"large_reps": True})])
def test_a_scaled_attack_is_the_attack_built_at_its_epsilon_from_one_trace(norm, epsilon,
                                                                           options):
    """APGD.scaled(f) gives, point for point, what APGD built at f times epsilon gives (its
    starts, restarts, targets and L1 schedule included), from the iterations traced once."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Dense(16, "relu")(inputs)))
    x = np.random.default_rng(1).uniform(size=(24, 12)).astype(np.float32)
    y = np.argmax(model(x).numpy(), axis=1)
    settings = dict(norm=norm, steps=12, seed=3, **options)
    base = apgd.APGD(model, epsilon=epsilon, **settings)
    broken = []
    for factor in (0.5, 1.5, 0.7, 1.0):
        scaled = base.scaled(factor)
        built = apgd.APGD(model, epsilon=epsilon * factor, **settings)
        assert scaled.settings == built.settings and base.threat_model.epsilon == epsilon
        x_adv = scaled.perturb(x, y)
        np.testing.assert_array_equal(x_adv, built.perturb(x, y))
        broken.append(np.mean(np.argmax(model(x_adv).numpy(), axis=1) != y))
    assert broken[0] < broken[1]  # the larger ball breaks more: the factor took effect
    assert base._spread.tracing_count() == 1
    with pytest.raises(ValueError, match=r"factor must be at least 0.0. Received: factor=-1"):
        base.scaled(-1)
