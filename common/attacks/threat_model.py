"""The threat model every attack shares: a ball of radius `epsilon` around the clean input in the
L-infinity, L2 or L1 norm, intersected with the pixel range.

One class per ball says how far a point is (its norm, and the dual norm FAB needs), how a gradient
becomes a step, how a perturbation is projected back into the ball and the pixel range, and where
a random start lies. `ThreatModel` pairs the ball named by `norm` (looked up in BALLS) with a
radius and a pixel range; it is what the attacks hold, and no other module compares a norm's
name. Adding a ball is one class here plus its pieces in the attacks whose algorithm differs
(FAB's projection onto a hyperplane, Square's queries, APGD's L1 rules).

The L2 and L1 rules are those of the AutoAttack reference implementation (fra31/auto-attack): in
L2 a step moves along the gradient over its norm, and a projection rescales the perturbation to
at most epsilon, then clips to the pixel range; in L1 (Croce & Hein, "Mind the box", ICML 2021)
a step spreads its size over the largest coordinates of the gradient, and the projection is the
exact Euclidean projection onto the L1 ball intersected with the pixel range.
"""

import dataclasses

import numpy as np
import tensorflow as tf

NORM_FLOOR = 1e-12  # added to a norm before dividing by it, as the reference does
# The fraction of the coordinates an L1 step moves, by largest gradient: APGD-L1's starting
# sparsity in the reference, and PGD's in L1.
L1_STEP_FRACTION = 0.2


def per_example(values, like):
    """One value per example, shaped to broadcast against `like`."""
    return tf.reshape(values, (-1,) + (1,) * (len(like.shape) - 1))


def _flat(x):
    return tf.reshape(x, (tf.shape(x)[0], -1))


def _scale(value, like):
    """A scalar or one value per example, ready to multiply `like`."""
    value = tf.cast(value, like.dtype)
    return value if value.shape.rank == 0 else per_example(value, like)


def _room(delta, x_nat, pixel_range):
    """Per coordinate, how far the pixel range lets `x_nat` move in the direction of `delta`."""
    low, high = pixel_range
    return tf.where(delta >= 0, high - x_nat, x_nat - low)


class Ball:
    """A norm's ball, centred on the clean input; the subclasses are the norms.

    `within(delta, epsilon, room)` is the Euclidean projection of the perturbation `delta` onto
    the ball of radius `epsilon`, each coordinate's size also capped by `room` (None: no cap);
    `project` applies it around `x_nat` with the pixel range's room. `sample` draws a point
    uniform in the ball (PGD's and training's random start) from `draws`, which supplies the
    uniform and normal variates on the host or inside a graph, so that both follow the one
    definition here. `noise` is the start noise APGD and FAB draw, as the reference draws it.
    """

    name = None

    def norms(self, x):
        """Per example, the norm of `x` (any shape with the batch first)."""
        raise NotImplementedError

    def dual_norms(self, x):
        """Per example, the dual norm of `x`: a linear function's rise per unit of this norm."""
        raise NotImplementedError

    def normalized(self, x):
        """`x` divided per example by its norm: the unit direction a step or start takes."""
        return x / (per_example(self.norms(x), x) + NORM_FLOOR)

    def direction(self, gradient):
        """The steepest-ascent direction of unit size."""
        raise NotImplementedError

    def within(self, delta, epsilon, room=None):
        raise NotImplementedError

    def project(self, x, x_nat, *, epsilon, pixel_range):
        """The point of the ball around `x_nat` and of the pixel range nearest to `x`."""
        x_nat = tf.cast(tf.cast(x_nat, tf.float32), x.dtype)
        delta = x - x_nat
        return x_nat + self.within(delta, epsilon, _room(delta, x_nat, pixel_range))

    def sample(self, draws, shape, epsilon):
        """A perturbation uniform in the ball: a unit direction (`_direction_law` normalized)
        times epsilon U^(1/n), n the number of coordinates of an example."""
        direction = self.normalized(self._direction_law(draws, shape))
        size = tf.cast(tf.reduce_prod(shape[1:]), direction.dtype)
        radius = epsilon * draws.uniform(shape[:1]) ** (1 / size)
        return direction * per_example(radius, direction)

    def _direction_law(self, draws, shape):
        """Draws whose direction is uniform on the unit sphere of this norm."""
        raise NotImplementedError

    def noise(self, rng, shape):
        """The start noise of APGD and FAB (float32): standard normal, as the reference draws
        it for L2 and L1."""
        return rng.standard_normal(shape).astype(np.float32)

    def noise_start(self, threat, x_nat, noise):
        """APGD's start from `noise`: `x_nat` plus the noise scaled to the sphere of radius
        epsilon, clipped to the pixel range."""
        return threat.start_on_sphere(x_nat, noise)


