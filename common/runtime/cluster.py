"""An evaluation over the workers of a cluster (`TF_CONFIG`, MultiWorkerMirroredStrategy).

Every worker runs the same command on the same data and takes the same decisions; each attack's
calls are spread over all replicas by `devices.Spread`, which hands every worker the whole
result. What this module adds: the chief alone prints and writes, every worker checks that it
resumes from the same state as the others, and a worker that dies or hangs stops the job with
one line on every survivor instead of holding it.
"""

import contextlib
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from common.runtime import devices
from common.runtime.errors import UserError

# What a collective raises on the survivors when a worker died, hung past the timeout, or the
# strategy's health check aborted the collectives.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                      tf.errors.CancelledError, tf.errors.AbortedError)


class WorkerLost(UserError):
    """A worker of the cluster stopped answering during an evaluation."""


@contextlib.contextmanager
def stops_on_lost_worker(strategy):
    """Turns the error a collective raises when another worker is gone into a WorkerLost line,
    for `strategy` spanning several workers; anything else passes as it is."""
    try:
        yield
    except LOST_WORKER_ERRORS as error:
        if not devices.spans_workers(strategy):
            raise
        raise WorkerLost(
            f"a worker of the cluster stopped or stopped answering ({type(error).__name__}); "
            "the job stops. Run the same command again on every worker: it resumes from the "
            "chief's state file") from error


@contextlib.contextmanager
def chief_output(strategy):
    """What is printed inside (lines and progress bars, on stdout and stderr) shows on the chief
    only: the other workers would print the same. An error raised inside still shows on every
    worker, once the block is left."""
    if devices.is_chief(strategy):
        yield
        return
    with open(os.devnull, "w") as nothing, contextlib.redirect_stdout(nothing), \
            contextlib.redirect_stderr(nothing):
        yield


@contextlib.contextmanager
def output_folder(strategy, folder):
    """`folder` on the chief; on the other workers a private temporary folder, removed at the end,
    for what they would write as the chief does (saving may take part in collectives)."""
    if devices.is_chief(strategy):
        yield folder
        return
    private = tempfile.mkdtemp(prefix="madry-worker-")
    try:
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


def values_of_workers(strategy, values):
    """Each replica's `values` (integers, the same on the replicas of one worker), one row per
    replica of the cluster, as every worker sees them. Every worker must call it at the same
    point."""
    local = tf.constant(np.asarray(values, np.int64).reshape(1, -1))
    distributed = strategy.experimental_distribute_values_from_function(lambda context: local)
    return tf.function(lambda value: strategy.gather(value, axis=0))(distributed).numpy()


def check_same_state(strategy, values, *, path):
    """Raises UserError where the workers of `strategy` resume from different states (`values`,
    integers that sum a state up, such as the attacks and batches done) read at `path`; a
    strategy within one worker needs no check."""
    if not devices.spans_workers(strategy):
        return
    rows = values_of_workers(strategy, values)
    if (rows != rows[:1]).any():
        raise UserError(f"the workers found different states at {path} (per worker: "
                        f"{rows.tolist()}): keep the output folder on storage every worker "
                        "reads, and run the same command on every worker")

