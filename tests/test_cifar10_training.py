"""CIFAR-10 training: the learning-rate schedule, weight decay, TF1 Momentum, synchronized batch
norm over two replicas, a short real run on the shared data, and free training's config."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import checkpoint_values, run_script, run_side_by_side
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar10_challenge import cifar10_input
from cifar10_challenge import model as cifar_model
from common.attacks import pgd
from common.models.batch_norm import BatchNorm
from common.training import loop, objectives
from common.training.momentum import TF1Momentum
from common.training.schedules import piecewise_constant

SCHEDULE = [[0, 0.1], [40000, 0.01], [60000, 0.001]]


def original_loss(weight_decay, global_batch_size, num_replicas):
    return objectives.xent_with_weight_decay(weight_decay, global_batch_size, num_replicas,
                                         cifar_model.decayed_kernels)


def test_learning_rate_keeps_the_old_value_at_a_boundary():
    schedule = piecewise_constant(SCHEDULE)
    rates = {step: float(schedule(step)) for step in (0, 40000, 40001, 60000, 60001, 79999)}
    assert rates == pytest.approx({0: 0.1, 40000: 0.1, 40001: 0.01, 60000: 0.01,
                                   60001: 0.001, 79999: 0.001})


def test_weight_decay_covers_only_the_kernels():
    keras.utils.set_random_seed(0)
    model = cifar_model.Model("eval", cifar_model.SIMPLE_FILTERS)
    names = {variable.path for variable in cifar_model.decayed_kernels(model)}
    assert len(names) == 1 + 3 * 5 * 2 + 1
    assert all(name.endswith("/kernel") for name in names)
    tf1_kernels = {name for name in cifar_model.tf1_variables(model) if name.endswith("/DW")}
    assert len(tf1_kernels) == len(names)
    logits = tf.constant([[2.0, 0.0, 1.0] + [0.0] * 7])
    labels = tf.constant([0], tf.int64)
    loss = original_loss(0.5, global_batch_size=1, num_replicas=1)(labels, logits, model)
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)[0]
    decay = sum(np.sum(v.numpy() ** 2) / 2 for v in model.trainable_variables
                if v.path in names)
    np.testing.assert_allclose(loss.numpy(), xent.numpy() + 0.5 * decay, rtol=1e-5)


def test_momentum_follows_tf1_across_a_learning_rate_drop():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
    weight = keras.Variable(np.array([1.0], np.float32))
    sgd_weight = keras.Variable(np.array([1.0], np.float32))
    ours = TF1Momentum(schedule, momentum=0.9)
    keras_sgd = keras.optimizers.SGD(schedule, momentum=0.9)
    expected, velocity = 1.0, 0.0
    for step in range(5):
        ours.apply_gradients([(tf.constant([1.0]), weight)])
        keras_sgd.apply_gradients([(tf.constant([1.0]), sgd_weight)])
        velocity = 0.9 * velocity + 1.0
        expected -= (0.1 if step <= 2 else 0.01) * velocity
        np.testing.assert_allclose(weight.numpy(), [expected], rtol=1e-6)
    assert abs(sgd_weight.numpy()[0] - expected) > 1e-3


def test_synchronized_batch_norm_uses_the_global_batch(two_replicas):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (8, 4, 4, 5)).astype(np.float32)
    two = two_replicas
    with two.scope():
        layer = BatchNorm()
        layer.build(x.shape)

    @tf.function
    def forward(inputs):
        return two.run(lambda part: layer(part, training=True), args=(inputs,))

    halves = two.experimental_distribute_values_from_function(
        lambda context: x[4 * context.replica_id_in_sync_group:][:4])
    outputs = np.concatenate(two.experimental_local_results(forward(halves)))
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(outputs, (x - mean) / np.sqrt(variance + 1e-3), atol=1e-5)
    count = 8 * 4 * 4
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               0.9 + 0.1 * variance * count / (count - 1), rtol=1e-5)


def one_step(strategy, batch, initial_weights):
    with strategy.scope():
        model = cifar_model.Model("eval", cifar_model.SIMPLE_FILTERS)
        model.set_weights(initial_weights)
        optimizer = TF1Momentum(0.1, momentum=0.9)
    attack = pgd.LinfPGDAttack(model, 8.0, 2, 2.0, True, "xent", pixel_range=(0.0, 255.0))
    loss = original_loss(2e-4, len(batch[0]), strategy.num_replicas_in_sync)
    step = loop.TrainStep(strategy, model, optimizer, settings=attack.settings, loss_fn=loss,
                              attack_training=False)
    metrics, _ = step(*batch, report=True)
    return model.get_weights(), {name: value.numpy() for name, value in metrics.items()}


@pytest.mark.slow
def test_two_replicas_take_the_same_step_as_one_device(cifar_data, two_replicas):
    """Synchronized batch norm in the training forward passes (moving averages included) and
    weight decay once per step. The attack runs in evaluation mode here: in training mode its
    gradients couple the batch through the batch statistics, so a sign flip of a gradient within
    round-off of zero (1 pixel after 1 step) spreads over the batch in later steps."""
    cifar = cifar10_input.CIFAR10Data(cifar_data)
    x, y = cifar10_input.training_batch(cifar, 0, 16, seed=4)
    settings = pgd.AttackSettings(epsilon=8.0, steps=2, step_size=2.0, random_start=True,
                                  loss="xent", pixel_range=(0.0, 255.0))
    batch = (x, y, loop.training_start(x, settings, seed=4, step=0))
    keras.utils.set_random_seed(5)
    initial = cifar_model.Model("eval", cifar_model.SIMPLE_FILTERS).get_weights()
    weights_two, metrics_two = one_step(two_replicas, batch, initial)
    weights_one, metrics_one = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), batch,
                                        initial)
    assert metrics_two["adv_correct"] == metrics_one["adv_correct"]
    np.testing.assert_allclose(metrics_two["adv_xent"], metrics_one["adv_xent"], rtol=1e-4)
    moved = 0
    for after_two, after_one, before in zip(weights_two, weights_one, initial):
        moved += not np.array_equal(after_one, before)
        np.testing.assert_allclose(after_two, after_one, rtol=1e-4, atol=1e-4)
    assert moved == len(initial), "weights and batch-norm moving averages all changed"


@pytest.mark.slow
def test_a_short_real_run_lowers_the_loss(tmp_path, cifar_data):
    model_dir = tmp_path / "run"
    result = run_script("cifar10_challenge/train.py", f"--model_dir={model_dir}",
                        f"--data_path={cifar_data}", "--filters=[16,16,32,64]",
                        "--max_num_training_steps=20", "--training_batch_size=32",
                        "--num_steps=1", "--num_output_steps=10", "--num_summary_steps=4",
                        "--num_checkpoint_steps=10")
    assert result.returncode == 0, result.stderr
    assert "Step 10:" in result.stdout and "examples per second" in result.stdout
    events = EventAccumulator(str(model_dir), size_guidance={"tensors": 0})
    events.Reload()
    xent = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("xent adv train")]
    assert len(xent) == 5
    assert np.mean(xent[-3:]) < xent[0] - 0.05, xent
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("checkpoint-20")


def _train_args(model_dir, cifar_data, steps, *extra):
    """A report every step: one traced train step, not two (the short real run covers both)."""
    return (*extra, f"--model_dir={model_dir}", f"--data_path={cifar_data}",
            "--filters=[16,16,32,64]", f"--max_num_training_steps={steps}",
            "--training_batch_size=8", "--num_steps=2", "--num_output_steps=1",
            "--num_summary_steps=2", "--num_checkpoint_steps=2")


def cifar_train(model_dir, cifar_data, steps, *extra):
    result = run_script("cifar10_challenge/train.py",
                        *_train_args(model_dir, cifar_data, steps, *extra))
    assert result.returncode == 0, result.stderr
    return result.stdout


def whole_and_first_part(whole, parts, cifar_data, *extra):
    """Trains 4 steps in `whole` and 3 in `parts`, side by side."""
    results = run_side_by_side([
        ("cifar10_challenge/train.py", _train_args(folder, cifar_data, steps, *extra), None)
        for folder, steps in ((whole, 4), (parts, 3))])
    assert all(result.returncode == 0 for result in results), [r.stderr for r in results]


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, cifar_data):
    """Weights, Momentum slots, batch-norm moving averages (the attack runs in training mode and
    moves them) and the global step, bit for bit."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole_and_first_part(whole, parts, cifar_data)
    out = cifar_train(parts, cifar_data, 4)
    assert f"Resuming from {parts}/checkpoint-3 at step 3" in out
    expected, resumed = (checkpoint_values(f"{folder}/checkpoint-4") for folder in (whole, parts))
    assert expected.keys() == resumed.keys()
    assert any("moving_mean" in name for name in expected)
    assert any(name.startswith("optimizer/_variables/") for name in expected)  # velocities
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


