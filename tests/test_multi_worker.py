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
from helpers import REPO, checkpoint_values, run_cluster, script_environment, shared_path

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


pytestmark = pytest.mark.slow


def written(model_dir):
    """The files of a model folder, its TensorBoard event files counted."""
    names = os.listdir(model_dir)
    events = sum(name.startswith("events.") for name in names)
    return sorted(name for name in names if not name.startswith("events.")) + [
        f"events ({events} file{'s' if events != 1 else ''})"]


# MNIST's plain PGD step is the CIFAR-10 run's; free training adds the gather and the guard.
@pytest.mark.parametrize("script, data, steps, extra", [
    ("cifar10_challenge/train.py", "cifar10", 1, ("--filters=[16,16,32,64]", "--num_steps=2",
                                                  "--attack_batch_norm=eval",
                                                  "--training_batch_size=8")),
    # free training gathers its perturbation from both workers; the guard all-reduces its count
    ("mnist_challenge/train.py", "mnist", 4, ("--epsilon=0.1", "--training_method=free",
                                              "--replay_m=2", "--overfitting_check_steps=2",
                                              "--overfitting_check_examples=60",
                                              "--training_batch_size=20")),
])
def test_two_workers_equal_one_process_over_two_devices(tmp_path, script, data, steps, extra):
    common = (f"--data_path={shared_path('data', data)}", f"--max_num_training_steps={steps}",
              "--num_checkpoint_steps=2", "--num_output_steps=2", "--num_summary_steps=2", *extra)
    cluster_dir, single_dir = tmp_path / "cluster", tmp_path / "single"
    results = run_cluster(script, f"--model_dir={cluster_dir}", *common)
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    chief_out, worker_out = (out for _, out, _ in results)
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
