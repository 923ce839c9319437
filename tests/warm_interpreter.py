"""Runs the challenge scripts for the tests without paying TensorFlow's import in each run.

Importing TensorFlow and Keras costs about 5 CPU-seconds, and the suite runs the scripts about
150 times. `run(argv, cwd=..., env=..., timeout=...)` instead asks a server process (this file
run as a script, one per test process) that has imported them and listed the devices, as a
script's start does, and nothing else: no operation has run, so no thread of TensorFlow's exists
when it forks. Each run is a fork of that server, which runs the script as `__main__` with the
run's own argv, folder, environment, umask, stdin from /dev/null and stdout and stderr to files,
and reports its exit status as Python would give it. What a fork cannot give as a new process
does, the caller asks of a new process (`usable_for`): TensorFlow's own start-up lines and the
settings TensorFlow reads at import (`TF_*`, `CUDA_*`, oneDNN's and OpenMP's variables).
"""

import atexit
import json
import os
import runpy
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

# The variables read while TensorFlow loads: a run whose environment differs in one of them needs
# a new process.
IMPORT_TIME_PREFIXES = ("TF_", "CUDA_", "ONEDNN_", "DNNL_", "MKL_", "OMP_", "KMP_", "XLA_",
                        "PYTHON")
HEADER = struct.Struct("!q")
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

def _run_child(connection, request, stdout, stderr):
    """In the forked child: becomes the script's process, runs it, reports its exit status after
    every exit handler the script registered, and exits."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (stdout, 1), (stderr, 2)):
        os.dup2(source, target)
        os.close(source)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.umask(request["umask"])
    import numpy as np

    np.random.seed()  # as a new process has: numpy's global generator is not reseeded on fork
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    connection.sendall(HEADER.pack(os.getpid()))
    status = {"code": 1}

    def report():
        sys.stdout.flush()
        sys.stderr.flush()
        connection.sendall(HEADER.pack(status["code"]))

    atexit.register(report)  # registered first, so it runs after the script's own exit handlers
    try:
        runpy.run_path(script, run_name="__main__")
        status["code"] = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            status["code"] = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    sys.exit(status["code"])


def serve(path):
    """Listens on the Unix socket `path` and forks a child per request; ends with its parent."""
    import keras  # noqa: F401
    import tensorflow as tf

    tf.config.list_physical_devices()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the system
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
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            _run_child(connection, request, *fds)
        for fd in fds:
            os.close(fd)
        connection.close()


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
        self.process.kill()
        self.process.wait()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


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


def run(argv, *, cwd, env, timeout):
    """Runs `argv` (a script and its arguments) in a fork of the server; returns what
    `subprocess.run(..., capture_output=True, text=True)` would. Raises
    subprocess.TimeoutExpired, having killed the run, after `timeout` seconds."""
    server = _started_server(env)
    request = json.dumps({"argv": [str(arg) for arg in argv], "cwd": str(cwd), "env": env,
                          "umask": _current_umask()}).encode()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(server.path)
        socket.send_fds(connection, [HEADER.pack(len(request))],
                        [stdout.fileno(), stderr.fileno()])
        connection.sendall(request)
        connection.settimeout(timeout)
        pid = None
        try:
            pid = HEADER.unpack(_receive_exactly(connection, HEADER.size))[0]
            status = _receive_exactly(connection, HEADER.size)
            while connection.recv(1):  # the end of the connection: the process has ended
                pass
        except TimeoutError as error:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(argv, timeout) from error
        # No status: the process died of a signal before its exit handlers ran.
        code = HEADER.unpack(status)[0] if status else -signal.SIGKILL
        outputs = []
        for file in (stdout, stderr):
            file.seek(0)
            outputs.append(file.read().decode(errors="replace"))
    return subprocess.CompletedProcess([sys.executable, *argv], code, *outputs)


if __name__ == "__main__":
    serve(sys.argv[1])
