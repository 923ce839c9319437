"""The server under abuse with no proxy in front, through real sockets on the loopback range: a
client at 127.0.0.2 holds 300 idle sockets and 20 trickling uploads against a server whose
open-files limit is 256; meanwhile a participant at 127.0.0.1 reads the leaderboard and uploads.
Then the access log: rotated, without tokens or status-page keys, X-Forwarded-For ignored. And,
in this process, the log's rate limit and the check of --forwarded_allow_ips."""

import glob
import logging
import os
import re
import selectors
import socket
import threading
import time

import pytest
import requests
from serving_helpers import (
    Server,
    add_participant,
    mnist_test_set,
    npy_bytes,
    open_database,
    random_sign_attack,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    upload,
)

EXAMPLES = 200
HEADER_TIMEOUT, STALL_TIMEOUT, UPLOAD_TIMEOUT = 3, 4, 8
PER_ADDRESS = 16
OPEN_FILES = 256
ACCESS_LOG_BYTES = 2000
ABUSER = "127.0.0.2"
# The body of a form upload whose token field never ends.
FORM_HEAD = (b"POST /submit HTTP/1.1\r\nHost: challenge\r\n"
             b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n"
             b'--b\r\nContent-Disposition: form-data; name="token"\r\n\r\n')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A web role under `ulimit -n 64` (soft) and 256 (hard), with short deadlines."""
    state = tmp_path_factory.mktemp("abuse") / "state"
    running = Server(state, f"--num_eval_examples={EXAMPLES}", f"--header_timeout={HEADER_TIMEOUT}",
                     f"--stall_timeout={STALL_TIMEOUT}", f"--upload_timeout={UPLOAD_TIMEOUT}",
                     f"--access_log_bytes={ACCESS_LOG_BYTES}", role="web",
                     open_files=(64, OPEN_FILES)).wait_ready()
    yield running
    running.stop()


class Abuser:
    """A socket from ABUSER that sends `head` at once, then `trickle` a byte every second; when
    the server answered (its first bytes) and closed it, from its opening."""

    def __init__(self, port, kind, head=b"", trickle=b""):
        self.kind = kind
        self.trickle = trickle
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=5,
                                               source_address=(ABUSER, 0))
        self.socket.setblocking(False)
        self.opened = time.monotonic()
        self.answer = b""
        self.closed_after = None
        if head:
            self.socket.send(head)

    def send_next(self):
        if self.trickle and self.closed_after is None:
            try:
                self.socket.send(self.trickle[:1])
                self.trickle = self.trickle[1:]
            except OSError:
                self.close()

    def read(self):
        try:
            data = self.socket.recv(4096)
        except BlockingIOError:
            return
        except OSError:  # reset: the server closed it with our bytes unread
            data = b""
        if data:
            self.answer += data
        else:
            self.close()

    def close(self):
        if self.closed_after is None:
            self.closed_after = time.monotonic() - self.opened
            self.socket.close()


def _abusers(port):
    """Up to the per-address cap, each deadline's abusers, then 296 idle sockets and 8 uploads
    more: 300 idle sockets and 20 trickling uploads in all."""
    header = b"POST /submit HTTP/1.1\r\nHost: challenge\r\n" + b"X-Slow: y\r\n" * 20
    first = ([Abuser(port, "idle") for _ in range(4)]
             + [Abuser(port, "headers", trickle=header) for _ in range(4)]
             + [Abuser(port, "stalled", head=FORM_HEAD + b"x") for _ in range(4)]
             + [Abuser(port, "slow", head=FORM_HEAD, trickle=b"x" * 60) for _ in range(4)])
    time.sleep(0.5)  # the server has counted them
    more = ([Abuser(port, "idle, over the cap") for _ in range(296)]
            + [Abuser(port, "upload, over the cap", head=FORM_HEAD, trickle=b"x" * 60)
               for _ in range(8)])
    return first, more


def _watch(abusers, until):
    """Trickles and reads until every abuser is closed or `until` (monotonic) passes."""
    selector = selectors.DefaultSelector()
    for abuser in abusers:
        selector.register(abuser.socket, selectors.EVENT_READ, abuser)
    next_byte = time.monotonic()
    while any(abuser.closed_after is None for abuser in abusers) and time.monotonic() < until:
        for key, _ in selector.select(timeout=0.1):
            key.data.read()
            if key.data.closed_after is not None:
                selector.unregister(key.fileobj)
        if time.monotonic() >= next_byte:
            next_byte += 1
            for abuser in abusers:
                abuser.send_next()
    selector.close()
    for abuser in abusers:
        abuser.close()


def _participant_meanwhile(url, token, images, stop, seen):
    """The participant at 127.0.0.1: the leaderboard every 0.25 s, one upload on the way."""
    attack = npy_bytes(random_sign_attack(images, seed=1))
    while not stop.is_set():
        start = time.monotonic()
        answer = requests.get(f"{url}/api/leaderboard", timeout=10)
        seen["leaderboard"].append((answer.status_code, time.monotonic() - start))
        if len(seen["leaderboard"]) == 4:
            start = time.monotonic()
            seen["upload"] = (upload(url, token, attack).status_code, time.monotonic() - start)
        stop.wait(0.25)


def _access_log(server):
    """The access log's files, oldest first, as one text."""
    text = ""
    for path in sorted(glob.glob(os.path.join(server.state_dir, "access.log*")), reverse=True):
        with open(path, encoding="utf-8") as log:
            text += log.read()
    return text


