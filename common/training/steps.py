"""The adversarial training step of one replica, by method: the one definition that the
challenge loop (loop.py) and `fit` (fit.py) both run.

A method is an entry of METHODS: the attack that makes the batch it trains on, the loss its
update minimises, and how the attack's start is drawn, on the host in float64 for the loop (whose
starts are a function of the step, for the original's exact arithmetic and for resuming) or
inside the graph for `fit`. A step is `attack`, then `update` (the loop reads its natural
accuracy in between, as the original did); free training's replay is `free_replay`.

- `pgd` (Madry et al., 2018) and `fgsm_rs` (Wong et al., 2020, one step from a random start)
  train on the PGD attack of their training settings (`training_settings`).
- `nfgsm` (de Jorge et al., 2022) trains on one signed step (of epsilon by default) from a start
  drawn in a ball NFGSM_NOISE times wider, not projected back onto the epsilon ball (only into
  the pixel range): the stronger noise and the missing projection keep single-step training from
  catastrophic overfitting at large epsilons.
- `free` (Shafahi et al., 2019) trains on the clean batch plus a perturbation carried over from
  the last replay, which the same backward pass moves by one signed step of epsilon.
- `trades` (Zhang et al., 2019) maximises KL(f(x) || f(x')) from x + 0.001 N(0, 1) with the
  training attack's steps, and minimises the objective on the clean batch plus
  beta KL(f(x) || f(x_adv)), the KL reduced over the batch as the objective reduces its
  cross-entropy (a mean for a mean: the authors' batchmean).

Any method but free can add GradAlign's penalty (Andriushchenko & Flammarion, 2020) to its loss:
`alignment` times 1 - cos of the cross-entropy's input gradients at the clean batch (held
constant) and at a uniform point of the ball around it (differentiated through, a double
backward pass). A gradient that turns within the ball is what lets a one- or few-step attack
miss the points a gradient-free attack finds; the penalty keeps it straight.

Any method can also take its update at adversarially perturbed weights (AWP, Wu et al., 2020):
each kernel (every trainable weight of more than one dimension) is moved by
`weight_perturbation` times its own norm along the gradient of the method's loss at the attack's
batch, summed over the replicas so that every replica moves the same way; the loss's gradient at
the moved weights is then applied to the weights as they were. Robustness that holds in a whole
neighbourhood of the weights generalises better from the training images to the test images.

The objective is `objective(labels, logits, model)`, the replica's share of the global batch's
loss; a method whose entry `reduces` (TRADES) also needs `objective.reduce(values)`, which sums
per-example values into that share in the same way (common/training/objectives.py's objectives
have it).

Adding a method is its functions here and one entry of METHODS: whatever the loop, `fit` and the
scripts need to know of it (its start, its training settings, whether it carries a perturbation
or needs `reduce`) is a field of its `Method`.
"""

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from common.attacks import pgd, threat_model
from common.runtime import devices, seeds

