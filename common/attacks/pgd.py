"""Projected gradient descent (PGD), the attack of Madry et al., for any Keras model, in the
L-infinity, L2 or L1 norm (the threat model's step and projection).

All steps run inside one `tf.function`. As in the original's numpy loop, the iterate is kept in
float64 and the model sees it cast to float32: a float32 iterate drifts from the original on a
few percent of pixels over 40 steps.
"""

import copy
import dataclasses

import numpy as np
import tensorflow as tf

from common.attacks import checks, losses
from common.attacks.threat_model import ThreatModel
from common.models import layers
from common.runtime import devices, precision, seeds


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackSettings:
    """What defines a PGD attack: the same for the attack scripts and for training."""

    epsilon: float
    steps: int
    step_size: float
    random_start: bool
    loss: object = "xent"  # a name of losses.PGD_LOSSES or a callable (logits, labels) -> loss
    pixel_range: tuple = (0.0, 1.0)
    norm: str = "Linf"

    def __post_init__(self):
        losses.check_loss(self.loss, losses.PGD_LOSSES)
        for name, kind in (("epsilon", float), ("steps", int), ("step_size", float),
                           ("random_start", bool)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "pixel_range", tuple(float(bound) for bound in self.pixel_range))

    @property
    def threat_model(self):
        return ThreatModel(self.epsilon, self.norm, self.pixel_range)


def input_gradient(model, x, labels, loss, training=False, targets=None, with_loss=False):
    """Gradient of the loss summed over the batch with respect to the float32 input `x`; with
    `with_loss`, (the gradient, the loss per example).

    Under a float16 policy the loss is scaled first, which keeps the sign of small gradients;
    a gradient that overflows to NaN there is taken as 0 (no step on that pixel).
    """
    scale = precision.FLOAT16_ATTACK_LOSS_SCALE if precision.computes_in_float16() else 1.0
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(devices.call_model(model, x, training), tf.float32)
        per_example = losses.per_example_loss(logits, labels, loss=loss, targets=targets)
        total = tf.reduce_sum(per_example) * scale
    gradient = losses.gradient(tape, total, x)
    if scale != 1.0:
        gradient = tf.where(tf.math.is_nan(gradient), tf.zeros_like(gradient), gradient)
    return (gradient, per_example) if with_loss else gradient


def start_point(x_nat, settings, rng):
    """Where PGD starts, in float64: `x_nat` itself, or with a random start a point drawn from
    `rng` by the threat model (for L-infinity the original's `x_nat + U(-epsilon, epsilon)`)."""
    if not settings.random_start:
        return np.asarray(x_nat, dtype=np.float32).astype(np.float64)
    return settings.threat_model.uniform_start(x_nat, rng)


def pgd_steps(model, x_nat, labels, x_start, settings, training=False, scale=None,
              trace=False):
    """`settings.steps` gradient steps from `x_start` (float64), each projected back into
    the threat model's ball around `x_nat` and the pixel range.

    The arithmetic is the original numpy loop's: the iterate is float64, while the step
    `step_size * sign(grad)` and the bounds `x_nat +- epsilon` are float32, as numpy computes a
    float32 array with a Python float.

    With `training`, batch norm updates its averages and, over several replicas, synchronizes
    its statistics, which TensorFlow cannot do inside a graph loop: the steps are then unrolled
    in Python; otherwise they run in a graph loop, which traces once for any number of steps.
    `scale` (a scalar tensor: float32, training's epsilon ramp; float64, PGD.scaled) multiplies
    epsilon and the step size.
    The `targeted` loss aims at the most likely wrong class of the natural image.
    With `trace`, returns (the iterate, the loss maximised per example at the start and after
    each step: shape steps + 1, batch).
    """
    threat, step_size = settings.threat_model, settings.step_size
    if scale is not None:
        threat, step_size = threat.scaled(scale), step_size * scale
    x_nat = tf.cast(x_nat, tf.float32)
    targets = None
    if settings.loss in losses.TARGETED:
        logits = tf.cast(devices.call_model(model, x_nat), tf.float32)
        targets = losses.wrong_classes(logits, labels, 1)[:, 0]
    x = x_start
    seen = tf.TensorArray(tf.float32, size=settings.steps + 1)
    gradient_of = input_gradient if training else devices.loop_step(input_gradient)
    with layers.weights_read_once(model):
        for step in range(settings.steps) if training else tf.range(settings.steps):
            grad, loss = gradient_of(model, tf.cast(x, tf.float32), labels, loss=settings.loss,
                                     training=training, targets=targets, with_loss=True)
            if trace:
                seen = seen.write(step, loss)
            x = threat.project(threat.step(x, grad, step_size), x_nat)
    if not trace:
        return x
    logits = tf.cast(devices.call_model(model, tf.cast(x, tf.float32), training), tf.float32)
    loss = losses.per_example_loss(logits, labels, settings.loss, targets)
    return x, seen.write(settings.steps, loss).stack()


