"""Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1) in the L-infinity or L2 norm, and its L1
version (Croce & Hein, "Mind the box", ICML 2021: `sparse_steps`), with the parameters of their
reference implementation (fra31/auto-attack, `autopgd_base.py`).

From a random point on the epsilon sphere, 100 steps of PGD with momentum: the step size starts at
2 epsilon and is halved at checkpoints where the loss rose in at most 75% of the steps since the
last one, or where it was not halved at the last checkpoint and the best loss has not improved
since; after a halving the attack continues from its best point. A point counts as broken as soon
as any iterate is misclassified. All the iterations run in one `tf.function` with fixed shapes.
In L1 the steps are sparse and the step size follows the sparsity of the best point instead.
"""

import copy
import dataclasses
import math

import numpy as np
import tensorflow as tf

from common.attacks import checks, losses, runs, threat_model
from common.attacks.threat_model import ThreatModel, per_example
from common.models import layers
from common.runtime import devices, seeds

FIRST_CHECKPOINT = 0.22  # p1
CHECKPOINT_DECREASE = 0.03  # the interval shrinks by this much at each checkpoint...
MIN_CHECKPOINT_INTERVAL = 0.06  # ...down to this
MOMENTUM = 0.75
RHO = 0.75  # the fraction of rising steps below which the step size is halved
# The large-reps schedule (AutoAttack's standard version in L1): epsilon multiples, and each
# one's share of the iterations.
LARGE_REPS_EPSILONS = (3.0, 2.0, 1.0)
LARGE_REPS_ITERATIONS = (0.3, 0.3, 0.4)
# APGD-L1 (Croce & Hein 2021): checkpoints every 4% of the iterations; the share of coordinates
# a step moves is the best point's sparsity over 1.5, by which the step size also shrinks,
# unless the best point became sparser than 95% of the last checkpoint's; at least epsilon / 10.
L1_CHECKPOINT_SHARE = 0.04
SPARSITY_DECREASE = 1.5
L1_SPARSER = 0.95
L1_SMALLEST_STEP = 10.0


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class APGDSettings:
    """What one APGD run needs (APGD builds it from its keywords)."""

    threat_model: ThreatModel
    num_iterations: int = 100
    loss: object = "xent"  # a name of losses.APGD_LOSSES or a callable
    # Whether the runs go towards target classes (a callable loss then takes them too).
    targeted: bool = False
    # Gradients averaged over this many passes (expectation over transformation), for models
    # whose outputs are random (AutoAttack's 'rand' version uses 20).
    eot_iterations: int = 1
    # The large-reps schedule (LARGE_REPS_EPSILONS), as AutoAttack's standard version runs APGD
    # in L1.
    large_reps: bool = False

    def __post_init__(self):
        losses.check_loss(self.loss, losses.APGD_LOSSES)
        checks.check_keywords(steps=(self.num_iterations, 1),
                              eot_iterations=(self.eot_iterations, 1))


def halve_step(rising, interval, *, halved_at_last, best_at_last, best):
    """Which examples halve their step size at a checkpoint `interval` steps after the last one:
    those whose loss rose in at most RHO of those steps, and those not halved at the last
    checkpoint whose best loss has not improved since."""
    oscillating = rising <= interval * RHO
    stuck = tf.logical_and(tf.logical_not(halved_at_last), best_at_last >= best)
    return tf.logical_or(oscillating, stuck)


def apgd_steps(model, x_nat, labels, *, targets, noise, settings, scale=None):
    """One run of APGD from the random start given by `noise` (the shape of `x_nat`, drawn by
    the threat model's `noise`): the iterations of the threat model's ball (STEPS), or with
    `large_reps` the reference's schedule: LARGE_REPS_ITERATIONS of the iterations at each of
    LARGE_REPS_EPSILONS times epsilon in turn, each from the highest-loss point of the one
    before, projected into its ball (the start: the noise in the largest ball).

    Returns the last misclassified iterate of each example (its start where none was), whether
    the example stayed correctly classified throughout (in the large-reps schedule: throughout
    its last part, within epsilon), and its final step size. `scale` (a float64 scalar tensor,
    APGD.scaled) multiplies epsilon.
    """
    threat = settings.threat_model if scale is None else settings.threat_model.scaled(scale)
    steps = STEPS[type(threat.ball)]
    with layers.weights_read_once(model):
        loss_and_gradient = devices.loop_step(
            _loss_and_gradient(model, labels, targets=targets, settings=settings))
        if not settings.large_reps:
            _, x_broken, robust, step_size = steps(
                loss_and_gradient, x_nat, labels, x_start=threat.noise_start(x_nat, noise),
                threat=threat, num_iterations=settings.num_iterations, fresh=True)
            return x_broken, robust, step_size
        x_best = threat.scaled(LARGE_REPS_EPSILONS[0]).noise_start(x_nat, noise)
        for factor, iterations in zip(LARGE_REPS_EPSILONS,
                                      large_reps_iterations(settings.num_iterations)):
            stage = threat.scaled(factor)
            x_best, x_broken, robust, step_size = steps(
                loss_and_gradient, x_nat, labels, x_start=stage.project(x_best, x_nat),
                threat=stage, num_iterations=iterations, fresh=False)
        return x_broken, robust, step_size


