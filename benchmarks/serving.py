"""Loads the MNIST challenge server (`mnist_challenge/serve.py --role=web`, started here on a free
port with its state in a temporary folder) as a class would at a deadline: --participants
participants (each from an address of its own, 127.0.2.x) each upload --uploads valid submissions
of the first --examples test images, all at once, while --slow connections trickle form uploads
one byte a second (from 127.0.1.x, 8 per address) and one client reads `GET /api/leaderboard`
over and over.

Prints the uploads accepted per second (over the time from the first upload's start to the last
one's 202) and the leaderboard's median and 95th-percentile latency during the load. Needs the
MNIST test set in --data_path. Run from the repository root: `python benchmarks/serving.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import concurrent.futures
import contextlib
import io
import socket
import statistics
import subprocess
import tempfile
import threading
import time

from absl import flags

from benchmarks import cli, peak

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPSILON = 0.3
SLOW_PER_ADDRESS = 8  # 254 addresses: --slow at most 2032
START_SECONDS = 300

PARTICIPANTS = flags.DEFINE_integer("participants", 8, "participants uploading at once",
                                    lower_bound=1, upper_bound=254)
UPLOADS = flags.DEFINE_integer("uploads", 10, "uploads of each participant, one after another",
                               lower_bound=1)
SLOW = flags.DEFINE_integer("slow", 64, "slow connections trickling a form upload",
                            lower_bound=0, upper_bound=2032)
EXAMPLES = flags.DEFINE_integer("examples", 1000, "test images per submission "
                                "(--num_eval_examples of the server)", lower_bound=1,
                                upper_bound=10000)
DATA_PATH = flags.DEFINE_string("data_path", os.path.join(REPO, "mnist_challenge", "MNIST_data"),
                                "folder of the MNIST data")
MODEL_DIR = flags.DEFINE_string("model_dir", None, "the model the server is set up for (the web "
                                "role records its fingerprint and scores nothing); default: "
                                "mnist_challenge/config.json's")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(state_dir, port):
    """serve.py --role=web, once it answers; its output goes to state_dir/../server.out, whose last
    line is the error where it does not start."""
    import requests

    command = [sys.executable, os.path.join(REPO, "mnist_challenge", "serve.py"), "--role=web",
               f"--state_dir={state_dir}", f"--port={port}", f"--data_path={DATA_PATH.value}",
               f"--num_eval_examples={EXAMPLES.value}", "--max_submissions_per_hour=100000"]
    if MODEL_DIR.value:
        command.append(f"--model_dir={MODEL_DIR.value}")
    with open(os.path.join(os.path.dirname(state_dir), "server.out"), "wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"http://127.0.0.1:{port}/api/leaderboard", timeout=5).ok:
                return server
        time.sleep(0.2)
    server.kill()
    server.wait()
    with open(output.name, encoding="utf-8", errors="replace") as written:
        last = (written.read().strip().splitlines() or ["(no output)"])[-1]
    cli.fail(f"serve.py did not start: {last.removeprefix('Error: ')}")


def _submission(images, seed):
    """A valid attack as .npy bytes: each pixel moved by +-EPSILON at random, clipped."""
    import numpy as np

    signs = np.random.default_rng(seed).choice([-1.0, 1.0], images.shape)
    buffer = io.BytesIO()
    np.save(buffer, np.clip(images + EPSILON * signs, 0, 1).astype(np.float32))
    return buffer.getvalue()


def _trickle(port, index, stop):
    """A form upload from 127.0.1.(index // SLOW_PER_ADDRESS + 1), a byte a second, reopened
    whenever the server closes it, until `stop`."""
    head = (b"POST /submit HTTP/1.1\r\nHost: challenge\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\nContent-Disposition: "
            b'form-data; name="token"\r\n\r\n')
    address = f"127.0.1.{index // SLOW_PER_ADDRESS + 1}"
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5,
                                          source_address=(address, 0)) as connection:
                connection.sendall(head)
                while not stop.wait(1):
                    connection.sendall(b"x")
        except OSError:
            stop.wait(1)


def _upload_all(url, tokens, attacks):
    """Each participant's uploads one after another, all participants at once: the statuses
    and the seconds from the first start to the last answer."""
    from benchmarks.client import session_from

    def one_participant(index):
        statuses = []
        with session_from(f"127.0.2.{index + 1}") as session:
            for attack in attacks:
                answer = session.post(f"{url}/api/submissions", timeout=600,
                                      headers={"Authorization": f"Bearer {tokens[index]}"},
                                      files={"file": ("attack.npy", attack)})
                statuses.append(answer.status_code)
        return statuses

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(tokens)) as pool:
        statuses = [status for result in pool.map(one_participant, range(len(tokens)))
                    for status in result]
    return statuses, time.monotonic() - start


def _read_leaderboard(url, stop, answers):
    """(status, seconds) of `GET /api/leaderboard`, each on a new connection, until `stop`."""
    import requests

    while not stop.is_set():
        start = time.monotonic()
        status = requests.get(f"{url}/api/leaderboard", timeout=60).status_code
        answers.append((status, time.monotonic() - start))
        stop.wait(0.05)


def main():
    from common.serving import database, participants
    from mnist_challenge import mnist_input

    images = mnist_input.MNISTData(DATA_PATH.value).test_images[:EXAMPLES.value]
    print(f"CPU: {peak.cpu_description()}")
    with tempfile.TemporaryDirectory(prefix="serving-benchmark-") as folder:
        state_dir, port = os.path.join(folder, "state"), _free_port()
        os.makedirs(state_dir)
        server = _start_server(state_dir, port)
        url = f"http://127.0.0.1:{port}"
        try:
            db = database.Database(None, state_dir, "MNIST")
            tokens = [participants.add(db, f"participant {index}")
                      for index in range(PARTICIPANTS.value)]
            db.dispose()
            attacks = [_submission(images, seed) for seed in range(UPLOADS.value)]
            stop, answers = threading.Event(), []
            background = [threading.Thread(target=_trickle, args=(port, index, stop))
                          for index in range(SLOW.value)]
            background.append(threading.Thread(target=_read_leaderboard,
                                               args=(url, stop, answers)))
            for thread in background:
                thread.start()
            time.sleep(1)  # the slow connections are open
            print(f"{PARTICIPANTS.value} participants x {UPLOADS.value} uploads of "
                  f"{len(attacks[0]) / 1e6:.1f} MB ({EXAMPLES.value} images), {SLOW.value} slow "
                  "connections ...")
            statuses, seconds = _upload_all(url, tokens, attacks)
            stop.set()
            for thread in background:
                thread.join()
        finally:
            server.terminate()
            server.wait(60)
    accepted = statuses.count(202)
    print(f"uploads accepted: {accepted} of {len(statuses)} in {seconds:.2f} s: "
          f"{accepted / seconds:.1f} per second")
    latencies = [seconds for status, seconds in answers if status == 200]
    p50, p95 = (statistics.quantiles(latencies, n=100)[index] for index in (49, 94))
    print(f"leaderboard during the load: {len(answers)} requests, {len(latencies)} answered "
          f"200, p50 {1000 * p50:.0f} ms, p95 {1000 * p95:.0f} ms")


if __name__ == "__main__":
    cli.run(main)
