"""Times the CIFAR-10 challenge's 10-step PGD attack and one training step, for the simple network
(batch 128) and the wide one (a few examples: a CPU runs it at about one example a second).

Prints examples/s, achieved GFLOP/s and the fraction of the fp32 matrix-multiply peak measured in
this same process. Run from the repository root: `python benchmarks/cifar10.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from benchmarks.flops import attack_flops_per_example, training_flops_per_example
from benchmarks.peak import matmul_peak_gflops
from benchmarks.timing import best_seconds, report, timed_training_step
from cifar10_challenge import model as cifar_model
from cifar10_challenge.challenge import CIFAR10
from common.attacks import pgd
from common.training import loop
from common.training.momentum import TF1Momentum
from common.training.objectives import xent_with_weight_decay

EPSILON, STEPS, STEP_SIZE = 8.0, 10, 2.0
BATCHES = {"simple": 128, "wide": 8}


def measure(name, filters, batch_size, rng, peak):
    model = cifar_model.Model("eval", filters)
    x = rng.uniform(*CIFAR10.pixel_range, (batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size)
    attack = pgd.LinfPGDAttack(model, EPSILON, STEPS, STEP_SIZE, True, "xent",
                               pixel_range=CIFAR10.pixel_range, seed=0)
    strategy = tf.distribute.get_strategy()
    loss = xent_with_weight_decay(2e-4, batch_size, 1, cifar_model.decayed_kernels)
    train_step = loop.TrainStep(strategy, model, TF1Momentum(0.1, 0.9), attack.settings, loss,
                                    attack_training=True)
    start = pgd.start_point(x, attack.settings, rng)
    repeats = 3 if name == "simple" else 1
    attack_seconds = best_seconds(lambda: attack.perturb(x, y), repeats)
    training_seconds = best_seconds(timed_training_step(train_step, x, y, start), repeats)
    report(f"{name} attack ({STEPS} steps, batch {batch_size})", batch_size, attack_seconds,
           attack_flops_per_example(model, STEPS), peak)
    report(f"{name} training step (batch {batch_size})", batch_size, training_seconds,
           training_flops_per_example(model, STEPS), peak)


def main():
    rng = np.random.default_rng(0)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048x2048, best): {peak:.1f} GFLOP/s")
    measure("simple", cifar_model.SIMPLE_FILTERS, BATCHES["simple"], rng, peak)
    measure("wide", cifar_model.WIDE_FILTERS, BATCHES["wide"], rng, peak)
    print(f"fp32 matmul peak after: {matmul_peak_gflops():.1f} GFLOP/s")


if __name__ == "__main__":
    main()