def _log_lines(server, text):
    with open(os.path.join(server.state_dir, "serve.log"), encoding="utf-8") as log:
        return [line for line in log if text in line]


def _wait_for_line(server, text, timeout):
    deadline = time.monotonic() + timeout
    while not _log_lines(server, text) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _log_lines(server, text)


@pytest.mark.slow
def test_abusive_connections_are_closed_and_a_participant_is_served(server):
    _, token = add_participant(open_database(state_dir=server.state_dir), "Ada")
    images = mnist_test_set()[0][:EXAMPLES]
    log_before = os.path.getsize(os.path.join(server.state_dir, "serve.log"))
    seen = {"leaderboard": [], "upload": None}
    stop = threading.Event()
    participant = threading.Thread(target=_participant_meanwhile,
                                   args=(server.url, token, images, stop, seen))
    start = time.monotonic()
    participant.start()
    try:
        first, more = _abusers(server.port)
        _watch(first + more, until=start + HEADER_TIMEOUT + 10 + 2)
    finally:
        stop.set()
        participant.join(30)
    # The participant was served throughout.
    latencies = [seconds for status, seconds in seen["leaderboard"]]
    assert {status for status, _ in seen["leaderboard"]} == {200}, seen
    assert len(latencies) >= 10 and max(latencies) < 2, latencies
    assert seen["upload"] is not None and seen["upload"][0] == 202, seen
    # Every abusive connection closed within header_timeout + 10 s; over the cap at once.
    for abuser in first + more:
        assert abuser.closed_after is not None, abuser.kind
        assert abuser.closed_after < HEADER_TIMEOUT + 10, (abuser.kind, abuser.closed_after)
    for abuser in more:
        assert abuser.closed_after < 2, (abuser.kind, abuser.closed_after)
        assert abuser.answer.startswith(b"HTTP/1.1 503 ") or abuser.kind.startswith("upload"), \
            abuser.answer
    by_kind = {}
    for abuser in first:
        by_kind.setdefault(abuser.kind, []).append(abuser)
    for abuser in by_kind["idle"] + by_kind["headers"]:
        assert HEADER_TIMEOUT - 0.5 < abuser.closed_after < HEADER_TIMEOUT + 2, abuser.kind
        assert abuser.answer == b""
    for abuser in by_kind["stalled"]:
        assert STALL_TIMEOUT - 0.5 < abuser.closed_after < STALL_TIMEOUT + 2
        assert abuser.answer.startswith(b"HTTP/1.1 408 ") and b"sent nothing for 4 s" in \
            abuser.answer, abuser.answer
    for abuser in by_kind["slow"]:
        assert UPLOAD_TIMEOUT - 0.5 < abuser.closed_after < UPLOAD_TIMEOUT + 2
        assert b"took longer than 8 s" in abuser.answer, abuser.answer
    # The log: one line per cause, then one with the count of the others.
    refused = _wait_for_line(server, "more like this in 10 s, the last: refused a connection", 5)
    assert len(refused) == 1 and " 303 more like this" in refused[0], refused
    assert len(_log_lines(server, "refused a connection from 127.0.0.2")) == 2
    closed = _wait_for_line(server, "more like this in 10 s, the last: closed a connection "
                            "from 127.0.0.2: no complete request", 5)
    assert len(closed) == 1 and " 7 more like this" in closed[0], closed
    timed_out = [line for line in _access_log(server).splitlines()
                 if re.match(r'127\.0\.0\.2 - - \[[^]]+\] "POST /submit HTTP/1\.1" 408 ', line)]
    assert len(timed_out) == 8, _access_log(server)[-3000:]
    log_after = os.path.getsize(os.path.join(server.state_dir, "serve.log"))
    assert log_after - log_before < 8000, log_after - log_before
    print(f"leaderboard under abuse: {len(latencies)} answers, max {max(latencies):.3f} s; "
          f"upload {seen['upload'][1]:.2f} s; over the cap closed after at most "
          f"{max(abuser.closed_after for abuser in more):.2f} s; log grew "
          f"{log_after - log_before} bytes")