def loss_trace(model, x_nat, labels, x_start, settings):
    """The cross-entropy of each example at `x_start` and after each of the PGD steps of
    `settings` (shape: steps + 1, batch), for the paper's Figure 1."""
    def xent(x):
        logits = devices.call_model(model, tf.cast(x, tf.float32))
        return losses.xent(tf.cast(logits, tf.float32), labels)

    one_step = dataclasses.replace(settings, steps=1)
    trace = tf.TensorArray(tf.float32, size=settings.steps + 1)
    x = x_start
    for step in tf.range(settings.steps):
        trace = trace.write(step, xent(x))
        x = pgd_steps(model, x_nat, labels, x_start=x, settings=one_step)
    return trace.write(settings.steps, xent(x)).stack()


class PGD:
    """PGD on any Keras model or callable that returns logits: `perturb(x, y)` returns float32
    adversarial examples in the shape of `x`, within `epsilon` of it in `norm` and within the
    pixel range.

    Inputs of any shape; each batch is checked first (inputs in the pixel range, integer labels
    of the model's classes, logits rather than probabilities: ValueError otherwise).

    Args:
        model: a Keras model or a callable returning logits.
        epsilon: the radius of the ball.
        norm: the ball's norm, "Linf", "L2" or "L1".
        steps: gradient steps.
        step_size: the length of a step; by default 2.5 epsilon / steps, so that the steps
            reach well past epsilon.
        loss: the loss maximised: xent, cw, margin or targeted (see common/attacks/losses.py),
            or a callable (logits, labels) -> per-example loss.
        restarts: runs from different random starts; each example keeps the run that
            misclassifies it, or else the one of highest loss.
        random_start: start from a random point of the ball (else from the input).
        seed: seeds the random starts (None: a fresh seed).
        pixel_range: (low, high), the range of valid inputs.
        strategy: spreads each batch over its replicas (by default the one in scope, else every
            local GPU: devices.default_strategy).
        jit_compile: compiles the steps with XLA.

    `scaled(factor)` is the same attack at epsilon and step size times `factor`, running the
    steps this one traced: a sweep over epsilon traces once.
    """

    def __init__(self, model, *, epsilon, norm="Linf", steps=40, step_size=None, loss="xent",
                 restarts=1, random_start=True, seed=0, pixel_range=(0.0, 1.0), strategy=None,
                 jit_compile=False):
        checks.check_keywords(epsilon=(epsilon, 0.0), steps=(steps, 0), restarts=(restarts, 1))
        step_size = 2.5 * epsilon / max(steps, 1) if step_size is None else step_size
        self.settings = AttackSettings(epsilon=epsilon, steps=steps, step_size=step_size,
                                       random_start=random_start, loss=loss,
                                       pixel_range=pixel_range, norm=norm)
        self.threat_model = self.settings.threat_model
        self.model = model
        self.restarts = int(restarts)
        self.seed = seed
        self.rng = self._new_rng()
        self._scale = np.float64(1.0)  # times the settings its traced steps were built with
        self.strategy = strategy or devices.default_strategy()
        self._spread_attack = devices.Spread(self.strategy, self._attack_batch, jit_compile)
        self._spread_traced = devices.Spread(self.strategy, self._traced_batch, jit_compile)
        self._spread_score = devices.Spread(self.strategy, self._score_batch)
        self._logits = devices.spread_logits(model, self.strategy)

    @classmethod
    def from_settings(cls, model, settings, **options):
        """The attack of `settings` (an AttackSettings); `options` as the constructor's."""
        return cls(model, epsilon=settings.epsilon, norm=settings.norm, steps=settings.steps,
                   step_size=settings.step_size, loss=settings.loss,
                   random_start=settings.random_start, pixel_range=settings.pixel_range,
                   **options)

    def _new_rng(self):
        return np.random.default_rng() if self.seed is None else \
            seeds.generator(self.seed, seeds.ATTACK_STARTS)

    def scaled(self, factor):
        """This attack with epsilon and the step size times `factor` (at least 0), drawing its
        random starts as a new attack of the same seed would. It runs the steps this attack
        traced, with the factor as an input (float64): the same points as an attack built at
        `epsilon * factor` and `step_size * factor`."""
        checks.check_keywords(factor=(factor, 0.0))
        attack = copy.copy(self)
        attack.settings = dataclasses.replace(self.settings,
                                              epsilon=self.settings.epsilon * factor,
                                              step_size=self.settings.step_size * factor)
        attack.threat_model = attack.settings.threat_model
        attack.rng = attack._new_rng()
        attack._scale = np.float64(self._scale * factor)
        return attack

    def _attack_batch(self, x_nat, labels, x_start, scale):
        return pgd_steps(self.model, x_nat, labels, x_start=x_start, settings=self.settings,
                         scale=scale)

    def _traced_batch(self, x_nat, labels, x_start, scale):
        x, seen = pgd_steps(self.model, x_nat, labels, x_start=x_start, settings=self.settings,
                            scale=scale, trace=True)
        return x, tf.transpose(seen)

    def _score_batch(self, x, labels):
        """Per example, the loss restarts compare (for a targeted attack, the cross-entropy of
        the label) and whether it is misclassified."""
        logits = tf.cast(devices.call_model(self.model, x), tf.float32)
        misclassified = tf.not_equal(tf.argmax(logits, axis=1), labels)
        loss = "xent" if self.settings.loss in losses.TARGETED else self.settings.loss
        return losses.per_example_loss(logits, labels, loss), misclassified

    def start_point(self, x_nat):
        """A fresh start for `x_nat`, drawn from this attack's seeded generator."""
        return start_point(x_nat, self.settings, self.rng)

    def skip(self, x_nat):
        """Draws the random starts that `perturb(x_nat, y)` draws, without attacking, so that a
        resumed run attacks its next batches from the starts an uninterrupted run would."""
        for _ in range(self.restarts):
            self.start_point(x_nat)

    def _checked(self, x_nat, y, start):
        """(x_nat, y) checked, and the first restart's start: `start`, or a drawn one."""
        x_nat, y, _ = checks.checked_with_model(x_nat, y, pixel_range=self.threat_model.pixel_range,
                                                logits_of=self._logits)
        start = self.start_point(x_nat) if start is None else np.asarray(start, np.float64)
        return x_nat, y, start

    def attack_float64(self, x_nat, y, start=None):
        """The adversarial examples as the float64 iterate holds them; with `start`, the first
        restart begins there instead of at a drawn start point."""
        x_nat, y, start = self._checked(x_nat, y, start)
        return self._restarted(x_nat, y, self._spread_attack(x_nat, y, start, self._scale))

    def perturb_with_losses(self, x, y):
        """`perturb(x, y)`, and the loss the attack maximises per example at the start and after
        each step of its first restart (shape: batch, steps + 1): whether the attack made
        progress."""
        x_nat, y, start = self._checked(x, y, None)
        first, seen = self._spread_traced(x_nat, y, start, self._scale)
        return self._restarted(x_nat, y, first).astype(np.float32), seen

    def _restarted(self, x_nat, y, best):
        """`best`, the first restart's result, where no other restart does better."""
        if self.restarts == 1:
            return best
        best_loss, best_wrong = self._spread_score(best.astype(np.float32), y)
        for _ in range(self.restarts - 1):
            x_adv = self._spread_attack(x_nat, y, self.start_point(x_nat), self._scale)
            loss, wrong = self._spread_score(x_adv.astype(np.float32), y)
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best[better] = x_adv[better]
            best_loss = np.where(better, loss, best_loss)
            best_wrong |= wrong
        return best

    def perturb(self, x, y, start=None):
        """Adversarial examples for `(x, y)` (arrays or tensors), float32, the shape of `x`;
        with `start` (float64, the shape of `x`), the first restart begins there."""
        return self.attack_float64(x, y, start).astype(np.float32)


