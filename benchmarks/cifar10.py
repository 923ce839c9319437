"""Times the CIFAR-10 challenge's PGD attack (10 steps by default) and one adversarial training
step (that attack, then Momentum with weight decay), for the simple network (batch 128 by
default) and the wide one (batch 8 by default: a CPU runs it at about one example a second), on
random inputs.

Prints examples/s, GFLOP/s (counted from the conv and dense layers, `benchmarks/flops.py`) and
the fraction of the fp32 matrix-multiply peak measured in this same process before the networks
run (and, for comparison, after). Each time is the best of --repeats runs (--wide_repeats for the
wide network) after one untimed (tracing) run. Run from the repository root:
`python benchmarks/cifar10.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from benchmarks import cli, peak

EPSILON, STEP_SIZE = 8.0, 2.0
NETWORKS = ("simple", "wide")

SELECTED = flags.DEFINE_list("networks", list(NETWORKS), "the networks to time, of "
                             f"{', '.join(NETWORKS)}")
SIMPLE_BATCH = flags.DEFINE_integer("simple_batch", 128, "examples in the simple network's "
                                    "batch", lower_bound=1)
WIDE_BATCH = flags.DEFINE_integer("wide_batch", 8, "examples in the wide network's batch",
                                  lower_bound=1)
STEPS = flags.DEFINE_integer("steps", 10, "PGD steps, of the attack and of the training step's "
                             "attack", lower_bound=1)
REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs of each, simple network (the best "
                               "counts)", lower_bound=1)
WIDE_REPEATS = flags.DEFINE_integer("wide_repeats", 1, "timed runs of each, wide network (the "
                                    "best counts)", lower_bound=1)
flags.register_validator("networks", cli.choices_validator(NETWORKS),
                         f"give one or more of {', '.join(NETWORKS)}, separated by commas")
flags.adopt_module_key_flags(peak)


def measure(name, filters, batch_size, repeats, rng, peak_gflops):
    import numpy as np
    import tensorflow as tf

    from benchmarks.flops import attack_flops_per_example, training_flops_per_example
    from benchmarks.timing import best_seconds, report, timed_training_step
    from cifar10_challenge import model as cifar_model
    from cifar10_challenge.challenge import CIFAR10
    from common.attacks import pgd
    from common.training import loop
    from common.training.momentum import TF1Momentum
    from common.training.objectives import xent_with_weight_decay

    steps = STEPS.value
    model = cifar_model.Model("eval", filters)
    x = rng.uniform(*CIFAR10.pixel_range, (batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size)
    attack = pgd.PGD(model, epsilon=EPSILON, steps=steps, step_size=STEP_SIZE,
                     pixel_range=CIFAR10.pixel_range, seed=0)
    strategy = tf.distribute.get_strategy()
    loss = xent_with_weight_decay(2e-4, batch_size, 1, cifar_model.decayed_kernels)
    train_step = loop.TrainStep(strategy, model, TF1Momentum(0.1, 0.9), settings=attack.settings,
                                loss_fn=loss, attack_training=True)
    start = pgd.start_point(x, attack.settings, rng)
    attack_seconds = best_seconds(lambda: attack.perturb(x, y), repeats)
    training_seconds = best_seconds(timed_training_step(train_step, x, y, start), repeats)
    report(f"{name} attack ({steps} steps, batch {batch_size})", batch_size, attack_seconds,
           attack_flops_per_example(model, steps), peak_gflops)
    report(f"{name} training step ({steps}-step attack, batch {batch_size})", batch_size,
           training_seconds, training_flops_per_example(model, steps), peak_gflops)


def main():
    import numpy as np

    from cifar10_challenge import model as cifar_model

    rng = np.random.default_rng(0)
    peak_gflops = peak.flagged_peak_gflops()
    print(peak.describe(peak_gflops))
    if "simple" in SELECTED.value:
        measure("simple", cifar_model.SIMPLE_FILTERS, SIMPLE_BATCH.value, REPEATS.value, rng,
                peak_gflops)
    if "wide" in SELECTED.value:
        measure("wide", cifar_model.WIDE_FILTERS, WIDE_BATCH.value, WIDE_REPEATS.value, rng,
                peak_gflops)
    print(f"fp32 matmul peak after: {peak.flagged_peak_gflops():.1f} GFLOP/s")


if __name__ == "__main__":
    cli.run(main)
