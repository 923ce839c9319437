"""The random streams drawn from a config's seed, named in one place.

Each stream is a numpy generator seeded with `[seed, stream, index...]`, so every batch order,
random start and augmentation is a function of the seed and the step alone: a resumed run draws
what an uninterrupted one drew, and each stream is independent of the others.
"""

import numpy as np

DATA_ORDER = 0
TRAINING_STARTS = 1
AUGMENTATION = 2
ATTACK_STARTS = 3
APGD_STARTS = 4
FAB_STARTS = 5
SQUARE = 6
GUARD = 7
LANDSCAPE = 8
ALIGNMENT = 9  # GradAlign's points, folded into a stateless seed inside the step


def generator(seed, stream, *index):
    """The numpy generator of `stream` (at `index`, e.g. a step or an epoch) for `seed`."""
    return np.random.default_rng([seed, stream, *index])
