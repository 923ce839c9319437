"""A host's view through real serve.py processes on SQLite: files stored compacted and scored as
run_attack.py scores the upload, storage errors as 503/507 with nothing left behind, the total
limit, the /submit page, the admin commands while the server runs, and closing with a private
split. (The export, unknown ids and the same data on PostgreSQL: test_serve_data.py, in-process;
moving the challenge to another model, on both databases: test_serve_api.py.)"""

import concurrent.futures
import gzip
import re
import time

import numpy as np
import pytest
import requests
import sqlalchemy as sa
from helpers import run_script, shared_path
from serving_helpers import (
    CACHE_WAIT,
    Server,
    add_participant,
    leaderboard,
    mnist_test_set,
    npy_bytes,
    open_database,
    random_sign_attack,
    run_serve,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    upload,
    wait_done,
)

from common.io import checkpoints
from common.serving import settings

pytestmark = pytest.mark.slow

EXAMPLES = 1000
FLAGS = (f"--num_eval_examples={EXAMPLES}", "--public_fraction=0.5", "--min_free_bytes=0",
         "--max_submissions_total=3")
MNIST_MODEL = shared_path("fixtures", "tf1_checkpoints", "mnist")


def _until(condition, seconds=CACHE_WAIT):
    """Whether `condition()` holds, asked until it does or for `seconds` (then once more)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="module")
def images():
    return mnist_test_set()[0][:EXAMPLES]


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("admin") / "state"


@pytest.fixture(scope="module")
def server(state):
    server = Server(state, *FLAGS).wait_ready().wait_scorer_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def db(state, server):
    db = open_database(state_dir=state)
    yield db
    db.dispose()


def _serve(state, *flags):
    return run_serve(f"--state_dir={state}", *flags)


def _submission(db, submission_id):
    table = db.tables.submissions
    with db.read() as connection:
        return connection.execute(sa.select(table).where(table.c.id == submission_id)).one()


def test_a_float64_upload_is_stored_as_float32_and_scored_as_run_attack_py_scores_it(
        server, db, state, images, tmp_path):
    attack = random_sign_attack(images, seed=5).astype(np.float64)
    path = tmp_path / "attack64.npy"
    np.save(path, attack)
    # run_attack.py on the same file, while the server scores it.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    running = pool.submit(run_script, "mnist_challenge/run_attack.py",
                          f"--model_dir={MNIST_MODEL}",
                          f"--data_path={shared_path('data', 'mnist')}",
                          f"--num_eval_examples={EXAMPLES}", f"--store_adv_path={path}",
                          cwd=tmp_path)
    pool.shutdown(wait=False)
    _, token = add_participant(db)
    answer = upload(server.url, token, path.read_bytes())
    assert answer.status_code == 202, answer.text
    submission_id = answer.json()["id"]
    view = wait_done(server.url, token, submission_id, servers=[server])
    assert view["status"] == "scored", view
    with gzip.open(state / "submissions" / f"{submission_id}.npy.gz") as stored:
        kept = np.load(stored)
    assert kept.dtype == np.float32 and np.array_equal(kept, attack)
    assert (state / "submissions" / f"{submission_id}.npy.gz").stat().st_size < \
        path.stat().st_size / 4
    result = running.result()
    assert result.returncode == 0, result.stderr
    printed = re.search(r"^Accuracy: (\d+\.\d\d)%$", result.stdout, re.MULTILINE).group(1)
    row = _submission(db, submission_id)
    assert f"{100 * row.accuracy:.2f}" == printed
    # The public half gives the score shown while the challenge is open; the halves make the
    # whole.
    assert view["accuracy"] == row.public_accuracy
    assert row.public_accuracy * 500 + row.private_accuracy * 500 == \
        pytest.approx(row.accuracy * EXAMPLES)
    assert row.model == checkpoints.fingerprint(checkpoints.latest_checkpoint(MNIST_MODEL))


def test_storage_failures_answer_503_or_507_and_leave_no_file(server, db, state, images):
    _, token = add_participant(db)
    data = npy_bytes(random_sign_attack(images, seed=6))
    folder = state / "submissions"
    folder.rename(state / "moved")
    folder.write_text("in the way")
    try:
        refused = upload(server.url, token, data)
    finally:
        folder.unlink()
        (state / "moved").rename(folder)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"].startswith("the server cannot store uploads now (")
    assert list((state / "incoming").iterdir()) == []
    full = Server(state.parent / "full", "--role=web", *FLAGS[:2], "--min_free_bytes=" +
                  str(1 << 60), database_url=f"sqlite:///{state}/serve.sqlite3").wait_ready()
    refused = upload(full.url, token, data)
    assert refused.status_code == 507, refused.text
    # Answered before the body was read, which was read after: no reset connection.
    assert refused.headers.get("Connection") != "close"
    assert f"at least {1 << 60} bytes of its disk free (--min_free_bytes)" in \
        refused.json()["error"]
    assert list((state.parent / "full" / "incoming").iterdir()) == []
    full.stop()


def test_the_total_limit_is_named_and_the_submit_page_says_what_to_send(server, db, images):
    _, token = add_participant(db)
    for _ in range(3):
        assert upload(server.url, token, npy_bytes(images)).status_code == 202
    refused = upload(server.url, token, npy_bytes(images))
    assert refused.status_code == 429
    assert refused.json()["error"] == ("you have 3 submissions, the most one participant may "
                                       "make (3, the server's --max_submissions_total)")
    page = requests.get(f"{server.url}/submit", timeout=30).text
    for text in (f"<code>({EXAMPLES},784)</code>", "1000 images of 784 values", "float32",
                 "Pixel values from 0.0 to 1.0", "first 1000 images of the\nMNIST test set",
                 "more than\n0.3 from it", "white-box", "black-box", "ask the\nhost",
                 "3 submissions per participant in all", "30 refused ones an hour"):
        assert text in page, text
    assert page.index('name="token"') < page.index('name="file"')


def test_admin_commands_work_while_the_server_runs(server, db, state, images):
    name, token = add_participant(db)
    ids = [upload(server.url, token, npy_bytes(random_sign_attack(images, seed)),
                  track=track).json()["id"] for seed, track in ((7, "white-box"),
                                                                (8, "black-box"))]
    views = [wait_done(server.url, token, submission_id) for submission_id in ids]
    listed = _serve(state, "--list_participants")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(name + "\t"))
    assert line == f"{name}\t2\t{100 * views[0]['accuracy']:.2f}%\t" \
                   f"{100 * views[1]['accuracy']:.2f}%"
    hidden = _serve(state, f"--hide_submission={ids[0]}")
    assert hidden.returncode == 0 and "off the leaderboard" in hidden.stdout
    # Off the board once the leaderboard's cache is read again.
    assert _until(lambda: ids[0] not in [row["id"] for row in leaderboard(server.url)])
    assert ids[1] in [row["id"] for row in leaderboard(server.url)]


def test_after_closing_uploads_get_403_and_the_board_turns_private(server, db, state, images):
    _, token = add_participant(db)
    # Clean on the public half, attacked on the private one: the two halves' scores differ.
    submitted = random_sign_attack(images, seed=9)
    public = settings.public_subset(db, EXAMPLES, 0.5)
    submitted[public] = images[public]
    late = upload(server.url, token, npy_bytes(submitted))
    assert late.status_code == 202
    closed = _serve(state, "--closes_at=2020-01-01T10:00:00+02:00")
    assert closed.returncode == 0 and "closes at 2020-01-01 08:00 UTC" in closed.stdout
    # The settings' cache read again (the form says the challenge closed), then the upload.
    assert _until(lambda: "The challenge closed at" in
                  requests.get(f"{server.url}/submit", timeout=30).text)
    refused = upload(server.url, token, npy_bytes(images))
    assert refused.status_code == 403
    assert refused.json()["error"] == ("the challenge closed at 2020-01-01 08:00 UTC: uploads "
                                       "are no longer accepted")
    view = wait_done(server.url, token, late.json()["id"])  # still scored
    row = _submission(db, late.json()["id"])
    assert view["accuracy"] == row.private_accuracy != row.public_accuracy
    def board():
        return {row["id"]: row["accuracy"] for row in leaderboard(server.url)}

    # The leaderboard's cache read again after the late one was scored.
    assert _until(lambda: late.json()["id"] in board())
    assert board()[late.json()["id"]] == row.private_accuracy
    page = requests.get(f"{server.url}/", timeout=30).text
    assert "The challenge closed at 2020-01-01 08:00 UTC: uploads are no\nlonger accepted." \
        in page
    assert "Scores on the private test images" in page
