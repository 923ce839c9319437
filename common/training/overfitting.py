"""The guard against catastrophic overfitting of Wong et al. (2020).

Trained on a one-step attack, a network can suddenly learn to defeat that attack alone: its
accuracy under a multi-step PGD collapses within a few hundred steps while the training accuracy
looks fine. At a set interval the guard attacks a fixed held-out batch with PGD (5 steps of
epsilon / 4, so that the steps reach past epsilon, from random starts) and compares the
accuracy with the last check. A drop of more than 0.2 stops training with the weights of the
check before, which the guard keeps as a checkpoint of its own in `model_dir/last_good_check`.
"""

import dataclasses
import os

import tensorflow as tf

from common.attacks import pgd
from common.runtime import devices, seeds

STEPS = 5
MAX_DROP = 0.2
EXAMPLES = 512  # of the held-out batch; divisible by any usual number of replicas
FOLDER = "last_good_check"


class GuardState(tf.Module):
    """What the guard remembers, part of the training checkpoint: the accuracy and step of the
    last check that passed, and the step at which it stopped training (-1: none yet)."""

    def __init__(self):
        super().__init__(name="overfitting_guard")
        self.accuracy = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
        self.good_step = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self.stopped_at = tf.Variable(-1, dtype=tf.int64, trainable=False)


@dataclasses.dataclass(frozen=True)
class Check:
    """One check's result: `accuracy` now, against `previous` at `previous_step` (-1: no check
    passed before); `collapsed` where it fell by more than the guard's max_drop."""

    step: int
    accuracy: float
    previous: float
    previous_step: int
    collapsed: bool


def guard_settings(settings):
    """The guard's attack in the ball of `settings`: STEPS steps of epsilon / 4 from random
    starts."""
    return dataclasses.replace(settings, steps=STEPS, step_size=settings.epsilon / 4,
                               random_start=True)


def check_max_drop(max_drop):
    """ValueError unless `max_drop`, a drop of accuracy, is between 0 and 1."""
    if not 0 <= max_drop <= 1:
        raise ValueError(f"max_drop must be between 0 and 1. Received: max_drop={max_drop}")


class OverfittingGuard:
    """Checks the model's accuracy under the guard's PGD (`guard_settings`) on a fixed held-out
    batch, from starts drawn once; a drop of more than `max_drop` from the last check that
    passed is a collapse.

    Args:
        strategy: the tf.distribute strategy the check runs under.
        model: the Keras model trained, returning logits.
        held_out: (images, labels), the first `examples` of them attacked.
        settings: a pgd.AttackSettings whose ball (and pixel range) the guard attacks in.
        seed: seeds the guard's random starts.
        max_drop: the largest drop of accuracy that is not a collapse, between 0 and 1.
        examples: how many held-out images each check attacks, a multiple of the replicas.
    """

    def __init__(self, strategy, model, held_out, *, settings, seed, max_drop=MAX_DROP,
                 examples=EXAMPLES):
        check_max_drop(max_drop)
        replicas = strategy.num_replicas_in_sync
        if examples < 1 or examples % replicas:
            raise ValueError(f"The guard's examples must be a positive multiple of the "
                             f"{replicas} replicas. Received: examples={examples}")
        images, labels = (tensor[:examples] for tensor in held_out)
        self.strategy = strategy
        self.model = model
        self.max_drop = max_drop
        self.state = GuardState()
        self.settings = guard_settings(settings)
        start = pgd.start_point(images, self.settings, seeds.generator(seed, seeds.GUARD))
        self._batch = devices.split_batch(strategy, (tf.convert_to_tensor(images, tf.float32),
                                             tf.convert_to_tensor(labels, tf.int64),
                                             tf.convert_to_tensor(start, tf.float64)))
        self._count = tf.function(self._count_correct)
        self._examples = len(images)

    def _count_correct(self, batch):
        def replica(images, labels, start):
            x_adv = pgd.pgd_steps(self.model, images, labels, x_start=start,
                                  settings=self.settings)
            logits = self.model(tf.cast(x_adv, tf.float32), training=False)
            return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), labels), tf.int64))

        correct = self.strategy.run(replica, args=batch)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)

    def check(self, step):
        """Attacks the held-out batch; records the accuracy where it did not collapse."""
        accuracy = float(self._count(self._batch).numpy()) / self._examples
        previous = float(self.state.accuracy.numpy())
        result = Check(step=step, accuracy=accuracy, previous=previous,
                       previous_step=int(self.state.good_step.numpy()),
                       collapsed=previous >= 0 and previous - accuracy > self.max_drop)
        if not result.collapsed:
            self.state.accuracy.assign(accuracy)
            self.state.good_step.assign(step)
        return result

    @property
    def stopped_at(self):
        """The step at which the guard stopped this run, or None."""
        step = int(self.state.stopped_at.numpy())
        return None if step < 0 else step


def last_good_manager(checkpoint, write_dir):
    """The guard's own checkpoint of the last check that passed."""
    return tf.train.CheckpointManager(checkpoint, os.path.join(write_dir, FOLDER), max_to_keep=1,
                                      checkpoint_name="checkpoint")