TRADES_NOISE = 0.001  # the start's standard deviation, as a fraction of the pixel range
NFGSM_NOISE = 2.0  # the radius of N-FGSM's start, in epsilons (the authors' k = 2)
DEFAULT_BETA = 6.0
COSINE_FLOOR = 1e-12  # GradAlign's cosine treats a gradient shorter than this as 0
GRADIENT_FLOOR = 1e-20  # AWP leaves a kernel whose loss gradient is shorter than this in place


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepContext:
    """What a replica's step needs besides its batch.

    Args:
        model: the Keras model trained.
        optimizer: its optimizer, built.
        settings: the training attack (a pgd.AttackSettings, see `training_settings`).
        method: a key of METHODS.
        beta: TRADES' weight of the KL term.
        attack_training: the model runs in training mode during the attack.
        alignment: GradAlign's weight of its penalty (0: none); not for free training.
        weight_perturbation: AWP's size of the weights' perturbation, relative to each kernel's
            norm (0: none).
    """

    model: Any
    optimizer: Any
    settings: Any
    method: str = "pgd"
    beta: float = DEFAULT_BETA
    attack_training: bool = False
    alignment: float = 0.0
    weight_perturbation: float = 0.0

    def __post_init__(self):
        method = training_method(self.method)
        if not self.beta >= 0:
            raise ValueError(f"beta must be at least 0. Received: beta={self.beta}")
        if not self.alignment >= 0:
            raise ValueError(f"alignment must be at least 0. Received: alignment="
                             f"{self.alignment}")
        if not self.weight_perturbation >= 0:
            raise ValueError(f"weight_perturbation must be at least 0. Received: "
                             f"weight_perturbation={self.weight_perturbation}")
        if self.alignment and method.carries:
            raise ValueError(f"GradAlign's penalty needs a drawn start, which {self.method} "
                             f"does not have. Received: method={self.method!r}, "
                             f"alignment={self.alignment}")

    @property
    def needs_reduce(self):
        """The loss needs the objective's `reduce` (TRADES' KL term, GradAlign's penalty)."""
        return METHODS[self.method].reduces or self.alignment > 0

    def threat(self, scale=None):
        """The threat model and step size, times `scale` (the epsilon ramp's) where given."""
        threat, step_size = self.settings.threat_model, self.settings.step_size
        if scale is None:
            return threat, step_size
        return threat.scaled(scale), step_size * scale


@dataclasses.dataclass(frozen=True)
class Update:
    """An update's logits on the adversarial batch, its loss (before the optimizer's scaling)
    and, where asked, the loss's gradient with respect to the adversarial batch."""

    logits: Any
    loss: Any
    input_gradient: Any = None


def attack(context, x_nat, labels, *, start, scale=None):
    """The batch (float32) that the method of `context` trains on, from `start`."""
    return tf.stop_gradient(tf.cast(
        METHODS[context.method].attack(context, x_nat, labels, start=start, scale=scale),
        tf.float32))


def update(context, x_nat, labels, *, x_adv, objective, input_gradient=False, seed=None,
           scale=None):
    """One optimizer step on the method's loss at `x_adv`, plus GradAlign's penalty where
    `context.alignment` asks, its uniform point drawn from `seed` (two integers) in the ball
    times `scale` (the epsilon ramp's, None: the whole ball). Where `context.weight_perturbation`
    asks, the loss, its logits and its gradients are those at the perturbed weights
    (`weight_offsets`)."""
    model, optimizer = context.model, context.optimizer
    offsets = weight_offsets(context, x_nat, labels, x_adv=x_adv, objective=objective) \
        if context.weight_perturbation else []
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        with _moved(model, offsets):
            logits, loss = METHODS[context.method].loss(context, x_nat, labels, x_adv=x_adv,
                                                        objective=objective)
            if context.alignment:
                loss += _alignment_term(context, x_nat, labels, seed=seed, scale=scale,
                                        objective=objective, dtype=loss.dtype)
        scaled = optimizer.scale_loss(loss)
    sources = [model.trainable_variables, x_adv] if input_gradient \
        else [model.trainable_variables]
    gradients = tape.gradient(scaled, sources)
    optimizer.apply_gradients(zip(gradients[0], model.trainable_variables))
    return Update(logits, loss, gradients[1] if input_gradient else None)


def _alignment_term(context, x_nat, labels, *, seed, scale, objective, dtype):
    """GradAlign's penalty times its weight, reduced as the objective reduces."""
    if seed is None:
        raise ValueError("GradAlign's penalty draws its points from a seed. Received: seed=None")
    penalty = objective.reduce(misalignment(context, x_nat, labels, seed=seed, scale=scale))
    return tf.cast(context.alignment, dtype) * tf.cast(penalty, dtype)


