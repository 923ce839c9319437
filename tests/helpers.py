"""What many tests use: paths to `../shared` (the datasets downloaded into a cache where it has
none), the real scripts run as a user runs them, and readers of what those scripts write."""

import concurrent.futures
import contextlib
import dataclasses
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
import warm_interpreter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
# The folder the datasets are downloaded into where ../shared has no copy.
DATA_CACHE_VARIABLE = "MADRY_TEST_DATA"
DATASETS = ("mnist", "cifar10")


def shared_path(*parts):
    """A path under ../shared; fails the test, naming the path, where it is missing.

    `shared_path("data", NAME, ...)` of a dataset in DATASETS resolves through `dataset_path`, so
    that a machine without ../shared/data downloads the dataset once, into a cache.
    """
    if len(parts) >= 2 and parts[0] == "data" and parts[1] in DATASETS:
        path = os.path.join(dataset_path(parts[1]), *parts[2:])
    else:
        path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.fail(f"shared test material missing: {path} (the tests need ../shared beside "
                    "the checkout)")
    return path


def data_cache():
    """The folder that holds the downloaded datasets: $MADRY_TEST_DATA where set, else
    ~/.cache/madry-challenges."""
    return os.environ.get(DATA_CACHE_VARIABLE) or \
        os.path.join(os.path.expanduser("~"), ".cache", "madry-challenges")


def official_base_urls():
    """{dataset: the address its official files are served under}, as the data readers have
    them."""
    from cifar10_challenge import cifar10_input
    from mnist_challenge import mnist_input

    return {"mnist": mnist_input.SOURCE_URL,
            "cifar10": cifar10_input.ARCHIVE.url.rsplit("/", 1)[0] + "/"}


def _fetch_mnist(folder, base_url):
    """The reader's own download of its missing files into `folder`, from `base_url`."""
    from mnist_challenge import mnist_input

    files = [dataclasses.replace(file, url=base_url + file.name)
             for file in mnist_input.OFFICIAL_FILES]
    with mock.patch.object(mnist_input, "OFFICIAL_FILES", files):
        mnist_input._fetch_missing(folder)


def _fetch_cifar10(folder, base_url):
    """The reader's own download and unpacking of the official archive into `folder`, from
    `base_url`, where any file is missing."""
    from cifar10_challenge import cifar10_input

    archive = cifar10_input.ARCHIVE
    with mock.patch.object(cifar10_input, "ARCHIVE",
                           dataclasses.replace(archive, url=base_url + archive.name)):
        cifar10_input._fetch_missing(folder)


def _wrong_content(name, folder):
    """The files of dataset `name` in `folder` whose content is not the official one, by the
    checksums the downloader records (MNIST's; CIFAR-10's files are checked as one archive, when
    downloaded)."""
    from common.io import download

    if name != "mnist":
        return []
    return [file for file, md5 in download.MNIST_CONTENT_MD5.items()
            if os.path.exists(os.path.join(folder, file))
            and download.gunzipped_md5(os.path.join(folder, file)) != md5]


_FETCH = {"mnist": _fetch_mnist, "cifar10": _fetch_cifar10}


@contextlib.contextmanager
def _locked(path):
    """Holds an exclusive lock on the file `path` (made where missing), so that test processes
    sharing a cache fill it one at a time; no lock where the system has no flock (the downloads
    still land under their names only once complete and checked)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def resolve_data(name, shared, cache, base_urls):
    """The folder of the dataset `name` (one of DATASETS) for the tests.

    `shared`/data/`name` where it exists, used as it is. Else `cache`/`name`, where the data
    reader's own downloader fetches whichever official files are missing from
    `base_urls[name]`, each checked against its official size and sha256 (and MNIST's content
    against its official md5s, cached files included; a wrong cached file is fetched anew), so
    that a second call downloads nothing. Fails the test, naming the URL and the cache folder,
    where the download fails or gives a wrong file; nothing wrong stays under a real name.
    """
    from common.runtime.errors import UserError

    own = os.path.join(shared, "data", name)
    if os.path.isdir(own):
        return own
    folder = os.path.join(cache, name)
    os.makedirs(folder, exist_ok=True)
    with _locked(os.path.join(cache, f".{name}.lock")):
        for file in _wrong_content(name, folder):
            os.remove(os.path.join(folder, file))
        try:
            _FETCH[name](folder, base_urls[name])
        except UserError as error:
            pytest.fail(f"{own} is absent, and the {name} test data could not be put into the "
                        f"cache (${DATA_CACHE_VARIABLE} chooses it): {error}", pytrace=False)
        wrong = _wrong_content(name, folder)
        for file in wrong:
            os.remove(os.path.join(folder, file))
    if wrong:
        pytest.fail(f"{own} is absent, and the {name} files downloaded into {folder} from "
                    f"{', '.join(base_urls[name] + file for file in wrong)} are not the "
                    "official content (their uncompressed md5 differs); removed",
                    pytrace=False)
    return folder


_RESOLVED = {}


def dataset_path(name):
    """`resolve_data` for ../shared, the cache and the official addresses, once a process: a
    failure is remembered, and fails every later test that needs the dataset alike."""
    if name not in _RESOLVED:
        try:
            _RESOLVED[name] = resolve_data(name, SHARED, data_cache(), official_base_urls()), None
        except pytest.fail.Exception as failure:
            _RESOLVED[name] = None, failure.msg
    path, failure = _RESOLVED[name]
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    return path


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


def script_environment(**extra):
    """The environment of a script run as a user runs it: on the CPU, without the caller's
    TF_CONFIG, plus `extra`."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    return {**env, **extra}


