"""Times AutoAttack's attacks next to the project's PGD, in the same process, on the MNIST network
and random inputs (batch 200 by default): APGD-CE, APGD-T and FAB-T (one target) iterations
against PGD steps, in L-infinity (epsilon 0.3) and L2 (epsilon 2.0), as examples x iterations
per second, GFLOP/s (counted from the conv and dense layers, `benchmarks/flops.py`) and the
fraction of the fp32 matrix-multiply peak, and Square's queries per second; then each L2
attack's rate against its L-infinity rate. The attacks take turns for --rounds rounds, after one
untimed (tracing) run each, and each keeps its best time. Run from the repository root:
`python benchmarks/autoattack.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from benchmarks import cli, peak

EPSILON, L2_EPSILON, PGD_STEP_SIZE = 0.3, 2.0, 0.01

BATCH = flags.DEFINE_integer("batch", 200, "examples in the attacked batch", lower_bound=1)
PGD_STEPS = flags.DEFINE_integer("pgd_steps", 40, "PGD steps", lower_bound=1)
ITERATIONS = flags.DEFINE_integer("iterations", 100, "iterations of APGD-CE, APGD-T and FAB-T",
                                  lower_bound=1)
QUERIES = flags.DEFINE_integer("queries", 500, "Square's queries", lower_bound=1)
ROUNDS = flags.DEFINE_integer("rounds", 6, "rounds of the attacks taking turns (each keeps its "
                              "best time)", lower_bound=1)
flags.adopt_module_key_flags(peak)


def report(name, iterations_per_second, flops_per_iteration, peak_gflops):
    gflops = iterations_per_second * flops_per_iteration / 1e9
    print(f"{name:34s} {iterations_per_second:9.1f} examples x iterations/s "
          f"{gflops:7.1f} GFLOP/s {gflops / peak_gflops:6.1%} of peak")
    return iterations_per_second


def main():
    import numpy as np

    from benchmarks.flops import forward_flops_per_example
    from benchmarks.timing import alternating_best_seconds
    from common.attacks import APGD, FAB, PGD, Square
    from mnist_challenge import model as mnist_model

    batch, pgd_steps, iterations, queries = (BATCH.value, PGD_STEPS.value, ITERATIONS.value,
                                             QUERIES.value)
    rng = np.random.default_rng(0)
    model = mnist_model.Model()
    x = rng.uniform(0, 1, (batch, 784)).astype(np.float32)
    gradient_flops = 2 * forward_flops_per_example(model)
    # Labels the model gives, so that every example is attacked (an attack skips the ones
    # misclassified already).
    y = np.argmax(model(x).numpy(), axis=1)
    pgd_attack = PGD(model, epsilon=EPSILON, steps=pgd_steps, step_size=PGD_STEP_SIZE, seed=0)
    runs = {"pgd": lambda: pgd_attack.perturb(x, y)}
    for suffix, norm, epsilon in (("", "Linf", EPSILON), (" L2", "L2", L2_EPSILON)):
        apgd_ce = APGD(model, epsilon=epsilon, norm=norm, steps=iterations)
        apgd_t = APGD(model, epsilon=epsilon, norm=norm, steps=iterations, targets=1)
        fab_t = FAB(model, epsilon=epsilon, norm=norm, steps=iterations, targets=1)
        # A ball too small to break anything, so that every query runs.
        square_attack = Square(model, epsilon=1e-3, norm=norm, steps=queries,
                               image_shape=(28, 28, 1))
        runs.update({
            "apgd-ce" + suffix: lambda attack=apgd_ce: attack.perturb(x, y),
            "apgd-t" + suffix: lambda attack=apgd_t: attack.perturb(x, y),
            "fab-t" + suffix: lambda attack=fab_t: attack.perturb(x, y),
            "square" + suffix: lambda attack=square_attack: attack.perturb(x, y),
        })
    peak_before = peak.flagged_peak_gflops()
    timings = alternating_best_seconds(runs, ROUNDS.value)
    peak_gflops = max(peak_before, peak.flagged_peak_gflops())
    print(peak.describe(peak_gflops))
    pgd_rate = report(f"PGD ({pgd_steps} steps)", batch * pgd_steps / timings["pgd"],
                      gradient_flops, peak_gflops)
    rates = {}
    for name in ("apgd-ce", "apgd-t", "fab-t", "apgd-ce L2", "apgd-t L2", "fab-t L2"):
        rates[name] = report(f"{name.upper()} ({iterations} iterations)",
                             batch * iterations / timings[name], gradient_flops, peak_gflops)
        print(f"{'':34s} {rates[name] / pgd_rate:9.1%} of PGD's rate")
    for name, label in (("square", "Square"), ("square L2", "Square L2")):
        rates[name] = report(f"{label} ({queries} queries)",
                             batch * queries / timings[name],
                             forward_flops_per_example(model), peak_gflops)
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        print(f"{name.upper()} L2 at {rates[name + ' L2'] / rates[name]:.1%} of its "
              "L-infinity rate")


if __name__ == "__main__":
    cli.run(main)