def large_reps_iterations(num_iterations):
    """The iterations of each part of the large-reps schedule: 30%, 30% (rounded up) and the
    rest; for 100 iterations 30, 30 and 40."""
    first = [math.ceil(share * num_iterations) for share in LARGE_REPS_ITERATIONS[:-1]]
    return first + [num_iterations - sum(first)]


def _loss_and_gradient(model, labels, *, targets, settings):
    """x -> (loss per example, its gradient averaged over `eot_iterations` passes, logits)."""
    targets = targets if settings.targeted else None

    def loss_and_gradient(x):
        gradient = tf.zeros_like(x)
        for _ in range(settings.eot_iterations):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = tf.cast(devices.call_model(model, x), tf.float32)
                loss = losses.per_example_loss(logits, labels, settings.loss, targets)
                total = tf.reduce_sum(loss)
            gradient += losses.gradient(tape, total, x)
        return loss, gradient / settings.eot_iterations, logits

    return loss_and_gradient


def _correct(logits, labels):
    return tf.equal(tf.argmax(logits, axis=1), labels)


def _evaluated(loss_and_gradient, x_adv, labels, *, robust, x_broken, best):
    """The bookkeeping of one iteration at `x_adv`: its loss and gradient, whether each example
    is still robust, its last misclassified iterate, and `best` (point, gradient, loss) where
    the loss rose above the best."""
    loss, gradient, logits = loss_and_gradient(x_adv)
    misclassified = tf.logical_not(_correct(logits, labels))
    robust = tf.logical_and(robust, tf.logical_not(misclassified))
    x_broken = tf.where(per_example(misclassified, x_adv), x_adv, x_broken)
    x_best, gradient_best, loss_best = best
    improved = per_example(loss > loss_best, x_adv)
    best = (tf.where(improved, x_adv, x_best), tf.where(improved, gradient, gradient_best),
            tf.where(loss > loss_best, loss, loss_best))
    return loss, gradient, robust, x_broken, best


def momentum_steps(loss_and_gradient, x_nat, labels, *, x_start, threat, num_iterations, fresh):
    """APGD's iterations in L-infinity and L2 (Algorithm 1) from `x_start`: steps with momentum,
    the step size halved at the checkpoints (`fresh` plays no part). Returns the highest-loss
    point, the last misclassified iterate (the start where none was), whether each example
    stayed correctly classified, and the final step sizes."""
    intervals = checkpoint_intervals(num_iterations)
    interval_at = tf.constant([intervals.get(i, 0) for i in range(num_iterations)], tf.float32)
    x_adv = x_start
    loss, gradient, logits = loss_and_gradient(x_adv)
    robust = _correct(logits, labels)
    x_broken = x_adv
    x_best, gradient_best, loss_best = x_adv, gradient, loss
    step_size = tf.fill(tf.shape(loss), tf.cast(2.0 * threat.epsilon, tf.float32))
    x_previous = x_adv
    # The reference compares the first step's loss with a zero-initialised entry.
    previous_loss = tf.zeros_like(loss)
    rising = tf.zeros_like(loss)
    loss_best_at_checkpoint = loss_best
    halved_at_checkpoint = tf.ones_like(robust)
    for iteration in tf.range(num_iterations):
        momentum = tf.where(iteration > 0, MOMENTUM, 1.0)
        z = threat.project(threat.step(x_adv, gradient, step_size), x_nat)
        moved = x_adv - x_previous
        x_previous = x_adv
        x_adv = threat.project(x_adv + (z - x_adv) * momentum + moved * (1 - momentum), x_nat)
        loss, gradient, robust, x_broken, (x_best, gradient_best, loss_best) = _evaluated(
            loss_and_gradient, x_adv, labels, robust=robust, x_broken=x_broken,
            best=(x_best, gradient_best, loss_best))
        rising += tf.cast(loss > previous_loss, tf.float32)
        previous_loss = loss
        interval = interval_at[iteration]
        if interval > 0:
            halve = halve_step(rising, interval, halved_at_last=halved_at_checkpoint,
                               best_at_last=loss_best_at_checkpoint, best=loss_best)
            halved_at_checkpoint = halve
            loss_best_at_checkpoint = loss_best
            step_size = tf.where(halve, step_size / 2, step_size)
            x_adv = tf.where(per_example(halve, x_adv), x_best, x_adv)
            gradient = tf.where(per_example(halve, x_adv), gradient_best, gradient)
            rising = tf.zeros_like(rising)
    return x_best, x_broken, robust, step_size


