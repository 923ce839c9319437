"""Evaluation over a cluster of worker processes on 127.0.0.1 (TF_CONFIG,
MultiWorkerMirroredStrategy) gives what one process gives: AutoAttack through the library on 3
workers; autoattack.py on 2 workers killed by SIGKILL mid-run and rerun resumes to the result of
a run never interrupted; and Square,
the one attack drawing random signs inside the graph, over two replicas equals one device."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import REPO, cluster_environments

from common.attacks import AutoAttack
from common.attacks.square import Square

TESTS = os.path.dirname(os.path.abspath(__file__))
EPSILON = 0.008
BATCH = 5
WORKER_SECONDS = 300

# A worker of the library test: AutoAttack (standard) on the tiny problem under the evaluation
# strategy of its TF_CONFIG; each worker saves what it received, the chief's log goes to stdout.
LIBRARY_WORKER = """
import json, sys
sys.path[:0] = sys.argv[1:3]
import numpy as np
from common.attacks import AutoAttack
from common.runtime import devices
from test_cluster_eval import BATCH, EPSILON, tiny_problem
strategy = devices.evaluation_strategy()
with strategy.scope():
    model, x, y = tiny_problem()
    result = AutoAttack(model, epsilon=EPSILON, image_shape=(28, 28, 1), log=print).evaluate(
        x, y, batch_size=BATCH, state_path=sys.argv[3] + "/state.npz")
np.savez(f"{sys.argv[3]}/worker{strategy.cluster_resolver.task_id}.npz", x_adv=result.x_adv,
         robust=result.robust, broken_by=result.broken_by,
         accuracy_after=json.dumps(result.accuracy_after))
"""

pytestmark = pytest.mark.slow


def tiny_problem():
    """A linear model of MNIST's input shape with seeded weights, 10 seeded inputs and the
    model's own labels (all clean examples correct), so that the attacks leave some robust."""
    rng = np.random.default_rng(31)
    weights = rng.normal(scale=0.05, size=(784, 10)).astype(np.float32)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model.set_weights([weights, np.zeros(10, np.float32)])
    x = rng.uniform(size=(10, 784)).astype(np.float32)
    return model, x, np.argmax(x @ weights, axis=1)


def start_workers(command, environments):
    return [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for env in environments]


def finished(processes, timeout=WORKER_SECONDS):
    """(returncode, stdout, stderr) of each process, killed where still running at `timeout`."""
    try:
        return [(process.wait(timeout) or process.returncode, *process.communicate())
                for process in processes]
    finally:
        for process in processes:
            process.kill()


def assert_same_result(found, expected):
    np.testing.assert_array_equal(found["robust"], expected["robust"])
    np.testing.assert_array_equal(found["broken_by"], expected["broken_by"])
    np.testing.assert_array_equal(found["x_adv"], expected["x_adv"])


def test_autoattack_on_three_workers_equals_one_process(tmp_path):
    model, x, y = tiny_problem()
    single = AutoAttack(model, epsilon=EPSILON, image_shape=(28, 28, 1)).evaluate(
        x, y, batch_size=BATCH)
    # Not a trivial case: some points broken, some robust after the four attacks.
    assert 0 < single.robust_accuracy < 1 and single.clean_accuracy == 1
    workers = start_workers([sys.executable, "-c", LIBRARY_WORKER, REPO, TESTS, str(tmp_path)],
                            cluster_environments(3))
    results = finished(workers)
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    chief_log, *others = [out for _, out, _ in results]
    assert "robust accuracy after SQUARE" in chief_log and others == ["", ""]
    expected = {"robust": single.robust, "broken_by": single.broken_by, "x_adv": single.x_adv}
    for index in range(3):
        saved = np.load(tmp_path / f"worker{index}.npz")
        assert_same_result(saved, expected)
        assert json.loads(str(saved["accuracy_after"])) == single.accuracy_after
    assert os.path.exists(tmp_path / "state.npz")  # the chief's


def autoattack_command(store, model_dir, data):
    return [sys.executable, os.path.join(REPO, "mnist_challenge", "autoattack.py"),
            f"--model_dir={model_dir}", f"--data_path={data}", "--num_eval_examples=4",
            "--eval_batch_size=2", "--epsilon=0.05", "--attacks=apgd-ce,apgd-t",
            f"--store_adv_path={store}"]


def batches_done(folder):
    """The batches done of the attack under way by the chief's state file in `folder` (0
    where there is none yet, or it is being replaced)."""
    for path in glob.glob(os.path.join(folder, "aa.state-*.npz")):
        try:
            with np.load(path) as saved:
                return json.loads(str(saved["meta"]))["batches_done"]
        except (OSError, ValueError, KeyError):
            return 0
    return 0


def test_a_worker_killed_mid_run_stops_the_job_and_a_rerun_resumes_to_the_whole_run(
        tmp_path, mnist_fixture, mnist_data):
    # The reference is a cluster run never interrupted: each worker attacks one example a
    # batch, and where a CPU's convolution rounds a batch of one otherwise than a batch of two
    # (AVX2 with one thread), APGD-T may end elsewhere than in one process.
    (tmp_path / "whole").mkdir()
    (tmp_path / "cluster").mkdir()
    store = tmp_path / "cluster" / "aa.npy"
    command = autoattack_command(store, mnist_fixture, mnist_data)
    chief, worker = start_workers(command, cluster_environments(2))
    deadline = time.monotonic() + WORKER_SECONDS
    while batches_done(tmp_path / "cluster") < 1 and chief.poll() is None and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)  # during APGD-CE's second batch
    [(returncode, _, err)] = finished([chief], timeout=150)
    assert returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert "a worker of the cluster stopped" in errors[0]
    assert not store.exists() and batches_done(tmp_path / "cluster") >= 1

    results = finished(start_workers(command, cluster_environments(2)))
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    (_, chief_out, chief_err), (_, worker_out, _) = results
    assert "no attack done" in chief_out and worker_out == ""
    bars = " ".join(chief_err.split())  # the finished batch is not attacked again
    assert "apgd-ce: 50%" in bars and "apgd-ce: 0%" not in bars
    whole = autoattack_command(tmp_path / "whole" / "aa.npy", mnist_fixture, mnist_data)
    for returncode, _, err in finished(start_workers(whole, cluster_environments(2))):
        assert returncode == 0, err[-3000:]
    np.testing.assert_array_equal(np.load(store), np.load(tmp_path / "whole" / "aa.npy"))
    resumed_report, whole_report = (json.load(open(tmp_path / folder / "aa.json"))
                                    for folder in ("cluster", "whole"))
    for key in ("attacks", "broken_by", "robust_accuracy", "clean_accuracy"):
        assert resumed_report[key] == whole_report[key], key
    assert sorted(os.listdir(tmp_path / "cluster")) == ["aa.json", "aa.npy"]


def test_square_over_two_replicas_equals_one_device(two_replicas):
    model, x, y = tiny_problem()
    for norm, epsilon in (("Linf", 0.03), ("L2", 1.0)):  # radii where Square breaks some
        one, two = (Square(model, epsilon=epsilon, norm=norm, steps=50, image_shape=(28, 28, 1),
                           strategy=strategy).perturb(x, y)
                    for strategy in (tf.distribute.get_strategy(), two_replicas))
        np.testing.assert_array_equal(one, two, err_msg=norm)
        assert np.any(one != x), norm