class LinfBall(Ball):
    name = "Linf"

    def norms(self, x):
        return tf.reduce_max(tf.abs(_flat(x)), axis=1)

    def dual_norms(self, x):
        return tf.reduce_sum(tf.abs(_flat(x)), axis=1)

    def direction(self, gradient):
        """The gradient's sign."""
        return tf.sign(gradient)

    def within(self, delta, epsilon, room=None):
        """`delta` clipped to +-epsilon (and to +-room)."""
        limit = tf.cast(epsilon, delta.dtype)
        if room is not None:
            limit = tf.minimum(limit, room)
        return tf.clip_by_value(delta, -limit, limit)

    def project(self, x, x_nat, *, epsilon, pixel_range):
        """`x` clipped to `x_nat` +- epsilon and the pixel range, the bounds in float32 as the
        original's numpy loop computes them beside its float64 iterate."""
        low, high = pixel_range
        x_nat, epsilon = tf.cast(x_nat, tf.float32), tf.cast(epsilon, tf.float32)
        lower = tf.maximum(tf.cast(x_nat - epsilon, x.dtype), low)
        upper = tf.minimum(tf.cast(x_nat + epsilon, x.dtype), high)
        return tf.clip_by_value(x, lower, upper)

    def sample(self, draws, shape, epsilon):
        """U(-epsilon, epsilon) per coordinate: the original's random start."""
        return draws.uniform(shape, -epsilon, epsilon)

    def noise(self, rng, shape):
        """U[-1, 1], as the reference draws it."""
        return rng.uniform(-1, 1, shape).astype(np.float32)


class L2Ball(Ball):
    name = "L2"

    def norms(self, x):
        return tf.sqrt(tf.reduce_sum(tf.square(_flat(x)), axis=1))

    dual_norms = norms

    def direction(self, gradient):
        """The gradient over its norm."""
        return self.normalized(gradient)

    def within(self, delta, epsilon, room=None):
        """`delta` rescaled to a norm of at most epsilon, then clipped to +-room: the
        reference's rule, not the exact projection onto the ball and the box together."""
        epsilon = tf.cast(epsilon, delta.dtype)
        length = per_example(self.norms(delta), delta)
        delta = delta * tf.minimum(epsilon, length) / (length + NORM_FLOOR)
        return delta if room is None else tf.clip_by_value(delta, -room, room)

    def project(self, x, x_nat, *, epsilon, pixel_range):
        """The perturbation rescaled to at most epsilon, then the point clipped to the pixel
        range."""
        x_nat = tf.cast(x_nat, x.dtype)
        return tf.clip_by_value(x_nat + self.within(x - x_nat, epsilon), *pixel_range)

    def _direction_law(self, draws, shape):
        return draws.normal(shape)


class L1Ball(Ball):
    name = "L1"

    def norms(self, x):
        return tf.reduce_sum(tf.abs(_flat(x)), axis=1)

    def dual_norms(self, x):
        return tf.reduce_max(tf.abs(_flat(x)), axis=1)

    def direction(self, gradient):
        """The gradient's sign on its largest L1_STEP_FRACTION of coordinates, of unit L1 size:
        the steepest L1 ascent moves one coordinate only, which the pixel range soon stops."""
        return sparse_direction(gradient, L1_STEP_FRACTION)

    def within(self, delta, epsilon, room=None):
        """The exact projection onto the L1 ball with each coordinate's size capped by `room`."""
        return l1_projection(delta, epsilon, room)

    def _direction_law(self, draws, shape):
        """Laplace variates (a difference of two exponentials): normalized, uniform on the L1
        sphere."""
        return -tf.math.log1p(-draws.uniform(shape)) + tf.math.log1p(-draws.uniform(shape))

    def noise_start(self, threat, x_nat, noise):
        """`x_nat` plus the noise, projected onto the ball and the pixel range (the reference's
        L1 start)."""
        return threat.project(x_nat + noise, x_nat)


BALLS = {ball.name: ball for ball in (LinfBall(), L2Ball(), L1Ball())}


def ball(norm):
    """The ball of the norm named `norm` ("Linf", "L2" or "L1")."""
    if norm not in BALLS:
        raise ValueError(f"Unknown norm: use one of {', '.join(BALLS)}. Received: norm={norm!r}")
    return BALLS[norm]


