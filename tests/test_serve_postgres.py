"""Several scorers on one PostgreSQL queue: a web process and two scorer processes share it, no
job is taken by both, and the job of a scorer killed with SIGKILL goes to the other after the
timeout and is scored once. The PostgreSQL server comes from $MADRY_TEST_POSTGRES_URL (by
default the project machines' own at 127.0.0.1:5432), or a throwaway one (serving_helpers).
Every server scores the first EXAMPLES test images (`--num_eval_examples`), to keep it short."""

import re
import time

import pytest
import sqlalchemy as sa
from serving_helpers import (
    Server,
    add_participant,
    fresh_postgres_database,
    mnist_test_set,
    npy_bytes,
    open_database,
    random_sign_attack,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    upload,
    wait_done,
)

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 3
EXAMPLES = 1000
EVAL = f"--num_eval_examples={EXAMPLES}"


def _rows(db):
    table = db.tables.submissions
    with db.read() as connection:
        return {row.id: row for row in connection.execute(
            sa.select(table.c.id, table.c.status, table.c.attempts, table.c.scorer))}


def _kill_a_scorer_while_it_scores(db, scorers):
    """Kills with SIGKILL the scorer of a job being scored, as soon as there is one: (the killed
    scorer, the ids of the jobs it held when it died, read once it was dead)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        scoring = [row for row in _rows(db).values() if row.status == "scoring"]
        if scoring:
            pid = int(scoring[0].scorer.split(":")[1])
            victim = next(scorer for scorer in scorers if scorer.process.pid == pid)
            victim.kill()
            held = [row.id for row in _rows(db).values()
                    if row.status == "scoring" and f":{pid}:" in row.scorer]
            return victim, held
        time.sleep(0.01)
    pytest.fail("no job was claimed within 120 s:\n" +
                "\n".join(scorer.output()[-2000:] for scorer in scorers))


def test_two_scorers_share_the_queue_and_a_killed_ones_job_goes_to_the_other(tmp_path):
    images = mnist_test_set()[0][:EXAMPLES]
    with fresh_postgres_database() as url:
        web = Server(tmp_path / "web", EVAL, role="web", database_url=url)
        scorers = [Server(tmp_path / f"scorer{number}", EVAL, f"--job_timeout={JOB_TIMEOUT}",
                          role="scorer", database_url=url) for number in (1, 2)]
        for server in (web, *scorers):
            server.wait_ready()
        db = open_database(database_url=url)
        _, token = add_participant(db)
        ids, seed, dead, held = [], 0, [], []
        for _ in range(3):  # the kill can come just after a result is written: again
            for _ in range(3):
                answer = upload(web.url, token, npy_bytes(random_sign_attack(images, seed)))
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["id"])
                seed += 1
            victim, killed = _kill_a_scorer_while_it_scores(db, scorers)
            dead.append(victim)
            held += killed
            survivor = next(scorer for scorer in scorers if scorer is not victim)
            if killed:
                break
            scorers = [survivor, Server(victim.state_dir, *victim.flags, role="scorer",
                                        database_url=url).wait_ready()]
        else:
            pytest.fail("no scorer was killed while it scored")
        servers = [web, survivor, *dead]
        views = [wait_done(web.url, token, submission_id, servers=servers)
                 for submission_id in ids]
        assert all(view["status"] == "scored" for view in views), views
        rows = _rows(db)
        logs = "".join(server.output() for server in servers)
        for submission_id in ids:
            # Scored once; claimed twice where its scorer was killed, else once.
            assert len(re.findall(rf"scored {submission_id}: accuracy", logs)) == 1, \
                (submission_id, logs[-5000:])
            attempts = 2 if submission_id in held else 1
            assert rows[submission_id].attempts == attempts, (submission_id, rows, logs[-5000:])
            assert len(re.findall(rf"scoring {submission_id} ", logs)) == attempts
        assert f":{survivor.process.pid}:" in rows[held[-1]].scorer
        for submission_id in held:
            assert f"scoring {submission_id} " in "".join(scorer.output() for scorer in dead)
            assert re.search(rf"scoring {submission_id} .* taken over from [^ ]+:\d+:",
                             logs)
        for server in (web, survivor):
            server.stop()
        db.dispose()
