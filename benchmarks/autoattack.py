"""Times AutoAttack's attacks next to the project's PGD, in the same process, on the MNIST model
(batch 200): APGD-CE, APGD-T and FAB-T (one target) iterations against PGD steps, in L-infinity
and L2, as examples x iterations per second, GFLOP/s and the fraction of the fp32
matrix-multiply peak, and Square's queries per second; then each L2 attack's rate against its
L-infinity rate. The attacks take turns for several rounds and each keeps its best time.
Run from the repository root: `python benchmarks/autoattack.py`.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks.flops import forward_flops_per_example
from benchmarks.peak import matmul_peak_gflops
from benchmarks.timing import alternating_best_seconds
from common.attacks import apgd, fab, pgd, square
from common.attacks.threat_model import ThreatModel
from mnist_challenge import model as mnist_model

EPSILON, L2_EPSILON, BATCH = 0.3, 2.0, 200
PGD_STEPS, APGD_ITERATIONS, SQUARE_QUERIES = 40, 100, 500
ROUNDS = 6


def report(name, iterations_per_second, flops_per_iteration, peak):
    gflops = iterations_per_second * flops_per_iteration / 1e9
    print(f"{name:34s} {iterations_per_second:9.1f} examples x iterations/s "
          f"{gflops:7.1f} GFLOP/s {gflops / peak:6.1%} of peak")
    return iterations_per_second


def main():
    rng = np.random.default_rng(0)
    model = mnist_model.Model()
    x = rng.uniform(0, 1, (BATCH, 784)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    gradient_flops = 2 * forward_flops_per_example(model)
    linf, l2 = ThreatModel(EPSILON), ThreatModel(L2_EPSILON, "L2")
    pgd_attack = pgd.LinfPGDAttack(model, EPSILON, PGD_STEPS, 0.01, True, "xent", seed=0)
    targets = (y + 1) % 10
    runs = {"pgd": lambda: pgd_attack.perturb(x, y)}
    for suffix, threat in (("", linf), (" L2", l2)):
        apgd_ce = apgd.APGD(model, apgd.APGDSettings(threat))
        apgd_t = apgd.APGD(model, apgd.APGDSettings(threat, loss="dlr-targeted"))
        fab_t = fab.FAB(model, fab.FABSettings(threat))
        # A ball too small to break anything, so that every query runs.
        square_attack = square.Square(
            model, square.SquareSettings(dataclasses.replace(threat, epsilon=1e-3),
                                         num_queries=SQUARE_QUERIES), image_shape=(28, 28, 1))
        runs.update({
            "apgd-ce" + suffix: lambda attack=apgd_ce: attack.attack(x, y),
            "apgd-t" + suffix: lambda attack=apgd_t: attack.attack(x, y, targets),
            "fab-t" + suffix: lambda attack=fab_t: attack.targeted(x, y, num_targets=1),
            "square" + suffix: lambda attack=square_attack: attack.attack(x, y),
        })
    peak_before = matmul_peak_gflops()
    timings = alternating_best_seconds(runs, ROUNDS)
    peak = max(peak_before, matmul_peak_gflops())
    print(f"fp32 matmul peak (2048x2048, best): {peak:.1f} GFLOP/s")
    pgd_rate = report(f"PGD ({PGD_STEPS} steps)", BATCH * PGD_STEPS / timings["pgd"],
                      gradient_flops, peak)
    rates = {}
    for name in ("apgd-ce", "apgd-t", "fab-t", "apgd-ce L2", "apgd-t L2", "fab-t L2"):
        rates[name] = report(f"{name.upper()} ({APGD_ITERATIONS} iterations)",
                             BATCH * APGD_ITERATIONS / timings[name], gradient_flops, peak)
        print(f"{'':34s} {rates[name] / pgd_rate:9.1%} of PGD's rate")
    for name in ("square", "square L2"):
        rates[name] = report(f"{name.capitalize()} ({SQUARE_QUERIES} queries)",
                             BATCH * SQUARE_QUERIES / timings[name],
                             forward_flops_per_example(model), peak)
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        print(f"{name.upper()} L2 at {rates[name + ' L2'] / rates[name]:.1%} of its "
              "L-infinity rate")


if __name__ == "__main__":
    main()
