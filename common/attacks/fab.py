"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020) in the L-infinity, L2 or L1
norm, with the parameters AutoAttack runs it with (100 iterations, alpha_max 0.1, eta 1.05, beta
0.9): FAB-T towards the classes of the 9 next highest clean logits in turn, from the clean image;
untargeted FAB towards the nearest class boundary at each iteration, from the clean image and
then, for further restarts, from random points at half epsilon.

FAB looks for the smallest perturbation that misclassifies: at each iteration it linearizes the
difference of the true class's and the target's logits, projects both the current point and the
original image onto that hyperplane (within the pixel range, in the attack's norm), and moves to
a mix of the two projections, biased towards the original; each time it is misclassified it
keeps the point if it is the closest yet and steps back towards the original. An example counts
as broken when that closest point lies within epsilon.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from common.attacks import checks, losses, runs, threat_model
from common.attacks.threat_model import ThreatModel
from common.models import layers
from common.runtime import devices, seeds

SMALLEST_NORM = 1e-8


@dataclasses.dataclass(frozen=True, kw_only=True)
class FABSettings:
    """What one FAB run needs (FAB builds it from its keywords)."""

    threat_model: ThreatModel
    num_iterations: int = 100
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9


def project_onto_hyperplane(points, weights, biases, *, pixel_range,
                            ball=threat_model.BALLS["Linf"]):
    """The smallest steps `d` in the norm of `ball` (one row per example, flat) with
    `weights . (points + d) = biases` and `points + d` within the pixel range; where no step in
    the range reaches the hyperplane, every coordinate moves to its bound that way."""
    projection = PROJECTIONS[type(ball)]
    return projection(points, weights, biases, pixel_range=pixel_range)


def _towards_hyperplane(points, weights, biases, *, pixel_range):
    """How far the hyperplane is (|b - w.x|), which way each coordinate moves to reach it, and
    how far the pixel range lets it move that way."""
    low, high = pixel_range
    needed = biases - tf.reduce_sum(weights * points, axis=1)
    direction = tf.sign(weights) * tf.sign(needed)[:, None]
    room = tf.where(direction > 0, high - points, points - low)
    room = tf.where(direction == 0, tf.zeros_like(room), room)
    return tf.abs(needed)[:, None], direction, room


def _moving_together(points, weights, biases, *, pixel_range, speed):
    """Coordinate i moves towards the hyperplane by `min(t speed_i, room_i)` for a common `t`.
    The change of `weights . x`, the sum of `|w_i| min(t speed_i, room_i)`, is increasing and
    piecewise linear in `t` with breakpoints room_i / speed_i, so the smallest `t` that reaches
    the hyperplane comes from cumulative sums over the sorted breakpoints."""
    target, direction, room = _towards_hyperplane(points, weights, biases,
                                                  pixel_range=pixel_range)
    breakpoints = room / tf.maximum(speed, 1e-12)
    order = tf.argsort(breakpoints, axis=1)
    sorted_breakpoints = tf.gather(breakpoints, order, batch_dims=1)
    sorted_weight = tf.gather(tf.abs(weights), order, batch_dims=1)
    sorted_room = tf.gather(room, order, batch_dims=1)
    sorted_speed = tf.gather(speed, order, batch_dims=1)
    # At the k-th breakpoint the coordinates before k have moved all their room, the others
    # t times their speed.
    filled = tf.math.cumsum(sorted_weight * sorted_room, axis=1, exclusive=True)
    remaining = tf.math.cumsum(sorted_weight * sorted_speed, axis=1, reverse=True)
    reached = filled + sorted_breakpoints * remaining
    breakpoint_index = tf.reduce_sum(tf.cast(reached < target, tf.int32), axis=1)
    feasible = breakpoint_index < tf.shape(points)[1]
    index = tf.minimum(breakpoint_index, tf.shape(points)[1] - 1)[:, None]
    t = (target - tf.gather(filled, index, batch_dims=1)) / tf.maximum(
        tf.gather(remaining, index, batch_dims=1), 1e-12)
    t = tf.where(feasible[:, None], t, tf.reduce_max(breakpoints, axis=1, keepdims=True))
    return direction * tf.minimum(t * speed, room)


def _linf_onto_hyperplane(points, weights, biases, *, pixel_range):
    """In L-infinity every coordinate moves alike."""
    return _moving_together(points, weights, biases, pixel_range=pixel_range,
                            speed=tf.ones_like(weights))


def _l2_onto_hyperplane(points, weights, biases, *, pixel_range):
    """In L2 each coordinate moves in proportion to its weight."""
    return _moving_together(points, weights, biases, pixel_range=pixel_range,
                            speed=tf.abs(weights))


def _l1_onto_hyperplane(points, weights, biases, *, pixel_range):
    """In L1 the coordinates of the largest |w_i| move first, each all its room, until the
    next one's share reaches the hyperplane: a unit of L1 moves `weights . x` most there."""
    target, direction, room = _towards_hyperplane(points, weights, biases,
                                                  pixel_range=pixel_range)
    order = tf.argsort(-tf.abs(weights), axis=1)
    sorted_weight = tf.gather(tf.abs(weights), order, batch_dims=1)
    sorted_room = tf.gather(room, order, batch_dims=1)
    filled = tf.math.cumsum(sorted_weight * sorted_room, axis=1, exclusive=True)
    full = tf.reduce_sum(tf.cast(filled + sorted_weight * sorted_room < target, tf.int32),
                         axis=1)[:, None]
    rank = tf.range(tf.shape(points)[1])[None, :]
    part = (target - filled) / tf.maximum(sorted_weight, 1e-12)
    moves = tf.where(rank < full, sorted_room,
                     tf.where(rank == full, tf.minimum(part, sorted_room), 0.0))
    return direction * tf.gather(moves, tf.argsort(order, axis=1), batch_dims=1)


# The projection onto a hyperplane per ball, keyed by the ball's class.
PROJECTIONS = {threat_model.LinfBall: _linf_onto_hyperplane,
               threat_model.L2Ball: _l2_onto_hyperplane,
               threat_model.L1Ball: _l1_onto_hyperplane}


def _nearest_boundary(model, x, labels, *, ball):
    """The difference of logits (other class minus true class) and its gradient, for the class
    whose linearized boundary is nearest in the norm of `ball` (distance: the difference over the
    dual norm of its gradient)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(devices.call_model(model, x), tf.float32)
        differences = logits - tf.gather(logits, labels, axis=1, batch_dims=1)[:, None]
    jacobian = losses.gradient(tape, differences, x, per_example=True)
    classes = tf.shape(logits)[1]
    per_class = tf.reshape(jacobian, (tf.shape(x)[0] * classes, -1))
    gradient_norms = tf.reshape(ball.dual_norms(per_class), (-1, classes))
    distances = tf.abs(differences) / (gradient_norms + 1e-12)
    distances = tf.where(tf.one_hot(labels, classes) > 0, np.inf, distances)
    nearest = tf.argmin(distances, axis=1)
    return (tf.gather(differences, nearest, axis=1, batch_dims=1),
            tf.gather(jacobian, nearest, axis=1, batch_dims=1))


def _towards_target(model, x, labels, *, targets):
    """The difference of logits (true class minus target) and its gradient."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(devices.call_model(model, x), tf.float32)
        difference = (tf.gather(logits, labels, axis=1, batch_dims=1)
                      - tf.gather(logits, targets, axis=1, batch_dims=1))
        total = tf.reduce_sum(difference)
    return difference, losses.gradient(tape, total, x)


def fab_steps(model, x_nat, labels, *, targets, noise, settings, targeted=True,
              random_start=False):
    """One FAB run from `x_nat` (towards `targets`, or untargeted), from a random point at half
    epsilon given by `noise` (the threat model's start noise) where `random_start`;
    returns the closest misclassified point found (`x_nat` where none was) and its distance in
    the threat model's norm (infinity where none)."""
    threat = settings.threat_model
    pixel_range = threat.pixel_range
    batch = tf.shape(x_nat)[0]
    flat_shape = (batch, -1)

    @devices.loop_step
    def difference_and_gradient(x):
        if targeted:
            return _towards_target(model, x, labels, targets=targets)
        return _nearest_boundary(model, x, labels, ball=threat.ball)

    def misclassified(x):
        logits = devices.call_model(model, x)
        return tf.not_equal(tf.argmax(logits, axis=1), labels)

    x_original = tf.reshape(x_nat, flat_shape)
    x = x_original
    if random_start:
        x = threat.start_on_sphere(x, tf.reshape(noise, flat_shape), radius=0.5)
    best = x_original
    best_distance = tf.fill((batch,), np.inf)
    with layers.weights_read_once(model):
        for _ in tf.range(settings.num_iterations):
            difference, gradient = difference_and_gradient(tf.reshape(x, tf.shape(x_nat)))
            weights = tf.reshape(gradient, flat_shape)
            biases = tf.reduce_sum(weights * x, axis=1) - difference
            step_here = project_onto_hyperplane(x, weights, biases, pixel_range=pixel_range,
                                                ball=threat.ball)
            step_original = project_onto_hyperplane(x_original, weights, biases,
                                                    pixel_range=pixel_range, ball=threat.ball)
            norm_here = tf.maximum(threat.norms(step_here), SMALLEST_NORM)
            norm_original = tf.maximum(threat.norms(step_original), SMALLEST_NORM)
            alpha = tf.clip_by_value(norm_here / (norm_here + norm_original), 0.0,
                                     settings.alpha_max)[:, None]
            x = tf.clip_by_value((x + settings.eta * step_here) * (1 - alpha)
                                 + (x_original + settings.eta * step_original) * alpha,
                                 *pixel_range)
            adversarial = misclassified(tf.reshape(x, tf.shape(x_nat)))
            distance = threat.norms(x - x_original)
            closer = tf.logical_and(adversarial, distance < best_distance)
            best = tf.where(closer[:, None], x, best)
            best_distance = tf.where(closer, distance, best_distance)
            x = tf.where(adversarial[:, None], x_original + (x - x_original) * settings.beta, x)
    return tf.reshape(best, tf.shape(x_nat)), best_distance


class FAB:
    """FAB on a Keras model or callable returning logits: `perturb(x, y)` returns float32
    adversarial examples in the shape of `x` (the clean image where the attack failed or the
    example was misclassified already), an example being broken by a misclassified point within
    epsilon. Untargeted, `restarts` runs, the first from the clean image, the others from random
    starts; with `targets`, FAB-T: towards the most likely wrong class of the clean image,
    `restarts` times, then the next, ... up to `targets` classes. Runs follow each other on the
    examples still robust; each batch is checked first, as PGD's.

    Args:
        model: a Keras model or a callable returning logits.
        epsilon: the radius of the ball.
        norm: the ball's norm, "Linf", "L2" or "L1".
        steps: iterations of a run.
        restarts: runs (per target class with `targets`).
        targets: the number of target classes of FAB-T (None: untargeted).
        seed: seeds the random starts, one stream per run.
        pixel_range: (low, high), the range of valid inputs.
        strategy: spreads each batch over its replicas.

    FAB takes no `loss`: it follows the linearized boundary (a difference of logits), not a
    loss; nor `jit_compile`: the reference has none, and XLA's effect on it is unmeasured.
    """

    def __init__(self, model, *, epsilon, norm="Linf", steps=100, restarts=1, targets=None,
                 seed=0, pixel_range=(0.0, 1.0), strategy=None):
        checks.check_keywords(steps=(steps, 1), restarts=(restarts, 1))
        if targets is not None:
            checks.check_keywords(targets=(targets, 1))
        self.settings = FABSettings(
            threat_model=ThreatModel(epsilon=epsilon, norm=norm, pixel_range=pixel_range),
            num_iterations=steps)
        self.threat_model = self.settings.threat_model
        self.model = model
        self.restarts, self.targets = int(restarts), targets
        self.seed = seed
        settings = self.settings

        def runner(targeted, random_start):
            return devices.Spread(strategy, lambda x, y, targets, noise: fab_steps(
                model, x, y, targets=targets, noise=noise, settings=settings, targeted=targeted,
                random_start=random_start))

        self._runs_by_kind = {(targeted, random_start): runner(targeted, random_start)
                              for targeted in (True, False) for random_start in (True, False)}
        self._logits = devices.spread_logits(model, strategy)

    def perturb(self, x, y):
        """Adversarial examples for `(x, y)` (arrays or tensors), float32, the shape of `x`."""
        x, y, logits = checks.checked_with_model(x, y, pixel_range=self.threat_model.pixel_range,
                                                 logits_of=self._logits)
        planned = runs.planned_runs(logits, y, targets=self.targets, restarts=self.restarts)

        def attack(todo, run):
            fab_run = self._runs_by_kind[(self.targets is not None, run.restart > 0)]
            noise = runs.start_noise(self.threat_model, seed=self.seed, stream=seeds.FAB_STARTS,
                                     run=run.index, shape=x[todo].shape)
            adversarial, distance = fab_run(x[todo], y[todo], run.targets[todo], noise)
            predictions = np.argmax(self._logits(adversarial), axis=1)
            epsilon = self.threat_model.epsilon
            return adversarial, (predictions != y[todo]) & (distance <= epsilon)

        return runs.on_robust_examples(x, planned, attack, robust=runs.correct(logits, y))
