"""A crash at any moment loses nothing: the server killed with SIGKILL while it scores a job, with
more jobs queued behind it, then started again: every accepted submission ends scored, once.
The server scores the first EXAMPLES test images (`--num_eval_examples`), to keep it short."""

import re
import signal
import time

import pytest
from serving_helpers import (
    Server,
    add_participant,
    leaderboard,
    mnist_test_set,
    npy_bytes,
    open_database,
    random_sign_attack,
    status,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    upload,
    wait_done,
)

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 3
EXAMPLES = 1000


def _database_statuses(db, ids):
    import sqlalchemy as sa

    table = db.tables.submissions
    with db.read() as connection:
        rows = connection.execute(sa.select(table.c.id, table.c.status, table.c.attempts)
                                  .where(table.c.id.in_(ids))).all()
    return {row.id: (row.status, row.attempts) for row in rows}


def _kill_while_scoring(server, url, token, ids):
    """Kills the server as soon as one of `ids` is being scored; that id, or None where the
    kill came after the job's result was written."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        views = [status(url, token, submission_id).json() for submission_id in ids]
        scoring = [view["id"] for view in views if view["status"] == "scoring"]
        if scoring:
            server.kill()
            return scoring[0]
        time.sleep(0.01)
    pytest.fail(f"no job was scored within 120 s:\n{server.output()[-3000:]}")


def test_a_server_killed_while_scoring_scores_every_accepted_job_once(tmp_path):
    images = mnist_test_set()[0][:EXAMPLES]
    state = tmp_path / "state"
    flags = (f"--job_timeout={JOB_TIMEOUT}", f"--num_eval_examples={EXAMPLES}")
    server = Server(state, *flags).wait_ready().wait_scorer_ready()
    db = open_database(state_dir=state)
    name, token = add_participant(db)
    files = [npy_bytes(random_sign_attack(images, seed)) for seed in (10, 11, 12)]
    ids, killed, runs = [], None, [server]
    for _ in range(3):  # the kill can come too late, after the result is written: again
        batch = []
        for data in files:
            answer = upload(server.url, token, data)
            assert answer.status_code == 202, answer.text
            batch.append(answer.json()["id"])
        ids += batch
        killed = _kill_while_scoring(server, server.url, token, batch)
        if _database_statuses(db, [killed])[killed][0] == "scoring":
            break
        server = Server(state, *flags, port=server.port).wait_ready()
        runs.append(server)
    else:
        pytest.fail("the server was never killed while it scored")
    statuses = _database_statuses(db, ids)
    assert statuses[killed] == ("scoring", 1)
    assert all(statuses[other][0] in ("queued", "scored") for other in ids if other != killed)
    restarted = Server(state, *flags, port=server.port).wait_ready()
    runs.append(restarted)
    views = [wait_done(restarted.url, token, submission_id, servers=runs)
             for submission_id in ids]
    assert all(view["status"] == "scored" for view in views), views
    statuses = _database_statuses(db, ids)
    assert statuses[killed] == ("scored", 2), statuses
    logs = "".join(run.output() for run in runs)
    for submission_id in ids:
        assert len(re.findall(rf"scored {submission_id}: accuracy", logs)) == 1, submission_id
    assert "taken over from" in restarted.output()
    rows = [row for row in leaderboard(restarted.url, fresh=True) if row["participant"] == name]
    assert len(rows) == 1 and rows[0]["accuracy"] == min(view["accuracy"] for view in views)
    # Stopped with SIGTERM while it scores: the job goes back to the queue at once, its attempt
    # not counted, and the server exits 0.
    answer = upload(restarted.url, token, files[0])
    assert answer.status_code == 202, answer.text
    last = answer.json()["id"]
    deadline = time.monotonic() + 120
    while status(restarted.url, token, last).json()["status"] != "scoring":
        assert time.monotonic() < deadline, restarted.output()[-3000:]
        time.sleep(0.01)
    restarted.process.send_signal(signal.SIGTERM)
    assert restarted.process.wait(30) == 0, restarted.output()[-3000:]
    assert _database_statuses(db, [last])[last] == ("queued", 0), restarted.output()[-3000:]
    assert f"{last} is back in the queue" in restarted.output()
    assert "server stopped" in restarted.output()
    assert restarted.output().count("taken over") == 1  # the first, killed run's job only
    db.dispose()
