"""Fast and free adversarial training: FGSM-RS, N-FGSM and free replays against hand-written
reference loops, the cyclic learning rate at its corners, the epsilon ramp, two replicas against
one device for each method, and the catastrophic-overfitting guard stopping a real run and
restoring."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import checkpoint_values, run_script
from test_bad_input import load
from test_mnist_training import summaries

from common.attacks import pgd
from common.runtime import seeds
from common.training import loop, schedules, steps
from common.training.objectives import summed_xent
from mnist_challenge import mnist_input
from mnist_challenge import model as mnist_model
from mnist_challenge.challenge import MNIST

EPSILON = 0.3
BATCH = 20


@pytest.fixture
def batch(mnist_data):
    mnist = mnist_input.MNISTData(mnist_data)
    indices = mnist_input.batch_indices(0, BATCH, len(mnist.train_labels), seed=1)
    return mnist.train_images[indices], mnist.train_labels[indices]


@pytest.fixture
def initial_weights():
    keras.utils.set_random_seed(3)
    return mnist_model.Model(on_cpu=False).get_weights()


def model_and_adam(weights, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = mnist_model.Model(on_cpu=False)
        model.set_weights(weights)
        optimizer = keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-8)
    return model, optimizer


def assert_same_adam_steps(ours, theirs, rate=1e-3):
    """Adam moves a weight by about its rate whatever the gradient's size, so a gradient near 0
    summed in another order may move it differently: allow that on a few weights, by less than
    half a step, and nowhere else."""
    for mine, other in zip(ours, theirs):
        difference = np.abs(mine - other)
        assert difference.max() < rate / 2, difference.max()
        assert np.mean(difference > 1e-6) < 0.005, np.mean(difference > 1e-6)


def xent_gradients(model, x, labels, sources):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = summed_xent(labels, model(x, training=True), model)
    return tape.gradient(loss, sources)


@pytest.mark.slow
def test_fgsm_rs_is_one_pgd_step_of_its_size_from_a_random_start(batch, initial_weights):
    config = load(MNIST, "--training_method=fgsm_rs", "--fgsm_step_size=0.375")
    settings = MNIST.training_attack_settings(config)
    assert settings == pgd.AttackSettings(epsilon=EPSILON, steps=1, step_size=0.375,
                                          random_start=True, loss="xent", pixel_range=(0.0, 1.0))
    x, y = batch
    model, optimizer = model_and_adam(initial_weights)
    step = loop.TrainStep(tf.distribute.get_strategy(), model, optimizer, settings=settings,
                          loss_fn=summed_xent)
    step(x, y, step.start_points(x, 5, 7), report=False, step=7)

    reference, reference_optimizer = model_and_adam(initial_weights)
    noise = seeds.generator(5, seeds.TRAINING_STARTS, 7).uniform(-EPSILON, EPSILON, x.shape)
    start = np.clip(x.astype(np.float64) + noise, 0, 1)
    x_start = tf.constant(start, tf.float32)
    gradient = xent_gradients(reference, x_start, y, x_start)
    x_adv = np.clip(start + 0.375 * np.sign(gradient.numpy()), x - EPSILON, x + EPSILON)
    x_adv = tf.constant(np.clip(x_adv, 0, 1), tf.float32)
    reference_optimizer.apply_gradients(zip(
        xent_gradients(reference, x_adv, y, reference.trainable_variables),
        reference.trainable_variables))
    for ours, before in zip(model.get_weights(), initial_weights):
        assert not np.array_equal(ours, before)
    assert_same_adam_steps(model.get_weights(), reference.get_weights())


@pytest.mark.slow
def test_nfgsm_is_one_unprojected_step_from_noise_twice_epsilon(batch, initial_weights):
    config = load(MNIST, "--training_method=nfgsm", "--fgsm_step_size=0.3")
    settings = MNIST.training_attack_settings(config)
    x, y = batch
    model, optimizer = model_and_adam(initial_weights)
    step = loop.TrainStep(tf.distribute.get_strategy(), model, optimizer, method="nfgsm",
                          settings=settings, loss_fn=summed_xent)
    step(x, y, step.start_points(x, 5, 7), report=False, step=7)

    reference, reference_optimizer = model_and_adam(initial_weights)
    noise = seeds.generator(5, seeds.TRAINING_STARTS, 7).uniform(-2 * EPSILON, 2 * EPSILON,
                                                                  x.shape)
    start = np.clip(x.astype(np.float64) + noise, 0, 1)
    x_start = tf.constant(start, tf.float32)
    gradient = xent_gradients(reference, x_start, y, x_start)
    x_adv = np.clip(start + 0.3 * np.sign(gradient.numpy()), 0, 1)  # no projection
    assert np.abs(x_adv - x).max() > 2.5 * EPSILON
    reference_optimizer.apply_gradients(zip(
        xent_gradients(reference, tf.constant(x_adv, tf.float32), y,
                       reference.trainable_variables), reference.trainable_variables))
    for ours, before in zip(model.get_weights(), initial_weights):
        assert not np.array_equal(ours, before)
    assert_same_adam_steps(model.get_weights(), reference.get_weights())


def test_a_few_step_training_attack_leaves_the_evaluation_attack_alone():
    config = load(MNIST, "--training_attack=[2,0.2]")
    assert MNIST.training_attack_settings(config) == pgd.AttackSettings(epsilon=EPSILON, steps=2,
                                                                        step_size=0.2,
                                                                        random_start=True)
    assert MNIST.attack_settings(config) == pgd.AttackSettings(epsilon=EPSILON, steps=40,
                                                               step_size=0.01, random_start=True)
    original = load(MNIST)
    assert MNIST.training_attack_settings(original) == MNIST.attack_settings(original)
    assert MNIST.training_attack_settings(
        load(MNIST, "--training_attack=[2,0.2]", "--training_method=fgsm_rs")).steps == 1


def test_config_robust_holds_the_measured_recipe():
    """config_robust.json is the recipe docs/training.md measured: 8 steps of 0.1 in training,
    the original's 40 steps of 0.01 in evaluation, bfloat16 only where the CPU has it."""
    config = load(MNIST, "--config=mnist_challenge/config_robust.json")
    assert MNIST.training_attack_settings(config) == pgd.AttackSettings(
        epsilon=EPSILON, steps=8, step_size=0.1, random_start=True)
    assert MNIST.attack_settings(config) == pgd.AttackSettings(epsilon=EPSILON, steps=40,
                                                               step_size=0.01, random_start=True)
    assert (config["training_method"], config["training_precision"]) == ("pgd", "auto")
    assert config["precision"] == "float32"
    assert (config["max_num_training_steps"], config["training_batch_size"]) == (9500, 100)
    assert config["epsilon_ramp_steps"] == 1900 and config["overfitting_check_steps"] == 500
    assert config["learning_rate_schedule"] == "piecewise_linear"
    assert config["step_size_schedule"] == [[0, 0.0], [3800, 0.002], [9500, 0.0]]
    assert config["model_dir"].endswith("mnist_challenge/models/robust")