def weight_offsets(context, x_nat, labels, *, x_adv, objective):
    """AWP's perturbation of the weights: (kernel, offset) pairs, each offset
    `context.weight_perturbation` times the kernel's norm along the gradient of the method's loss
    at `x_adv` (the objective's weight decay included), the gradient summed over the replicas.
    The pass that finds it leaves the model's state (batch norm's statistics) as it was."""
    model = context.model
    kernels = [weight for weight in model.trainable_variables if len(weight.shape) > 1]
    with tf.GradientTape() as tape, keras.StatelessScope():
        _, loss = METHODS[context.method].loss(context, x_nat, labels, x_adv=x_adv,
                                               objective=objective)
        scaled = context.optimizer.scale_loss(loss)
    gradients = devices.global_sum(tape.gradient(scaled, kernels))
    offsets = []
    for kernel, gradient in zip(kernels, gradients):
        size = context.weight_perturbation * tf.norm(kernel.value)
        offsets.append((kernel, gradient * (size / tf.maximum(tf.norm(gradient),
                                                              GRADIENT_FLOOR))))
    return offsets


@contextlib.contextmanager
def _moved(model, offsets):
    """Inside, the model's weights read as moved by `offsets` ((weight, offset) pairs; none:
    as they are); the state the model updates inside (batch norm's statistics) is kept."""
    if not offsets:
        yield
        return
    with keras.StatelessScope([(weight, weight.value + offset)
                               for weight, offset in offsets]) as scope:
        yield
    for variable in model.non_trainable_variables:
        value = scope.get_current_value(variable)
        if value is not None:
            variable.assign(value)


def free_replay(context, x_nat, labels, *, perturbation, objective, scale=None):
    """One replay of free training: the update at `clip(x_nat + perturbation)` and, from its
    backward pass, the perturbation moved by a signed step of epsilon within the ball.
    Returns (x_adv, the Update, the next perturbation)."""
    threat, _ = context.threat(scale)
    x_adv = attack(context, x_nat, labels, start=perturbation, scale=scale)
    result = update(context, x_nat, labels, x_adv=x_adv, objective=objective,
                    input_gradient=True)
    gradient = tf.where(tf.math.is_finite(result.input_gradient), result.input_gradient, 0.0)
    return x_adv, result, threat.within_ball(threat.step(perturbation, gradient, threat.epsilon))


def replica_seed(seed):
    """A stateless seed (two integers) of this replica's draws inside a step, from `seed` (the
    run's seed and the step): each replica of a distributed step draws its own."""
    replica = tf.distribute.get_replica_context()
    replica_id = 0 if replica is None else replica.replica_id_in_sync_group
    seed = tf.cast(seed, tf.int64)
    return tf.stack([seed[0] * 1000 + tf.cast(replica_id, tf.int64), seed[1]])


def misalignment(context, x_nat, labels, *, seed, scale=None):
    """Per example, GradAlign's 1 - cos of the cross-entropy's input gradients at `x_nat` (held
    constant) and at a uniform point of the ball around it, drawn from `seed` (two integers):
    0 where the gradient keeps its direction, 1 where the two are orthogonal."""
    threat, _ = context.threat(scale)
    seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), seeds.ALIGNMENT)
    return gradient_misalignment(context.model, x_nat, threat.random_start(x_nat, seed,
                                                                           tf.float32), labels)


def gradient_misalignment(model, x, x_near, labels):
    """Per example, 1 - cos of the cross-entropy's input gradients at `x` (held constant) and
    at `x_near` (differentiated through)."""
    x, x_near = (tf.cast(points, tf.float32) for points in (x, x_near))
    # The summed cross-entropy's gradient, each example's own; the tape around this function
    # records the second one, so that it is differentiated through.
    here = tf.stop_gradient(pgd.input_gradient(model, x, labels, "xent", training=True))
    near = pgd.input_gradient(model, x_near, labels, "xent", training=True)
    return 1.0 - _cosine(here, near)


def _cosine(a, b):
    """Per example, the cosine of two batches of gradients (0 where either is 0, with a
    gradient of 0 there too)."""
    a, b = (tf.reshape(x, (tf.shape(x)[0], -1)) for x in (a, b))
    return tf.reduce_sum(a * b, axis=1) / (_norm(a) * _norm(b))


def _norm(x):
    """Each row's L2 norm, at least COSINE_FLOOR: finite, with a finite gradient, at 0."""
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=1) + COSINE_FLOOR ** 2)


