"""Learning-rate schedules of the config files."""

import keras


def piecewise_constant(step_size_schedule):
    """TF1's piecewise_constant on the global step from `[[0, rate0], [boundary1, rate1], ...]`:
    the old rate holds at a boundary."""
    boundaries = [step for step, _ in step_size_schedule[1:]]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [rate for _, rate in step_size_schedule])