def sparse_direction(gradient, fraction):
    """Per example, the sign of `gradient` where its magnitude is among the largest `fraction`
    of coordinates (a scalar or one per example), divided by how many there are: a direction of
    unit L1 size. The cut is the reference's: the magnitude at sorted index (1 - fraction) n."""
    flat = _flat(gradient)
    size = tf.shape(flat)[1]
    magnitudes = tf.abs(flat)
    fraction = tf.cast(fraction, tf.float32) * tf.ones(tf.shape(flat)[:1])
    index = tf.cast(tf.clip_by_value((1 - fraction) * tf.cast(size, tf.float32), 0.0,
                                     tf.cast(size - 1, tf.float32)), tf.int32)
    cut = tf.gather(tf.sort(magnitudes, axis=1), index[:, None], batch_dims=1)
    signs = tf.sign(flat) * tf.cast(magnitudes >= cut, flat.dtype)
    signs /= tf.reduce_sum(tf.abs(signs), axis=1, keepdims=True) + 1e-10
    return tf.reshape(signs, tf.shape(gradient))


def l1_projection(delta, epsilon, room=None):
    """The Euclidean projection of the perturbations `delta` (batch first) onto
    {d : |d|_1 <= epsilon, |d_i| <= room_i} (room None: no cap), computed in float64.

    The projection keeps each coordinate's sign and shrinks its size to
    clip(|delta_i| - lam, 0, cap_i), cap_i = min(|delta_i|, room_i), with the smallest lam >= 0
    that fits the ball: 0 where the capped sizes already fit, found by `_l1_threshold` for the
    other examples only (its sort costs more than the rest of an L1 Square query).
    """
    flat = tf.cast(_flat(delta), tf.float64)
    size = tf.abs(flat)
    cap = size if room is None else tf.minimum(size, tf.cast(_flat(room), tf.float64))
    # A Python float straight to float64 (tf.cast would round it to float32 first).
    epsilon = tf.cast(epsilon, tf.float64) if tf.is_tensor(epsilon) else tf.constant(
        epsilon, tf.float64)
    total = tf.reduce_sum(cap, axis=1, keepdims=True)
    epsilon = tf.broadcast_to(tf.reshape(epsilon, [-1, 1]), tf.shape(total))
    over = tf.where(total[:, 0] > epsilon[:, 0])
    lam = tf.scatter_nd(over, _l1_threshold(tf.gather_nd(size, over), tf.gather_nd(cap, over),
                                            tf.gather_nd(epsilon, over)),
                        tf.shape(total, out_type=tf.int64))
    projected = tf.sign(flat) * tf.clip_by_value(size - lam, 0.0, cap)
    return tf.reshape(tf.cast(projected, delta.dtype), tf.shape(delta))


def _l1_threshold(size, cap, epsilon):
    """Per row whose capped sizes exceed `epsilon`, the lam of l1_projection. The total size is
    piecewise linear and decreasing in lam, with breakpoints |delta_i| - cap_i (coordinate i
    starts to shrink) and |delta_i| (it reaches 0): its values at the sorted breakpoints come
    from cumulative sums, and lam from the segment where the total crosses epsilon."""
    breakpoints = tf.concat([size - cap, size], axis=1)
    order = tf.argsort(breakpoints, axis=1)
    ranked = tf.gather(breakpoints, order, batch_dims=1)
    change = tf.gather(tf.concat([tf.ones_like(size), -tf.ones_like(size)], axis=1), order,
                       batch_dims=1)
    shrinking = tf.math.cumsum(change, axis=1)  # coordinates shrinking after each breakpoint
    total = tf.reduce_sum(cap, axis=1, keepdims=True)
    fall = tf.math.cumsum(shrinking[:, :-1] * (ranked[:, 1:] - ranked[:, :-1]), axis=1)
    totals = total - tf.concat([tf.zeros_like(total), fall], axis=1)
    last_above = tf.maximum(tf.reduce_sum(tf.cast(totals > epsilon, tf.int32), axis=1) - 1, 0)
    start = tf.gather(ranked, last_above[:, None], batch_dims=1)
    return start + (tf.gather(totals, last_above[:, None], batch_dims=1) - epsilon) / tf.maximum(
        tf.gather(shrinking, last_above[:, None], batch_dims=1), 1.0)


class HostDraws:
    """Uniform and normal variates from the numpy generator `rng`, as float64 tensors."""

    def __init__(self, rng):
        self.rng = rng

    def uniform(self, shape, low=0.0, high=1.0):
        return tf.constant(self.rng.uniform(low, high, _sizes(shape)))

    def normal(self, shape):
        return tf.constant(self.rng.normal(size=_sizes(shape)))