def test_config_free_holds_shafahi_et_al_settings():
    from test_bad_input import load

    from cifar10_challenge.challenge import CIFAR10
    config = load(CIFAR10, "--config=cifar10_challenge/config_free.json")
    assert (config["training_method"], config["replay_m"]) == ("free", 8)
    assert config["max_num_training_steps"] == 80000 and config["training_batch_size"] == 128
    assert config["step_size_schedule"] == SCHEDULE
    assert config["learning_rate_schedule"] == "piecewise_constant"
    assert (config["weight_decay"], config["momentum"]) == (0.0002, 0.9)
    assert config["filters"] == list(cifar_model.WIDE_FILTERS)
    assert (config["epsilon"], config["num_steps"], config["step_size"]) == (8.0, 20, 2.0)
    assert config["model_dir"].endswith("cifar10_challenge/models/free_m8")


@pytest.mark.slow
def test_free_training_resumes_mid_batch_as_an_uninterrupted_run(tmp_path, cifar_data):
    """Free replays on the simple network: the perturbation and the batch-norm averages are
    kept; a run resumed between two replays of one batch ends as an uninterrupted one."""
    free = ("--config=cifar10_challenge/config_free.json", "--replay_m=2")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole_and_first_part(whole, parts, cifar_data, *free)
    cifar_train(parts, cifar_data, 4, *free)
    expected, resumed = (checkpoint_values(f"{folder}/checkpoint-4") for folder in (whole, parts))
    perturbation = expected["free_perturbation/.ATTRIBUTES/VARIABLE_VALUE"]
    assert perturbation.shape == (8, 32, 32, 3)
    assert np.abs(perturbation).max() == 8.0
    assert expected.keys() == resumed.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
