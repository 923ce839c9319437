"""Many uploads at once: 20 from 5 participants, all accepted, all scored, nothing lost, the
leaderboard right; and participants added with --add_participant while the server runs."""

import concurrent.futures
import gzip

import numpy as np
import pytest
import sqlalchemy as sa
from serving_helpers import (
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

pytestmark = pytest.mark.slow

EXAMPLES = 100  # --num_eval_examples: the first 100 test images, to keep the test short


def test_twenty_uploads_at_once_from_five_participants_are_all_scored(tmp_path):
    images = mnist_test_set()[0][:EXAMPLES]
    state = tmp_path / "state"
    # 20 connections at once from one address: over the default per-address cap of 16.
    server = Server(state, f"--num_eval_examples={EXAMPLES}",
                    "--max_connections_per_address=32").wait_ready()
    db = open_database(state_dir=state)
    # A participant added while the server runs: one line, the token, valid at once.
    added = run_serve(f"--state_dir={state}", "--add_participant=Dana Scully")
    assert added.returncode == 0, added.stderr
    assert len(added.stdout.splitlines()) == 1 and len(added.stdout.strip()) == 43
    people = [("Dana Scully", added.stdout.strip())] + [add_participant(db) for _ in range(4)]
    jobs = [(name, token, track, epsilon, seed)
            for seed, (name, token) in enumerate(people)
            for track, epsilon in (("white-box", 0.3), ("white-box", 0.1), ("black-box", 0.2),
                                   ("black-box", 0.25))]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: upload(
            server.url, job[1], npy_bytes(random_sign_attack(images, job[4], job[3])),
            track=job[2]), jobs))
    assert [answer.status_code for answer in answers] == [202] * 20, [a.text for a in answers]
    ids = [answer.json()["id"] for answer in answers]
    assert len(set(ids)) == 20
    views = [wait_done(server.url, job[1], submission_id, servers=[server])
             for job, submission_id in zip(jobs, ids)]
    assert all(view["status"] == "scored" for view in views), views
    best = {}
    for (name, _, track, _, _), view in zip(jobs, views):
        best[name, track] = min(best.get((name, track), 1.0), view["accuracy"])
    rows = [row for row in leaderboard(server.url, fresh=True) if row["participant"] is not None]
    assert {(row["participant"], row["track"]): row["accuracy"] for row in rows} == best
    assert len(rows) == len(best) == 10
    assert [row["accuracy"] for row in rows] == sorted(row["accuracy"] for row in rows)
    table = db.tables.submissions
    with db.read() as connection:
        stored = connection.execute(sa.select(table.c.id, table.c.attempts)).all()
    assert sorted(row.id for row in stored) == sorted(ids)
    assert all(row.attempts == 1 for row in stored)
    assert sorted(path.name for path in (state / "submissions").iterdir()) == \
        sorted(f"{submission_id}.npy.gz" for submission_id in ids)
    # A new token for a participant: the old one stops working at once.
    reset = run_serve(f"--state_dir={state}", "--reset_token=Dana Scully")
    assert reset.returncode == 0, reset.stderr
    assert upload(server.url, people[0][1], b"x").status_code == 401
    assert upload(server.url, reset.stdout.strip(), b"x").status_code == 400
    with gzip.open(state / "submissions" / f"{ids[0]}.npy.gz") as stored:
        np.testing.assert_array_equal(np.load(stored), random_sign_attack(images, 0, 0.3))
    server.stop()
    db.dispose()
