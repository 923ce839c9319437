"""The Square attack (Andriushchenko et al., ECCV 2020) in the threat model's norm, with the
parameters AutoAttack runs it with (5000 queries, p_init 0.8, the margin loss, no rescaled
schedule).

A score-based attack: it uses the model's logits only, never its gradients, so it finds what
gradient masking hides from APGD and FAB. In L-infinity it starts from vertical stripes of
+-epsilon and at each query tries one square window, the same for every example of the batch,
set to +-2 epsilon per channel and projected back into the ball, keeping it where the margin
loss falls or the example becomes misclassified; the other norms move the perturbation's mass
between windows by their reference's rules (below). The queries run in one `tf.function` and
stop when every example of the batch is broken.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from common.attacks import checks, losses, runs, threat_model
from common.attacks.threat_model import ThreatModel
from common.runtime import devices

# The fraction of the image a square covers, halved at these query counts (the reference's
# schedule, without rescaling to the number of queries).
HALVING_QUERIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SquareSettings:
    """What Square's queries need (Square builds it from its keywords)."""

    threat_model: ThreatModel
    num_queries: int = 5000
    p_init: float = 0.8


def square_fraction(query, p_init):
    """The fraction of the image that the square of `query` covers."""
    return p_init / 2 ** sum(query > halving for halving in HALVING_QUERIES)


def square_sizes(settings, height, width):
    """The side of each query's square, in pixels."""
    return [max(int(round(np.sqrt(square_fraction(query, settings.p_init) * height * width))), 1)
            for query in range(settings.num_queries)]


def example_signs(shape, stream, positions):
    """Random signs of shape (len(positions), *shape) for the examples at `positions` of their
    whole batch: drawn for the batch up to the last of them, then taken, so that one replica's
    slice of the batch gets what the whole batch gets for it (on one device or many)."""
    rows = tf.reduce_max(positions) + 1
    drawn = tf.random.stateless_uniform(tf.concat([[rows], shape], 0), stream, -1.0, 1.0)
    return tf.sign(tf.gather(drawn, positions))


def _positions(x_nat, positions):
    return tf.range(tf.shape(x_nat)[0]) if positions is None else positions


def square_queries(predict, x_nat, labels, *, settings, seed, positions=None):
    """Square's queries on images `x_nat` (NHWC); `predict(images)` gives logits. Returns the
    best images found and their margins (negative: broken). `positions` (by default 0, 1, ...)
    are the examples' places in their whole batch, which key their random draws."""
    low, high = settings.threat_model.pixel_range
    epsilon = settings.threat_model.epsilon
    height, width, channels = x_nat.shape[1:]
    sizes = tf.constant(square_sizes(settings, height, width), tf.int32)
    lower = tf.maximum(x_nat - epsilon, low)
    upper = tf.minimum(x_nat + epsilon, high)
    stripes = example_signs((1, width, channels), [seed, -1], _positions(x_nat, positions))
    rows, columns = tf.range(height)[:, None], tf.range(width)[None, :]

    def propose(query, x_best):
        side = sizes[query]
        corner = tf.random.stateless_uniform((2,), [seed, query], 0, 2**30, tf.int32)
        # As the reference, the last position of the window is never drawn.
        top = corner[0] % tf.maximum(height - side, 1)
        left = corner[1] % tf.maximum(width - side, 1)
        window = tf.logical_and(tf.logical_and(rows >= top, rows < top + side),
                                tf.logical_and(columns >= left, columns < left + side))
        signs = tf.sign(tf.random.stateless_uniform((channels,), [seed, query + 2**20],
                                                    -1.0, 1.0))
        delta = tf.cast(window, tf.float32)[:, :, None] * (2 * epsilon) * signs
        return tf.clip_by_value(x_best + delta, lower, upper)

    return _search(predict, tf.clip_by_value(x_nat + epsilon * stripes, low, high), labels,
                   num_queries=settings.num_queries, propose=propose)


def _search(predict, x_start, labels, *, num_queries, propose):
    """Square's random search from `x_start`: `propose(query, x_best)` gives each query's
    candidate images, each kept where it lowers the margin of an example not broken yet; the
    search ends after `num_queries` or once every example is broken. Returns the best images
    and their margins (negative: broken)."""
    x_best = x_start
    margin_best = losses.logit_margin(predict(x_best), labels)
    query = tf.constant(0)
    while query < num_queries and tf.reduce_any(margin_best > 0):
        x_new = propose(query, x_best)
        new_margin = losses.logit_margin(predict(x_new), labels)
        accept = tf.logical_and(margin_best > 0, new_margin < margin_best)
        x_best = tf.where(accept[:, None, None, None], x_new, x_best)
        margin_best = tf.where(accept, new_margin, margin_best)
        query += 1
    return x_best, margin_best


def window_sizes(settings, height, width):
    """The side of each L2 or L1 query's windows: odd, at least 3, at most the image's side."""
    sides = []
    for query in range(settings.num_queries):
        side = max(int(round(np.sqrt(square_fraction(query, settings.p_init) * height * width))),
                   3)
        side += 1 - side % 2
        sides.append(min(side, height, width))
    return sides