def training_settings(settings, method, *, fgsm_step_size=None, attack_steps=None):
    """The attack that `method` trains on, from the evaluation attack's settings (see the
    `settings` rules below): `fgsm_step_size` is fgsm_rs' step (None: 1.25 epsilon);
    `attack_steps`, a pair (steps, step size), replaces the steps of a method that runs them
    (pgd, trades; None or empty: the settings' own)."""
    return training_method(method).settings(settings, fgsm_step_size=fgsm_step_size,
                                            attack_steps=attack_steps)


def _own_steps(settings, *, fgsm_step_size, attack_steps):
    """The settings, or their steps and step size from `attack_steps`."""
    if not attack_steps:
        return settings
    count, step_size = attack_steps
    return dataclasses.replace(settings, steps=count, step_size=step_size)


def _one_step(settings, *, fgsm_step_size, attack_steps):
    """One step of `fgsm_step_size` (None: 1.25 epsilon) from a random start."""
    step_size = 1.25 * settings.epsilon if fgsm_step_size is None else fgsm_step_size
    return dataclasses.replace(settings, steps=1, step_size=step_size, random_start=True)


def _noisy_step(settings, *, fgsm_step_size, attack_steps):
    """N-FGSM's step: one of `fgsm_step_size` (None: epsilon, the authors' choice) from a random
    start."""
    step_size = settings.epsilon if fgsm_step_size is None else fgsm_step_size
    return dataclasses.replace(settings, steps=1, step_size=step_size, random_start=True)


def _ball_only(settings, *, fgsm_step_size, attack_steps):
    """The settings as they are: only their ball (and pixel range) is used."""
    return settings


# The attacks.

def _pgd_attack(context, x_nat, labels, *, start, scale):
    return pgd.pgd_steps(context.model, x_nat, labels, x_start=start, settings=context.settings,
                         training=context.attack_training, scale=scale)


def _unprojected_attack(context, x_nat, labels, *, start, scale):
    """N-FGSM's attack: the step from the wide start, kept in a ball as wide as the start's
    radius plus the step, which it cannot leave, so that nothing pulls it back."""
    settings = context.settings
    unbounded = dataclasses.replace(
        settings, epsilon=NFGSM_NOISE * settings.epsilon + settings.step_size)
    return pgd.pgd_steps(context.model, x_nat, labels, x_start=start, settings=unbounded,
                         training=context.attack_training, scale=scale)


def _free_attack(context, x_nat, labels, *, start, scale):
    return tf.clip_by_value(x_nat + start, *context.settings.pixel_range)


def _kl_attack(context, x_nat, labels, *, start, scale):
    """TRADES' inner maximisation: PGD's steps (pgd.pgd_steps) on the KL divergence from the
    clean prediction, which stands in for the labels."""
    clean = tf.stop_gradient(tf.cast(context.model(x_nat, training=context.attack_training),
                                     tf.float32))
    settings = dataclasses.replace(context.settings, loss=_kl_from_clean)
    x = pgd.pgd_steps(context.model, x_nat, clean, x_start=start, settings=settings,
                      training=context.attack_training, scale=scale)
    return tf.clip_by_value(x, *settings.pixel_range)  # the start may leave it, at zero steps


def _kl_from_clean(logits, clean):
    return kl_divergence(clean, logits)


# The losses: (logits on the adversarial batch, the loss of the update).

def _adversarial_loss(context, x_nat, labels, *, x_adv, objective):
    logits = context.model(x_adv, training=True)
    return logits, objective(labels, logits, context.model)


def _trades_loss(context, x_nat, labels, *, x_adv, objective):
    model = context.model
    clean = model(x_nat, training=True)
    logits = model(x_adv, training=True)
    divergence = kl_divergence(tf.cast(clean, tf.float32), tf.cast(logits, tf.float32))
    loss = objective(labels, clean, model)
    return logits, loss + tf.cast(context.beta, loss.dtype) * tf.cast(
        objective.reduce(divergence), loss.dtype)


