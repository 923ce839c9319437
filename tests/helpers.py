"""What many tests use: paths to `../shared`, the real scripts run as a user runs them, and
readers of what those scripts write."""

import concurrent.futures
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def shared_path(*parts):
    """A path under ../shared; fails the test, naming the path, where it is missing."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.fail(f"shared test material missing: {path} (the tests need ../shared beside "
                    "the checkout)")
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
    """Runs one of the challenge scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=script_environment())


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
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def free_port():
    """A port on 127.0.0.1 that nothing listens on at the time of the call."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SLOW_BODY_BYTES = 1 << 20


class FileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder `served`; `/cut/NAME` sends half of NAME then closes, `/slow/NAME`
    sends a little of a large body then stalls."""

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
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"
