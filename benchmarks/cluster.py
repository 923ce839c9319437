"""Times AutoAttack spread over a cluster of local worker processes (TF_CONFIG on 127.0.0.1,
MultiWorkerMirroredStrategy), as autoattack.py runs on several machines: the MNIST network (seeded
random weights) on random inputs labelled by the model, with an epsilon too small to break
anything, so that every attack runs in full. For each count of --workers, each worker limited to
--threads CPU threads (intra- and inter-op), it prints examples per second, the speedup over
the first count and the scaling efficiency (speedup / workers ratio), and whether the robust
flags and adversarial examples equal the first count's. Each run evaluates a few examples first,
untimed, so that tracing is left out. Run from the repository root: `python benchmarks/cluster.py`.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from benchmarks import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPSILON = 1e-4

WORKERS = flags.DEFINE_list("workers", ["1", "2"], "the worker counts to time, the first the "
                            "reference of the speedup")
flags.register_validator("workers", cli.positive_integers,
                         "--workers must list positive integers, separated by commas")
THREADS = flags.DEFINE_integer("threads", None, "CPU threads per worker (by default the "
                               "machine's CPUs divided by the largest worker count)",
                               lower_bound=1)
EXAMPLES = flags.DEFINE_integer("examples", 40, "examples attacked", lower_bound=1)
ATTACKS = flags.DEFINE_string("attacks", "apgd-ce,apgd-t,fab-t,square", "AutoAttack's attacks, "
                              "a comma list (by default the standard version's)")
TIMEOUT = flags.DEFINE_integer("timeout", 3600, "seconds a run may take", lower_bound=1)

# One worker: AutoAttack on the examples after an untimed run on a few; the chief saves the
# seconds and the result.
WORKER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
threads, examples, attacks, epsilon, out = (int(sys.argv[2]), int(sys.argv[3]),
                                            sys.argv[4].split(","), float(sys.argv[5]),
                                            sys.argv[6])
import keras, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(threads)
from common.attacks import AutoAttack
from common.runtime import devices
from mnist_challenge import model as mnist_model
keras.utils.set_random_seed(0)
strategy = devices.evaluation_strategy()
with strategy.scope():
    model = mnist_model.Model(on_cpu=True)
x = np.random.default_rng(0).uniform(size=(examples, 784)).astype(np.float32)
y = np.argmax(model(x).numpy(), axis=1)
attack = AutoAttack(model, epsilon=epsilon, attacks=attacks, strategy=strategy,
                    image_shape=(28, 28, 1))
warm = min(examples, 2 * strategy.num_replicas_in_sync)
attack.evaluate(x[:warm], y[:warm], batch_size=examples)
started = time.perf_counter()
result = attack.evaluate(x, y, batch_size=examples)
seconds = time.perf_counter() - started
if devices.is_chief(strategy):
    np.savez(out, seconds=seconds, robust=result.robust, x_adv=result.x_adv)
"""


def free_ports(count):
    """`count` ports of 127.0.0.1 that nothing listens on at the time of the call."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def run_cluster(workers, threads, out):
    """Runs the workers; returns the chief's saved figures."""
    cluster = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    processes = []
    for index in range(workers):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        env.pop("TF_CONFIG", None)
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": cluster},
                                           "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, REPO, str(threads), str(EXAMPLES.value),
             ATTACKS.value, str(EPSILON), out], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    try:
        errors = [process.communicate(timeout=TIMEOUT.value)[1] for process in processes]
    except subprocess.TimeoutExpired:
        cli.fail(f"{workers} workers took longer than --timeout={TIMEOUT.value} seconds")
    finally:
        for process in processes:
            process.kill()
    for process, error in zip(processes, errors):
        if process.returncode:
            cli.fail(f"a worker of {workers} failed: {error.strip().splitlines()[-1:]}")
    import numpy as np

    with np.load(out) as saved:
        return {name: saved[name] for name in saved.files}


def main():
    import numpy as np

    counts = [int(count) for count in WORKERS.value]
    threads = THREADS.value or max((os.cpu_count() or 1) // max(counts), 1)
    print(f"AutoAttack ({ATTACKS.value}) on the MNIST network, {EXAMPLES.value} examples, "
          f"{threads} CPU thread(s) per worker")
    print(f"{'workers':>7s} {'examples/s':>11s} {'speedup':>8s} {'efficiency':>10s} same result")
    with tempfile.TemporaryDirectory() as folder:
        first = None
        for count in counts:
            figures = run_cluster(count, threads, os.path.join(folder, f"{count}.npz"))
            rate = EXAMPLES.value / float(figures["seconds"])
            first = first or {"count": count, "rate": rate, **figures}
            speedup = rate / first["rate"]
            same = all(np.array_equal(figures[name], first[name]) for name in ("robust", "x_adv"))
            print(f"{count:7d} {rate:11.2f} {speedup:8.2f} "
                  f"{speedup / (count / first['count']):10.0%} {'yes' if same else 'NO'}")


if __name__ == "__main__":
    cli.run(main)
