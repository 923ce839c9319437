"""Checking a submitted `attack.npy`, the original's checks in the original's order.

A submission is untrusted input: it is read without pickle, and each failed check raises a
UserError whose one line names what is wrong. The original let NaN through (NaN passes every
comparison); here NaN and infinity are refused.
"""

import os

import numpy as np
import tensorflow as tf

from common.batching import batch_bounds
from common.errors import UserError

TOLERANCE = 1e-4


def load_submission(path):
    """The array in a `.npy` file, never unpickling anything."""
    if not os.path.isfile(path):
        raise UserError(f"submission {path} is not a file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"submission {path} is not a readable .npy array: {error}") from error


def check_submission(x_adv, x_nat, epsilon, pixel_range, shape_text):
    """Raises UserError unless `x_adv` is a valid attack on `x_nat`; returns it as float32.

    `shape_text` is how the original printed the expected shape.
    """
    if x_adv.shape != x_nat.shape:
        raise UserError(f"Invalid shape: expected {shape_text}, found {x_adv.shape}")
    if not (np.issubdtype(x_adv.dtype, np.floating) or np.issubdtype(x_adv.dtype, np.integer)):
        raise UserError(f"Invalid data type: expected real numbers, found {x_adv.dtype}")
    low, high = pixel_range
    x_min, x_max = np.nanmin(x_adv), np.nanmax(x_adv)
    if x_max > high + TOLERANCE or x_min < low - TOLERANCE:
        raise UserError(f"Invalid pixel range. Expected [{low:g}, {high:g}], "
                        f"found [{x_min}, {x_max}]")
    not_finite = ~np.isfinite(x_adv)
    if not_finite.any():
        first = tuple(int(i) for i in np.unravel_index(np.argmax(not_finite), x_adv.shape))
        raise UserError(f"Invalid pixel value: {x_adv[first]} at index {first}")
    distance = np.max(np.abs(x_adv.astype(np.float64) - x_nat))
    if distance > epsilon + TOLERANCE:
        raise UserError(f"maximum perturbation found: {distance}\n"
                        f"maximum perturbation allowed: {epsilon}")
    return x_adv.astype(np.float32)


def score(model, x_adv, labels, batch_size):
    """Accuracy of the model on the submission and its predicted labels (int64, as `pred.npy`)."""
    predict = tf.function(lambda x: tf.argmax(model(x, training=False), axis=1),
                          reduce_retracing=True)
    predictions = np.concatenate([predict(x_adv[first:end]).numpy()
                                  for first, end in batch_bounds(len(x_adv), batch_size)])
    return np.mean(predictions == labels), predictions


def report_score(accuracy, predictions):
    """The original's last lines: the accuracy, and the predictions in ./pred.npy."""
    print(f"Accuracy: {100.0 * accuracy:.2f}%")
    np.save("pred.npy", predictions)
    print("Output saved at pred.npy")
