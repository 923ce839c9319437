"""The challenge server's API through real serve.py processes on local ports, once on SQLite (one
process, web and scorer) and once on PostgreSQL (a web process and two scorer processes sharing
the queue): valid submissions scored as run_attack.py scores them, every bad file refused with
the checks' own line, tokens, the size limit, the rate limit, owners, the leaderboard, the
form, and, last, moving the challenge to another model. Every server scores the first EXAMPLES
test images (`--num_eval_examples`), and run_attack.py the same ones, to keep it short."""

import http.client
import io
import re
import socket
import threading
import time

import numpy as np
import pytest
import requests
import sqlalchemy as sa
from helpers import PicklePayload, run_script, shared_path
from serving_helpers import (
    EPSILON,
    Server,
    add_participant,
    fresh_postgres_database,
    leaderboard,
    mnist_test_set,
    noised_model,
    npy_bytes,
    open_database,
    random_sign_attack,
    status,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    upload,
    wait_done,
)

from common.evaluation import submission
from common.io import checkpoints
from common.runtime.errors import UserError

pytestmark = pytest.mark.slow

EXAMPLES = 1000
EVAL = f"--num_eval_examples={EXAMPLES}"
LIMIT_PER_HOUR = 16
LIMIT_REFUSED = 16
SHAPE_TEXT = f"({EXAMPLES},784)"
MAX_FILE = 12 + submission.MAX_HEADER_BYTES + 8 * EXAMPLES * 784
VIEW_KEYS = {"id", "status", "accuracy", "error", "submitted_at", "track"}
ROW_KEYS = {"id", "participant", "track", "accuracy", "submitted_at"}


class Deployment:
    def __init__(self, kind, servers, db, spool_dirs, database_url):
        self.kind, self.servers, self.db, self.spool_dirs = kind, servers, db, spool_dirs
        self.url = servers[0].url
        self.database_url = database_url

    def participant(self):
        return add_participant(self.db)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def deployment(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    limit = [EVAL, f"--max_submissions_per_hour={LIMIT_PER_HOUR}",
             f"--max_refused_per_hour={LIMIT_REFUSED}"]
    if request.param == "sqlite":
        server = Server(root / "state", *limit).wait_ready()
        db = open_database(state_dir=root / "state")
        yield Deployment("sqlite", [server], db, [root / "state" / "incoming"],
                         f"sqlite:///{root / 'state'}/serve.sqlite3")
        server.stop()
        db.dispose()
        return
    with fresh_postgres_database() as url:
        servers = [Server(root / "web", *limit, role="web", database_url=url),
                   Server(root / "scorer1", EVAL, role="scorer", database_url=url),
                   Server(root / "scorer2", EVAL, role="scorer", database_url=url)]
        for server in servers:
            server.wait_ready()
        db = open_database(database_url=url)
        yield Deployment("postgresql", servers, db, [root / "web" / "incoming"], url)
        for server in servers:
            server.stop()
        db.dispose()


@pytest.fixture(scope="module")
def test_set():
    """The images and labels the servers score on: the first EXAMPLES of the test set."""
    images, labels = mnist_test_set()
    return images[:EXAMPLES], labels[:EXAMPLES]


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory, test_set):
    path = tmp_path_factory.mktemp("valid") / "attack.npy"
    np.save(path, random_sign_attack(test_set[0], seed=0))
    return path