@pytest.mark.slow
def test_free_replays_equal_a_hand_written_loop(batch, initial_weights):
    x, y = batch
    settings = pgd.AttackSettings(epsilon=EPSILON, steps=40, step_size=0.01, random_start=True)
    model, optimizer = model_and_adam(initial_weights)
    step = loop.FreeTrainStep(tf.distribute.get_strategy(), model, optimizer, settings=settings,
                              loss_fn=summed_xent, replays=3, batch_size=BATCH)
    assert step.start_points(x, 0, 0).shape == (0, 784)
    for replay in range(3):
        step(x, y, step.start_points(x, 0, replay), report=False, step=replay)

    reference, reference_optimizer = model_and_adam(initial_weights)
    perturbation = np.zeros_like(x)
    for _ in range(3):
        x_adv = tf.constant(np.clip(x + perturbation, 0, 1))
        weight_gradients, input_gradient = xent_gradients(
            reference, x_adv, y, [reference.trainable_variables, x_adv])
        reference_optimizer.apply_gradients(zip(weight_gradients,
                                                reference.trainable_variables))
        perturbation = np.clip(perturbation + EPSILON * np.sign(input_gradient.numpy()),
                               -EPSILON, EPSILON)
    np.testing.assert_allclose(step.perturbation.numpy(), perturbation, rtol=0, atol=1e-6)
    assert np.abs(perturbation).max() == pytest.approx(EPSILON)
    for ours, before in zip(model.get_weights(), initial_weights):
        assert np.abs(ours - before).max() > 1e-3
    assert_same_adam_steps(model.get_weights(), reference.get_weights())


