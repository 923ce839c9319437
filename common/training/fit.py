"""Adversarial training of any Keras model with `fit`: `AdversarialModel` wraps the model so that
each training step attacks its batch first, and `OverfittingGuardCallback` is the
catastrophic-overfitting guard (common/training/overfitting.py) as a Keras callback.

The methods are the challenge loop's, the same code (common/training/steps.py): `pgd` trains on
the PGD attack of `attack` (a `common.attacks.PGD`); `fgsm_rs` on one step of `fgsm_step_size`
from a random start (Wong et al., 2020); `nfgsm` on one step from a start twice as wide, not
projected back onto the ball (de Jorge et al., 2022); `free` replays each batch `replays` times,
each replay one optimizer step whose backward pass also moves a perturbation carried over to the
next replay and the next batch (Shafahi et al., 2019); `trades` (Zhang et al., 2019) minimises
the compiled loss on the clean batch plus `beta` times the KL divergence of the prediction at the
attack's point from the clean one. Random starts are drawn inside the step from `seed` and the
optimizer's step count, so that `keras.callbacks.BackupAndRestore` resumes a run on the same
starts. Works under any `tf.distribute` strategy `fit` supports.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from common.attacks import PGD, pgd
from common.training import overfitting, steps


@keras.saving.register_keras_serializable(package="common.training")
class AdversarialModel(keras.Model):
    """`model` trained by `fit` on adversarial examples of `attack`, by `method`.

    Compile it as any model: `compile(optimizer, loss, metrics)`; the loss and metrics see the
    adversarial batch (for trades, the loss sees the clean batch and the KL term is added).
    Evaluation, prediction and saving use `model` as it is: `model` itself holds the trained
    weights. A full save (`.keras`) loads back with `keras.saving.load_model`, whose `.model` is
    the trained model; a weights-only save loads into `AdversarialModel(model, attack)`.

    Args:
        model: the Keras model trained, returning logits.
        attack: a `common.attacks.PGD` on `model`: the training attack (its ball, steps and step
            size; for free training its ball).
        method: "pgd", "fgsm_rs", "nfgsm", "free" or "trades".
        beta: trades' weight of the KL term.
        fgsm_step_size: the step size of fgsm_rs (None: 1.25 epsilon) and nfgsm (None:
            epsilon).
        replays: free training's replays of each batch.
        batch_size: free training's batch size, that of `fit`.
        attack_training: the model runs in training mode during the attack (the CIFAR-10
            original's batch norm).
        alignment: GradAlign's weight (Andriushchenko & Flammarion, 2020) of 1 - cos of the
            cross-entropy's input gradients at the clean batch and at a uniform point of the
            ball (0: none; not for free).
        weight_perturbation: AWP's size (Wu et al., 2020) of the weights' perturbation,
            relative to each kernel's norm, at which each update's gradient is taken (0: none).
        seed: seeds the random starts (and GradAlign's points).
    """

    def __init__(self, model, attack, *, method="pgd", beta=steps.DEFAULT_BETA,
                 fgsm_step_size=None, replays=8, batch_size=None, attack_training=False,
                 alignment=0.0, weight_perturbation=0.0, seed=0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(attack, PGD):
            raise TypeError(f"attack must be a common.attacks.PGD. Received: attack={attack!r}")
        if steps.training_method(method).carries and not batch_size:
            raise ValueError("Free training needs batch_size, the size of fit's batches. "
                             f"Received: batch_size={batch_size}")
        if replays < 1:
            raise ValueError(f"replays must be at least 1. Received: replays={replays}")
        self.model = model
        self.attack = attack
        settings = steps.training_settings(attack.settings, method,
                                           fgsm_step_size=fgsm_step_size)
        self.context = steps.StepContext(model=model, optimizer=None, settings=settings,
                                         method=method, beta=float(beta),
                                         attack_training=attack_training,
                                         alignment=float(alignment),
                                         weight_perturbation=float(weight_perturbation))
        self.method = method
        self.fgsm_step_size = fgsm_step_size
        self.replays = int(replays)
        self.seed = int(seed)
        self.batch_size = batch_size
        self.built = model.built  # the wrapper's weights are the model's
        self.perturbation = None  # free training's, made at the first step
        # Its own tf.function: AutoGraph turns the attack's step loop into a graph loop, which
        # Keras' train function (traced without AutoGraph) would not.
        self._attack = tf.function(self._attack_batch, reduce_retracing=True)

    @property
    def settings(self):
        """The training attack's settings."""
        return self.context.settings

    def get_config(self):
        """The config of a full save; a callable attack loss cannot be saved in it."""
        settings = self.attack.settings
        if callable(settings.loss):
            raise TypeError("A full save needs the attack's loss by name, not a callable; save "
                            f"the weights only. Received: loss={settings.loss!r}")
        return {**super().get_config(),
                "model": keras.saving.serialize_keras_object(self.model),
                "attack": dataclasses.asdict(settings),
                "method": self.method, "beta": self.context.beta,
                "fgsm_step_size": self.fgsm_step_size, "replays": self.replays,
                "batch_size": self.batch_size,
                "attack_training": self.context.attack_training,
                "alignment": self.context.alignment,
                "weight_perturbation": self.context.weight_perturbation, "seed": self.seed}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"),
                                                      custom_objects=custom_objects)
        settings = pgd.AttackSettings(**config.pop("attack"))
        return cls(model, PGD.from_settings(model, settings), **config)

    def save(self, filepath, *args, **kwargs):
        """Keras' full save, refused before its file is opened where `get_config` fails."""
        self.get_config()
        return super().save(filepath, *args, **kwargs)

    def call(self, x, training=False):
        return self.model(x, training=training)

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        self.built = True

    def _context(self):
        if self.context.optimizer is not self.optimizer:
            self.context = dataclasses.replace(self.context, optimizer=self.optimizer)
        return self.context

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
        return steps.METHODS[self.method].start_in_graph(x, self.settings,
                                                         self._replica_seed(step))

    def _replica_seed(self, step):
        return steps.replica_seed(tf.stack([tf.cast(self.seed, tf.int64),
                                            tf.cast(step, tf.int64)]))

    def _attack_batch(self, x, y, start):
        return steps.attack(self.context, x, y, start=start)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        context = self._context()
        objective = _CompiledLoss(self, sample_weight)
        if steps.training_method(self.method).carries:
            return self._free_replays(context, x, y, objective=objective)
        step = self.optimizer.iterations
        x_adv = self._attack(x, y, self.start_points(x, step))
        result = steps.update(context, x, y, x_adv=x_adv, objective=objective,
                              seed=self._replica_seed(step))
        return self._tracked_metrics(result, x_adv, y, sample_weight=sample_weight)

    def _free_replays(self, context, x, y, *, objective):
        variable = self._free_perturbation(x)
        size = tf.shape(x)[0]
        for _ in range(self.replays):
            x_adv, result, moved = steps.free_replay(context, x, y, perturbation=variable[:size],
                                                     objective=objective)
            variable.assign(tf.concat([moved, variable[size:]], axis=0))
        return self._tracked_metrics(result, x_adv, y, sample_weight=objective.sample_weight)

    def _tracked_metrics(self, result, x_adv, y, *, sample_weight):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for metric in self.metrics:
            if metric.name == "loss":  # the loss of the global batch, as Keras' own step
                metric.update_state(result.loss * replicas, sample_weight=tf.shape(x_adv)[0])
        return self.compute_metrics(x_adv, y, result.logits, sample_weight)


class _CompiledLoss:
    """The compiled loss of an AdversarialModel as the objective of common/training/steps.py:
    Keras' reduction (the weighted mean of the replica's batch, divided among the replicas)."""

    def __init__(self, adversarial, sample_weight):
        self.adversarial = adversarial
        self.sample_weight = sample_weight

    def __call__(self, labels, logits, model):
        return self.adversarial.compute_loss(y=labels, y_pred=logits,
                                             sample_weight=self.sample_weight)

    def reduce(self, values):
        if self.sample_weight is not None:
            values = values * tf.cast(tf.reshape(self.sample_weight, (-1,)), values.dtype)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return tf.reduce_mean(values) / replicas


class OverfittingGuardCallback(keras.callbacks.Callback):
    """Stops `fit` when robustness collapses (Wong et al., 2020): every `every` steps the
    overfitting guard (common/training/overfitting.py: PGD-5 of epsilon / 4 in the ball of
    `attack`, from starts drawn once from `seed`) attacks `held_out` (images, labels); a drop of
    more than `max_drop` from the last check that passed stops training and puts back the
    weights of that check. `accuracies` lists (step, accuracy) of the checks that passed.

    Args:
        held_out: (images, labels), the first `examples` of them attacked.
        attack: a `common.attacks.PGD` whose ball the guard attacks in.
        every: steps between checks.
        max_drop: the largest drop of accuracy that is not a collapse.
        seed: seeds the guard's random starts.
        examples: how many held-out images each check attacks, a multiple of the replicas.
    """

    def __init__(self, held_out, attack, *, every=200, max_drop=overfitting.MAX_DROP, seed=0,
                 examples=overfitting.EXAMPLES):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be at least 1. Received: every={every}")
        overfitting.check_max_drop(max_drop)
        self.held_out = tuple(np.asarray(array) for array in held_out)
        self.attack = attack
        self.every, self.max_drop, self.seed, self.examples = every, max_drop, seed, examples
        self.accuracies, self.stopped_at = [], None
        self._guard = self._last_good = None

    def on_train_begin(self, logs=None):
        model = self.model.model if isinstance(self.model, AdversarialModel) else self.model
        self._guard = overfitting.OverfittingGuard(
            self.model.distribute_strategy, model, self.held_out,
            settings=self.attack.settings, seed=self.seed, max_drop=self.max_drop,
            examples=self.examples)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every:
            return
        result = self._guard.check(step)
        if result.collapsed:
            self.model.set_weights(self._last_good)
            self.stopped_at = step
            self.model.stop_training = True
            return
        self.accuracies.append((step, result.accuracy))
        self._last_good = self.model.get_weights()
