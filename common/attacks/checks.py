"""The checks every attack makes on what it is given, before any work: inputs within the pixel
range, labels that are integer class indices of the model's classes, one per input, and a model
that returns logits. A mistake there would otherwise pass silently (images in [0, 255] against
the default range give perturbations of 254) or end in a graph dump."""

import numbers

import numpy as np

# A model whose outputs are non-negative and sum to 1 within this returns probabilities.
PROBABILITY_TOLERANCE = 1e-4


def check_keywords(**values):
    """Refuses numbers out of their range: `epsilon` below 0, `steps`, `restarts` and the like
    below their least value, and anything but a number; each keyword maps to (value, least
    value)."""
    for name, (value, least) in values.items():
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number. Received: {name}={value!r}")
        if not value >= least:
            raise ValueError(f"{name} must be at least {least}. Received: {name}={value!r}")


def check_inputs(x, pixel_range):
    """`x` as a float32 array, refused where any value is not finite or outside `pixel_range`."""
    x = np.asarray(x, np.float32)
    if not x.size:
        raise ValueError(f"x holds no example. Received: x with shape {x.shape}")
    bad = np.count_nonzero(~np.isfinite(x))
    if bad:
        raise ValueError(f"x must be finite. Received: x with {bad} NaN or infinite values")
    low, high = pixel_range
    if x.min() < low or x.max() > high:
        raise ValueError(f"x must lie within pixel_range=({low:g}, {high:g}): scale the inputs "
                         f"or give their pixel_range. Received: x with values from "
                         f"{x.min():g} to {x.max():g}")
    return x


def check_labels(y, examples):
    """`y` as an int64 vector of `examples` labels, refused where it is anything else (one-hot
    rows, floats, another count)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a vector of class indices (one-hot labels: take their "
                         f"argmax). Received: y with shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class indices. Received: y of dtype {y.dtype}")
    if len(y) != examples:
        raise ValueError(f"y must hold one label per example of x ({examples}). Received: y "
                         f"with {len(y)} labels")
    return y.astype(np.int64)


def check_logits(logits):
    """The number of classes of a model whose outputs are `logits`, refused where they are not
    a vector of at least 2 logits per example, or are probabilities."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"the model must return a vector of logits per example, of 2 classes "
                         f"or more. Received: outputs of shape {logits.shape[1:]} per example")
    if np.all(logits >= 0) and np.allclose(logits.sum(axis=1), 1, atol=PROBABILITY_TOLERANCE):
        raise ValueError("the model must return logits, not probabilities (remove its final "
                         "softmax). Received: outputs that are non-negative and sum to 1")
    return logits.shape[1]


def check_classes(y, classes):
    """Refuses labels that are not classes of a model of `classes` classes."""
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"y must be class indices from 0 to {classes - 1}, the model's classes. "
                         f"Received: y with labels from {y.min()} to {y.max()}")


def checked_with_model(x, y, *, pixel_range, logits_of):
    """(x as float32, y as int64, the model's logits of x), checked as above; `logits_of(x)`
    gives the logits."""
    x = check_inputs(x, pixel_range)
    y = check_labels(y, len(x))
    logits = logits_of(x)
    check_classes(y, check_logits(logits))
    return x, y, logits
