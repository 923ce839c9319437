"""Runs the challenge scripts for the tests without paying TensorFlow's import in each run.

Importing TensorFlow and Keras costs about 5 CPU-seconds, and the suite runs the scripts about
200 times. `run(argv, ...)` (to the end) and `Run(argv, ...)` (started, like subprocess.Popen)
instead ask a server process (this file run as a script, one per test process) that has
imported them and listed the devices, as a script's start does, and nothing else: no operation
has run, so no thread of TensorFlow's exists when it forks. Each run is a fork of that server,
which runs the script as `__main__` with the run's own argv, folder, environment, umask, stdin
from /dev/null and stdout and stderr to the caller's files; the server reaps it and sends the
caller its exit status. What a fork cannot give as a new process does, the caller asks of a new
process (`usable_for`): TensorFlow's own start-up lines and the settings TensorFlow reads at
import (`TF_*`, `CUDA_*`, oneDNN's and OpenMP's variables).
"""

import atexit
import contextlib
import json
import os
import runpy
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

# The variables read while TensorFlow loads: a run whose environment differs in one of them needs
# a new process.
IMPORT_TIME_PREFIXES = ("TF_", "CUDA_", "ONEDNN_", "DNNL_", "MKL_", "OMP_", "KMP_", "XLA_",
                        "PYTHON")
HEADER = struct.Struct("!q")
# The signals whose handlers the server sets: a run reported ended, the server stopped.
HANDLED = {signal.SIGCHLD, signal.SIGTERM}
START_TIMEOUT = 300


def _import_time_settings(env):
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_PREFIXES)}


def _receive_exactly(connection, size):
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# The server side.

def _run_child(request, stdout, stderr):
    """In the forked child: becomes the script's process and runs it; its exit status is the
    one Python would give it."""
    for number in HANDLED:
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # a signal sent meanwhile lands now
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    for fd in {devnull, stdout, stderr}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.umask(request["umask"])
    import numpy as np

    np.random.seed()  # as a new process has: numpy's global generator is not reseeded on fork
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def serve(path):
    """Listens on the Unix socket `path`; for each request forks a child that runs the script,
    sends the caller the child's pid and, once it has ended, its exit status. Ends with its
    parent."""
    import keras  # noqa: F401
    import tensorflow as tf

    tf.config.list_physical_devices()
    running = {}  # pid: the caller's connection

    def report_ended(signum=None, frame=None, block=False):
        while running:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return
            connection = running.pop(pid)
            with contextlib.suppress(OSError):  # the caller may have gone
                connection.sendall(HEADER.pack(os.waitstatus_to_exitcode(status)))
            connection.close()

    def stop(signum=None, frame=None):
        """Kills the runs still going (a server a test left running) and reports them."""
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        for pid in running:
            os.kill(pid, signal.SIGKILL)
        report_ended(block=True)
        os._exit(0)

    signal.signal(signal.SIGCHLD, report_ended)
    signal.signal(signal.SIGTERM, stop)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(16)
    os.rename(path + ".new", path)
    listener.settimeout(1)
    while os.getppid() == parent:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        connection.settimeout(None)
        header, fds, _, _ = socket.recv_fds(connection, HEADER.size, 2)
        request = json.loads(_receive_exactly(connection, HEADER.unpack(header)[0]))
        # Blocked until the child is in `running` and, in the child, until the handlers are
        # Python's own again.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = os.fork()
        if pid == 0:
            for inherited in (listener, connection, *running.values()):
                inherited.close()
            _run_child(request, *fds)
        for fd in fds:
            os.close(fd)
        running[pid] = connection
        connection.sendall(HEADER.pack(pid))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    stop()


# The tests' side.

class _Server:
    def __init__(self, env):
        self.folder = tempfile.mkdtemp(prefix="warm-interpreter-")
        self.path = os.path.join(self.folder, "socket")
        self.settings = _import_time_settings(env)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.path],
                                        env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the warm interpreter did not start")
            time.sleep(0.05)

    def close(self):
        """Stops the server, which kills the runs still going and reports them."""
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_server = None
_server_lock = threading.Lock()


def _started_server(env):
    global _server
    with _server_lock:
        if _server is None:
            _server = _Server(env)
            atexit.register(_server.close)
        return _server


def usable_for(argv, env):
    """Whether a fork can stand for a new process: not where TensorFlow's own lines are asked
    for, nor where the settings TensorFlow reads at import differ from the server's."""
    if "--tf_log" in argv or "--tf_log=true" in argv:
        return False
    return _server is None or _import_time_settings(env) == _server.settings


def _current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Run:
    """`argv` (a script and its arguments) running in a fork of the server, its output going to
    the open files `stdout` and `stderr`: the part of subprocess.Popen the tests use."""

    def __init__(self, argv, *, cwd, env, stdout, stderr):
        server = _started_server(env)
        self.args = [sys.executable, *argv]
        self.returncode = None
        request = json.dumps({"argv": [str(arg) for arg in argv], "cwd": str(cwd), "env": env,
                              "umask": _current_umask()}).encode()
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(server.path)
        socket.send_fds(self._connection, [HEADER.pack(len(request))],
                        [stdout.fileno(), stderr.fileno()])
        self._connection.sendall(request)
        self.pid = HEADER.unpack(_receive_exactly(self._connection, HEADER.size))[0]

    def poll(self):
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self.wait()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                status = _receive_exactly(self._connection, HEADER.size)
            except TimeoutError as error:
                raise subprocess.TimeoutExpired(self.args, timeout) from error
            if status is None:
                raise RuntimeError("the warm interpreter ended before the run it started")
            self.returncode = HEADER.unpack(status)[0]
            self._connection.close()
        return self.returncode

    def send_signal(self, number):
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


def run(argv, *, cwd, env, timeout):
    """Runs `argv` (a script and its arguments) in a fork of the server; returns what
    `subprocess.run(..., capture_output=True, text=True)` would. Raises
    subprocess.TimeoutExpired, having killed the run, after `timeout` seconds."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = Run(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        outputs = []
        for file in (stdout, stderr):
            file.seek(0)
            outputs.append(file.read().decode(errors="replace"))
    return subprocess.CompletedProcess(process.args, process.returncode, *outputs)


if __name__ == "__main__":
    serve(sys.argv[1])
