"""The threat model every attack shares: a ball of radius `epsilon` in the L-infinity or L2 norm
around the clean input, intersected with the pixel range. It says how far a point is, how a
gradient becomes a step, how a point is projected back, and where a random start lies.

The L2 rules are those of the AutoAttack reference implementation (fra31/auto-attack): a step
moves along the gradient divided by its norm, and a projection rescales the perturbation to at
most epsilon, then clips to the pixel range.
"""

import dataclasses

import numpy as np
import tensorflow as tf

NORMS = ("Linf", "L2")
NORM_FLOOR = 1e-12  # added to a norm before dividing by it, as the reference does


def per_example(values, like):
    """One value per example, shaped to broadcast against `like`."""
    return tf.reshape(values, (-1,) + (1,) * (len(like.shape) - 1))


def _flat(x):
    return tf.reshape(x, (tf.shape(x)[0], -1))


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """Perturbations of at most `epsilon` in `norm` ("Linf" or "L2"), within `pixel_range`."""

    epsilon: float
    norm: str = "Linf"
    pixel_range: tuple = (0.0, 1.0)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: use one of {', '.join(NORMS)}")
        low, high = (float(bound) for bound in self.pixel_range)
        if not low < high:
            raise ValueError(f"pixel_range must rise, got {self.pixel_range}")
        object.__setattr__(self, "pixel_range", (low, high))
        if isinstance(self.epsilon, (int, float, np.floating, np.integer)):  # not a ramp's tensor
            if not self.epsilon >= 0:
                raise ValueError(f"epsilon must be at least 0, got {self.epsilon}")
            object.__setattr__(self, "epsilon", float(self.epsilon))

    def scaled(self, factor):
        """The same threat model with epsilon times `factor` (a float or a scalar tensor)."""
        return dataclasses.replace(self, epsilon=self.epsilon * factor)

    def norms(self, x):
        """Per example, the norm of `x` (any shape with the batch first)."""
        if self.norm == "Linf":
            return tf.reduce_max(tf.abs(_flat(x)), axis=1)
        return tf.sqrt(tf.reduce_sum(tf.square(_flat(x)), axis=1))

    def normalized(self, x):
        """`x` divided per example by its norm: the unit direction a step or start takes."""
        return x / (per_example(self.norms(x), x) + NORM_FLOOR)

    def direction(self, gradient):
        """The steepest-ascent direction of unit size: the gradient's sign (L-infinity) or the
        gradient over its norm (L2)."""
        if self.norm == "Linf":
            return tf.sign(gradient)
        return self.normalized(gradient)

    def step(self, x, gradient, step_size):
        """`x` moved by `step_size` along `direction(gradient)`, computed in the gradient's dtype
        and added in `x`'s (PGD keeps a float64 iterate, as the original's numpy loop)."""
        return x + tf.cast(_scale(step_size, gradient) * self.direction(gradient), x.dtype)

    def within_ball(self, delta):
        """The perturbation `delta` brought back into the ball: clipped to +-epsilon
        (L-infinity) or rescaled to a norm of at most epsilon (L2)."""
        epsilon = tf.cast(self.epsilon, delta.dtype)
        if self.norm == "Linf":
            return tf.clip_by_value(delta, -epsilon, epsilon)
        length = per_example(self.norms(delta), delta)
        return delta * tf.minimum(epsilon, length) / (length + NORM_FLOOR)

    def project(self, x, x_nat):
        """The point of the ball around `x_nat` and of the pixel range nearest to `x` (for L2:
        the perturbation rescaled to at most epsilon, then clipped to the pixel range)."""
        low, high = self.pixel_range
        if self.norm == "Linf":
            x_nat = tf.cast(x_nat, tf.float32)
            lower = tf.maximum(tf.cast(x_nat - self.epsilon, x.dtype), low)
            upper = tf.minimum(tf.cast(x_nat + self.epsilon, x.dtype), high)
            return tf.clip_by_value(x, lower, upper)
        x_nat = tf.cast(x_nat, x.dtype)
        return tf.clip_by_value(x_nat + self.within_ball(x - x_nat), low, high)

    def uniform_start(self, x_nat, rng):
        """PGD's random start, drawn on the host in float64 from the numpy generator `rng`: for
        L-infinity the original's `x_nat + U(-epsilon, epsilon)`, for L2 a point uniform in the
        ball; clipped to the pixel range."""
        x_nat = np.asarray(x_nat, dtype=np.float32).astype(np.float64)
        if self.norm == "Linf":
            noise = rng.uniform(-self.epsilon, self.epsilon, x_nat.shape)
        else:
            direction = rng.normal(size=x_nat.shape).reshape(len(x_nat), -1)
            direction /= np.linalg.norm(direction, axis=1, keepdims=True) + NORM_FLOOR
            radius = self.epsilon * rng.uniform(size=(len(x_nat), 1)) ** (1 / direction.shape[1])
            noise = (direction * radius).reshape(x_nat.shape)
        return np.clip(x_nat + noise, *self.pixel_range)

    def random_start(self, x_nat, seed, dtype=tf.float64):
        """`uniform_start`'s distribution drawn inside a graph, from a stateless `seed` (two
        integers): the start of training through `fit`, where no host generator can run."""
        x_nat = tf.cast(tf.cast(x_nat, tf.float32), dtype)
        if self.norm == "Linf":
            noise = tf.random.stateless_uniform(tf.shape(x_nat), seed, -self.epsilon,
                                                self.epsilon, dtype)
        else:
            direction = self.normalized(tf.random.stateless_normal(tf.shape(x_nat), seed,
                                                                   dtype=dtype))
            size = tf.cast(tf.reduce_prod(tf.shape(x_nat)[1:]), dtype)
            radius = self.epsilon * tf.random.stateless_uniform(
                tf.shape(x_nat)[:1], seed + 1, dtype=dtype) ** (1 / size)
            noise = direction * per_example(radius, direction)
        return tf.clip_by_value(x_nat + noise, *self.pixel_range)

    def start_on_sphere(self, x_nat, noise, radius=1.0):
        """`x_nat` plus `noise` scaled to norm `radius` x epsilon, clipped to the pixel range:
        APGD's start (noise U[-1, 1] for L-infinity, normal for L2) and FAB's (radius 0.5)."""
        return tf.clip_by_value(x_nat + _scale(radius, noise) * self.epsilon
                                * self.normalized(noise), *self.pixel_range)


def _scale(value, like):
    """A scalar or one value per example, ready to multiply `like`."""
    value = tf.cast(value, like.dtype)
    return value if value.shape.rank == 0 else per_example(value, like)
