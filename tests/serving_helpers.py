"""What the server tests share: serve.py processes on local ports, participants, uploads, valid
attacks, and a PostgreSQL server (the machine's own, or a throwaway one started with the
installed initdb and pg_ctl)."""

import atexit
import contextlib
import glob
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import pytest
import requests
from helpers import REPO, free_port, run_script, script_environment, shared_path, start_script

MNIST_SERVE = "mnist_challenge/serve.py"
EPSILON = 0.3
POSTGRES_VARIABLE = "MADRY_TEST_POSTGRES_URL"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
START_TIMEOUT = 120
SCORE_TIMEOUT = 120
CACHE_WAIT = 2.5  # the web server reads the leaderboard and the settings at most every 2 s
# Every serve.py process the tests started and have not stopped.
_RUNNING = []


def mnist_test_set():
    from mnist_challenge import mnist_input

    data = mnist_input.MNISTData(shared_path("data", "mnist"))
    return data.test_images.astype(np.float32), data.test_labels


def noised_model(folder):
    """The MNIST fixture with its last layer's weights noised, as a TF1 checkpoint in `folder`:
    another model for the same challenge."""
    import tensorflow as tf  # here: most server tests' processes need no TensorFlow

    source = tf.train.latest_checkpoint(shared_path("fixtures", "tf1_checkpoints", "mnist"))
    reader = tf.train.load_checkpoint(source)
    with tf.Graph().as_default():
        variables = {}
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if name == "Variable_6":  # the logits' weights, (1024, 10)
                value = value + np.random.default_rng(0).normal(0, value.std(), value.shape) \
                    .astype(value.dtype)
            variables[name] = tf.compat.v1.Variable(value, name=name.replace("/", "_"))
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "checkpoint"), global_step=1)
    return folder