def run_script(script, *args, cwd=None, timeout=600):
    """Runs one of the challenge scripts as a user would; returns the CompletedProcess.

    The run is a fork of a process that has imported TensorFlow (warm_interpreter.py) wherever a
    fork stands for a new process, and a new process elsewhere.
    """
    argv, env = [os.path.join(REPO, script), *args], script_environment()
    if warm_interpreter.usable_for(argv, env):
        return warm_interpreter.run(argv, cwd=cwd or REPO, env=env, timeout=timeout)
    return subprocess.run([sys.executable, *argv], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def start_script(script, *args, output, cwd=None):
    """Starts one of the challenge scripts as a user would, stdout and stderr going to the open
    file `output`; returns its subprocess.Popen, or the warm_interpreter.Run that answers the
    same calls (poll, wait, kill, terminate, send_signal, pid, returncode) where a fork stands
    for a new process."""
    argv, env = [os.path.join(REPO, script), *args], script_environment()
    if warm_interpreter.usable_for(argv, env):
        return warm_interpreter.Run(argv, cwd=cwd or REPO, env=env, stdout=output, stderr=output)
    return subprocess.Popen([sys.executable, *argv], cwd=cwd or REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)


def run_side_by_side(runs):
    """Runs each (script, arguments, cwd) of `runs` as run_script does, three at a time; returns
    the CompletedProcesses in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda run: run_script(run[0], *run[1], cwd=run[2]), runs))


def error_lines(result):
    """The `Error:` lines a script printed on stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


def assert_one_error_line(result, message, context=None):
    """The script failed with exit status 1 and one `Error:` line containing `message`."""
    report = (context, result.returncode, result.stderr[-2000:])
    assert result.returncode == 1, report
    assert "Traceback" not in result.stderr, report
    errors = error_lines(result)
    assert len(errors) == 1 and message in errors[0], report


def checkpoint_values(path):
    """Every variable a checkpoint holds, by name (the bookkeeping entries left out)."""
    import tensorflow as tf  # imported here: a process that needs only the data helpers starts fast

    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def free_port():
    """A port on 127.0.0.1 that nothing listens on at the time of the call."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_environments(count):
    """The environments of the `count` workers of one cluster on 127.0.0.1 (ports picked free),
    worker i's `TF_CONFIG` naming it task i."""
    workers = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    return [script_environment(TF_CONFIG=json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        for index in range(count)]


# What a worker prints when the port it was given was taken between the pick and its start.
PORT_TAKEN = ("Address already in use", "Could not start gRPC server")


def run_cluster(script, *args, workers=2, timeout=400):
    """Runs `script` as a cluster of `workers` processes on 127.0.0.1, each a new process (a
    fork would keep TensorFlow's state from before TF_CONFIG), its ports picked again where one
    was taken; returns (returncode, stdout, stderr) of each worker, the chief first."""
    for _ in range(3):
        processes = [subprocess.Popen(
            [sys.executable, os.path.join(REPO, script), *args], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for env in cluster_environments(workers)]
        try:
            results = [(process, *process.communicate(timeout=timeout))
                       for process in processes]
        finally:
            for process in processes:
                process.kill()
        if not any(taken in err for _, _, err in results for taken in PORT_TAKEN):
            break
    return [(process.returncode, out, err) for process, out, err in results]


SLOW_BODY_BYTES = 1 << 20


class FileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder `served`; `/cut/NAME` sends half of NAME then closes, `/slow/NAME`
    sends a little of a large body then stalls. The server's `requests` lists each request
    received, as "METHOD PATH"."""

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:
            self.server.requests.append(f"{self.command} {self.path}")
        return parsed

    def do_GET(self):
        if self.path.startswith("/cut/"):
            body = (self.server.served / self.path[len("/cut/"):]).read_bytes()
            self._send_part(len(body), body[: len(body) // 2])
        elif self.path.startswith("/slow/"):
            self._send_part(SLOW_BODY_BYTES, b"PK" * 1000)
            time.sleep(30)
        else:
            super().do_GET()

    def _send_part(self, length, part):
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(part)
        self.wfile.flush()

    def translate_path(self, path):
        return str(self.server.served / path.lstrip("/"))

    def log_message(self, *args):
        pass


def serve_folder(folder):
    """An HTTP server of `folder` on 127.0.0.1, serving in a thread; its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    server.served = folder
    server.requests = []
    server.daemon_threads = True
    # A short poll: shutdown() waits for it.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"
