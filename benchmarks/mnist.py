"""Times the MNIST challenge's 40-step PGD attack (batch 200) and one training step (batch 50).

Prints examples/s, achieved GFLOP/s and the fraction of the fp32 matrix-multiply peak measured in
this same process (before and after, as these shared machines drift). Run from the repository
root: `python benchmarks/mnist.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from benchmarks.flops import attack_flops_per_example, training_flops_per_example
from benchmarks.peak import matmul_peak_gflops
from benchmarks.timing import best_seconds, report, timed_training_step
from common.attacks import pgd
from common.training import loop
from common.training.objectives import summed_xent
from mnist_challenge import model as mnist_model

EPSILON, STEPS, STEP_SIZE = 0.3, 40, 0.01
ATTACK_BATCH, TRAINING_BATCH = 200, 50


def main():
    rng = np.random.default_rng(0)
    model = mnist_model.Model()
    x = rng.uniform(0, 1, (ATTACK_BATCH, 784)).astype(np.float32)
    y = rng.integers(0, 10, ATTACK_BATCH)
    attack = pgd.LinfPGDAttack(model, EPSILON, STEPS, STEP_SIZE, True, "xent", seed=0)
    strategy = tf.distribute.get_strategy()
    optimizer = keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-8)
    train_step = loop.TrainStep(strategy, model, optimizer, attack.settings, summed_xent)
    start = pgd.start_point(x[:TRAINING_BATCH], attack.settings, rng)

    peak_before = matmul_peak_gflops()
    attack_seconds = best_seconds(lambda: attack.perturb(x, y))
    training_seconds = best_seconds(
        timed_training_step(train_step, x[:TRAINING_BATCH], y[:TRAINING_BATCH], start))
    peak = max(peak_before, matmul_peak_gflops())
    print(f"fp32 matmul peak (2048x2048, best): {peak:.1f} GFLOP/s")
    report(f"attack ({STEPS} steps, batch {ATTACK_BATCH})", ATTACK_BATCH, attack_seconds,
           attack_flops_per_example(model, STEPS), peak)
    report(f"training step (batch {TRAINING_BATCH})", TRAINING_BATCH, training_seconds,
           training_flops_per_example(model, STEPS), peak)


if __name__ == "__main__":
    main()