def test_the_cyclic_schedule_at_its_corners():
    cyclic = schedules.PiecewiseLinear([[0, 0.0], [400, 1e-3], [1000, 0.0]])
    for step, rate in [(0, 0.0), (200, 5e-4), (400, 1e-3), (700, 5e-4), (1000, 0.0),
                       (5000, 0.0)]:
        assert float(cyclic(step)) == pytest.approx(rate, rel=1e-6, abs=1e-12), step
    assert float(schedules.PiecewiseLinear([[0, 0.1]])(123)) == pytest.approx(0.1)
    config = load(MNIST)
    assert MNIST.learning_rate(config) == 1e-4
    linear = load(MNIST, "--learning_rate_schedule=piecewise_linear",
                  "--step_size_schedule=[[0,0],[10,0.002],[20,0]]")
    assert float(MNIST.learning_rate(linear)(15)) == pytest.approx(0.001)


def test_the_optimizer_follows_the_cyclic_schedule(batch, initial_weights):
    x, y = batch
    with tf.distribute.get_strategy().scope():
        model = mnist_model.Model(on_cpu=False)
        model.set_weights(initial_weights)
        optimizer = keras.optimizers.Adam(
            learning_rate=schedules.PiecewiseLinear([[0, 0.0], [2, 1e-3], [4, 0.0]]))
    step = loop.TrainStep(tf.distribute.get_strategy(), model, optimizer,
                          settings=pgd.AttackSettings(epsilon=EPSILON, steps=1, step_size=0.375,
                                                      random_start=True),
                          loss_fn=summed_xent)
    step(x, y, step.start_points(x, 0, 0), report=False)
    for ours, before in zip(model.get_weights(), initial_weights):
        np.testing.assert_array_equal(ours, before)  # the rate of step 0 is 0
    step(x, y, step.start_points(x, 0, 1), report=False, step=1)
    assert not np.array_equal(model.get_weights()[0], initial_weights[0])


