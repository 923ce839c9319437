"""The port against the original's way of running (benchmarks/original.py), each in its own
process, alternating: --pairs pairs per workload, the first of each pair taking turns. Workloads:
the MNIST attack (PGD-40, batch 200, as pgd_attack.py runs it), the MNIST training step (PGD-40
then Adam, batch 50, as train.py runs it) and a few steps of the CIFAR-10 attack on the wide
network at a small batch.

Prints the CPU (model and vector extensions) and the baseline, then per workload each pair's
throughputs and ratio (port / original), the median ratio, the spread of each side's throughput
between processes ((max - min) / median) and the fraction of the fp32 matrix-multiply peak
(benchmarks/peak.py, measured in this process before and after). Run from the repository root:
`python benchmarks/versus_original.py`.

With --baseline_checkout=DIR the port of another checkout of this repository takes the
original's place (say `git worktree add ../before COMMIT`): a change measured against the code
before it, the same workloads, the same alternation.

`--precision=mixed_bfloat16` runs the port in bfloat16 (with --baseline_checkout, both ports): what
the opt-in precision buys over the original, which computes in float32. The fraction of peak is
still of the fp32 peak.
"""

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import cli, peak  # noqa: E402

WORKLOADS = ("mnist_attack", "mnist_training", "cifar10_attack")
SIDES = ("port", "original")
RESULT_MARK = "RESULT "

WORKLOAD = flags.DEFINE_list("workloads", list(WORKLOADS), "which workloads to run, from "
                             f"{', '.join(WORKLOADS)}")
flags.register_validator("workloads", cli.choices_validator(WORKLOADS),
                         f"--workloads must name workloads from {', '.join(WORKLOADS)}")
PAIRS = flags.DEFINE_integer("pairs", 5, "processes of each side per workload, alternating",
                             lower_bound=1)
MNIST_BATCH = flags.DEFINE_integer("mnist_batch", 200, "MNIST attack batch", lower_bound=1)
MNIST_BATCHES = flags.DEFINE_integer("mnist_batches", 3, "timed MNIST attack batches per "
                                     "process (after one untimed)", lower_bound=1)
MNIST_STEPS = flags.DEFINE_integer("mnist_steps", 40, "PGD steps of the MNIST attack and "
                                   "training step", lower_bound=1)
TRAINING_BATCH = flags.DEFINE_integer("training_batch", 50, "MNIST training batch",
                                      lower_bound=1)
TRAINING_STEPS = flags.DEFINE_integer("training_steps", 5, "timed training steps per process "
                                      "(after one untimed)", lower_bound=1)
CIFAR_BATCH = flags.DEFINE_integer("cifar10_batch", 8, "CIFAR-10 attack batch", lower_bound=1)
CIFAR_STEPS = flags.DEFINE_integer("cifar10_steps", 2, "PGD steps of each timed CIFAR-10 attack",
                                   lower_bound=1)
CIFAR_REPEATS = flags.DEFINE_integer("cifar10_repeats", 2, "timed CIFAR-10 attacks per process "
                                     "(after one untimed)", lower_bound=1)
CIFAR_FILTERS = flags.DEFINE_list("cifar10_filters", ["16", "160", "320", "640"],
                                  "the CIFAR-10 network's widths (wide by default)")
flags.register_validator("cifar10_filters", cli.positive_integers,
                         "--cifar10_filters must be four positive whole numbers")
SIZE_FLAGS = (MNIST_BATCH, MNIST_BATCHES, MNIST_STEPS, TRAINING_BATCH, TRAINING_STEPS,
              CIFAR_BATCH, CIFAR_STEPS, CIFAR_REPEATS, CIFAR_FILTERS)
BASELINE_CHECKOUT = flags.DEFINE_string(
    "baseline_checkout", None, "a checkout of this repository at another commit whose port takes "
    "the original's place (say `git worktree add ../before COMMIT`)")
flags.register_validator(
    "baseline_checkout",
    lambda path: path is None or (
        bool(path) and os.path.isfile(os.path.join(path, "common", "attacks", "pgd.py"))),
    "--baseline_checkout must be a checkout of this repository (a folder holding "
    "common/attacks/pgd.py)")
PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"],
                              "the port's precision (the original computes in float32)")
