"""MNIST adversarial training: a real short run learns, a resumed run equals an uninterrupted one,
and one step on two replicas equals the step on one device."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import run_script, run_side_by_side
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.attacks import pgd
from common.training import loop
from common.training.objectives import summed_xent
from mnist_challenge import model as mnist_model

SMALL_ATTACK = ("--epsilon=0.1", "--k=3", "--a=0.04")


def summaries(folder, tag):
    events = EventAccumulator(folder, size_guidance={"tensors": 0})
    events.Reload()
    return {event.step: tf.make_ndarray(event.tensor_proto) for event in events.Tensors(tag)}


def train(model_dir, mnist_data, *args):
    result = run_script("mnist_challenge/train.py", f"--model_dir={model_dir}",
                        f"--data_path={mnist_data}", *SMALL_ATTACK, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_a_short_real_run_raises_adversarial_accuracy(tmp_path, mnist_data):
    model_dir = str(tmp_path / "run")
    out = train(model_dir, mnist_data, "--max_num_training_steps=150", "--num_output_steps=50",
                "--num_summary_steps=10", "--num_checkpoint_steps=60")
    lines = out.splitlines()
    assert lines[0].startswith("Step 0:    (")
    assert lines[1].startswith("    training nat accuracy ") and lines[1].endswith("%")
    assert lines[2].startswith("    training adv accuracy ")
    assert lines[3].startswith("Step 50:")
    assert lines[6].endswith(" examples per second")
    accuracy = summaries(model_dir, "accuracy adv train")
    assert sorted(accuracy) == list(range(0, 150, 10))
    first, last = np.mean([accuracy[s] for s in (0, 10, 20)]), np.mean(
        [accuracy[s] for s in (100, 110, 120, 130, 140)])
    assert last > first + 0.15, (first, last)
    xent = summaries(model_dir, "xent adv")
    assert xent[140] < xent[0]
    assert set(summaries(model_dir, "images adv train")) == set(range(0, 150, 10))
    checkpoint_files = sorted(f for f in os.listdir(model_dir) if f.endswith(".index"))
    assert checkpoint_files == ["checkpoint-120.index", "checkpoint-150.index",
                                "checkpoint-60.index"]
    assert tf.train.latest_checkpoint(model_dir).endswith("checkpoint-150")
    with open(os.path.join(model_dir, "config.json")) as copied:
        assert json.load(copied)["max_num_training_steps"] == 150


def checkpoint_values(path):
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_sequence(tmp_path, mnist_data):
    cadence = ("--num_checkpoint_steps=2", "--num_output_steps=2")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    first = run_side_by_side([
        ("mnist_challenge/train.py", (f"--model_dir={folder}", f"--data_path={mnist_data}",
                                      *SMALL_ATTACK, f"--max_num_training_steps={steps}",
                                      *cadence), None)
        for folder, steps in ((whole, 6), (parts, 3))])
    assert all(result.returncode == 0 for result in first), [r.stderr for r in first]
    out = train(parts, mnist_data, "--max_num_training_steps=6", *cadence)
    assert f"Resuming from {parts}/checkpoint-3 at step 3" in out
    assert out.count("Step ") == 1 and "Step 4:" in out
    expected, resumed = (checkpoint_values(f"{folder}/checkpoint-6") for folder in (whole, parts))
    assert expected.keys() == resumed.keys()
    assert int(resumed["global_step/.ATTRIBUTES/VARIABLE_VALUE"]) == 6
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    rerun = train(parts, mnist_data, "--max_num_training_steps=6", *cadence)
    assert "Step " not in rerun


@pytest.mark.slow
def test_training_refuses_a_tf1_checkpoint_folder(tmp_path, mnist_data, mnist_fixture):
    result = run_script("mnist_challenge/train.py", f"--model_dir={mnist_fixture}",
                        f"--data_path={mnist_data}", "--max_num_training_steps=1")
    assert result.returncode == 1
    assert "is a TF1 checkpoint: training resumes only from its own checkpoints" in result.stderr


def one_step(strategy, batch, initial_weights):
    with strategy.scope():
        model = mnist_model.Model()
        model.set_weights(initial_weights)
        optimizer = keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-8)
    attack = pgd.LinfPGDAttack(model, 0.3, 10, 0.01, True, "xent")
    step = loop.TrainStep(strategy, model, optimizer, settings=attack.settings,
                          loss_fn=summed_xent)
    metrics, _ = step(*batch, report=True)
    return model.get_weights(), {name: value.numpy() for name, value in metrics.items()}


@pytest.mark.slow
def test_two_replicas_take_the_same_step_as_one_device(mnist_data, two_replicas):
    from mnist_challenge import mnist_input
    mnist = mnist_input.MNISTData(mnist_data)
    indices = mnist_input.batch_indices(0, 50, len(mnist.train_labels), seed=1)
    batch = (mnist.train_images[indices], mnist.train_labels[indices],
             loop.training_start(mnist.train_images[indices],
                                 pgd.AttackSettings(epsilon=0.3, steps=10, step_size=0.01,
                                                    random_start=True),
                                 seed=1, step=0))
    keras.utils.set_random_seed(3)
    initial = mnist_model.Model().get_weights()
    assert two_replicas.num_replicas_in_sync == 2
    weights_two, metrics_two = one_step(two_replicas, batch, initial)
    weights_one, metrics_one = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), batch,
                                        initial)
    assert metrics_two["adv_correct"] == metrics_one["adv_correct"]
    assert metrics_two["nat_correct"] == metrics_one["nat_correct"]
    np.testing.assert_allclose(metrics_two["adv_xent"], metrics_one["adv_xent"], rtol=1e-5)
    for after_two, after_one, before in zip(weights_two, weights_one, initial):
        assert not np.array_equal(after_one, before)
        np.testing.assert_allclose(after_two, after_one, rtol=0, atol=1e-6)


def test_an_uneven_split_is_refused(two_replicas):
    from common.runtime.errors import UserError
    two = two_replicas
    with two.scope():
        model = mnist_model.Model()
        optimizer = keras.optimizers.Adam()
    step = loop.TrainStep(two, model, optimizer,
                          settings=pgd.AttackSettings(epsilon=0.3, steps=1, step_size=0.01,
                                                      random_start=True),
                          loss_fn=summed_xent)
    with pytest.raises(UserError, match="training_batch_size 5 does not split over 2 replicas"):
        step(np.zeros((5, 784), np.float32), np.zeros(5, np.int64), np.zeros((5, 784)))


class FailingSource:
    """A batch source that records the indices asked for and fails at `fail_at`."""

    def __init__(self, fail_at=None):
        self.asked, self.fail_at = [], fail_at
        self.images = np.random.default_rng(0).uniform(0, 1, (4, 784)).astype(np.float32)

    def __call__(self, index):
        self.asked.append(index)
        if index == self.fail_at:
            raise OSError(f"the batch of step {index} could not be read")
        return self.images, np.arange(4) + index % 6


def train_four_steps(tmp_path, source):
    model = mnist_model.Model()
    attack = pgd.LinfPGDAttack(model, 0.3, 1, 0.1, True, "xent")
    step = loop.TrainStep(tf.distribute.get_strategy(), model,
                          keras.optimizers.Adam(learning_rate=1e-4),
                          settings=attack.settings, loss_fn=summed_xent)
    settings = loop.LoopSettings(model_dir=str(tmp_path), batch_size=4, max_steps=4,
                                 output_steps=100, summary_steps=100, checkpoint_steps=100)
    loop.train(settings, step, batch_for_step=source, seed=1,
               to_images=lambda x: tf.reshape(x, (-1, 28, 28, 1)))


def test_the_loop_asks_for_each_batch_once_in_order(tmp_path):
    source = FailingSource()
    train_four_steps(tmp_path, source)
    assert source.asked == [0, 1, 2, 3]
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("checkpoint-4")


def test_a_failing_batch_source_stops_training_with_its_own_error(tmp_path):
    # Batches are prepared ahead in another thread; the error must still reach the caller as
    # itself, at the step that needed the batch (the only checkpoint is step 0's).
    source = FailingSource(fail_at=2)
    with pytest.raises(OSError, match="^the batch of step 2 could not be read$"):
        train_four_steps(tmp_path, source)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("checkpoint-0")
