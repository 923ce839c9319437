"""Evaluation of checkpoints: natural and adversarial accuracy and average losses.

`eval_loop` is the original's endless loop, polling `model_dir` every 10 seconds and evaluating
each new checkpoint, with its printed lines and its summaries in `model_dir/eval`; `once`
evaluates the newest checkpoint and returns.
"""

import functools
import os
import sys
import time
from datetime import datetime

import numpy as np
import tensorflow as tf
import tqdm

from common.io import checkpoints
from common.runtime import devices
from common.runtime.batching import batch_bounds
from common.runtime.errors import UserError

POLL_SECONDS = 10


def _xent_and_correct(model, x, labels):
    logits = model(x, training=False)
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return xent, tf.equal(tf.argmax(logits, axis=1), labels)


@functools.cache
def scoring_function(model, strategy):
    """Per-example cross-entropy and correctness of `model`, spread over `strategy`'s replicas;
    traced once per model, for any batch size and every new checkpoint."""
    return devices.Spread(strategy, lambda x, y: _xent_and_correct(model, x, y))


def evaluate(model, attack, images, labels, num_examples, batch_size):
    """Accuracy and average cross-entropy of the model on the first `num_examples`, natural and
    under `attack`."""
    score = scoring_function(model, attack.strategy)
    totals = np.zeros(4)
    for first, end in tqdm.tqdm(batch_bounds(num_examples, batch_size), desc="evaluating",
                                unit="batch", leave=False):
        x_batch, y_batch = images[first:end], labels[first:end]
        x_adv = attack.perturb(x_batch, y_batch).astype(np.float32)
        xent_nat, correct_nat = score(x_batch, y_batch)
        xent_adv, correct_adv = score(x_adv, y_batch)
        totals += [np.sum(xent_nat, dtype=np.float64), np.sum(xent_adv, dtype=np.float64),
                   np.sum(correct_nat), np.sum(correct_adv)]
    avg_xent_nat, avg_xent_adv, acc_nat, acc_adv = totals / num_examples
    return {"avg_xent_nat": avg_xent_nat, "avg_xent_adv": avg_xent_adv,
            "acc_nat": acc_nat, "acc_adv": acc_adv}


def _write_results(writer, step, results):
    with writer.as_default(step=step):
        tf.summary.scalar("xent adv eval", results["avg_xent_adv"])
        tf.summary.scalar("xent adv", results["avg_xent_adv"])
        tf.summary.scalar("xent nat", results["avg_xent_nat"])
        tf.summary.scalar("accuracy adv eval", results["acc_adv"])
        tf.summary.scalar("accuracy adv", results["acc_adv"])
        tf.summary.scalar("accuracy nat", results["acc_nat"])
    writer.flush()


def _print_results(results):
    print(f"natural: {100 * results['acc_nat']:.2f}%")
    print(f"adversarial: {100 * results['acc_adv']:.2f}%")
    print(f"avg nat loss: {results['avg_xent_nat']:.4f}")
    print(f"avg adv loss: {results['avg_xent_adv']:.4f}")


def _say(text):
    print(text, end="")
    sys.stdout.flush()


def _evaluate_checkpoint(path, writer, load_checkpoint, run_evaluation):
    _say(f"\nCheckpoint {path}, evaluating ...   ({datetime.now()})\n")
    step = checkpoints.global_step_of(path)
    load_checkpoint(path)
    results = run_evaluation()
    _write_results(writer, step, results)
    _print_results(results)
    return results


def _evaluate_newest(model_dir, writer, load_checkpoint, run_evaluation, skip, newest):
    """Evaluates the newest checkpoint unless it is `skip`; returns its path (None if none).

    A checkpoint that the trainer's rotation removes before it is loaded is passed over for the
    next newest; one that stays the newest and cannot be read raises CheckpointUnreadable.
    """
    while True:
        path = newest(model_dir)
        if path is None or path == skip:
            return path
        try:
            _evaluate_checkpoint(path, writer, load_checkpoint, run_evaluation)
            return path
        except checkpoints.CheckpointUnreadable:
            if newest(model_dir) == path:
                raise
            _say(f"Checkpoint {path} was removed while being read, moving to the newest\n")


def eval_loop(model_dir, load_checkpoint, run_evaluation, once=False, summary_dir=None,
              newest=checkpoints.latest_checkpoint):
    """Evaluates each new checkpoint of `model_dir` as it appears (with `once`, the newest only).

    `load_checkpoint(path)` loads the weights; `run_evaluation()` returns `evaluate`'s results.
    The endless loop outlives checkpoints removed by rotation or unreadable: it says so and waits.

    Args:
        summary_dir: where the summaries go (by default `model_dir/eval`).
        newest: gives the newest checkpoint of a folder (over a cluster, the chief's choice, so
            that every worker evaluates the same one).
    """
    writer = tf.summary.create_file_writer(summary_dir or os.path.join(model_dir, "eval"))
    if once:
        if _evaluate_newest(model_dir, writer, load_checkpoint, run_evaluation, None,
                            newest) is None:
            raise UserError(f"No checkpoint found in {model_dir}")
        return
    last_checkpoint = None
    waiting = False
    while True:
        try:
            path = _evaluate_newest(model_dir, writer, load_checkpoint, run_evaluation,
                                    last_checkpoint, newest)
        except checkpoints.CheckpointUnreadable as error:
            _say(f"{error}; waiting for the next checkpoint\n")
            path = newest(model_dir)
        if path != last_checkpoint:
            last_checkpoint, waiting = path, False
            continue
        if waiting:
            _say(".")
        elif path is None:
            _say("No checkpoint yet, waiting ...")
        else:
            _say(f"Waiting for the next checkpoint ...   ({datetime.now()})   ")
        waiting = True
        time.sleep(POLL_SECONDS)