SIDE = flags.DEFINE_enum("side", None, list(SIDES), "run one side of one workload in this "
                         "process and print its result (what the comparison starts)")
flags.adopt_module_key_flags(peak)


def _timed(run, count):
    """Seconds of `count` calls of `run()`, after one untimed call (tracing, graph set-up)."""
    run()
    start = time.perf_counter()
    for _ in range(count):
        run()
    return time.perf_counter() - start


def _mnist_port(workload, x, y):
    from common.attacks import pgd
    from mnist_challenge import model as mnist_model

    model = mnist_model.Model()
    attack = pgd.PGD(model, epsilon=0.3, steps=MNIST_STEPS.value, step_size=0.01, seed=0)
    if workload == "mnist_attack":
        return model, lambda: attack.perturb(x, y)
    import keras
    import tensorflow as tf

    from common.training import loop
    from common.training.objectives import summed_xent

    optimizer = keras.optimizers.Adam(learning_rate=1e-4, epsilon=1e-8)
    step = loop.TrainStep(tf.distribute.get_strategy(), model, optimizer,
                          settings=attack.settings, loss_fn=summed_xent)
    rng = np.random.default_rng(0)

    def train():
        start = pgd.start_point(x, attack.settings, rng)
        metrics, _ = step(x, y, start, report=False)
        metrics["adv_correct"].numpy()

    return model, train


def _mnist_original(workload, x, y):
    from benchmarks import original

    graph = original.Graph(original.mnist_network, (784,))
    rng = np.random.default_rng(0)

    def attack():
        return graph.perturb(x, y, 0.3, MNIST_STEPS.value, 0.01, (0.0, 1.0), rng)

    if workload == "mnist_attack":
        return attack
    return lambda: graph.train_step(attack(), y)


def _cifar_port(x, y):
    from cifar10_challenge import model as cifar_model
    from common.attacks import pgd

    model = cifar_model.Model("eval", [int(width) for width in CIFAR_FILTERS.value])
    attack = pgd.PGD(model, epsilon=8.0, steps=CIFAR_STEPS.value, step_size=2.0, seed=0,
                     pixel_range=(0.0, 255.0))
    return model, lambda: attack.perturb(x, y)


def _cifar_original(x, y):
    from benchmarks import original

    graph = original.Graph(original.cifar10_network([int(w) for w in CIFAR_FILTERS.value]),
                           (32, 32, 3))
    rng = np.random.default_rng(0)
    return lambda: graph.perturb(x, y, 8.0, CIFAR_STEPS.value, 2.0, (0.0, 255.0), rng)


def _import_from(checkout):
    """Puts the other checkout's packages first, and proves that its `common` is the one
    imported (nothing may have imported this checkout's before)."""
    checkout = os.path.abspath(checkout)
    sys.path.insert(0, checkout)
    import common

    if not os.path.abspath(common.__file__).startswith(checkout + os.sep):
        cli.fail(f"the baseline imported {common.__file__}, not the one in {checkout}")


def _as_the_scripts_run():
    """The port's scripts run with TensorFlow's defaults; a --baseline_checkout from the days its
    scripts turned Grappler off on CPUs (`devices.steady_cpu_kernels`) runs as they did."""
    from common.runtime import devices

    if hasattr(devices, "steady_cpu_kernels"):
        devices.steady_cpu_kernels()


