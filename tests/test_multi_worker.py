"""Both train.py scripts as a 2-worker cluster on 127.0.0.1 (MultiWorkerMirroredStrategy, one CPU
each) equal one process over 2 logical CPU devices with the same global batch and seed.

The two differ in kernel threading, so in round-off; PGD's gradient signs amplify round-off from
step to step, hence few steps: 4 for MNIST, 1 for CIFAR-10, whose synchronized batch norm
spreads any flipped sign over the whole batch.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, checkpoint_values, cluster_environments, script_environment, shared_path

# The reference: train.py in one process whose strategy mirrors over two logical CPUs.
TWO_DEVICES = """
import runpy, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from common.runtime import devices
devices.training_strategy = lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# What a worker prints when the port it was given was taken in the meantime.
PORT_TAKEN = ("Address already in use", "Could not start gRPC server")
ATTEMPTS = 3

pytestmark = pytest.mark.slow


def run_workers(script, args):
    """Runs the 2-worker cluster once; returns (returncode, stdout, stderr) of each worker."""
    processes = [subprocess.Popen(
        [sys.executable, os.path.join(REPO, script), *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for env in cluster_environments(2)]
    try:
        return [(process, *process.communicate(timeout=400)) for process in processes]
    finally:
        for process in processes:
            process.kill()


def run_cluster(script, args):
    """The workers' outputs; ports are picked free, and picked again where one was taken
    between the pick and the worker's start."""
    for _ in range(ATTEMPTS):
        results = run_workers(script, args)
        if not any(taken in err for _, _, err in results for taken in PORT_TAKEN):
            break
    for process, _, err in results:
        assert process.returncode == 0, err
    return [out for _, out, _ in results]


def written(model_dir):
    """The files of a model folder, its TensorBoard event files counted."""
    names = os.listdir(model_dir)
    events = sum(name.startswith("events.") for name in names)
    return sorted(name for name in names if not name.startswith("events.")) + [
        f"events ({events} file{'s' if events != 1 else ''})"]


@pytest.mark.parametrize("script, data, steps, extra", [
    ("mnist_challenge/train.py", "mnist", 4, ("--epsilon=0.1", "--k=3", "--a=0.04",
                                              "--training_batch_size=20")),
    ("cifar10_challenge/train.py", "cifar10", 1, ("--filters=[16,16,32,64]", "--num_steps=2",
                                                  "--attack_batch_norm=eval",
                                                  "--training_batch_size=8")),
    # free training gathers its perturbation from both workers; the guard all-reduces its count
    ("mnist_challenge/train.py", "mnist", 4, ("--epsilon=0.1", "--training_method=free",
                                              "--replay_m=2", "--overfitting_check_steps=2",
                                              "--training_batch_size=20")),
])
def test_two_workers_equal_one_process_over_two_devices(tmp_path, script, data, steps, extra):
    common = (f"--data_path={shared_path('data', data)}", f"--max_num_training_steps={steps}",
              "--num_checkpoint_steps=2", "--num_output_steps=2", "--num_summary_steps=2", *extra)
    cluster_dir, single_dir = tmp_path / "cluster", tmp_path / "single"
    chief_out, worker_out = run_cluster(script, (f"--model_dir={cluster_dir}", *common))
    single = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES, REPO, os.path.join(REPO, script),
         f"--model_dir={single_dir}", *common],
        env=script_environment(), capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr
    assert "Step 0:" in chief_out and worker_out == ""
    checkpoint_files = sorted(f"checkpoint-{step}.{suffix}" for step in {*range(0, steps, 2), steps}
                              for suffix in ("data-00000-of-00001", "index"))
    guard = ["last_good_check"] if "--overfitting_check_steps=2" in extra else []
    assert written(cluster_dir) == written(single_dir) == [
        "checkpoint", *checkpoint_files, "config.json", *guard, "events (1 file)"]
    expected = checkpoint_values(f"{single_dir}/checkpoint-{steps}")
    found = checkpoint_values(f"{cluster_dir}/checkpoint-{steps}")
    assert found.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(found[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
