"""Times AutoAttack's attacks next to the project's PGD, in the same process, on the MNIST model
(batch 200): APGD-CE, APGD-T and FAB-T (one target) iterations against PGD steps, as examples x
iterations per second, GFLOP/s and the fraction of the fp32 matrix-multiply peak, and Square's
queries per second. The attacks take turns for several rounds and each keeps its best time.
Run from the repository root: `python benchmarks/autoattack.py`.
"""

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

EPSILON, BATCH = 0.3, 200
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
    THREAT = ThreatModel(EPSILON)  # noqa: N806
    pgd_attack = pgd.LinfPGDAttack(model, EPSILON, PGD_STEPS, 0.01, True, "xent", seed=0)
    apgd_ce = apgd.APGD(model, apgd.APGDSettings(THREAT))
    apgd_t = apgd.APGD(model, apgd.APGDSettings(THREAT, loss="dlr-targeted"))
    fab_t = fab.FAB(model, fab.FABSettings(THREAT))
    # A ball too small to break anything, so that every query runs.
    square_attack = square.Square(
        model, square.SquareSettings(ThreatModel(1e-3), num_queries=SQUARE_QUERIES),
        image_shape=(28, 28, 1))
    targets = (y + 1) % 10
    runs = {
        "pgd": lambda: pgd_attack.perturb(x, y),
        "apgd-ce": lambda: apgd_ce.attack(x, y),
        "apgd-t": lambda: apgd_t.attack(x, y, targets),
        "fab-t": lambda: fab_t.targeted(x, y, num_targets=1),
        "square": lambda: square_attack.attack(x, y),
    }
    peak_before = matmul_peak_gflops()
    timings = alternating_best_seconds(runs, ROUNDS)
    peak = max(peak_before, matmul_peak_gflops())
    print(f"fp32 matmul peak (2048x2048, best): {peak:.1f} GFLOP/s")
    pgd_rate = report(f"PGD ({PGD_STEPS} steps)", BATCH * PGD_STEPS / timings["pgd"],
                      gradient_flops, peak)
    for name in ("apgd-ce", "apgd-t", "fab-t"):
        rate = report(f"{name.upper()} ({APGD_ITERATIONS} iterations)",
                      BATCH * APGD_ITERATIONS / timings[name], gradient_flops, peak)
        print(f"{'':34s} {rate / pgd_rate:9.1%} of PGD's rate")
    report(f"Square ({SQUARE_QUERIES} queries)", BATCH * SQUARE_QUERIES / timings["square"],
           forward_flops_per_example(model), peak)


if __name__ == "__main__":
    main()