class GraphDraws:
    """Uniform and normal variates drawn inside a graph from a stateless `seed` (two integers),
    the k-th draw from seed + k."""

    def __init__(self, seed, dtype):
        self.seed, self.dtype, self.count = seed, dtype, 0

    def _next_seed(self):
        self.count += 1
        return self.seed + (self.count - 1)

    def uniform(self, shape, low=0.0, high=1.0):
        return tf.random.stateless_uniform(shape, self._next_seed(), low, high, self.dtype)

    def normal(self, shape):
        return tf.random.stateless_normal(shape, self._next_seed(), dtype=self.dtype)


def _sizes(shape):
    return tuple(int(size) for size in np.asarray(shape))


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """Perturbations of at most `epsilon` in `norm` ("Linf", "L2" or "L1"), within
    `pixel_range`."""

    epsilon: float
    norm: str = "Linf"
    pixel_range: tuple = (0.0, 1.0)

    def __post_init__(self):
        ball(self.norm)
        low, high = (float(bound) for bound in self.pixel_range)
        if not low < high:
            raise ValueError(f"pixel_range must rise. Received: pixel_range={self.pixel_range}")
        object.__setattr__(self, "pixel_range", (low, high))
        if isinstance(self.epsilon, (int, float, np.floating, np.integer)):  # not a ramp's tensor
            if not self.epsilon >= 0:
                raise ValueError(f"epsilon must be at least 0. Received: epsilon={self.epsilon}")
            object.__setattr__(self, "epsilon", float(self.epsilon))

    @property
    def ball(self):
        return BALLS[self.norm]

    def scaled(self, factor):
        """The same threat model with epsilon times `factor` (a float or a scalar tensor,
        float32 as training's epsilon ramp or float64 as PGD.scaled)."""
        return dataclasses.replace(self, epsilon=self.epsilon * factor)

    def norms(self, x):
        """Per example, the norm of `x` (any shape with the batch first)."""
        return self.ball.norms(x)

    def normalized(self, x):
        """`x` divided per example by its norm."""
        return self.ball.normalized(x)

    def step(self, x, gradient, step_size):
        """`x` moved by `step_size` along the ball's steepest-ascent direction of `gradient`,
        computed in the gradient's dtype and added in `x`'s (PGD keeps a float64 iterate, as the
        original's numpy loop)."""
        direction = self.ball.direction(gradient)
        return x + tf.cast(_scale(step_size, gradient) * direction, x.dtype)

    def within_ball(self, delta):
        """The perturbation `delta` brought back into the ball (not the pixel range)."""
        return self.ball.within(delta, self.epsilon)

    def project(self, x, x_nat):
        """The point of the ball around `x_nat` and of the pixel range nearest to `x` (in L2:
        the perturbation rescaled to at most epsilon, then clipped to the pixel range)."""
        return self.ball.project(x, x_nat, epsilon=self.epsilon, pixel_range=self.pixel_range)

    def uniform_start(self, x_nat, rng):
        """PGD's random start, drawn on the host in float64 from the numpy generator `rng`: a
        point uniform in the ball (for L-infinity the original's `x_nat + U(-epsilon,
        epsilon)`), clipped to the pixel range."""
        x_nat = np.asarray(x_nat, dtype=np.float32).astype(np.float64)
        noise = np.asarray(self.ball.sample(HostDraws(rng), x_nat.shape, self.epsilon))
        return np.clip(x_nat + noise, *self.pixel_range)

    def random_start(self, x_nat, seed, dtype=tf.float64):
        """`uniform_start`'s distribution drawn inside a graph, from a stateless `seed` (two
        integers): the start of training through `fit`, where no host generator can run."""
        x_nat = tf.cast(tf.cast(x_nat, tf.float32), dtype)
        noise = self.ball.sample(GraphDraws(seed, dtype), tf.shape(x_nat), self.epsilon)
        return tf.clip_by_value(x_nat + noise, *self.pixel_range)

    def noise(self, rng, shape):
        """APGD's and FAB's start noise, drawn from the numpy generator `rng`."""
        return self.ball.noise(rng, shape)

    def noise_start(self, x_nat, noise):
        """APGD's start from `noise` (drawn by `noise`)."""
        return self.ball.noise_start(self, x_nat, noise)

    def start_on_sphere(self, x_nat, noise, radius=1.0):
        """`x_nat` plus `noise` scaled to norm `radius` x epsilon, clipped to the pixel range:
        APGD's start in L-infinity and L2, and FAB's (radius 0.5)."""
        epsilon = tf.cast(self.epsilon, noise.dtype)
        return tf.clip_by_value(x_nat + _scale(radius, noise) * epsilon
                                * self.normalized(noise), *self.pixel_range)