def run_side(workload, side):
    """{"examples_per_second", "flops_per_example", "compute_dtype"} of one side of one
    workload, measured in this process (flops and dtype only on the port's side, from its Keras
    model)."""
    from benchmarks.flops import attack_flops_per_example, training_flops_per_example

    rng = np.random.default_rng(0)
    if workload == "cifar10_attack":
        batch, count = CIFAR_BATCH.value, CIFAR_REPEATS.value
        x = rng.uniform(0, 255, (batch, 32, 32, 3)).astype(np.float32)
    else:
        batch = MNIST_BATCH.value if workload == "mnist_attack" else TRAINING_BATCH.value
        count = MNIST_BATCHES.value if workload == "mnist_attack" else TRAINING_STEPS.value
        x = rng.uniform(0, 1, (batch, 784)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    flops = compute_dtype = None
    if side == "original" and BASELINE_CHECKOUT.value:
        _import_from(BASELINE_CHECKOUT.value)
        side = "port"
    if side == "original":
        run = _cifar_original(x, y) if workload == "cifar10_attack" else \
            _mnist_original(workload, x, y)
    else:
        import keras

        _as_the_scripts_run()
        keras.mixed_precision.set_global_policy(PRECISION.value)
        if workload == "cifar10_attack":
            model, run = _cifar_port(x, y)
            flops = attack_flops_per_example(model, CIFAR_STEPS.value)
        else:
            model, run = _mnist_port(workload, x, y)
            counter = attack_flops_per_example if workload == "mnist_attack" else \
                training_flops_per_example
            flops = counter(model, MNIST_STEPS.value)
        compute_dtype = model.compute_dtype
    seconds = _timed(run, count)
    return {"examples_per_second": batch * count / seconds, "flops_per_example": flops,
            "compute_dtype": compute_dtype}


def _child(workload, side):
    """The result of one side of one workload, run in a new process with this one's sizes."""
    sizes = [flag.serialize() for flag in (*SIZE_FLAGS, BASELINE_CHECKOUT, PRECISION)
             if flag.present]
    process = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--workloads={workload}",
         *sizes], capture_output=True, text=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not lines:
        cli.fail(f"the {_label(side)} side of {workload} failed: "
                 f"{process.stderr.strip()[-500:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def _label(side):
    """How a side is named in the output: the baseline is the original or the other checkout."""
    return "checkout" if side == "original" and BASELINE_CHECKOUT.value else side


def baseline_description():
    """What the port is compared with."""
    if not BASELINE_CHECKOUT.value:
        return "the original's way of running (benchmarks/original.py)"
    path = os.path.abspath(BASELINE_CHECKOUT.value)
    try:
        commit = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on this machine
        commit = ""
    return f"the port in {path}" + (f" at {commit}" if commit else "")


def precision_description():
    """What each side computes in."""
    if BASELINE_CHECKOUT.value:
        return f"both ports compute in {PRECISION.value}"
    return f"the port computes in {PRECISION.value}, the original in float32"


def _spread(values):
    return (max(values) - min(values)) / statistics.median(values)


def compare(workload, pairs):
    """Runs the pairs of one workload, printing each; returns {side: [result, ...]}."""
    results = {side: [] for side in SIDES}
    print(f"== {workload}")
    for pair in range(pairs):
        order = SIDES if pair % 2 == 0 else SIDES[::-1]
        for side in order:
            results[side].append(_child(workload, side))
        port, original = (results[side][-1]["examples_per_second"] for side in SIDES)
        print(f"pair {pair + 1} ({_label(order[0])} first): port {port:8.2f}, "
              f"{_label('original')} {original:8.2f} examples/s, ratio {port / original:.3f}")
    return results


def summarize(workload, results, peak_gflops):
    """Prints the median ratio, each side's spread and fraction of peak; returns the median."""
    ratios = [port["examples_per_second"] / original["examples_per_second"]
              for port, original in zip(results["port"], results["original"])]
    flops = results["port"][0]["flops_per_example"]
    print(f"{workload}: median ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f})")
    for side in SIDES:
        speeds = [result["examples_per_second"] for result in results[side]]
        fraction = statistics.median(speeds) * flops / 1e9 / peak_gflops
        dtypes = "/".join(sorted({result["compute_dtype"] or "float32"
                                  for result in results[side]}))
        print(f"  {_label(side):9s} median {statistics.median(speeds):8.2f} examples/s in "
              f"{dtypes}, spread {_spread(speeds):.1%}, {fraction:.1%} of peak")
    return statistics.median(ratios)


def main():
    if SIDE.value is not None:
        if len(WORKLOAD.value) != 1:
            cli.fail("--side runs exactly one workload: give --workloads=NAME")
        print(RESULT_MARK + json.dumps(run_side(WORKLOAD.value[0], SIDE.value)))
        return
    print(f"CPU: {peak.cpu_description()}")
    print(f"Baseline: {baseline_description()}")
    print(f"Precision: {precision_description()}")
    peak_before = peak.flagged_peak_gflops()
    results = {workload: compare(workload, PAIRS.value) for workload in WORKLOAD.value}
    peak_gflops = max(peak_before, peak.flagged_peak_gflops())
    print(peak.describe(peak_gflops))
    for workload, result in results.items():
        summarize(workload, result, peak_gflops)


if __name__ == "__main__":
    cli.run(main)
