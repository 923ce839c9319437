"""Checking a submitted `attack.npy`: untrusted input, read header first and never unpickled.

The `.npy` header is parsed and checked (type, shape, size of the data) before any data is read,
so a header that declares terabytes or Python objects costs nothing. Then come the original's
checks in the original's order (shape, pixel range, perturbation), plus NaN and infinity, which
the original let through. Each failed check raises a UserError whose one line names what is
wrong and, for values, the first offending index and value.
"""

import os

import numpy as np
import tensorflow as tf

from common.io.files import written_in_place
from common.runtime import devices
from common.runtime.batching import batch_bounds
from common.runtime.errors import UserError

TOLERANCE = 1e-4
# numpy's own bound on a header's length; a longer one is refused unparsed.
MAX_HEADER_BYTES = 10000


PREDICTIONS_PATH = "pred.npy"  # in the current folder, as the original

def _read_header(submission, path):
    """(shape, fortran_order, dtype) from an open `.npy` file's header."""
    try:
        version = np.lib.format.read_magic(submission)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version}")
        return read_header(submission, max_header_size=MAX_HEADER_BYTES)
    except Exception as error:  # numpy's header parser raises many kinds on crafted input
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"submission {path} is not a valid .npy file: {reason}") from error


def _check_dtype(dtype, path):
    if dtype.hasobject:
        raise UserError(f"submission {path} holds Python objects (it would need pickle): "
                        "refused")
    # timedelta64 counts as an integer type to numpy; only kinds f, i, u are real numbers.
    if dtype.fields is not None or dtype.kind not in "fiu":
        raise UserError(f"Invalid data type: expected real numbers, found {dtype}")


def _check_shape(found, expected, shape_text):
    if tuple(found) != tuple(expected):
        raise UserError(f"Invalid shape: expected {shape_text}, found {tuple(found)}")


def load_submission(path, shape, shape_text):
    """The array of shape `shape` stored in the `.npy` file at `path`, as float64.

    `shape_text` is how the original printed the expected shape. Any real float or integer type,
    byte order and memory order is accepted.
    """
    if not os.path.exists(path):
        raise UserError(f"submission {path} does not exist")
    if not os.path.isfile(path):
        raise UserError(f"submission {path} is not a file")
    with open(path, "rb") as submission:
        size = os.fstat(submission.fileno()).st_size
        if size == 0:
            raise UserError(f"submission {path} is empty")
        found_shape, fortran_order, dtype = _read_header(submission, path)
        _check_dtype(dtype, path)
        _check_shape(found_shape, shape, shape_text)
        expected_bytes = int(np.prod(shape)) * dtype.itemsize
        data_bytes = size - submission.tell()
        if data_bytes != expected_bytes:
            problem = "truncated" if data_bytes < expected_bytes else "longer than its array"
            raise UserError(f"submission {path} is {problem}: its header needs {expected_bytes} "
                            f"bytes of data, the file holds {data_bytes}")
        data = np.frombuffer(submission.read(expected_bytes), dtype=dtype)
    return data.reshape(shape, order="F" if fortran_order else "C").astype(np.float64)


def _first(mask):
    return tuple(int(i) for i in np.unravel_index(np.argmax(mask), mask.shape))


def check_submission(x_adv, x_nat, epsilon, pixel_range):
    """Raises UserError unless `x_adv` (float64) is a valid attack on `x_nat`; returns it as
    float32, the type the model is scored on."""
    low, high = pixel_range
    outside = (x_adv < low - TOLERANCE) | (x_adv > high + TOLERANCE)
    if outside.any():
        first = _first(outside)
        raise UserError(f"Invalid pixel range. Expected [{low:g}, {high:g}], found "
                        f"[{np.nanmin(x_adv)}, {np.nanmax(x_adv)}]; the first is "
                        f"{x_adv[first]} at index {first}")
    not_a_number = np.isnan(x_adv)
    if not_a_number.any():
        first = _first(not_a_number)
        raise UserError(f"Invalid pixel value: {x_adv[first]} at index {first}")
    distance = np.abs(x_adv - x_nat)
    too_far = distance > epsilon + TOLERANCE
    if too_far.any():
        first = _first(too_far)
        raise UserError(f"maximum perturbation found: {np.max(distance)}, maximum perturbation "
                        f"allowed: {epsilon}; the first is {x_adv[first]} at index {first}, "
                        f"{distance[first]} from the test image")
    return x_adv.astype(np.float32)


def load_and_check(path, x_nat, epsilon, pixel_range, shape_text):
    """The submission at `path`, checked against the test images `x_nat`, as float32."""
    x_adv = load_submission(path, x_nat.shape, shape_text)
    return check_submission(x_adv, x_nat.astype(np.float64), epsilon, pixel_range)


def check_array(x_adv, x_nat, epsilon, pixel_range, shape_text):
    """An attack given as an array (the original `run_attack` function's argument), checked as
    a submitted file is, as float32."""
    x_adv = np.asarray(x_adv)
    _check_dtype(x_adv.dtype, "array")
    _check_shape(x_adv.shape, x_nat.shape, shape_text)
    return check_submission(x_adv.astype(np.float64), x_nat.astype(np.float64), epsilon,
                            pixel_range)


def score(model, x_adv, labels, batch_size, strategy=None):
    """Accuracy of the model on the submission and its predicted labels (int64, as `pred.npy`),
    each batch spread over the replicas of `strategy` (a local MirroredStrategy: every GPU)."""
    predict = devices.Spread(strategy, lambda x: tf.argmax(devices.call_model(model, x), axis=1))
    predictions = np.concatenate([predict(x_adv[first:end])
                                  for first, end in batch_bounds(len(x_adv), batch_size)])
    return np.mean(predictions == labels), predictions


def report_score(accuracy, predictions):
    """The original's last lines: the accuracy, and the predictions in ./pred.npy."""
    print(f"Accuracy: {100.0 * accuracy:.2f}%")
    with written_in_place(PREDICTIONS_PATH) as target:
        np.save(target, predictions)
    print(f"Output saved at {PREDICTIONS_PATH}")