def random_sign_attack(images, seed, epsilon=EPSILON):
    """A valid submission: each pixel moved by +-epsilon at random, clipped to [0, 1]."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], images.shape)
    return np.clip(images + epsilon * signs, 0, 1).astype(np.float32)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


class Server:
    """A serve.py process of `role`, started at once, its output in `state_dir`/../NAME.out;
    `open_files`: its (soft, hard) limit of open files, as `ulimit -n` sets them."""

    def __init__(self, state_dir, *flags, role="both", database_url=None, script=MNIST_SERVE,
                 model_dir=None, data_path=None, port=None, open_files=None):
        os.makedirs(state_dir, exist_ok=True)
        self.state_dir = str(state_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.role = role
        self.flags = flags
        self.database_url = database_url
        model_dir = model_dir or shared_path("fixtures", "tf1_checkpoints", "mnist")
        data_path = data_path or shared_path("data", "mnist")
        self.command = [sys.executable, os.path.join(REPO, script), f"--state_dir={state_dir}",
                        f"--role={role}", f"--port={self.port}", f"--model_dir={model_dir}",
                        f"--data_path={data_path}", *flags]
        if database_url:
            self.command.append(f"--database_url={database_url}")
        self.output_path = f"{self.state_dir.rstrip('/')}.{role}.{uuid.uuid4().hex[:8]}.out"
        self.process = None
        self.port_tries = 0
        self.open_files = open_files
        self.start()

    def start(self):
        with open(self.output_path, "ab") as output:
            if self.open_files is None:
                self.process = start_script(*self.command[1:], output=output)
            else:
                self.process = subprocess.Popen(self.command, stdout=output,
                                                stderr=subprocess.STDOUT, cwd=REPO,
                                                env=script_environment(),
                                                preexec_fn=self._limit_open_files)
        _RUNNING.append(self)

    def _limit_open_files(self):
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def output(self):
        with open(self.output_path, encoding="utf-8", errors="replace") as output:
            return output.read()

    def _check_alive(self, what):
        if self.process.poll() is not None:
            pytest.fail(f"serve.py ({self.role}) exited with {self.process.returncode} while "
                        f"{what}:\n{self.output()[-4000:]}")

    def wait_ready(self, timeout=START_TIMEOUT):
        """Until the web server answers, or (a scorer) the scorer waits for jobs. Where another
        process took the port between free_port() and the server's bind, on another port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None and "Address already in use" in self.output() \
                    and self.port_tries < 3:
                self.port_tries += 1
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.command = [arg for arg in self.command if not arg.startswith("--port=")] + \
                    [f"--port={self.port}"]
                self.start()
            self._check_alive("starting")
            if self.role == "scorer":
                if "waiting for jobs" in self.output():
                    return self
            else:
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{self.url}/api/leaderboard", timeout=5).status_code == 200:
                        return self
            time.sleep(0.1)
        pytest.fail(f"serve.py ({self.role}) not ready after {timeout} s:\n"
                    f"{self.output()[-4000:]}")

    def wait_scorer_ready(self, timeout=START_TIMEOUT):
        """Until the scorer of a `both` process waits for jobs."""
        deadline = time.monotonic() + timeout
        while "waiting for jobs" not in self.output():
            self._check_alive("starting its scorer")
            if time.monotonic() > deadline:
                pytest.fail(f"no scorer after {timeout} s:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        return self

    def kill(self):
        """SIGKILL, as a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self in _RUNNING:
            _RUNNING.remove(self)


@pytest.fixture(autouse=True)
def stop_servers_after_each_test():
    """Stops the servers a test started, passed or failed (import it into a test module);
    those of module fixtures, started before, are left to their fixtures."""
    before = list(_RUNNING)
    yield
    for server in [server for server in _RUNNING if server not in before]:
        server.stop()


@atexit.register
def _stop_every_server():
    for server in list(_RUNNING):
        server.stop()


def run_serve(*flags, timeout=120):
    """serve.py run to its end (adding a participant, or failing), as run_script runs a script
    (a fork of the warm interpreter where one stands for a new process): the CompletedProcess."""
    return run_script(MNIST_SERVE, *flags, timeout=timeout)


def open_database(state_dir=None, database_url=None, challenge="MNIST"):
    """The server's database, opened here as the server of `challenge` opens it."""
    from common.serving import database

    db = database.Database(database_url, str(state_dir), challenge)
    db.create()
    return db


def add_participant(db, name=None):
    """A new participant in the server's database (as --add_participant does): (name, token)."""
    from common.serving import participants

    name = name or f"p-{uuid.uuid4().hex[:8]}"
    return name, participants.add(db, name)


def upload(url, token, data, filename="attack.npy", track=None, attack=None, timeout=120):
    """POST /api/submissions with the bytes `data` as the file; the requests Response."""
    fields = {key: value for key, value in (("track", track), ("attack", attack)) if value}
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.post(f"{url}/api/submissions", headers=headers, timeout=timeout,
                         files={"file": (filename, data, "application/octet-stream")},
                         data=fields)


def status(url, token, submission_id):
    return requests.get(f"{url}/api/submissions/{submission_id}",
                        headers={"Authorization": f"Bearer {token}"}, timeout=30)


def wait_done(url, token, submission_id, timeout=SCORE_TIMEOUT, servers=()):
    """The submission's view once scored or rejected; fails after `timeout` s, showing the
    output of `servers`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = status(url, token, submission_id)
        assert answer.status_code == 200, answer.text
        view = answer.json()
        if view["status"] in ("scored", "rejected"):
            return view
        time.sleep(0.1)
    logs = "\n".join(server.output()[-3000:] for server in servers)
    pytest.fail(f"{submission_id} not scored after {timeout} s: {view}\n{logs}")


def leaderboard(url, fresh=False):
    """The leaderboard's rows; `fresh`: read after the server's cache of it has expired, so that
    every score written before the call shows (a server's readiness check reads it too)."""
    if fresh:
        time.sleep(CACHE_WAIT)
    answer = requests.get(f"{url}/api/leaderboard", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


# PostgreSQL.

_POSTGRES = {}


def _answers(url):
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _tool(name):
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _throwaway_postgres(tried):
    """Starts PostgreSQL in a temporary folder, as a user other than root (it refuses root):
    its URL. Stopped when the test process ends."""
    import pwd

    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.fail(f"no PostgreSQL answers at {tried} (${POSTGRES_VARIABLE}), and initdb and "
                    "pg_ctl are not installed to start one: install PostgreSQL (Debian: "
                    f"apt-get install postgresql), or set ${POSTGRES_VARIABLE} to a server's URL",
                    pytrace=False)
    folder = tempfile.mkdtemp(prefix="madry-postgres-")
    prefix = []
    if os.geteuid() == 0:
        user = next((name for name in ("postgres", "nobody") if _user_exists(name)), None)
        if user is None:
            pytest.fail("no user other than root to run a throwaway PostgreSQL as",
                        pytrace=False)
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, port = os.path.join(folder, "data"), free_port()
    steps = [[initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
             [pg_ctl, "-D", data, "-l", os.path.join(folder, "log"), "-w", "-o",
              f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"]]
    for step in steps:
        result = subprocess.run(prefix + step, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.fail(f"no PostgreSQL answers at {tried}, and a throwaway one would not start "
                        f"({' '.join(step[:1])}): {result.stderr[-2000:]}", pytrace=False)

    def stop():
        subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _user_exists(name):
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def postgres_server():
    """The URL of a PostgreSQL server for the tests: ${MADRY_TEST_POSTGRES_URL}, by default the
    project machines' own, or a throwaway one where none answers."""
    if "url" not in _POSTGRES:
        url = os.environ.get(POSTGRES_VARIABLE) or DEFAULT_POSTGRES
        _POSTGRES["url"] = url if _answers(url) else _throwaway_postgres(url)
    return _POSTGRES["url"]


@contextlib.contextmanager
def fresh_postgres_database():
    """A new, empty database on the test server, dropped afterwards: its URL."""
    import psycopg
    import sqlalchemy as sa

    server = postgres_server()
    name = f"madry_serve_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sa.engine.make_url(server).set(database=name).render_as_string(
            hide_password=False)
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')



@contextlib.contextmanager
def database_at(kind, tmp_path_factory):
    """A fresh database of `kind` ("sqlite" or "postgresql"): open_database's keyword
    arguments."""
    if kind == "sqlite":
        yield {"state_dir": tmp_path_factory.mktemp("sqlite")}
    else:
        with fresh_postgres_database() as url:
            yield {"database_url": url, "state_dir": tmp_path_factory.mktemp("postgresql")}