@pytest.mark.slow
def test_open_files_limit_is_raised_and_caps_the_connections(server):
    lines = _log_lines(server, "connections at once (--max_connections=1000)")
    assert len(lines) == 1 and f"at most {OPEN_FILES - 100} connections" in lines[0], lines


@pytest.mark.slow
def test_access_log_is_rotated_and_keeps_no_secret(server):
    _, token = add_participant(open_database(state_dir=server.state_dir))
    images = mnist_test_set()[0][:EXAMPLES]
    form = requests.post(f"{server.url}/submit", data={"token": token, "track": "white-box"},
                         files={"file": ("a.npy", npy_bytes(random_sign_attack(images, 2)))},
                         allow_redirects=False, timeout=60)
    assert form.status_code == 303, form.text
    page = form.headers["location"]  # /submissions/ID/KEY
    key = page.rsplit("/", 1)[-1]
    assert requests.get(f"{server.url}{page}?x={token}", timeout=30).ok
    spoofed = requests.get(f"{server.url}/api/leaderboard", timeout=30,
                           headers={"X-Forwarded-For": "203.0.113.9", "User-Agent": "spoof"})
    assert spoofed.ok
    for _ in range(ACCESS_LOG_BYTES // 100):  # lines of about 100 bytes: past one rotation
        assert requests.get(f"{server.url}/api/leaderboard", timeout=30).ok
    files = sorted(glob.glob(os.path.join(server.state_dir, "access.log*")))
    assert len(files) >= 2, files  # rotated at --access_log_bytes
    assert all(os.path.getsize(path) <= ACCESS_LOG_BYTES for path in files)
    text = _access_log(server)
    with open(os.path.join(server.state_dir, "serve.log"), encoding="utf-8") as log:
        text_and_log = text + log.read()
    assert token not in text_and_log and key not in text_and_log
    assert re.search(r'^127\.0\.0\.1 - - \[[^]]+\] "POST /submit HTTP/1\.1" 303 0 [\d.]+ '
                     r'"python-requests/[^"]+"$', text, re.MULTILINE), text[-2000:]
    assert '"GET /submissions/... HTTP/1.1" 200' in text
    assert re.search(r'^127\.0\.0\.1 .* "GET /api/leaderboard HTTP/1\.1" 200 .* "spoof"$', text,
                     re.MULTILINE)
    assert "203.0.113.9" not in text


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_rate_limit_lets_one_line_per_cause_through_then_counts_the_others():
    from common.serving import connections

    logger = logging.getLogger("test_serve_abuse.rate_limit")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    kept, other = _Kept(), _Kept()
    rate_limit = connections.RateLimit(window=0.3)
    for handler in (kept, other):  # one filter on two handlers judges each record once
        handler.addFilter(rate_limit)
        logger.addHandler(handler)
    for number in range(5):
        logger.warning("closed connection %d", number)
        logger.info("progress %d", number)
        logger.info("no token from %d", number, extra={"cause": "no token"})
    logger.warning("another cause")
    time.sleep(1)
    expected = ["closed connection 0"] + [f"progress {number}" for number in range(5)] + [
        "another cause", "4 more like this in 0.3 s, the last: closed connection 4",
        "no token from 0", "4 more like this in 0.3 s, the last: no token from 4"]
    assert sorted(kept.lines) == sorted(expected)
    assert other.lines == kept.lines


def test_forwarded_allow_ips_takes_addresses_and_networks_only():
    from common.runtime.errors import UserError
    from common.serving import connections

    found = connections.networks(" 127.0.0.1, 10.0.0.0/8,::1 ", "--forwarded_allow_ips")
    assert [str(network) for network in found] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert connections.networks("", "--forwarded_allow_ips") == ()
    with pytest.raises(UserError, match=r"Received: --forwarded_allow_ips='127.0.0.1,nginx' "
                                        r"\('nginx' is not one\)"):
        connections.networks("127.0.0.1,nginx", "--forwarded_allow_ips")
