"""Timing helpers shared by the benchmarks."""

import time

REPEATS = 3


def best_seconds(run, repeats=REPEATS):
    """Best wall time of `run()` over `repeats` runs, after one untimed run (tracing)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def report(name, examples, seconds, flops_per_example, peak):
    gflops = examples * flops_per_example / seconds / 1e9
    print(f"{name:48s} {examples / seconds:8.2f} examples/s {gflops:7.1f} GFLOP/s "
          f"{gflops / peak:6.1%} of peak")


def timed_training_step(train_step, x, y, x_start):
    """A callable running one training step to completion."""

    def run():
        metrics, _ = train_step(x, y, x_start, report=False)
        metrics["adv_correct"].numpy()

    return run


def alternating_best_seconds(runs, rounds):
    """{name: best seconds}, the runs taking turns round after round, so that the machine's
    drift reaches them alike (after one untimed run each, for tracing)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
