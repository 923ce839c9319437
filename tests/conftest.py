"""Test set-up: each test process's share of the cores for TensorFlow's thread pools, the
repository on sys.path, two logical CPUs, and the fixtures of the data, the TF1
checkpoints and the challenge server's databases (helpers live in helpers.py and
serving_helpers.py).

The datasets come from ../shared/data where it has them, else from a cache ($MADRY_TEST_DATA,
by default ~/.cache/madry-challenges) that the data readers' own downloader fills once per
machine; the TF1 checkpoints only from ../shared/fixtures."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The test processes (pytest -n 2) share the machine's cores: each TensorFlow, and each script it
# starts, gets its share for its intra- and inter-op pools. Pools of every core in each process
# wait on each other's cores: on 2 cores the suite took 5-8% longer (docs/tests.md).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    for _pool in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(_pool, str(max(1, _share)))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from helpers import REPO, serve_folder, shared_path  # noqa: E402

sys.path.insert(0, REPO)

# The 2-replica tests need two devices; this must happen before TensorFlow starts.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture
def mnist_data():
    return shared_path("data", "mnist")


@pytest.fixture
def mnist_fixture():
    return shared_path("fixtures", "tf1_checkpoints", "mnist")


@pytest.fixture
def cifar_data():
    return shared_path("data", "cifar10")


@pytest.fixture
def cifar_fixture():
    return shared_path("fixtures", "tf1_checkpoints", "cifar10_simple")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request, tmp_path_factory):
    """A challenge server's database of each kind, fresh for the module: open_database's keyword
    arguments."""
    from serving_helpers import database_at

    with database_at(request.param, tmp_path_factory) as where:
        yield where


@pytest.fixture(scope="session")
def two_replicas():
    """One MirroredStrategy over the two logical CPUs for the whole session: strategies created
    anew in one process number their collective all-reduces alike, and would collide."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def file_server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    server, url = serve_folder(served)
    yield served, url
    server.shutdown()
