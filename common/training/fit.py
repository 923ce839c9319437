"""Adversarial training of any Keras model with `fit`: `AdversarialModel` wraps the model so that
each training step attacks its batch first, and `OverfittingGuardCallback` is the
catastrophic-overfitting guard as a Keras callback.

The methods are the challenge loop's (common/training/loop.py), with the same attack code:
`pgd` trains on the PGD attack of `attack` (a `common.attacks.PGD`); `fgsm_rs` on one step of
`fgsm_step_size` from a random start (Wong et al., 2020); `free` replays each batch `replays`
times, each replay one optimizer step whose backward pass also moves a perturbation carried over
to the next replay and the next batch (Shafahi et al., 2019). Random starts are drawn inside the
step from `seed` and the optimizer's step count, so that `keras.callbacks.BackupAndRestore`
resumes a run on the same starts. Works under any `tf.distribute` strategy `fit` supports.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from common.attacks import PGD, pgd
from common.runtime import devices

METHODS = ("pgd", "fgsm_rs", "free")


class AdversarialModel(keras.Model):
    """`model` trained by `fit` on adversarial examples of `attack` (a PGD), by `method`.

    Compile it as any model: `compile(optimizer, loss, metrics)`; the loss and metrics see the
    adversarial batch. `attack_training` runs the model in training mode during the attack (the
    CIFAR-10 original's batch norm). Evaluation, prediction and saving use `model` as it is:
    `model` itself holds the trained weights.
    """

    def __init__(self, model, attack, method="pgd", fgsm_step_size=None, replays=8,
                 batch_size=None, attack_training=False, seed=0, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if not isinstance(attack, PGD):
            raise TypeError("attack must be a common.attacks.PGD")
        if method == "free" and not batch_size:
            raise ValueError("free training needs batch_size, the size of fit's batches")
        self.model = model
        self.method = method
        self.settings = training_settings(attack.settings, method, fgsm_step_size)
        self.replays = int(replays)
        self.attack_training = attack_training
        self.seed = int(seed)
        self.batch_size = batch_size
        self.built = model.built  # the wrapper's weights are the model's
        self.perturbation = None  # free training's, made at the first step
        # Its own tf.function: AutoGraph turns the step loop into a graph loop, which Keras'
        # train function (traced without AutoGraph) would not.
        unroll = pgd.unrolls(attack.strategy, self.settings.steps)
        self._attack = tf.function(lambda x, y, start: pgd.pgd_steps(
            model, x, y, start, self.settings, attack_training, unroll=unroll))

    def call(self, x, training=False):
        return self.model(x, training=training)

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        self.built = True

    def _free_perturbation(self, x):
        """Free training's perturbation, one per replica for its slice of the batch, made at
        the first step (not saved: a resumed run starts it again from zero)."""
        if self.perturbation is None:
            local = -(-self.batch_size // tf.distribute.get_strategy().num_replicas_in_sync)
            with tf.init_scope():
                self.perturbation = tf.Variable(
                    tf.zeros((local, *x.shape[1:])), trainable=False,
                    name="free_perturbation", synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        return self.perturbation

    def start_points(self, x, step):
        """The attack's start for the batch `x` of optimizer step `step` (float64)."""
        if not self.settings.random_start:
            return tf.cast(tf.cast(x, tf.float32), tf.float64)
        replica = tf.distribute.get_replica_context()
        replica_id = 0 if replica is None else replica.replica_id_in_sync_group
        seed = tf.stack([tf.cast(self.seed, tf.int64) * 1000 + tf.cast(replica_id, tf.int64),
                         tf.cast(step, tf.int64)])
        return self.settings.threat_model.random_start(x, seed)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.method == "free":
            return self._free_replays(x, y, sample_weight)
        start = self.start_points(x, self.optimizer.iterations)
        x_adv = self._attack(x, y, start)
        x_adv = tf.stop_gradient(tf.cast(x_adv, tf.float32))
        return super().train_step((x_adv, y, sample_weight))

    def _free_replays(self, x, y, sample_weight):
        threat = self.settings.threat_model
        variable = self._free_perturbation(x)
        size = tf.shape(x)[0]
        for _ in range(self.replays):
            perturbation = variable[:size]
            x_adv = tf.clip_by_value(x + perturbation, *threat.pixel_range)
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                y_pred = self(x_adv, training=True)
                loss = self.compute_loss(x=x_adv, y=y, y_pred=y_pred,
                                         sample_weight=sample_weight)
                scaled = self.optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled, self.trainable_weights + [x_adv])
            self.optimizer.apply_gradients(zip(gradients[:-1], self.trainable_weights))
            gradient = tf.where(tf.math.is_finite(gradients[-1]), gradients[-1], 0.0)
            moved = threat.within_ball(threat.step(perturbation, gradient, threat.epsilon))
            variable.assign(tf.concat([moved, variable[size:]], axis=0))
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for metric in self.metrics:
            if metric.name == "loss":  # the loss of the global batch, as Keras' own step
                metric.update_state(loss * replicas, sample_weight=size)
        return self.compute_metrics(x_adv, y, y_pred, sample_weight)


def training_settings(settings, method, fgsm_step_size=None):
    """The attack that `method` trains on, from the evaluation attack's settings: itself for
    pgd; one step of `fgsm_step_size` (by default 1.25 epsilon) from a random start for fgsm_rs;
    its ball for free."""
    if method == "fgsm_rs":
        step_size = 1.25 * settings.epsilon if fgsm_step_size is None else fgsm_step_size
        return dataclasses.replace(settings, steps=1, step_size=step_size,
                                   random_start=True)
    return settings


class OverfittingGuardCallback(keras.callbacks.Callback):
    """Stops `fit` when robustness collapses (Wong et al., 2020): every `every` steps it attacks
    `held_out` (images, labels) with PGD-5 of epsilon / 4 steps from random starts in the
    attack's ball; a drop of more than `max_drop` from the last check stops training and puts
    back the weights of that check. `accuracies` lists (step, accuracy) of every check."""

    def __init__(self, held_out, attack, every=200, max_drop=0.2, seed=0):
        super().__init__()
        self.images, self.labels = (np.asarray(array) for array in held_out)
        epsilon = attack.settings.epsilon
        self.settings = dataclasses.replace(attack.settings, steps=5,
                                            step_size=epsilon / 4, random_start=True)
        self.every, self.max_drop, self.seed = every, max_drop, seed
        self.accuracies, self.stopped_at = [], None
        self._last_good = None

    def _accuracy(self):
        attack = PGD.from_settings(self.model.model if isinstance(self.model, AdversarialModel)
                                   else self.model, self.settings, seed=self.seed)
        x_adv = attack.perturb(self.images, self.labels)
        logits = devices.call_model(attack.model, x_adv)
        return float(np.mean(np.argmax(np.asarray(logits), axis=1) == self.labels))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every:
            return
        accuracy = self._accuracy()
        if self.accuracies and self.accuracies[-1][1] - accuracy > self.max_drop:
            self.model.set_weights(self._last_good)
            self.stopped_at = step
            self.model.stop_training = True
            return
        self.accuracies.append((step, accuracy))
        self._last_good = self.model.get_weights()


