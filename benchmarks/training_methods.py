"""Times one training step of each training method on the MNIST model, in the same process and
taking turns: `pgd` (the original's 40-step attack), `fgsm_rs` (one step) and `free` (one replay),
at the config's batch of 50 and at 200. Prints training examples per second (for free also the
new examples per second: each batch is replayed 8 times), GFLOP/s and the fraction of the fp32
matrix-multiply peak measured in this process. Run from the repository root:
`python benchmarks/training_methods.py`, or `python benchmarks/` with every other benchmark.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from benchmarks.flops import training_flops_per_example
from benchmarks.peak import matmul_peak_gflops
from benchmarks.timing import alternating_best_seconds, report, timed_training_step
from common.attacks import pgd
from common.training import loop
from common.training.objectives import summed_xent
from mnist_challenge import model as mnist_model

EPSILON, PGD_STEPS, PGD_STEP_SIZE, FGSM_STEP_SIZE, REPLAYS = 0.3, 40, 0.01, 0.375, 8
BATCHES = (50, 200)
ROUNDS = 5


def training_steps(batch_size):
    """{method: (TrainStep, attack steps in its FLOP count)} on fresh models."""
    strategy = tf.distribute.get_strategy()
    settings = pgd.AttackSettings(EPSILON, PGD_STEPS, PGD_STEP_SIZE, True)
    steps = {}
    for method in ("pgd", "fgsm_rs", "free"):
        model = mnist_model.Model()
        optimizer = keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-8)
        if method == "free":
            steps[method] = (loop.FreeTrainStep(strategy, model, optimizer, settings,
                                                    summed_xent, REPLAYS, batch_size), 0)
        else:
            attack = settings if method == "pgd" else pgd.AttackSettings(
                EPSILON, 1, FGSM_STEP_SIZE, True)
            steps[method] = (loop.TrainStep(strategy, model, optimizer, attack,
                                                summed_xent), attack.num_steps)
    return steps


def main():
    rng = np.random.default_rng(0)
    peak = matmul_peak_gflops()
    for batch_size in BATCHES:
        x = rng.uniform(0, 1, (batch_size, 784)).astype(np.float32)
        y = rng.integers(0, 10, batch_size)
        steps = training_steps(batch_size)
        runs = {method: timed_training_step(step, x, y, step.start_points(x, 0, 0))
                for method, (step, _) in steps.items()}
        seconds = alternating_best_seconds(runs, ROUNDS)
        peak = max(peak, matmul_peak_gflops())
        print(f"batch {batch_size}, fp32 matmul peak (2048x2048, best): {peak:.1f} GFLOP/s")
        for method, (step, attack_steps) in steps.items():
            flops = training_flops_per_example(step.model, attack_steps)
            report(f"  {method}", batch_size, seconds[method], flops, peak)
        print(f"  free: {batch_size / seconds['free'] / REPLAYS:.1f} new examples/s "
              f"({REPLAYS} replays each)")


if __name__ == "__main__":
    main()
