"""Times the MNIST network in float32 against mixed precision, the precisions taking turns round
after round in one process: the fast recipe's training step (config_fast.json: a 3-step PGD of
0.2 from a random start, then Adam, batch 100 by default) and the challenge's attack (PGD-40,
batch 200 by default), on random inputs.

Prints the CPU with its bfloat16 instructions (AVX512_BF16, AMX-BF16: without them bfloat16 is
emulated) and what `training_precision: auto` trains in on it, then per workload and precision
examples/s, GFLOP/s (counted from the conv and dense layers, `benchmarks/flops.py`), the fraction
of the fp32 matrix-multiply peak measured in this process, and the speed relative to float32. Each
precision keeps its best time over --rounds rounds, after one untimed (tracing) run. Run from the
repository root: `python benchmarks/precision.py`, or `python benchmarks/` with every other
benchmark.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from benchmarks import cli, peak

EPSILON = 0.3
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

COMPARED = flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "the precisions timed, "
                             f"of {', '.join(PRECISIONS)}; the first is the reference")
flags.register_validator("precisions", cli.choices_validator(PRECISIONS),
                         f"give one or more of {', '.join(PRECISIONS)}, separated by commas")
TRAINING_BATCH = flags.DEFINE_integer("training_batch", 100, "examples in the training step's "
                                      "batch", lower_bound=1)
TRAINING_ATTACK_STEPS = flags.DEFINE_integer("training_attack_steps", 3, "PGD steps of the "
                                             "training step's attack (of 0.2)", lower_bound=1)
ATTACK_BATCH = flags.DEFINE_integer("attack_batch", 200, "examples in the attacked batch",
                                    lower_bound=1)
ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 40, "PGD steps of the attack (of 0.01)",
                                    lower_bound=1)
ROUNDS = flags.DEFINE_integer("rounds", 5, "rounds of the precisions taking turns (each keeps "
                              "its best time)", lower_bound=1)
flags.adopt_module_key_flags(peak)


def built_under(policy, build):
    """`build()` with `policy` the global precision policy; float32 again afterwards."""
    from common.runtime import precision

    precision.set_precision(policy)
    try:
        return build()
    finally:
        precision.set_precision("float32")


def training_step(x):
    """The fast recipe's training step on a new model, under the current policy."""
    import keras
    import tensorflow as tf

    from common.attacks import pgd
    from common.runtime import precision
    from common.training import loop
    from common.training.objectives import summed_xent
    from mnist_challenge import model as mnist_model

    settings = pgd.AttackSettings(epsilon=EPSILON, steps=TRAINING_ATTACK_STEPS.value,
                                  step_size=0.2, random_start=True)
    model = mnist_model.Model()
    optimizer = precision.training_optimizer(keras.optimizers.Adam(1e-3, epsilon=1e-8))
    step = loop.TrainStep(tf.distribute.get_strategy(), model, optimizer, settings=settings,
                          loss_fn=summed_xent)
    return step, step.start_points(x, 0, 0)


def attack(x, y):
    """A callable running the challenge's attack on a new model, under the current policy."""
    from common.attacks import pgd
    from mnist_challenge import model as mnist_model

    model = mnist_model.Model()
    attack = pgd.PGD(model, epsilon=EPSILON, steps=ATTACK_STEPS.value, step_size=0.01, seed=0)
    return model, lambda: attack.perturb(x, y)


def main():
    import numpy as np

    from benchmarks.flops import attack_flops_per_example, training_flops_per_example
    from benchmarks.timing import alternating_best_seconds, timed_training_step
    from common.runtime import precision

    rng = np.random.default_rng(0)
    print(peak.cpu_description())
    print("bfloat16 instructions:", "yes" if precision.cpu_computes_bfloat16() else
          "none (bfloat16 is emulated)")
    print("training_precision auto trains in:",
          "mixed_bfloat16" if precision.bfloat16_beats_float32() else "float32")
    batch, attack_batch = TRAINING_BATCH.value, ATTACK_BATCH.value
    x = rng.uniform(0, 1, (max(batch, attack_batch), 784)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    steps = {policy: built_under(policy, lambda: training_step(x[:batch]))
             for policy in COMPARED.value}
    attacks = {policy: built_under(policy, lambda: attack(x[:attack_batch], y[:attack_batch]))
               for policy in COMPARED.value}
    peak_gflops = peak.flagged_peak_gflops()
    training_seconds = alternating_best_seconds(
        {policy: timed_training_step(step, x[:batch], y[:batch], start)
         for policy, (step, start) in steps.items()}, ROUNDS.value)
    attack_seconds = alternating_best_seconds(
        {policy: run for policy, (_, run) in attacks.items()}, ROUNDS.value)
    peak_gflops = max(peak_gflops, peak.flagged_peak_gflops())
    print(peak.describe(peak_gflops))
    compared(f"training step ({TRAINING_ATTACK_STEPS.value}-step attack, batch {batch})", batch,
             training_seconds,
             {policy: training_flops_per_example(step.model, TRAINING_ATTACK_STEPS.value)
              for policy, (step, _) in steps.items()}, peak_gflops)
    compared(f"attack ({ATTACK_STEPS.value} steps, batch {attack_batch})", attack_batch,
             attack_seconds,
             {policy: attack_flops_per_example(model, ATTACK_STEPS.value)
              for policy, (model, _) in attacks.items()}, peak_gflops)


def compared(title, examples, seconds, flops, peak_gflops):
    """One workload's lines: each precision's rate and its speed relative to the first's."""
    from benchmarks.timing import report

    reference = COMPARED.value[0]
    print(title)
    for policy in seconds:
        report(f"  {policy}", examples, seconds[policy], flops[policy], peak_gflops)
        print(f"  {policy}: {seconds[reference] / seconds[policy]:.2f}x {reference}")


if __name__ == "__main__":
    cli.run(main)
