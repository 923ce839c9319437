"""Times one training step of each training method on the MNIST network, on random inputs, in the
same process and taking turns round after round: `pgd` (the original's attack, 40 steps by
default), `fgsm_rs` (one step), `free` (one replay; each batch is replayed 8 times by default),
`trades` (3 steps of 0.2 by default, the fast recipe's), `trades+gradalign` (the same with
GradAlign's penalty) and `trades+awp` (the same with AWP's weight perturbation), at the config's
batch of 50 and at 200 by default.

Prints training examples per second (for free also the new examples per second: one replay's
rate divided by the replays), GFLOP/s (counted from the conv and dense layers,
`benchmarks/flops.py`) and the fraction of the fp32 matrix-multiply peak measured in this process
(the best before and after each batch size). Each method keeps its best time over --rounds rounds,
after one untimed (tracing) run. Run from the repository root:
`python benchmarks/training_methods.py`, or `python benchmarks/` with every other benchmark.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from benchmarks import cli, peak

EPSILON, PGD_STEP_SIZE, FGSM_STEP_SIZE = 0.3, 0.01, 0.375
GRADALIGN_WEIGHT, AWP_GAMMA = 0.5, 0.005
# name: (training method, GradAlign's weight, AWP's size)
VARIANTS = {"pgd": ("pgd", 0.0, 0.0), "fgsm_rs": ("fgsm_rs", 0.0, 0.0),
            "free": ("free", 0.0, 0.0), "trades": ("trades", 0.0, 0.0),
            "trades+gradalign": ("trades", GRADALIGN_WEIGHT, 0.0),
            "trades+awp": ("trades", 0.0, AWP_GAMMA)}

BATCHES = flags.DEFINE_list("batches", ["50", "200"], "batch sizes, each timed in turn")
PGD_STEPS = flags.DEFINE_integer("pgd_steps", 40, "attack steps of the pgd method",
                                 lower_bound=1)
REPLAYS = flags.DEFINE_integer("replays", 8, "replays of each batch by the free method (the new "
                               "examples per second are one replay's rate over this)",
                               lower_bound=1)
TRADES_STEPS = flags.DEFINE_integer("trades_steps", 3, "attack steps of the trades methods",
                                    lower_bound=1)
TRADES_STEP_SIZE = flags.DEFINE_float("trades_step_size", 0.2, "their attack's step size",
                                      lower_bound=0.0)
ROUNDS = flags.DEFINE_integer("rounds", 5, "rounds of the methods taking turns (each keeps its "
                              "best time)", lower_bound=1)
flags.register_validator("batches", cli.positive_integers,
                         "give one or more positive integers, separated by commas")
flags.adopt_module_key_flags(peak)


def training_steps(batch_size):
    """{variant: (TrainStep, FLOPs per example)} on fresh models."""
    import keras
    import tensorflow as tf

    from common.attacks import pgd
    from common.training import loop, steps
    from common.training.objectives import summed_xent
    from mnist_challenge import model as mnist_model

    strategy = tf.distribute.get_strategy()
    settings = pgd.AttackSettings(epsilon=EPSILON, steps=PGD_STEPS.value, step_size=PGD_STEP_SIZE,
                                  random_start=True)
    by_variant = {}
    for name, (method, alignment, weight_perturbation) in VARIANTS.items():
        model = mnist_model.Model()
        optimizer = keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-8)
        attack = steps.training_settings(
            settings, method, fgsm_step_size=FGSM_STEP_SIZE,
            attack_steps=[TRADES_STEPS.value, TRADES_STEP_SIZE.value] if method == "trades"
            else None)
        step = loop.build_train_step(strategy, model, optimizer, method=method, settings=attack,
                                     loss_fn=summed_xent, replays=REPLAYS.value,
                                     batch_size=batch_size, alignment=alignment,
                                     weight_perturbation=weight_perturbation)
        by_variant[name] = (step, _flops_per_example(model, method, attack.steps, alignment,
                                                     weight_perturbation))
    return by_variant


def _flops_per_example(model, method, attack_steps, alignment, weight_perturbation):
    from benchmarks import flops
    from common.training import steps

    if steps.training_method(method).carries:  # moved in the update's own backward pass
        count = flops.training_flops_per_example(model, 0)
    elif method == "trades":
        count = flops.trades_flops_per_example(model, attack_steps)
    else:
        count = flops.training_flops_per_example(model, attack_steps)
    count += flops.gradalign_flops_per_example(model) if alignment else 0
    return count + (flops.awp_flops_per_example(model, method) if weight_perturbation else 0)


def main():
    import numpy as np

    from benchmarks.timing import alternating_best_seconds, report, timed_training_step

    rng = np.random.default_rng(0)
    peak_gflops = peak.flagged_peak_gflops()
    for batch_size in (int(batch) for batch in BATCHES.value):
        x = rng.uniform(0, 1, (batch_size, 784)).astype(np.float32)
        y = rng.integers(0, 10, batch_size)
        steps = training_steps(batch_size)
        runs = {method: timed_training_step(step, x, y, step.start_points(x, 0, 0))
                for method, (step, _) in steps.items()}
        seconds = alternating_best_seconds(runs, ROUNDS.value)
        peak_gflops = max(peak_gflops, peak.flagged_peak_gflops())
        print(f"batch {batch_size}, {peak.describe(peak_gflops)}")
        for name, (_, flops) in steps.items():
            report(f"  {name}", batch_size, seconds[name], flops, peak_gflops)
        print(f"  free: {batch_size / seconds['free'] / REPLAYS.value:.1f} new examples/s "
              f"({REPLAYS.value} replays each)")


if __name__ == "__main__":
    cli.run(main)
