"""Times the MNIST challenge's PGD attack (40 steps, batch 200 by default) and one adversarial
training step (that attack on the batch, then Adam on the adversarial examples; batch 50 by
default) on the challenge's network, on random inputs.

Prints examples/s, GFLOP/s (counted from the conv and dense layers, `benchmarks/flops.py`) and
the fraction of the fp32 matrix-multiply peak measured in this same process, before and after
(the better of the two counts), as these shared machines drift. Each time is the best of
--repeats runs after one untimed (tracing) run. Run from the repository root:
`python benchmarks/mnist.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from benchmarks import cli, peak

EPSILON, STEP_SIZE = 0.3, 0.01

ATTACK_BATCH = flags.DEFINE_integer("attack_batch", 200, "examples in the attacked batch",
                                    lower_bound=1)
TRAINING_BATCH = flags.DEFINE_integer("training_batch", 50, "examples in the training step's "
                                      "batch", lower_bound=1)
STEPS = flags.DEFINE_integer("steps", 40, "PGD steps, of the attack and of the training step's "
                             "attack", lower_bound=1)
REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs of each (the best counts)",
                               lower_bound=1)
flags.adopt_module_key_flags(peak)


def main():
    # Imported here, so that --help answers without loading TensorFlow.
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.flops import attack_flops_per_example, training_flops_per_example
    from benchmarks.timing import best_seconds, report, timed_training_step
    from common.attacks import pgd
    from common.training import loop
    from common.training.objectives import summed_xent
    from mnist_challenge import model as mnist_model

    attack_batch, training_batch, steps = ATTACK_BATCH.value, TRAINING_BATCH.value, STEPS.value
    rng = np.random.default_rng(0)
    model = mnist_model.Model()
    examples = max(attack_batch, training_batch)
    x = rng.uniform(0, 1, (examples, 784)).astype(np.float32)
    y = rng.integers(0, 10, examples)
    attack = pgd.PGD(model, epsilon=EPSILON, steps=steps, step_size=STEP_SIZE, seed=0)
    strategy = tf.distribute.get_strategy()
    optimizer = keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-8)
    train_step = loop.TrainStep(strategy, model, optimizer, settings=attack.settings,
                                loss_fn=summed_xent)
    start = pgd.start_point(x[:training_batch], attack.settings, rng)

    peak_before = peak.flagged_peak_gflops()
    attack_seconds = best_seconds(lambda: attack.perturb(x[:attack_batch], y[:attack_batch]),
                                  REPEATS.value)
    training_seconds = best_seconds(
        timed_training_step(train_step, x[:training_batch], y[:training_batch], start),
        REPEATS.value)
    peak_gflops = max(peak_before, peak.flagged_peak_gflops())
    print(peak.describe(peak_gflops))
    report(f"attack ({steps} steps, batch {attack_batch})", attack_batch, attack_seconds,
           attack_flops_per_example(model, steps), peak_gflops)
    report(f"training step ({steps}-step attack, batch {training_batch})", training_batch,
           training_seconds, training_flops_per_example(model, steps), peak_gflops)


if __name__ == "__main__":
    cli.run(main)
