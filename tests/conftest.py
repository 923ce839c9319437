"""Shared test set-up: paths to `../shared`, helpers to run the real scripts, two logical CPUs."""

import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
sys.path.insert(0, REPO)

# The 2-replica tests need two devices; this must happen before TensorFlow starts.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


def shared_path(*parts):
    """A path under ../shared; fails the test, naming the path, where it is missing."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.fail(f"shared test material missing: {path} (the tests need ../shared beside "
                    "the checkout)")
    return path


@pytest.fixture
def mnist_data():
    return shared_path("data", "mnist")


@pytest.fixture
def mnist_fixture():
    return shared_path("fixtures", "tf1_checkpoints", "mnist")


def writable_copy(folder, tmp_path):
    """A copy of a read-only fixture folder that scripts may write into (as into a fetched
    released model, where eval.py writes its summaries)."""
    target = tmp_path / "released"
    shutil.copytree(folder, target)
    return str(target)


class PicklePayload:
    """What an attacker would hide in a pickled submission: unpickling it creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def run_script(script, *args, cwd=None, timeout=600):
    """Runs one of the challenge scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.fixture
def cifar_data():
    return shared_path("data", "cifar10")


@pytest.fixture
def cifar_fixture():
    return shared_path("fixtures", "tf1_checkpoints", "cifar10_simple")


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the two logical CPUs for the whole session: strategies created
    anew in one process number their collective all-reduces alike, and would collide."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
