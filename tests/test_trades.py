"""TRADES (Zhang et al., 2019) in the one training core: its loss against a numpy computation,
its inner maximisation inside the ball, a fit step with beta 0 equal to natural training's, the
challenge loop's step equal to fit's, and a short MNIST run more robust than natural training."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_fit import EPSILON, data, small_model

from common.attacks import PGD
from common.training import fit, loop, objectives, steps
from mnist_challenge import mnist_input


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def context(model, beta, optimizer=None, steps_=3):
    attack = PGD(model, epsilon=EPSILON, steps=steps_, step_size=0.04)
    optimizer = optimizer or keras.optimizers.SGD(0.0)
    optimizer.build(model.trainable_variables)
    return steps.StepContext(model=model, optimizer=optimizer, settings=attack.settings,
                             method="trades", beta=beta)


def test_the_trades_loss_is_the_mean_xent_plus_beta_times_the_mean_kl():
    x, y = data(8)
    model = small_model()
    x_adv = np.clip(x + np.random.default_rng(1).uniform(-EPSILON, EPSILON, x.shape), 0, 1)
    x_adv = tf.constant(x_adv, tf.float32)
    result = steps.update(context(model, beta=2.5), x, y, x_adv=x_adv,
                          objective=objectives.Xent(divisor=8))

    p, q = softmax(model(x).numpy().astype(np.float64)), softmax(model(x_adv).numpy())
    xent = -np.log(p[np.arange(8), y])
    kl = np.sum(p * np.log(p / q), axis=1)
    assert kl.mean() > 1e-4
    np.testing.assert_allclose(float(result.loss), xent.mean() + 2.5 * kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(steps.kl_divergence(model(x), model(x_adv)).numpy(), kl,
                               rtol=1e-4, atol=1e-7)


def test_the_inner_maximisation_raises_the_kl_within_the_ball():
    x, y = data(16)
    model = small_model()
    trades = context(model, beta=6.0, steps_=5)
    start = steps.METHODS["trades"].start_in_graph(x, trades.settings, tf.constant([0, 0]))
    assert 0 < np.abs(start.numpy() - x).max() < 0.01
    x_adv = steps.attack(trades, x, y, start=start).numpy()
    assert np.abs(x_adv - x).max() <= EPSILON + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    at_start = steps.kl_divergence(model(x), model(tf.cast(start, tf.float32))).numpy()
    at_adv = steps.kl_divergence(model(x), model(x_adv)).numpy()
    assert np.all(at_adv > at_start)


def test_with_beta_zero_a_fit_step_is_natural_trainings_step():
    x, y = data()
    model = small_model()
    trades = fit.AdversarialModel(model, PGD(model, epsilon=EPSILON, steps=2), method="trades",
                                  beta=0.0)
    natural = small_model()
    for trained in (trades, natural):
        trained.compile(optimizer=keras.optimizers.SGD(0.5),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trained.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for mine, other in zip(model.get_weights(), natural.get_weights()):
        np.testing.assert_allclose(mine, other, atol=1e-6)
    assert not np.allclose(natural.get_weights()[0], small_model().get_weights()[0])


def test_the_loops_trades_step_equals_fits():
    x, y = data()
    model = small_model()
    adversarial = fit.AdversarialModel(model, PGD(model, epsilon=EPSILON, steps=3, step_size=0.04),
                                       method="trades", beta=6.0)
    adversarial.compile(optimizer=keras.optimizers.SGD(0.5),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    adversarial.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    theirs = small_model()
    step = loop.TrainStep(tf.distribute.get_strategy(), theirs, keras.optimizers.SGD(0.5),
                          settings=adversarial.settings, loss_fn=objectives.Xent(divisor=32),
                          method="trades")
    step(x, y, adversarial.start_points(x, 0).numpy(), report=False)
    for mine, other in zip(model.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(mine, other, atol=1e-6)
    assert not np.allclose(model.get_weights()[0], small_model().get_weights()[0])


def test_the_loop_draws_trades_starts_near_the_batch():
    x, y = data()
    settings = PGD(small_model(), epsilon=EPSILON, steps=1).settings
    start = loop.training_start(x, settings, seed=1, step=2, method="trades")
    noise = start - x
    assert start.dtype == np.float64
    assert abs(noise.std() - steps.TRADES_NOISE) < 0.1 * steps.TRADES_NOISE
    np.testing.assert_array_equal(start, loop.training_start(x, settings, seed=1, step=2,
                                                             method="trades"))


def test_trades_needs_an_objective_that_reduces():
    model = small_model()
    settings = PGD(model, epsilon=EPSILON, steps=1).settings
    with pytest.raises(TypeError, match="Received: loss_fn="):
        loop.TrainStep(tf.distribute.get_strategy(), model, keras.optimizers.SGD(0.1),
                       settings=settings, loss_fn=lambda labels, logits, model: 0.0,
                       method="trades")
    with pytest.raises(ValueError, match="Received: beta=-1"):
        fit.AdversarialModel(model, PGD(model, epsilon=EPSILON), method="trades", beta=-1)


def mnist_mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(10)])


@pytest.mark.slow
def test_a_short_trades_run_on_mnist_is_more_robust_than_natural_training(mnist_data):
    mnist = mnist_input.MNISTData(mnist_data)
    x, y = mnist.train_images[:6000], mnist.train_labels[:6000].astype(np.int64)
    x_test, y_test = mnist.test_images[:500], mnist.test_labels[:500].astype(np.int64)
    robust = {}
    for method in ("natural", "trades"):
        model = mnist_mlp(0)
        trained = model if method == "natural" else fit.AdversarialModel(
            model, PGD(model, epsilon=0.1, steps=3, step_size=0.04), method="trades")
        trained.compile(optimizer=keras.optimizers.Adam(2e-3),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trained.fit(x, y, batch_size=50, epochs=2, shuffle=False, verbose=0)
        x_adv = PGD(model, epsilon=0.1, steps=10, step_size=0.025, seed=1).perturb(x_test,
                                                                                     y_test)
        robust[method] = np.mean(np.argmax(model(x_adv).numpy(), axis=1) == y_test)
    assert robust["trades"] > robust["natural"] + 0.2, robust


def test_two_replicas_take_the_loops_trades_step_of_one_device(two_replicas):
    x, y = data()
    settings = PGD(small_model(), epsilon=EPSILON, steps=2, step_size=0.05).settings
    start = loop.training_start(x, settings, seed=0, step=0, method="trades")
    weights = []
    for strategy in (two_replicas, tf.distribute.OneDeviceStrategy("/cpu:0")):
        with strategy.scope():
            model, optimizer = small_model(), keras.optimizers.SGD(0.5)
        step = loop.TrainStep(strategy, model, optimizer, settings=settings,
                              loss_fn=objectives.Xent(divisor=32), method="trades")
        step(x, y, start, report=False)
        weights.append(model.get_weights())
    for mine, other in zip(*weights):
        np.testing.assert_allclose(mine, other, atol=1e-5)