def kl_divergence(logits_p, logits_q):
    """Per example, KL(p || q) of the softmax distributions of two float32 logits."""
    log_p = tf.nn.log_softmax(logits_p)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(logits_q)), axis=1)


# The starts: on the host from a numpy generator (the loop), in the graph from a stateless seed
# (fit). The ball's start is the threat model's; TRADES' is one function of threat_model's host
# or graph draws, as Ball.sample is.

def _float64(x_nat):
    """The batch as the float64 iterate holds it: its float32 values."""
    return tf.cast(tf.cast(x_nat, tf.float32), tf.float64)


def _ball_start_on_host(x_nat, settings, rng):
    return pgd.start_point(x_nat, settings, rng)


def _ball_start_in_graph(x_nat, settings, seed):
    if not settings.random_start:
        return _float64(x_nat)
    return settings.threat_model.random_start(x_nat, seed, tf.float64)


def _noise_ball(settings):
    """The ball N-FGSM's start is drawn from: NFGSM_NOISE times the epsilon ball."""
    return dataclasses.replace(settings, epsilon=NFGSM_NOISE * settings.epsilon)


def _wide_start_on_host(x_nat, settings, rng):
    return _ball_start_on_host(x_nat, _noise_ball(settings), rng)


def _wide_start_in_graph(x_nat, settings, seed):
    return _ball_start_in_graph(x_nat, _noise_ball(settings), seed)


def _noise_start(x_nat, settings, draws):
    """TRADES' start: x_nat + TRADES_NOISE (high - low) N(0, 1)."""
    x_nat = _float64(x_nat)
    low, high = settings.pixel_range
    return x_nat + TRADES_NOISE * (high - low) * draws.normal(tf.shape(x_nat))


def _noise_start_on_host(x_nat, settings, rng):
    return _noise_start(x_nat, settings, threat_model.HostDraws(rng)).numpy()


def _noise_start_in_graph(x_nat, settings, seed):
    return _noise_start(x_nat, settings, threat_model.GraphDraws(seed, tf.float64))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """A training method.

    Args:
        attack: `(context, x_nat, labels, *, start, scale) -> x_adv`.
        loss: `(context, x_nat, labels, *, x_adv, objective) -> (logits, loss)`.
        settings: `(settings, *, fgsm_step_size, attack_steps) -> settings`, the attack it
            trains on (`training_settings`).
        start_on_host: `(x_nat, settings, rng) -> float64 start`, drawn on the host (the loop);
            None: the start is a perturbation carried from replay to replay (free training).
        start_in_graph: `(x_nat, settings, seed) -> float64 start`, drawn in the graph (`fit`).
        reduces: its loss needs the objective's `reduce`.
    """

    attack: Callable
    loss: Callable
    settings: Callable = _own_steps
    start_on_host: Callable = None
    start_in_graph: Callable = None
    reduces: bool = False

    @property
    def carries(self):
        """The start is a perturbation carried from replay to replay, not drawn."""
        return self.start_on_host is None


METHODS = {
    "pgd": Method(attack=_pgd_attack, loss=_adversarial_loss, start_on_host=_ball_start_on_host,
                  start_in_graph=_ball_start_in_graph),
    "fgsm_rs": Method(attack=_pgd_attack, loss=_adversarial_loss, settings=_one_step,
                      start_on_host=_ball_start_on_host, start_in_graph=_ball_start_in_graph),
    "nfgsm": Method(attack=_unprojected_attack, loss=_adversarial_loss, settings=_noisy_step,
                    start_on_host=_wide_start_on_host, start_in_graph=_wide_start_in_graph),
    "free": Method(attack=_free_attack, loss=_adversarial_loss, settings=_ball_only),
    "trades": Method(attack=_kl_attack, loss=_trades_loss, start_on_host=_noise_start_on_host,
                     start_in_graph=_noise_start_in_graph, reduces=True),
}


def training_method(name):
    """The Method named `name` (a key of METHODS)."""
    if name not in METHODS:
        raise ValueError(f"Unknown training method; use one of {', '.join(METHODS)}. "
                         f"Received: method={name!r}")
    return METHODS[name]