def test_the_epsilon_ramp_scales_starts_and_steps(batch, initial_weights):
    x, y = batch
    model, optimizer = model_and_adam(initial_weights)
    settings = pgd.AttackSettings(epsilon=EPSILON, steps=2, step_size=0.1, random_start=True)
    step = loop.TrainStep(tf.distribute.get_strategy(), model, optimizer, settings=settings,
                          loss_fn=summed_xent, epsilon_ramp_steps=10)
    assert [step.epsilon_scale(s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    start = step.start_points(x, 0, 5)
    assert np.abs(start - x).max() <= EPSILON / 2 + 1e-7
    assert np.abs(start - x).max() > EPSILON / 4
    _, x_adv = step(x, y, start, report=False, step=5)
    assert np.abs(x_adv.numpy() - x).max() == pytest.approx(EPSILON / 2, abs=1e-6)
    np.testing.assert_array_equal(step.start_points(x, 0, 0), x.astype(np.float64))


def one_step(method, strategy, batch, initial_weights):
    model, optimizer = model_and_adam(initial_weights, strategy)
    settings = steps.training_settings(
        pgd.AttackSettings(epsilon=EPSILON, steps=3, step_size=0.1, random_start=True), method,
        fgsm_step_size=0.375)
    step = loop.build_train_step(strategy, model, optimizer, method=method, settings=settings,
                                 loss_fn=summed_xent, replays=2, batch_size=BATCH)
    assert step.replays == (2 if method == "free" else 1)
    x, y = batch
    for index in range(step.replays):  # free: the second replay starts from the carried one
        metrics, _ = step(x, y, step.start_points(x, 1, index), report=True, step=index)
    state = [variable.numpy() for variable in step.state.values()]
    return model.get_weights() + state, {name: value.numpy() for name, value in metrics.items()}


@pytest.mark.parametrize("method", ["fgsm_rs", "free"])
def test_two_replicas_take_the_same_steps_as_one_device(method, batch, initial_weights,
                                                        two_replicas):
    weights_two, metrics_two = one_step(method, two_replicas, batch, initial_weights)
    weights_one, metrics_one = one_step(method, tf.distribute.OneDeviceStrategy("/cpu:0"),
                                        batch, initial_weights)
    assert abs(int(metrics_two["adv_correct"]) - int(metrics_one["adv_correct"])) <= 1
    assert metrics_two["nat_correct"] == metrics_one["nat_correct"]
    np.testing.assert_allclose(metrics_two["adv_xent"], metrics_one["adv_xent"], rtol=1e-3)
    assert len(weights_one) == len(initial_weights) + (method == "free")
    np.testing.assert_allclose(weights_two[-1], weights_one[-1], rtol=0, atol=1e-6)
    assert_same_adam_steps(weights_two, weights_one)


GUARDED = ("--epsilon=0.05", "--training_method=fgsm_rs", "--fgsm_step_size=0.06",
           "--training_batch_size=50", "--overfitting_check_steps=10",
           "--overfitting_check_examples=256",
           "--num_checkpoint_steps=10", "--num_output_steps=1000",
           "--learning_rate_schedule=piecewise_constant",
           # a rate that wrecks the model after step 30: a drop the guard must catch
           "--step_size_schedule=[[0,0.001],[30,0.5]]")


def guarded_run(model_dir, mnist_data, max_steps):
    result = run_script("mnist_challenge/train.py", f"--model_dir={model_dir}",
                        f"--data_path={mnist_data}", *GUARDED,
                        f"--max_num_training_steps={max_steps}")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_guard_stops_on_a_drop_and_keeps_the_weights_before(tmp_path, mnist_data):
    guarded, reference = tmp_path / "guarded", tmp_path / "reference"
    out = guarded_run(guarded, mnist_data, 100)
    assert "Catastrophic overfitting at step 40: the held-out accuracy fell from " in out
    assert "training stops with the weights of step 30" in out
    assert "Step 50:" not in out and "Step 40: PGD-5 accuracy on the held-out batch" in out
    assert tf.train.latest_checkpoint(str(guarded)).endswith("checkpoint-30")
    assert not os.path.exists(f"{guarded}/checkpoint-100.index")
    kept = checkpoint_values(f"{guarded}/checkpoint-30")
    assert int(kept["overfitting_guard/stopped_at/.ATTRIBUTES/VARIABLE_VALUE"]) == 40
    assert int(kept["global_step/.ATTRIBUTES/VARIABLE_VALUE"]) == 30
    accuracies = summaries(str(guarded), "accuracy adv held out")
    assert sorted(accuracies) == [0, 10, 20, 30, 40]
    assert accuracies[30] - accuracies[40] > 0.2
    assert summaries(str(guarded), "catastrophic overfitting, weights kept from step") == {40: 30}

    guarded_run(reference, mnist_data, 30)  # no check at its end: compare all but the guard
    expected = checkpoint_values(f"{reference}/checkpoint-30")
    assert int(kept["overfitting_guard/good_step/.ATTRIBUTES/VARIABLE_VALUE"]) == 30
    for name, value in expected.items():
        if not name.startswith("overfitting_guard/"):
            np.testing.assert_array_equal(kept[name], value, err_msg=name)

    rerun = guarded_run(guarded, mnist_data, 100)
    assert "The overfitting guard stopped this run at step 40; its newest checkpoint holds " \
           "the weights of step 30" in rerun
    assert "Step " not in rerun.replace("at step 40", "")