def _nonzero(x):
    """Per example, how many coordinates of `x` are not 0 (its sparsity)."""
    return tf.reduce_sum(tf.cast(tf.not_equal(tf.reshape(x, (tf.shape(x)[0], -1)), 0),
                                 tf.float32), axis=1)


def sparse_steps(loss_and_gradient, x_nat, labels, *, x_start, threat, num_iterations, fresh):
    """APGD's iterations in L1 ("Mind the box", Croce & Hein 2021) from `x_start`, as the
    reference runs them: no momentum; each step of size `step_size` moves the coordinates of
    the largest gradients (at first L1_STEP_FRACTION of them, or, from a start that is not
    `fresh`, the start's non-zero coordinates over SPARSITY_DECREASE), then projects exactly.
    Every L1_CHECKPOINT_SHARE of the iterations the fraction becomes the best point's over
    SPARSITY_DECREASE; where the best point's sparsity fell below L1_SPARSER of the last
    checkpoint's, the step size returns to epsilon and the iterate to the best point, elsewhere
    the step size shrinks by SPARSITY_DECREASE, down to epsilon / L1_SMALLEST_STEP. Returns as
    `momentum_steps`."""
    size = tf.cast(tf.reduce_prod(tf.shape(x_nat)[1:]), tf.float32)
    interval = max(int(L1_CHECKPOINT_SHARE * num_iterations), 1)
    x_adv = x_start
    loss, gradient, logits = loss_and_gradient(x_adv)
    robust = _correct(logits, labels)
    x_broken = x_adv
    x_best, gradient_best, loss_best = x_adv, gradient, loss
    full_step = tf.fill(tf.shape(loss), tf.cast(threat.epsilon, tf.float32))
    step_size = full_step
    if fresh:
        sparsity = tf.fill(tf.shape(loss), size)
        fraction = tf.fill(tf.shape(loss), threat_model.L1_STEP_FRACTION)
    else:
        sparsity = _nonzero(x_adv - x_nat)
        fraction = sparsity / size / SPARSITY_DECREASE
    for iteration in tf.range(num_iterations):
        step = per_example(step_size, x_adv) * threat_model.sparse_direction(gradient, fraction)
        x_adv = threat.project(x_adv + step, x_nat)
        loss, gradient, robust, x_broken, (x_best, gradient_best, loss_best) = _evaluated(
            loss_and_gradient, x_adv, labels, robust=robust, x_broken=x_broken,
            best=(x_best, gradient_best, loss_best))
        if (iteration + 1) % interval == 0:
            sparsity_now = _nonzero(x_best - x_nat)
            sparser = sparsity_now / sparsity < L1_SPARSER
            fraction = sparsity_now / size / SPARSITY_DECREASE
            step_size = tf.clip_by_value(
                tf.where(sparser, full_step, step_size / SPARSITY_DECREASE),
                full_step / L1_SMALLEST_STEP, full_step)
            sparsity = sparsity_now
            x_adv = tf.where(per_example(sparser, x_adv), x_best, x_adv)
            gradient = tf.where(per_example(sparser, x_adv), gradient_best, gradient)
    return x_best, x_broken, robust, step_size


# APGD's iterations per ball: keyed by the ball's class.
STEPS = {threat_model.LinfBall: momentum_steps, threat_model.L2Ball: momentum_steps,
         threat_model.L1Ball: sparse_steps}