def _centred_rings(rows, columns, *, ring_power, order):
    """A rows x columns pattern of nested rectangles around the centre, the k-th ring weighted
    1 / (k + 1)^ring_power, of unit norm of `order` (2 or 1): most of its mass at the centre."""
    pattern = np.zeros((rows, columns))
    top, left = rows // 2, columns // 2
    for ring in range(max(rows // 2 + 1, columns // 2 + 1)):
        pattern[max(top, 0):min(top + 2 * ring + 1, rows),
                max(left, 0):min(left + 2 * ring + 1, columns)] += 1.0 / (ring + 1) ** ring_power
        top, left = top - 1, left - 1
    return pattern / max(np.linalg.norm(pattern.ravel(), order), 1e-12)


def window(side, ring_power, order):
    """The reference's window of `side`: rings of + above rings of -, of unit norm of
    `order`."""
    pattern = np.concatenate([
        _centred_rings(side // 2, side, ring_power=ring_power, order=order),
        -_centred_rings(side - side // 2, side, ring_power=ring_power, order=order)])
    return pattern / np.linalg.norm(pattern.ravel(), order)


def l2_window(side):
    """The L2 window: rings weighted 1 / (k + 1)^2."""
    return window(side, 2, 2)


@dataclasses.dataclass(frozen=True)
class WindowRules:
    """What Square's window queries take from the ball (L2 or L1), as the reference defines it:
    the window's ring weights 1 / (k + 1)^`ring_power` and norm `order`; `size(x, axes)`, the
    norm over those axes; `mass(epsilon, image, windows, channels)`, a new window's norm per
    channel from the perturbation's norm and the two windows' per channel; and
    `into_ball(threat, x_nat, delta)`, the candidate image of a perturbation."""

    ring_power: int
    order: int
    size: object
    mass: object
    into_ball: object


L2_RULES = WindowRules(
    ring_power=2, order=2,
    size=lambda x, axes: tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True)),
    mass=lambda epsilon, image, windows, channels: tf.sqrt(
        tf.maximum(epsilon ** 2 - tf.square(image), 0.0) / channels + tf.square(windows)),
    into_ball=lambda threat, x_nat, delta: tf.clip_by_value(
        x_nat + delta / (L2_RULES.size(delta, (1, 2, 3)) + 1e-12) * threat.epsilon,
        *threat.pixel_range))
# In L1 the reference projects onto a ball a little inside epsilon.
L1_INSIDE = 1 - 1e-6
L1_RULES = WindowRules(
    ring_power=4, order=1,
    size=lambda x, axes: tf.reduce_sum(tf.abs(x), axis=axes, keepdims=True),
    mass=lambda epsilon, image, windows, channels: (
        tf.maximum(epsilon - image, 0.0) / channels + windows) * channels,
    into_ball=lambda threat, x_nat, delta: threat.scaled(L1_INSIDE).project(x_nat + delta,
                                                                             x_nat))


def window_queries(predict, x_nat, labels, *, settings, seed, rules, positions=None):
    """Square's L2 or L1 queries (the reference's, by `rules`): from a grid of windows of random
    signs, each query moves the perturbation's mass out of one window and into another, where
    it sets a new window of random signs per channel, the total kept at the ball's epsilon.
    `positions` as square_queries'."""
    threat = settings.threat_model
    epsilon = threat.epsilon
    height, width, channels = x_nat.shape[1:]
    positions = _positions(x_nat, positions)
    sides = window_sizes(settings, height, width)
    biggest = max(sides)
    # Every window used, padded to the biggest side, and its transpose: [side index, flip].
    distinct = sorted(set(sides))
    windows = np.zeros((len(distinct), 2, biggest, biggest), np.float32)
    for index, side in enumerate(distinct):
        pattern = window(side, rules.ring_power, rules.order)
        windows[index, 0, :side, :side] = pattern
        windows[index, 1, :side, :side] = pattern.T
    windows = tf.constant(windows)
    side_index = tf.constant([distinct.index(side) for side in sides], tf.int32)
    side_of = tf.constant(sides, tf.int32)

    def placed(pattern, top, left):
        """The biggest x biggest `pattern` placed at (top, left) in a height x width image."""
        full = tf.pad(pattern, [[top, height - top], [left, width - left]])
        return tf.reshape(full[:height, :width], (height, width, 1))

    # The start: a grid of windows of side height // 5 with random signs per channel.
    grid = max(height // 5, 1)
    first = max((height - grid * 5) // 2, 0)
    start_window = np.zeros((biggest + grid, biggest + grid), np.float32)
    start_window[:grid, :grid] = window(grid, rules.ring_power, rules.order)
    init = tf.zeros_like(x_nat)
    for row in range(first, first + grid * (height // grid), grid):
        for column in range(first, first + grid * (width // grid), grid):
            init += placed(start_window[:biggest, :biggest], row, column)[None] * example_signs(
                (1, 1, channels), [seed, -1 - row * width - column], positions)

    def propose(query, x_best):
        side = side_of[query]
        draws = tf.random.stateless_uniform((5,), [seed, query], 0, 2**30, tf.int32)
        # As the reference, the last position of a window is never drawn.
        spread = tf.maximum(height - side, 1), tf.maximum(width - side, 1)
        top, left = draws[0] % spread[0], draws[1] % spread[1]
        top_2, left_2 = draws[2] % spread[0], draws[3] % spread[1]
        square = tf.pad(tf.ones((side, side)), [[0, biggest - side], [0, biggest - side]])
        window_1 = placed(square, top, left)
        window_2 = placed(square, top_2, left_2)
        delta = x_best - x_nat
        norm_window_1 = rules.size(delta * window_1, (1, 2))
        norm_image = rules.size(delta, (1, 2, 3))
        both = tf.maximum(window_1, window_2)
        norm_windows = rules.size(delta * both, (1, 2))
        pattern = placed(windows[side_index[query], draws[4] % 2], top, left)
        fresh = pattern[None] * example_signs((1, 1, channels), [seed, query + 2**20],
                                              positions)
        fresh += delta * window_1 / (norm_window_1 + 1e-12)
        fresh *= rules.mass(epsilon=epsilon, image=norm_image, windows=norm_windows,
                            channels=channels) / (rules.size(fresh, (1, 2)) + 1e-12)
        delta = delta * (1 - window_2) * (1 - window_1) + fresh
        return rules.into_ball(threat, x_nat, delta)

    return _search(predict, rules.into_ball(threat, x_nat, init), labels,
                   num_queries=settings.num_queries, propose=propose)


def l2_square_queries(predict, x_nat, labels, *, settings, seed, positions=None):
    return window_queries(predict, x_nat, labels, settings=settings, seed=seed, rules=L2_RULES,
                          positions=positions)


def l1_square_queries(predict, x_nat, labels, *, settings, seed, positions=None):
    return window_queries(predict, x_nat, labels, settings=settings, seed=seed, rules=L1_RULES,
                          positions=positions)


# Square's queries per ball, keyed by the ball's class.
QUERIES = {threat_model.LinfBall: square_queries, threat_model.L2Ball: l2_square_queries,
           threat_model.L1Ball: l1_square_queries}


class Square:
    """Square on a Keras model or callable returning logits: `perturb(x, y)` returns float32
    adversarial examples in the shape of `x` (the clean image where the attack failed or the
    example was misclassified already). Each batch is checked first, as PGD's.

    The windows are squares of an image: `image_shape` (HWC) says how one input is one; by
    default an input of rank 3 is that image, and any other (a flat vector, say) is read as an
    image of one row and one channel.

    Args:
        model: a Keras model or a callable returning logits.
        epsilon: the radius of the ball.
        norm: the ball's norm, "Linf", "L2" or "L1".
        steps: queries of the model per example at most.
        p_init: the fraction of the image the first squares cover.
        seed: seeds the squares and their signs.
        pixel_range: (low, high), the range of valid inputs.
        strategy: spreads each batch over its replicas.
        image_shape: (height, width, channels) of one input, where it is not an image already.

    Square takes no `loss`: its acceptance rule is the margin loss's; no `restarts`: AutoAttack's
    reference runs it once (another `seed` gives another run); no `jit_compile`: the reference
    has none, and XLA's effect on it is unmeasured.
    """

    def __init__(self, model, *, epsilon, norm="Linf", steps=5000, p_init=0.8, seed=0,
                 pixel_range=(0.0, 1.0), strategy=None, image_shape=None):
        checks.check_keywords(steps=(steps, 1))
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1]. Received: p_init={p_init!r}")
        settings = SquareSettings(
            threat_model=ThreatModel(epsilon=epsilon, norm=norm, pixel_range=pixel_range),
            num_queries=steps, p_init=p_init)
        self.settings, self.threat_model, self.model = settings, settings.threat_model, model
        queries = QUERIES[type(settings.threat_model.ball)]

        def run(x, y, positions):
            shape = image_shape or _as_image(x.shape[1:])
            images = tf.reshape(x, (-1, *shape))

            def predict(candidates):
                return tf.cast(devices.call_model(model, tf.reshape(candidates, tf.shape(x))),
                               tf.float32)

            x_adv, margins = queries(predict, images, y, settings=settings, seed=seed,
                                     positions=positions)
            return tf.reshape(x_adv, tf.shape(x)), margins

        self._spread = devices.Spread(strategy, run)
        self._logits = devices.spread_logits(model, strategy)

    def perturb(self, x, y):
        """Adversarial examples for `(x, y)` (arrays or tensors), float32, the shape of `x`."""
        x, y, logits = checks.checked_with_model(x, y, pixel_range=self.threat_model.pixel_range,
                                                 logits_of=self._logits)

        def attack(todo, run):
            x_adv, margins = self._spread(x[todo], y[todo], np.arange(len(todo), dtype=np.int32))
            return x_adv, margins <= 0

        return runs.on_robust_examples(x, runs.untargeted_runs(y, 1), attack,
                                       robust=runs.correct(logits, y))


def _as_image(example_shape):
    if len(example_shape) == 3:
        return tuple(example_shape)
    return (1, int(np.prod(example_shape)), 1)
