"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020) in the L-infinity norm, with
the parameters AutoAttack runs it with (100 iterations, alpha_max 0.1, eta 1.05, beta 0.9): FAB-T
towards the classes of the 9 next highest clean logits in turn, from the clean image; untargeted
FAB towards the nearest class boundary at each iteration, from the clean image and then, for
further restarts, from random points at half epsilon.

FAB looks for the smallest perturbation that misclassifies: at each iteration it linearizes the
difference of the true class's and the target's logits, projects both the current point and
the original image onto that hyperplane (within the pixel range), and moves to a mix of the two
projections, biased towards the original; each time it is misclassified it keeps the point if it
is the closest yet and steps back towards the original. An example counts as broken when that
closest point lies within epsilon.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from common.attacks.runs import next_classes, on_robust_examples
from common.runtime import devices, seeds

SMALLEST_NORM = 1e-8


@dataclasses.dataclass(frozen=True)
class FABSettings:
    epsilon: float
    pixel_range: tuple = (0.0, 1.0)
    num_iterations: int = 100
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9


def project_linf(points, weights, biases, pixel_range):
    """The smallest L-infinity steps `d` (one row per example, flat) with
    `weights . (points + d) = biases` and `points + d` within the pixel range; where no step in
    the range reaches the hyperplane, the step in the range that comes closest to it.

    Moving coordinate i by up to `delta` in the direction that brings `weights . x` towards the
    bias changes it by `|w_i| min(delta, room_i)`, room_i being the distance to the range's
    bound that way. The sum is increasing and piecewise linear in `delta`, with breakpoints at
    the sorted rooms, so the smallest `delta` reaching the hyperplane is found from cumulative
    sums over the sorted rooms.
    """
    low, high = pixel_range
    needed = biases - tf.reduce_sum(weights * points, axis=1)
    direction = tf.sign(weights) * tf.sign(needed)[:, None]
    room = tf.where(direction > 0, high - points, points - low)
    room = tf.where(direction == 0, tf.zeros_like(room), room)
    order = tf.argsort(room, axis=1)
    sorted_room = tf.gather(room, order, batch_dims=1)
    sorted_weight = tf.gather(tf.abs(weights), order, batch_dims=1)
    # Reached with delta = the k-th smallest room: the coordinates before k move all their room,
    # those from k on move delta.
    filled = tf.math.cumsum(sorted_weight * sorted_room, axis=1, exclusive=True)
    remaining_weight = tf.math.cumsum(sorted_weight, axis=1, reverse=True)
    reached = filled + sorted_room * remaining_weight
    target = tf.abs(needed)[:, None]
    breakpoint_index = tf.reduce_sum(tf.cast(reached < target, tf.int32), axis=1)
    feasible = breakpoint_index < tf.shape(points)[1]
    index = tf.minimum(breakpoint_index, tf.shape(points)[1] - 1)[:, None]
    delta = (target - tf.gather(filled, index, batch_dims=1)) / tf.maximum(
        tf.gather(remaining_weight, index, batch_dims=1), 1e-12)
    delta = tf.where(feasible[:, None], delta, tf.reduce_max(room, axis=1, keepdims=True))
    return direction * tf.minimum(delta, room)


def _nearest_boundary(model, x, labels):
    """The difference of logits (other class minus true class) and its gradient, for the class
    whose linearized boundary is nearest in the L-infinity norm."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model(x, training=False), tf.float32)
        differences = logits - tf.gather(logits, labels, axis=1, batch_dims=1)[:, None]
    jacobian = tape.batch_jacobian(differences, x)
    gradient_norms = tf.reduce_sum(tf.abs(tf.reshape(jacobian, (tf.shape(x)[0],
                                                                 tf.shape(logits)[1], -1))), -1)
    distances = tf.abs(differences) / (gradient_norms + 1e-12)
    distances = tf.where(tf.one_hot(labels, tf.shape(logits)[1]) > 0, np.inf, distances)
    nearest = tf.argmin(distances, axis=1)
    return (tf.gather(differences, nearest, axis=1, batch_dims=1),
            tf.gather(jacobian, nearest, axis=1, batch_dims=1))


def _towards_target(model, x, labels, targets):
    """The difference of logits (true class minus target) and its gradient."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model(x, training=False), tf.float32)
        difference = (tf.gather(logits, labels, axis=1, batch_dims=1)
                      - tf.gather(logits, targets, axis=1, batch_dims=1))
        total = tf.reduce_sum(difference)
    return difference, tape.gradient(total, x)