class APGD:
    """APGD on a Keras model or callable returning logits: `perturb(x, y)` returns float32
    adversarial examples in the shape of `x` (the clean image where the attack failed or the
    example was misclassified already). `restarts` runs follow one another, each on the examples
    still robust; with `targets`, APGD-T: the targeted runs towards the most likely wrong class
    of the clean image, then the next, ... up to `targets` classes, `restarts` times each. Each
    batch is checked first, as PGD's.

    The random starts are drawn on the host from `seed`, one stream per run, so a run is
    reproducible; each batch is spread over the replicas of `strategy`.

    Args:
        model: a Keras model or a callable returning logits.
        epsilon: the radius of the ball.
        norm: the ball's norm, "Linf", "L2" or "L1".
        steps: iterations of a run.
        loss: xent or dlr (untargeted), targeted or dlr-targeted (with `targets`), or a
            callable: (logits, labels) -> per-example loss, or with `targets`
            (logits, labels, targets) -> per-example loss, `targets` the run's target class per
            example; by default xent, or dlr-targeted with `targets`.
        restarts: runs from different random starts (per target class with `targets`).
        targets: the number of target classes of APGD-T (None: untargeted).
        eot_iterations: gradients averaged over this many passes (expectation over
            transformation), for models whose outputs are random.
        large_reps: runs each restart at 3, 2 and 1 times epsilon in turn, as AutoAttack's
            standard version runs APGD in L1 (see `large_reps_iterations`).
        seed: seeds the random starts.
        pixel_range: (low, high), the range of valid inputs.
        strategy: spreads each batch over its replicas.
        jit_compile: compiles the iterations with XLA.

    `scaled(factor)` is the same attack at epsilon times `factor`, running the iterations this
    one traced: a sweep over epsilon traces once.
    """

    def __init__(self, model, *, epsilon, norm="Linf", steps=100, loss=None, restarts=1,
                 targets=None, eot_iterations=1, large_reps=False, seed=0,
                 pixel_range=(0.0, 1.0), strategy=None, jit_compile=False):
        checks.check_keywords(restarts=(restarts, 1))
        if targets is not None:
            checks.check_keywords(targets=(targets, 1))
        if loss is None:
            loss = "xent" if targets is None else "dlr-targeted"
        if not callable(loss) and (targets is None) == (loss in losses.TARGETED):
            raise ValueError(f"the targeted losses ({', '.join(losses.TARGETED)}) go with "
                             f"targets and only they do (a callable loss goes with either). "
                             f"Received: loss={loss!r}, targets={targets!r}")
        self.settings = APGDSettings(
            threat_model=ThreatModel(epsilon=epsilon, norm=norm, pixel_range=pixel_range),
            num_iterations=steps, loss=loss, targeted=targets is not None,
            eot_iterations=eot_iterations, large_reps=large_reps)
        self.threat_model = self.settings.threat_model
        self.model = model
        self.restarts, self.targets = int(restarts), targets
        self.seed = seed
        self._scale = np.float64(1.0)  # times the epsilon its traced iterations were built with
        self._spread = devices.Spread(
            strategy, lambda x, y, targets, noise, scale: apgd_steps(
                model, x, y, targets=targets, noise=noise, settings=self.settings, scale=scale),
            jit_compile)
        self._logits = devices.spread_logits(model, strategy)

    def scaled(self, factor):
        """This attack with epsilon times `factor` (at least 0). It runs the iterations this
        attack traced, with the factor as an input (float64): the same points as an attack
        built at `epsilon * factor`."""
        checks.check_keywords(factor=(factor, 0.0))
        attack = copy.copy(self)
        attack.settings = dataclasses.replace(
            self.settings, threat_model=self.threat_model.scaled(factor))
        attack.threat_model = attack.settings.threat_model
        attack._scale = np.float64(self._scale * factor)
        return attack

    def perturb(self, x, y):
        """Adversarial examples for `(x, y)` (arrays or tensors), float32, the shape of `x`."""
        x, y, logits = checks.checked_with_model(x, y, pixel_range=self.threat_model.pixel_range,
                                                 logits_of=self._logits)
        planned = runs.planned_runs(logits, y, targets=self.targets, restarts=self.restarts)

        def attack(todo, run):
            noise = runs.start_noise(self.threat_model, seed=self.seed, stream=seeds.APGD_STARTS,
                                     run=run.index, shape=x[todo].shape)
            x_adv, robust, _ = self._spread(x[todo], y[todo], run.targets[todo], noise,
                                            self._scale)
            return x_adv, ~robust

        return runs.on_robust_examples(x, planned, attack, robust=runs.correct(logits, y))