@pytest.fixture(scope="module")
def run_attack_percent(valid_file):
    """What run_attack.py prints for the valid file, on the same images: 'xx.xx'."""
    result = run_script("mnist_challenge/run_attack.py", EVAL,
                        f"--model_dir={shared_path('fixtures', 'tf1_checkpoints', 'mnist')}",
                        f"--data_path={shared_path('data', 'mnist')}",
                        f"--store_adv_path={valid_file}", cwd=valid_file.parent)
    assert result.returncode == 0, result.stderr
    return re.search(r"^Accuracy: (\d+\.\d\d)%$", result.stdout, re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def accepted(deployment, valid_file):
    """A valid submission accepted from a participant: (token, 202 answer)."""
    _, token = deployment.participant()
    return token, upload(deployment.url, token, valid_file.read_bytes(), track="black-box")


def test_a_valid_submission_is_scored_as_run_attack_py_scores_it(deployment, accepted,
                                                                  run_attack_percent):
    token, answer = accepted
    assert answer.status_code == 202, answer.text
    assert set(answer.json()) == {"id", "status"} and answer.json()["status"] == "queued"
    view = wait_done(deployment.url, token, answer.json()["id"], servers=deployment.servers)
    assert set(view) == VIEW_KEYS, view
    assert view["status"] == "scored" and view["error"] is None, view
    assert view["id"] == answer.json()["id"] and view["track"] == "black-box"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", view["submitted_at"]), view
    assert 0 <= view["accuracy"] <= 1
    # run_attack.py prints the percentage to two decimals: all of it, on EXAMPLES images.
    assert f"{100 * view['accuracy']:.2f}" == run_attack_percent
    assert round(view["accuracy"] * EXAMPLES) == round(float(run_attack_percent) * EXAMPLES / 100)


def _pickled(tmp_path):
    payload = np.empty((3, 3), dtype=object)
    payload[...] = PicklePayload(str(tmp_path / "pwned"))
    return npy_bytes(payload)


def _with(images, index, value):
    bad = random_sign_attack(images, seed=1).astype(np.float64)
    bad[index] = value
    return npy_bytes(bad)


def _header(shape):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


BAD_FILES = {
    "pickle": lambda images, tmp: _pickled(tmp),
    "shape": lambda images, tmp: npy_bytes(images[:EXAMPLES - 1]),
    "images_not_flat": lambda images, tmp: npy_bytes(images.reshape(EXAMPLES, 28, 28)),
    "complex": lambda images, tmp: npy_bytes(images[:5].astype(np.complex64)),
    "bool": lambda images, tmp: npy_bytes(images[:5] > 0.5),
    "strings": lambda images, tmp: npy_bytes(images[:5].astype("U3")),
    "nan": lambda images, tmp: _with(images, (17, 300), np.nan),
    "inf": lambda images, tmp: _with(images, (4, 5), np.inf),
    "minus_inf": lambda images, tmp: _with(images, (EXAMPLES - 1, 783), -np.inf),
    "pixel_range": lambda images, tmp: _with(images, (3, 2), 1.5),
    "beyond_epsilon": lambda images, tmp: _with(
        images, (42, 400), images[42, 400] + (0.31 if images[42, 400] < 0.5 else -0.31)),
    "truncated": lambda images, tmp: npy_bytes(images)[:5000],
    "longer_than_its_array": lambda images, tmp: npy_bytes(images) + b"tail",
    "huge_header": lambda images, tmp: _header((10**12, 784)),
    "oversized_header": lambda images, tmp: (
        b"\x93NUMPY\x02\x00" + (70000).to_bytes(4, "little") + b"{" + b" " * 69998 + b"\n"),
    "not_npy": lambda images, tmp: b"pixel,value\n0,0.5\n",
    "empty": lambda images, tmp: b"",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_every_bad_file_is_refused_with_the_checks_own_line(deployment, test_set, tmp_path,
                                                            case):
    images = test_set[0]
    data = BAD_FILES[case](images, tmp_path)
    local = tmp_path / "local copy.npy"
    local.write_bytes(data)
    with pytest.raises(UserError) as error:
        submission.load_and_check(str(local), images, EPSILON, (0.0, 1.0), SHAPE_TEXT)
    name = f"my {case}.npy"
    expected = str(error.value).replace(str(local), name)
    _, token = deployment.participant()
    answer = upload(deployment.url, token, data, filename=f"C:\\Users\\me\\{name}")
    assert answer.status_code == 400, answer.text
    assert answer.json() == {"error": expected}
    assert "\n" not in expected and str(deployment.servers[0].state_dir) not in answer.text
    assert not (tmp_path / "pwned").exists()  # the pickle was never loaded
    for folder in deployment.spool_dirs:
        assert list(folder.iterdir()) == []


def test_an_upload_without_a_valid_token_is_refused_with_401(deployment, accepted):
    token, _ = accepted
    for headers in ({}, {"Authorization": "Bearer not-a-token"},
                    {"Authorization": f"Basic {token}"}, {"Authorization": "Bearer "},
                    {"Authorization": f"Bearer {token}x"}):
        refused = requests.post(f"{deployment.url}/api/submissions", headers=headers,
                                files={"file": ("attack.npy", b"\x93NUMPY")}, timeout=30)
        assert refused.status_code == 401, (headers, refused.text)
        assert "token" in refused.json()["error"]
        assert refused.headers["WWW-Authenticate"] == "Bearer"


def test_only_the_owner_sees_a_submission_anyone_else_gets_404(deployment, accepted):
    token, answer = accepted
    submission_id = answer.json()["id"]
    _, other = deployment.participant()
    assert status(deployment.url, token, submission_id).status_code == 200
    for who, which in ((other, submission_id), (token, "0" * 24), (token, "x"),
                       ("not-a-token", submission_id), (None, submission_id)):
        headers = {"Authorization": f"Bearer {who}"} if who else {}
        refused = requests.get(f"{deployment.url}/api/submissions/{which}", headers=headers,
                               timeout=30)
        assert refused.status_code == 404, refused.text
        assert refused.json() == {"error": "no such submission of yours"}


def _multipart_head(boundary):
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            "filename=\"big.npy\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


def test_an_upload_over_the_limit_is_cut_off_with_413(deployment):
    _, token = deployment.participant()
    port = int(deployment.url.rsplit(":", 1)[1])
    # Its Content-Length over the limit: answered at once, before any of the body is sent.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", "/api/submissions")
    connection.putheader("Authorization", f"Bearer {token}")
    connection.putheader("Content-Type", "multipart/form-data; boundary=b0undary")
    connection.putheader("Content-Length", str(MAX_FILE + (1 << 20)))
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413
    assert answer.getheader("Connection") == "close"
    assert f"({MAX_FILE} bytes: float64 pixels" in answer.read().decode()
    connection.close()
    # Streamed without a length: the server answers once the file passes the limit, and reads
    # no further.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        # A small send buffer, so that what was sent is about what the server read, whatever
        # the system's TCP buffers (several MB, against a MAX_FILE of a few MB).
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 18)
        raw.sendall((f"POST /api/submissions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{token}\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n").encode())
        sent = [0]
        chunk = b"\0" * (1 << 20)

        def send():
            try:
                head = _multipart_head("b0undary")
                raw.sendall(b"%x\r\n%s\r\n" % (len(head), head))
                while sent[0] < 3 * MAX_FILE:
                    raw.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent[0] += len(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        response = http.client.HTTPResponse(raw)
        response.begin()
        assert response.status == 413
        assert b"larger than the largest submission" in response.read()
        sender.join(60)
        assert not sender.is_alive()
    assert MAX_FILE <= sent[0] < 2 * MAX_FILE, sent[0]
    for folder in deployment.spool_dirs:
        assert list(folder.iterdir()) == []


def test_refused_uploads_over_their_own_hourly_limit_are_refused_with_429(deployment,
                                                                          valid_file):
    _, token = deployment.participant()
    _, other = deployment.participant()
    codes = [upload(deployment.url, token, valid_file.read_bytes()).status_code]
    big = http.client.HTTPConnection("127.0.0.1", int(deployment.url.rsplit(":", 1)[1]))
    big.request("POST", "/api/submissions", headers={
        "Authorization": f"Bearer {token}", "Content-Length": str(MAX_FILE + (1 << 20)),
        "Content-Type": "multipart/form-data; boundary=x"})
    codes.append(big.getresponse().status)
    codes += [upload(deployment.url, token, b"not a .npy file").status_code
              for _ in range(LIMIT_REFUSED - 1)]
    assert codes == [202, 413] + [400] * (LIMIT_REFUSED - 1)
    refused = upload(deployment.url, token, valid_file.read_bytes())
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"].startswith(
        f"at most {LIMIT_REFUSED} refused uploads an hour (the server's "
        "--max_refused_per_hour): try again in ")
    assert 3500 < int(refused.headers["Retry-After"]) <= 3601
    assert upload(deployment.url, other, b"not a .npy file").status_code == 400


def test_the_leaderboard_keeps_each_participants_best_per_track(deployment, test_set):
    images = test_set[0]
    (alice, alice_token), (bob, bob_token) = deployment.participant(), deployment.participant()
    uploads = [(alice_token, random_sign_attack(images, 2, epsilon=0.1), "white-box", "weak"),
               (alice_token, random_sign_attack(images, 3), "white-box", "strong"),
               (alice_token, images, "black-box", "none at all"),
               (bob_token, random_sign_attack(images, 4, epsilon=0.2), "white-box", "<b>bold</b>")]
    ids = []
    for token, x, track, attack in uploads:
        answer = upload(deployment.url, token, npy_bytes(x), track=track, attack=attack)
        assert answer.status_code == 202, answer.text
        ids.append((token, answer.json()["id"]))
    weak, strong, clean, bobs = [wait_done(deployment.url, token, submission_id,
                                           servers=deployment.servers)["accuracy"]
                                 for token, submission_id in ids]
    assert strong < bobs < weak < clean
    rows = leaderboard(deployment.url, fresh=True)
    assert [row["accuracy"] for row in rows] == sorted(row["accuracy"] for row in rows)
    reference = [row for row in rows if row["participant"] is None]
    assert len(reference) == 1 and reference[0]["accuracy"] == clean
    assert all(set(row) == ROW_KEYS for row in rows)
    assert reference[0] == {"id": None, "participant": None, "track": None, "accuracy": clean,
                            "submitted_at": None}
    ours = {(row["participant"], row["track"]): row for row in rows
            if row["participant"] in (alice, bob)}
    assert {key: row["accuracy"] for key, row in ours.items()} == {
        (alice, "white-box"): strong, (alice, "black-box"): clean, (bob, "white-box"): bobs}
    assert all(set(row) == ROW_KEYS for row in ours.values())
    page = requests.get(f"{deployment.url}/", timeout=30).text
    assert f"<td>strong</td><td>{alice}</td>\n<td>{100 * strong:.2f}%</td>" in page
    assert "weak" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page


def test_the_form_leads_to_a_status_page_that_refreshes_until_scored(deployment, valid_file):
    name, token = deployment.participant()
    answer = requests.post(f"{deployment.url}/submit", allow_redirects=False, timeout=120,
                           data={"token": token, "track": "black-box", "attack": "by form"},
                           files={"file": ("form.npy", valid_file.read_bytes())})
    assert answer.status_code == 303, answer.text
    page_url = deployment.url + answer.headers["Location"]
    location = re.fullmatch(r"/submissions/([0-9a-f]{24})/[A-Za-z0-9_-]{32}",
                            answer.headers["Location"])
    assert location, answer.headers["Location"]
    page = requests.get(page_url, timeout=30)
    assert page.status_code == 200 and name in page.text and "form.npy" in page.text
    # One id: the one in the address heads the page, and is the API's.
    assert f"<h1>Submission {location.group(1)}</h1>" in page.text
    assert status(deployment.url, token, location.group(1)).status_code == 200
    assert re.search(r"<dd>\d{4}-\d\d-\d\d \d\d:\d\d UTC</dd>", page.text)
    assert page.headers["Referrer-Policy"] == "no-referrer"
    if "scored" not in page.text:
        assert '<meta http-equiv="refresh"' in page.text
    for _ in range(1200):
        page = requests.get(page_url, timeout=30).text
        if 'id="status" class="scored"' in page:
            break
        time.sleep(0.1)
    assert 'id="accuracy"' in page and '<meta http-equiv="refresh"' not in page
    refused = requests.post(f"{deployment.url}/submit", timeout=60,
                            data={"token": "wrong", "attack": "by form"},
                            files={"file": ("form.npy", valid_file.read_bytes())})
    assert refused.status_code == 401 and "unknown token" in refused.text
    # The form's answer comes after the whole body was read, on a connection kept open.
    assert refused.headers.get("Connection") != "close"
    assert requests.get(f"{deployment.url}/submissions/{location.group(1)}/{'x' * 32}",
                        timeout=30).status_code == 404


def _unscored(db):
    submissions = db.tables.submissions
    with db.read() as connection:
        return connection.execute(sa.select(sa.func.count()).where(
            submissions.c.status.in_(("queued", "scoring")))).scalar_one()


def _wait_all_scored(db, servers):
    deadline = time.monotonic() + 240
    while _unscored(db) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _unscored(db) == 0, "\n".join(server.output()[-3000:] for server in servers)


# Last of the module: it moves the deployment's challenge to another model.
def test_a_scorer_of_another_model_is_refused_and_rescore_moves_the_challenge(deployment,
                                                                               tmp_path):
    """The mistake of two scorers started on different models of one queue: the second is
    refused; with --rescore it moves the challenge, the running scorers of the old model stop
    with one line, every submission is scored again on the new model and the leaderboard (of
    the web server still running) shows the new scores."""
    _wait_all_scored(deployment.db, deployment.servers)
    before = leaderboard(deployment.url, fresh=True)
    assert before
    other = noised_model(tmp_path)
    old = checkpoints.fingerprint(checkpoints.latest_checkpoint(
        shared_path("fixtures", "tf1_checkpoints", "mnist")))
    new = checkpoints.fingerprint(checkpoints.latest_checkpoint(str(other)))
    refused = Server(tmp_path / "refused", EVAL, role="scorer",
                     database_url=deployment.database_url, model_dir=other)
    refused.process.wait(120)
    lines = [line for line in refused.output().splitlines() if line.startswith("Error:")]
    assert refused.process.returncode != 0 and len(lines) == 1, refused.output()[-2000:]
    assert old[:12] in lines[0] and new[:12] in lines[0] and "--rescore" in lines[0]

    # On SQLite the submission files are in the state folder, which a scorer shares.
    mover = Server(deployment.servers[0].state_dir if deployment.kind == "sqlite"
                   else tmp_path / "mover", EVAL, "--rescore", role="scorer",
                   database_url=deployment.database_url, model_dir=other).wait_ready()
    _wait_all_scored(deployment.db, [mover, *deployment.servers])
    submissions = deployment.db.tables.submissions
    with deployment.db.read() as connection:
        models = set(connection.execute(sa.select(submissions.c.model).where(
            submissions.c.status == "scored")).scalars())
        history = set(connection.execute(sa.select(deployment.db.tables.scores.c.model))
                      .scalars())
    assert models == {new} and history == {old, new}
    assert "queued again to be scored on it" in mover.output()
    moved = f"the challenge moved to model {new[:12]}"
    for server in deployment.servers:  # each scorer retires at its next claim
        if server.role == "scorer":
            server.process.wait(60)
            lines = [line for line in server.output().splitlines() if line.startswith("Error:")]
            assert server.process.returncode == 1 and len(lines) == 1, server.output()[-2000:]
            assert moved in lines[0]
        elif server.role == "both":  # its web server goes on, and says its scorer stopped
            deadline = time.monotonic() + 30
            while "scores nothing more" not in server.output() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert server.process.poll() is None
            assert f"{moved}; this scorer has {old[:12]}: this server scores nothing more" in \
                server.output(), server.output()[-2000:]
    after = leaderboard(deployment.url, fresh=True)
    assert {row["id"] for row in after} == {row["id"] for row in before}
    assert [row["accuracy"] for row in after] != [row["accuracy"] for row in before]