def fab_steps(model, x_nat, labels, targets, noise, settings, targeted=True, random_start=False):
    """One FAB run from `x_nat` (towards `targets`, or untargeted), from a random point at half
    epsilon given by `noise` (U[-1, 1]) where `random_start`; returns the closest misclassified
    point found (`x_nat` where none was) and its L-infinity distance (infinity where none)."""
    batch = tf.shape(x_nat)[0]
    flat_shape = (batch, -1)

    def difference_and_gradient(x):
        if targeted:
            return _towards_target(model, x, labels, targets)
        return _nearest_boundary(model, x, labels)

    def misclassified(x):
        logits = model(x, training=False)
        return tf.not_equal(tf.argmax(logits, axis=1), labels)

    x_original = tf.reshape(x_nat, flat_shape)
    x = x_original
    if random_start:
        noise = tf.reshape(noise, flat_shape)
        scale = tf.reduce_max(tf.abs(noise), axis=1, keepdims=True)
        x = tf.clip_by_value(x + 0.5 * settings.epsilon * noise / scale, *settings.pixel_range)
    best = x_original
    best_distance = tf.fill((batch,), np.inf)
    for _ in tf.range(settings.num_iterations):
        difference, gradient = difference_and_gradient(tf.reshape(x, tf.shape(x_nat)))
        weights = tf.reshape(gradient, flat_shape)
        biases = tf.reduce_sum(weights * x, axis=1) - difference
        step_here = project_linf(x, weights, biases, settings.pixel_range)
        step_original = project_linf(x_original, weights, biases, settings.pixel_range)
        norm_here = tf.maximum(tf.reduce_max(tf.abs(step_here), axis=1), SMALLEST_NORM)
        norm_original = tf.maximum(tf.reduce_max(tf.abs(step_original), axis=1), SMALLEST_NORM)
        alpha = tf.clip_by_value(norm_here / (norm_here + norm_original), 0.0,
                                 settings.alpha_max)[:, None]
        x = tf.clip_by_value((x + settings.eta * step_here) * (1 - alpha)
                             + (x_original + settings.eta * step_original) * alpha,
                             *settings.pixel_range)
        adversarial = misclassified(tf.reshape(x, tf.shape(x_nat)))
        distance = tf.reduce_max(tf.abs(x - x_original), axis=1)
        closer = tf.logical_and(adversarial, distance < best_distance)
        best = tf.where(closer[:, None], x, best)
        best_distance = tf.where(closer, distance, best_distance)
        x = tf.where(adversarial[:, None], x_original + (x - x_original) * settings.beta, x)
    return tf.reshape(best, tf.shape(x_nat)), best_distance


class FAB:
    """FAB on a Keras model: `targeted(x, y)` (FAB-T) and `untargeted(x, y, restarts)` return
    the adversarial examples (the clean image where the attack failed) and which examples stayed
    robust, an example being broken by a misclassified point within epsilon. Runs follow each
    other on the examples still robust; random starts come from `seed`, one stream per run."""

    def __init__(self, model, settings, seed=0, strategy=None):
        self.settings = settings
        self.seed = seed
        strategy = strategy or tf.distribute.get_strategy()
        image_shape = tuple(model.input_shape[1:])
        images = tf.TensorSpec((None,) + image_shape, tf.float32)
        labels = tf.TensorSpec((None,), tf.int64)

        def runner(targeted, random_start):
            return devices.Spread(strategy, tf.function(
                lambda x, y, targets, noise: fab_steps(model, x, y, targets, noise, settings,
                                                       targeted, random_start),
                input_signature=(images, labels, labels, images)))

        self._runs_by_kind = {(targeted, random_start): runner(targeted, random_start)
                      for targeted in (True, False) for random_start in (True, False)}
        self._logits = devices.spread_logits(model, strategy)

    def _runs(self, x, y, runs):
        """`runs` ((targets or None, run index) pairs) one after another on the examples still
        robust; a misclassified point within epsilon breaks an example."""

        def attack(todo, run):
            targets, index = run
            noise = seeds.generator(self.seed, seeds.FAB_STARTS, index).uniform(
                -1, 1, x[todo].shape).astype(np.float32)
            fab_run = self._runs_by_kind[(targets is not None, index > 0 and targets is None)]
            adversarial, distance = fab_run(x[todo], y[todo], y[todo] if targets is None else
                                            targets[todo], noise)
            predictions = np.argmax(self._logits(adversarial), axis=1)
            return adversarial, (predictions != y[todo]) & (distance <= self.settings.epsilon)

        return on_robust_examples(x, runs, attack)

    def targeted(self, x, y, num_targets=9):
        """FAB-T: towards the class of the 2nd, then the 3rd... highest clean logit."""
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
        targets = next_classes(self._logits(x), num_targets)
        return self._runs(x, y, [(targets[:, rank - 1], rank)
                                 for rank in range(1, num_targets + 1)])

    def untargeted(self, x, y, restarts=1):
        """FAB: the first run from the clean image, the others from random starts."""
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
        return self._runs(x, y, [(None, run) for run in range(restarts)])