class LinfPGDAttack(PGD):
    """PGD with the original's constructor and `perturb(x_nat, y)`, returning the float64
    iterate as the original did; no session is needed.

    `k` steps of size `a` within `epsilon` of `x_nat`, from a random start when `random_start`.
    Beyond the original: `pixel_range` (MNIST [0, 1], CIFAR-10 [0, 255]) and the options of PGD.
    """

    def __init__(self, model, epsilon, k, a, random_start, loss_func, pixel_range=(0.0, 1.0),
                 restarts=1, seed=None, jit_compile=False, strategy=None):
        super().__init__(model, epsilon=epsilon, steps=k, step_size=a, loss=loss_func,
                         restarts=restarts, random_start=random_start, seed=seed,
                         pixel_range=pixel_range, strategy=strategy, jit_compile=jit_compile)

    @classmethod
    def from_settings(cls, model, settings, **options):
        return cls(model, epsilon=settings.epsilon, k=settings.steps, a=settings.step_size,
                   random_start=settings.random_start, loss_func=settings.loss,
                   pixel_range=settings.pixel_range, **options)

    # The original's attribute names.
    epsilon = property(lambda self: self.settings.epsilon)
    k = property(lambda self: self.settings.steps)
    a = property(lambda self: self.settings.step_size)
    rand = property(lambda self: self.settings.random_start)
    loss_func = property(lambda self: self.settings.loss)

    def perturb(self, x_nat, y, *session, start=None):
        """Adversarial examples for `(x_nat, y)` within epsilon of `x_nat` (float64 numpy array).

        With `start`, the first restart begins there instead of at a drawn start point.
        """
        if session:
            raise TypeError(f"perturb(x_nat, y) takes no session: TensorFlow 2 runs the attack "
                            f"itself; pass a start point as perturb(x_nat, y, start=...). "
                            f"Received: {len(session)} more positional arguments")
        return self.attack_float64(x_nat, y, start)
