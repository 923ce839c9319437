"""Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1) in the L-infinity or L2 norm, with the
parameters of their reference implementation (fra31/auto-attack, `autopgd_base.py`).

From a random point on the epsilon sphere, 100 steps of PGD with momentum: the step size starts at
2 epsilon and is halved at checkpoints where the loss rose in at most 75% of the steps since the
last one, or where it was not halved at the last checkpoint and the best loss has not improved
since; after a halving the attack continues from its best point. A point counts as broken as soon
as any iterate is misclassified. All the iterations run in one `tf.function` with fixed shapes.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from common.attacks import losses
from common.attacks.runs import on_robust_examples
from common.attacks.threat_model import ThreatModel, per_example
from common.runtime import devices, seeds

LOSSES = ("xent", "dlr", "dlr-targeted")
FIRST_CHECKPOINT = 0.22  # p1
CHECKPOINT_DECREASE = 0.03  # the interval shrinks by this much at each checkpoint...
MIN_CHECKPOINT_INTERVAL = 0.06  # ...down to this
MOMENTUM = 0.75
RHO = 0.75  # the fraction of rising steps below which the step size is halved


def checkpoint_intervals(num_iterations):
    """{iteration index: steps since the previous checkpoint} of the step-size checkpoints.

    For 100 iterations: checks after 22, 41, 57, 70, 80, 87, 93 and 99 iterations.
    """
    interval = max(int(FIRST_CHECKPOINT * num_iterations), 1)
    decrease = max(int(CHECKPOINT_DECREASE * num_iterations), 1)
    smallest = max(int(MIN_CHECKPOINT_INTERVAL * num_iterations), 1)
    intervals, iteration = {}, interval - 1
    while iteration < num_iterations:
        intervals[iteration] = interval
        interval = max(interval - decrease, smallest)
        iteration += interval
    return intervals


@dataclasses.dataclass(frozen=True)
class APGDSettings:
    threat_model: ThreatModel
    num_iterations: int = 100
    loss: str = "xent"
    # Gradients averaged over this many passes (expectation over transformation), for models
    # whose outputs are random (AutoAttack's 'rand' version uses 20).
    eot_iterations: int = 1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown APGD loss {self.loss!r}: use one of {LOSSES}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {self.num_iterations}")


def halve_step(rising, interval, halved_at_last, best_at_last, best):
    """Which examples halve their step size at a checkpoint `interval` steps after the last one:
    those whose loss rose in at most RHO of those steps, and those not halved at the last
    checkpoint whose best loss has not improved since."""
    oscillating = rising <= interval * RHO
    stuck = tf.logical_and(tf.logical_not(halved_at_last), best_at_last >= best)
    return tf.logical_or(oscillating, stuck)


def apgd_steps(model, x_nat, labels, targets, noise, settings):
    """One run of APGD from the random start given by `noise` (the shape of `x_nat`; U[-1, 1]
    for L-infinity, standard normal for L2).

    Returns the last misclassified iterate of each example (its start where none was), whether
    the example stayed correctly classified throughout, and its final step size.
    """
    threat = settings.threat_model
    intervals = checkpoint_intervals(settings.num_iterations)
    interval_at = tf.constant([intervals.get(i, 0) for i in range(settings.num_iterations)],
                              tf.float32)

    def loss_and_gradient(x):
        gradient = tf.zeros_like(x)
        for _ in range(settings.eot_iterations):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = tf.cast(devices.call_model(model, x), tf.float32)
                loss = losses.per_example_loss(logits, labels, settings.loss, targets)
                total = tf.reduce_sum(loss)
            gradient += tape.gradient(total, x)
        return loss, gradient / settings.eot_iterations, logits

    def correct(logits):
        return tf.equal(tf.argmax(logits, axis=1), labels)

    x_adv = threat.start_on_sphere(x_nat, noise)
    loss, gradient, logits = loss_and_gradient(x_adv)
    robust = correct(logits)
    x_broken = x_adv
    x_best, gradient_best, loss_best = x_adv, gradient, loss
    step_size = tf.fill(tf.shape(loss), tf.constant(2.0 * threat.epsilon, tf.float32))
    x_previous = x_adv
    # The reference compares the first step's loss with a zero-initialised entry.
    previous_loss = tf.zeros_like(loss)
    rising = tf.zeros_like(loss)
    loss_best_at_checkpoint = loss_best
    halved_at_checkpoint = tf.ones_like(robust)
    for iteration in tf.range(settings.num_iterations):
        momentum = tf.where(iteration > 0, MOMENTUM, 1.0)
        z = threat.project(threat.step(x_adv, gradient, step_size), x_nat)
        moved = x_adv - x_previous
        x_previous = x_adv
        x_adv = threat.project(x_adv + (z - x_adv) * momentum + moved * (1 - momentum), x_nat)
        loss, gradient, logits = loss_and_gradient(x_adv)
        misclassified = tf.logical_not(correct(logits))
        robust = tf.logical_and(robust, tf.logical_not(misclassified))
        x_broken = tf.where(per_example(misclassified, x_adv), x_adv, x_broken)
        improved = loss > loss_best
        x_best = tf.where(per_example(improved, x_adv), x_adv, x_best)
        gradient_best = tf.where(per_example(improved, x_adv), gradient, gradient_best)
        loss_best = tf.where(improved, loss, loss_best)
        rising += tf.cast(loss > previous_loss, tf.float32)
        previous_loss = loss
        interval = interval_at[iteration]
        if interval > 0:
            halve = halve_step(rising, interval, halved_at_checkpoint, loss_best_at_checkpoint,
                               loss_best)
            halved_at_checkpoint = halve
            loss_best_at_checkpoint = loss_best
            step_size = tf.where(halve, step_size / 2, step_size)
            x_adv = tf.where(per_example(halve, x_adv), x_best, x_adv)
            gradient = tf.where(per_example(halve, x_adv), gradient_best, gradient)
            rising = tf.zeros_like(rising)
    return x_broken, robust, step_size


class APGD:
    """APGD on a Keras model or callable. `attack(x, y, targets, run)` is one run;
    `untargeted(x, y)` and `targeted(x, y)` are APGD-CE (or APGD-DLR) and APGD-T as AutoAttack
    runs them, returning the adversarial examples (the clean image where the attack failed) and
    which examples stayed robust. The random starts are drawn on the host from `seed`, one stream
    per run, so a run is reproducible; each batch is spread over the replicas of `strategy`."""

    def __init__(self, model, settings, seed=0, strategy=None, jit_compile=False):
        self.model = model
        self.settings = settings
        self.seed = seed
        self._spread = devices.Spread(
            strategy, lambda x, y, targets, noise: apgd_steps(model, x, y, targets, noise,
                                                              settings), jit_compile)
        self._logits = devices.spread_logits(model, strategy)

    def noise(self, shape, run):
        """The noise of the random start of `run` (a restart or target index): U[-1, 1] for
        L-infinity, standard normal for L2, as the reference draws them."""
        rng = seeds.generator(self.seed, seeds.APGD_STARTS, run)
        if self.settings.threat_model.norm == "Linf":
            return rng.uniform(-1, 1, shape).astype(np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    def attack(self, x, y, targets=None, run=0):
        """(adversarial examples, robust) of one run; `targets` for the targeted DLR loss."""
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.int64)
        targets = y if targets is None else np.asarray(targets, np.int64)
        x_adv, robust, _ = self._spread(x, y, targets, self.noise(x.shape, run))
        return x_adv, robust

    def _runs(self, x, y, runs):
        """`runs` ((targets, run index) pairs) one after another on the examples still robust."""

        def attack(todo, run):
            targets, index = run
            adversarial, robust = self.attack(x[todo], y[todo], targets[todo], index)
            return adversarial, ~robust

        return on_robust_examples(x, runs, attack)

    def untargeted(self, x, y, restarts=1):
        """APGD-CE or APGD-DLR: `restarts` runs, each on the examples still robust."""
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
        return self._runs(x, y, [(y, run) for run in range(restarts)])

    def targeted(self, x, y, num_targets=9):
        """APGD-T: the targeted DLR run towards the most likely wrong class of the clean image,
        then the next... up to `num_targets` classes, each on the examples still robust."""
        if self.settings.loss != "dlr-targeted":
            raise ValueError("APGD-T needs the loss 'dlr-targeted'")
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
        targets = losses.wrong_classes(self._logits(x), y, num_targets).numpy()
        return self._runs(x, y, [(targets[:, rank - 1], rank)
                                 for rank in range(1, num_targets + 1)])
