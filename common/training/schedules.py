"""Learning-rate schedules of the config files, both read from `step_size_schedule`, a list of
`[step, rate]` pairs starting at step 0, on the optimizer's step count (its updates so far)."""

import keras
import tensorflow as tf

SHAPES = ("piecewise_constant", "piecewise_linear")


def piecewise_constant(step_size_schedule):
    """TF1's piecewise_constant on the global step from `[[0, rate0], [boundary1, rate1], ...]`:
    the old rate holds at a boundary. One pair is a constant rate."""
    if len(step_size_schedule) == 1:
        return step_size_schedule[0][1]
    boundaries = [step for step, _ in step_size_schedule[1:]]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [rate for _, rate in step_size_schedule])


class PiecewiseLinear(keras.optimizers.schedules.LearningRateSchedule):
    """The rate interpolated linearly between the pairs, holding the last rate after the last
    pair: `[[0, 0], [400, 1e-3], [1000, 0]]` is the cyclic schedule of Wong et al. (2020)."""

    def __init__(self, step_size_schedule):
        self.step_size_schedule = [list(pair) for pair in step_size_schedule]

    def __call__(self, step):
        steps = tf.constant([float(step) for step, _ in self.step_size_schedule], tf.float32)
        rates = tf.constant([float(rate) for _, rate in self.step_size_schedule], tf.float32)
        step = tf.cast(step, tf.float32)
        last = len(self.step_size_schedule) - 1
        if last == 0:
            return rates[0]
        segment = tf.clip_by_value(tf.searchsorted(steps, [step], side="right")[0] - 1, 0,
                                   last - 1)
        start, end = steps[segment], steps[segment + 1]
        fraction = tf.clip_by_value((step - start) / (end - start), 0.0, 1.0)
        return rates[segment] + fraction * (rates[segment + 1] - rates[segment])

    def get_config(self):
        return {"step_size_schedule": self.step_size_schedule}


def learning_rate(shape, step_size_schedule):
    """The learning rate of `step_size_schedule` read as `shape` (one of SHAPES) says."""
    if shape == "piecewise_linear":
        return PiecewiseLinear(step_size_schedule)
    return piecewise_constant(step_size_schedule)
