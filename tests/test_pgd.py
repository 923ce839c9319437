"""The PGD engine: the epsilon ball (L-infinity and L2), the pixel range, the losses (targeted
and the margin loss too), the random start, restarts, reproducibility, the loss trace of Figure 1,
and the unrolled loop of training mode against the graph loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from common.attacks import losses, pgd


def tiny_model(input_size=12, classes=3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((input_size,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(classes)(hidden))


def test_unknown_loss_and_zero_restarts_are_rejected():
    with pytest.raises(ValueError, match="unknown loss: .*Received: loss='hinge'"):
        pgd.LinfPGDAttack(tiny_model(), 0.3, 5, 0.1, True, "hinge")
    with pytest.raises(ValueError, match="restarts must be at least 1. Received: restarts=0"):
        pgd.LinfPGDAttack(tiny_model(), 0.3, 5, 0.1, True, "xent", restarts=0)


def test_an_original_style_session_argument_is_a_clear_error():
    attack = pgd.LinfPGDAttack(tiny_model(), 0.3, 1, 0.1, True, "xent")
    with pytest.raises(TypeError, match=r"takes no session.*perturb\(x_nat, y, start=\.\.\.\)\. "
                                        r"Received: 1 more positional arguments$"):
        attack.perturb(np.zeros((2, 12), np.float32), np.zeros(2), object())


def test_settings_keep_the_original_attribute_names():
    attack = pgd.LinfPGDAttack(tiny_model(), 8, 7, 2, 1, "cw", pixel_range=(0, 255))
    assert (attack.epsilon, attack.k, attack.a, attack.rand, attack.loss_func) == \
        (8.0, 7, 2.0, True, "cw")
    assert attack.settings == pgd.AttackSettings(epsilon=8.0, steps=7, step_size=2.0,
                                                 random_start=True, loss="cw",
                                                 pixel_range=(0.0, 255.0))
    again = pgd.LinfPGDAttack.from_settings(tiny_model(), attack.settings)
    assert again.settings == attack.settings


def test_linf_random_start_is_uniform_in_the_ball_and_clipped():
    settings = pgd.AttackSettings(epsilon=0.3, steps=1, step_size=0.1, random_start=True,
                                  loss="xent", pixel_range=(0.0, 1.0))
    middle = np.full((2000, 12), 0.5, np.float32)
    offsets = pgd.start_point(middle, settings, np.random.default_rng(0)) - 0.5
    # U(-0.3, 0.3) per pixel: each decile of the interval holds a tenth of the pixels.
    counts = np.histogram(offsets, bins=10, range=(-0.3, 0.3))[0] / offsets.size
    np.testing.assert_allclose(counts, 0.1, atol=0.01)
    near_top = pgd.start_point(np.full((2000, 12), 0.9, np.float32), settings,
                               np.random.default_rng(1))
    assert near_top.dtype == np.float64 and near_top.max() == 1.0
    assert abs(np.mean(near_top == 1.0) - 0.2 / 0.6) < 0.02  # the part beyond 1 is clipped
    assert not np.array_equal(pgd.start_point(middle, settings, np.random.default_rng(2)),
                              pgd.start_point(middle, settings, np.random.default_rng(3)))
    fixed = pgd.start_point(near_top, pgd.AttackSettings(epsilon=0.3, steps=1, step_size=0.1,
                                                         random_start=False), None)
    np.testing.assert_array_equal(fixed, near_top.astype(np.float32).astype(np.float64))


def test_l2_random_start_is_uniform_in_the_ball():
    settings = pgd.AttackSettings(epsilon=2.0, steps=1, step_size=0.1, random_start=True,
                                  loss="xent", pixel_range=(-100.0, 100.0), norm="L2")
    x_nat = np.zeros((4000, 3), np.float32)
    radii = np.linalg.norm(pgd.start_point(x_nat, settings, np.random.default_rng(0)), axis=1)
    assert radii.max() <= 2.0
    # Uniform in a 3-dimensional ball: P(radius <= r) = (r / 2) ** 3.
    for fraction in (0.5, 0.8, 0.95):
        assert abs(np.mean(radii <= 2.0 * fraction) - fraction ** 3) < 0.03


def test_cw_loss_is_the_original_margin():
    logits = tf.constant([[1.0, 5.0, 2.0], [0.0, -1.0, 70.0]])
    labels = tf.constant([1, 0], tf.int64)
    loss = losses.per_example_loss(logits, labels, "cw").numpy()
    # -relu(correct - max wrong + 50): (5 - 2 + 50) and (0 - 70 + 50 < 0).
    np.testing.assert_allclose(loss, [-53.0, 0.0])


def test_margin_and_targeted_losses_by_hand():
    logits = tf.constant([[1.0, 5.0, 2.0], [0.0, -1.0, 70.0]])
    labels = tf.constant([1, 0], tf.int64)
    # The paper's CW: -relu(correct - max wrong), confidence 0: (5 - 2) and (0 - 70 < 0).
    np.testing.assert_allclose(losses.per_example_loss(logits, labels, "margin").numpy(),
                               [-3.0, 0.0])
    targets = losses.wrong_classes(logits, labels, 1).numpy()[:, 0]
    assert targets.tolist() == [2, 2]
    np.testing.assert_allclose(losses.wrong_classes(-logits, labels, 2).numpy(),
                               [[0, 2], [1, 2]])
    # -log softmax(logits)[target], by hand: [1, 5, 2] -> log(e + e^5 + e^2) - 2.
    by_hand = [2 - np.log(np.exp(1) + np.exp(5) + np.exp(2)),
               70 - np.log(1 + np.exp(-1) + np.exp(70))]
    np.testing.assert_allclose(losses.per_example_loss(logits, labels, "targeted", targets),
                               by_hand, rtol=1e-5)


def test_targeted_pgd_moves_towards_the_most_likely_wrong_class():
    rng = np.random.default_rng(6)
    x_nat = rng.uniform(0, 1, (200, 12)).astype(np.float32)
    model = tiny_model(classes=5)
    logits = model(x_nat)
    y = np.argmax(logits.numpy(), axis=1)
    targets = losses.wrong_classes(logits, y, 1).numpy()[:, 0]
    attack = pgd.LinfPGDAttack(model, 0.3, 20, 0.03, True, "targeted", seed=1)
    predicted = np.argmax(model(attack.perturb(x_nat, y).astype(np.float32)).numpy(), axis=1)
    fooled = predicted != y
    assert fooled.mean() > 0.5
    assert np.mean(predicted[fooled] == targets[fooled]) > 0.9


def test_the_loss_trace_follows_the_attack_step_by_step():
    rng = np.random.default_rng(7)
    x_nat = rng.uniform(0, 1, (16, 12)).astype(np.float32)
    model = tiny_model()
    y = np.argmax(model(x_nat).numpy(), axis=1)
    settings = pgd.AttackSettings(epsilon=0.2, steps=6, step_size=0.05, random_start=True,
                                  loss="xent")
    start = pgd.start_point(x_nat, settings, np.random.default_rng(0))
    trace = pgd.loss_trace(model, x_nat, y, start, settings).numpy()
    assert trace.shape == (7, 16)
    for steps in (0, 3, 6):
        x = pgd.pgd_steps(model, x_nat, y, start, pgd.AttackSettings(epsilon=0.2, steps=steps,
                                                                     step_size=0.05,
                                                                     random_start=True))
        expected = losses.xent(model(tf.cast(x, tf.float32)), y).numpy()
        np.testing.assert_allclose(trace[steps], expected, rtol=1e-5, atol=1e-6)
    assert np.all(trace[-1] > trace[0])


def test_skip_draws_the_starts_of_a_batch():
    x_nat = np.random.default_rng(8).uniform(0, 1, (10, 12)).astype(np.float32)
    y = np.zeros(10, np.int64)
    whole = pgd.LinfPGDAttack(tiny_model(), 0.1, 2, 0.05, True, "xent", restarts=3, seed=2)
    whole.perturb(x_nat[:5], y[:5])
    expected = whole.perturb(x_nat[5:], y[5:])
    skipping = pgd.LinfPGDAttack(tiny_model(), 0.1, 2, 0.05, True, "xent", restarts=3, seed=2)
    skipping.skip(x_nat[:5])
    np.testing.assert_array_equal(skipping.perturb(x_nat[5:], y[5:]), expected)


@pytest.mark.parametrize("pixel_range, epsilon", [((0.0, 1.0), 0.3), ((0.0, 255.0), 8.0)])
def test_result_stays_in_the_ball_and_the_pixel_range(pixel_range, epsilon):
    rng = np.random.default_rng(1)
    x_nat = rng.uniform(*pixel_range, (32, 12)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    attack = pgd.LinfPGDAttack(tiny_model(), epsilon, 10, epsilon / 4, True, "xent",
                               pixel_range=pixel_range, seed=3)
    x_adv = attack.perturb(x_nat, y)
    assert x_adv.dtype == np.float64
    assert np.all(np.abs(x_adv - x_nat) <= epsilon * (1 + 1e-6))
    assert x_adv.min() >= pixel_range[0] and x_adv.max() <= pixel_range[1]
    assert np.abs(x_adv - x_nat).max() > epsilon / 2


def test_attack_raises_the_loss_and_seeds_reproduce():
    rng = np.random.default_rng(2)
    x_nat = rng.uniform(0, 1, (64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    model = tiny_model()
    first = pgd.LinfPGDAttack(model, 0.3, 20, 0.05, True, "xent", seed=5).perturb(x_nat, y)
    again = pgd.LinfPGDAttack(model, 0.3, 20, 0.05, True, "xent", seed=5).perturb(x_nat, y)
    np.testing.assert_array_equal(first, again)

    def summed_loss(x):
        return losses.xent(model(x.astype(np.float32)), y).numpy().sum()

    assert summed_loss(first) > summed_loss(x_nat) + 1.0


def test_no_random_start_begins_at_the_natural_image():
    x_nat = np.full((4, 12), 0.5, np.float32)
    attack = pgd.LinfPGDAttack(tiny_model(), 0.3, 0, 0.1, False, "xent")
    np.testing.assert_array_equal(attack.perturb(x_nat, np.zeros(4, np.int64)), x_nat)


def test_restarts_keep_the_strongest_start_per_example():
    rng = np.random.default_rng(4)
    x_nat = rng.uniform(0, 1, (200, 12)).astype(np.float32)
    model = tiny_model()
    y = np.argmax(model(x_nat).numpy(), axis=1)
    many = pgd.LinfPGDAttack(model, 0.05, 3, 0.02, True, "xent", restarts=5, seed=9)
    # One restart at a time from the same seeded stream draws the same five starts.
    one = pgd.LinfPGDAttack(model, 0.05, 3, 0.02, True, "xent", seed=9)
    candidates = np.stack([one.perturb(x_nat, y) for _ in range(5)])
    logits = np.stack([model(c.astype(np.float32)).numpy().astype(np.float64)
                       for c in candidates])
    shifted = logits - logits.max(axis=2, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
    xent = -np.take_along_axis(log_softmax, y[None, :, None], axis=2)[..., 0]
    wrong = logits.argmax(axis=2) != y
    # Per example: the misclassified restart of highest loss, else the restart of highest loss.
    best = np.argmax(np.where(wrong.any(axis=0), np.where(wrong, xent, -np.inf), xent), axis=0)
    assert len(set(best.tolist())) > 1  # the rule picks different restarts for different examples
    np.testing.assert_array_equal(many.perturb(x_nat, y), candidates[best, np.arange(len(y))])


def test_the_unrolled_loop_of_training_mode_equals_the_graph_loop():
    """Training mode unrolls the steps in Python (batch norm cannot update inside a graph loop);
    on a model without batch norm both loops take the same steps."""
    rng = np.random.default_rng(5)
    model = tiny_model()
    x_nat = rng.uniform(0, 1, (40, 12)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    settings = pgd.AttackSettings(epsilon=0.2, steps=6, step_size=0.03, random_start=True,
                                  loss="xent")
    start = pgd.start_point(x_nat, settings, np.random.default_rng(1))
    results = [tf.function(lambda x, labels, x0, training=training: pgd.pgd_steps(
        model, x, labels, x0, settings, training=training))(x_nat, y, start).numpy()
        for training in (False, True)]
    np.testing.assert_array_equal(results[0], results[1])
    assert np.abs(results[0] - start).max() > 0.05


@pytest.mark.slow
def test_l2_pgd_stays_in_the_ball_and_the_range_and_raises_the_loss():
    rng = np.random.default_rng(10)
    x_nat = rng.uniform(0, 1, (64, 12)).astype(np.float32)
    model = tiny_model()
    y = np.argmax(model(x_nat).numpy(), axis=1)
    x_adv = pgd.PGD(model, epsilon=0.5, steps=20, step_size=0.1, norm="L2",
                    seed=1).perturb(x_nat, y)
    assert x_adv.dtype == np.float32 and x_adv.shape == x_nat.shape
    distances = np.linalg.norm(x_adv - x_nat, axis=1)
    assert distances.max() <= 0.5 + 1e-5 and distances.max() > 0.45
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert losses.xent(model(x_adv), y).numpy().sum() > \
        losses.xent(model(x_nat), y).numpy().sum() + 1.0


def test_an_l2_step_moves_by_the_step_size_along_the_gradient():
    """On a linear model the gradient of the margin is the difference of two weight rows: one
    L2 step of size s from the centre moves exactly s along it."""
    weights = np.array([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]], np.float32).T  # 3 inputs, 2 classes
    model = lambda x: tf.matmul(x, weights)  # noqa: E731 (a plain callable as the model)
    x_nat = np.full((1, 3), 0.5, np.float32)
    attack = pgd.PGD(model, epsilon=10.0, steps=1, step_size=0.3, norm="L2",
                     random_start=False, loss="margin", pixel_range=(-10, 10))
    np.testing.assert_allclose(attack.perturb(x_nat, [0]) - x_nat, [[-0.1, -0.2, -0.2]],
                               atol=1e-6)


@pytest.mark.parametrize("norm, epsilon", [("Linf", 0.3), ("L2", 1.0), ("L1", 2.0)])
def test_a_scaled_attack_is_the_attack_built_at_its_epsilon_from_one_trace(norm, epsilon):
    """PGD.scaled(f) gives, point for point, what PGD built at f times epsilon and the step size
    gives (random starts and restarts included, and the loss trace), while the traced steps of
    the attack scaled serve every factor."""
    model = tiny_model()
    x = np.random.default_rng(0).uniform(size=(16, 12)).astype(np.float32)
    y = np.arange(16) % 3
    options = dict(norm=norm, steps=4, restarts=2, seed=5)
    base = pgd.PGD(model, epsilon=epsilon, step_size=epsilon / 3, **options)
    for factor in (0.25, 1.5, 0.7, 0.0, 1.0):
        built = pgd.PGD(model, epsilon=epsilon * factor, step_size=epsilon / 3 * factor,
                        **options)
        scaled = base.scaled(factor)
        assert scaled.settings == built.settings and base.settings.epsilon == epsilon
        np.testing.assert_array_equal(scaled.attack_float64(x, y), built.attack_float64(x, y))
        for got, expected in zip(scaled.perturb_with_losses(x, y), built.perturb_with_losses(x, y)):
            np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(base.scaled(0.5).perturb(x, y), base.perturb(x, y))
    assert base._spread_attack.tracing_count() == base._spread_traced.tracing_count() == 1
    with pytest.raises(ValueError, match=r"factor must be at least 0.0. Received: factor=-1"):
        base.scaled(-1)
