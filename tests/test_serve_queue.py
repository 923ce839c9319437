"""The server's database and queue in-process, on SQLite and on PostgreSQL: tokens kept hashed,
the rate limit and the job claims atomic under concurrent callers, leases that run out, results
written only under the claim that holds, and the settings every process must share."""

import concurrent.futures
import hashlib
import threading
import time

import pytest
import sqlalchemy as sa
from serving_helpers import open_database

from common.runtime.errors import UserError
from common.serving import database, participants, queue, settings, storage, uploads

MODEL = "a" * 64
OPEN = queue.Limits(per_hour=10**6, refused_per_hour=10**6, total=10**6)


@pytest.fixture
def db(backend):
    db = open_database(**backend)
    settings.adopt_model(db, MODEL)
    yield db
    db.dispose()


def _store(db, backend):
    return storage.DatabaseStore(db) if db.is_postgresql else \
        storage.FolderStore(str(backend["state_dir"]))


def _queue_jobs(db, backend, count, tmp_path):
    """`count` accepted submissions of a new participant: (participant, their ids)."""
    name = f"p{time.monotonic_ns()}"
    participants.add(db, name)
    participant = _participant(db, name)
    store, ids = _store(db, backend), []
    for number in range(count):
        spool = tmp_path / f"spool{number}.npy"
        spool.write_bytes(b"data %d" % number)
        received = uploads.Received(str(spool), f"{number}.npy", spool.stat().st_size,
                                    hashlib.sha256(spool.read_bytes()).hexdigest())
        upload_id = queue.start_upload(db, participant.id, OPEN)
        stored = (str(spool), received.size, received.sha256)
        ids.append(queue.accept(db, store, upload_id, participant.id, received, stored,
                                "white-box", "").id)
    return participant, ids


def _participant(db, name):
    table = db.tables.participants
    with db.read() as connection:
        row = connection.execute(sa.select(table.c.id).where(table.c.name == name)).one()
    return participants.Participant(row.id, name)


def test_tokens_are_kept_hashed_and_checked(db):
    token = participants.add(db, "Alan Turing")
    table = db.tables.participants
    with db.read() as connection:
        stored = connection.execute(sa.select(table).where(table.c.name == "Alan Turing")).one()
    assert token not in repr(tuple(stored)) and stored.token_hash == \
        hashlib.sha256(token.encode()).hexdigest()
    assert participants.authenticate(db, token).name == "Alan Turing"
    for wrong in (None, "", token[:-1], token + "x", "x" * 1000):
        assert participants.authenticate(db, wrong) is None
    with pytest.raises(UserError, match="exists already"):
        participants.add(db, "Alan Turing")
    new = participants.add(db, "Alan Turing", replace=True)
    assert participants.authenticate(db, token) is None
    assert participants.authenticate(db, new).name == "Alan Turing"
    for bad in ("", "   ", "x" * 65, "tab\there"):
        with pytest.raises(UserError, match="printable"):
            participants.add(db, bad)


def test_the_rate_limit_holds_under_concurrent_uploads(db):
    participants.add(db, "Grace Hopper")
    participant = _participant(db, "Grace Hopper")

    def start(_):
        try:
            return queue.start_upload(db, participant.id, queue.Limits(10, 30, 1000))
        except queue.RateLimited as limited:
            return limited

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(start, range(30)))
    assert sum(isinstance(result, int) for result in results) == 10
    refused = [result for result in results if isinstance(result, queue.RateLimited)]
    assert len(refused) == 20 and all(3590 <= result.retry_after <= 3601 for result in refused)
    assert "at most 10 uploads an hour" in str(refused[0])


def test_each_job_is_claimed_once_by_concurrent_scorers(db, backend, tmp_path):
    _, ids = _queue_jobs(db, backend, 40, tmp_path)
    start = threading.Barrier(6)

    def scorer(number):
        claimed = []
        start.wait()
        while (job := queue.claim(db, f"scorer{number}", 60, MODEL)) is not None:
            claimed.append(job.id)
            time.sleep(0.01)  # scoring: the others claim meanwhile
            assert queue.finish(db, job, MODEL, queue.Score(0.5, 0.5, None))
        return claimed

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        claims = list(pool.map(scorer, range(6)))
    flat = [job_id for claimed in claims for job_id in claimed]
    assert sorted(flat) == sorted(ids)  # every job once, none twice
    assert sum(1 for claimed in claims if claimed) > 1


def test_a_job_whose_lease_runs_out_goes_to_another_scorer_and_is_scored_once(db, backend,
                                                                              tmp_path):
    _, (job_id,) = _queue_jobs(db, backend, 1, tmp_path)
    first = queue.claim(db, "first", 1, MODEL)
    assert first.id == job_id and first.attempts == 1 and first.taken_from is None
    assert queue.claim(db, "second", 1, MODEL) is None
    assert queue.renew(db, first, 1)
    time.sleep(1.3)
    second = queue.claim(db, "second", 60, MODEL)
    assert second.id == job_id and second.attempts == 2 and second.taken_from == "first"
    assert not queue.renew(db, first, 1)
    # Its claim is gone: nothing written.
    assert not queue.finish(db, first, MODEL, queue.Score(0.1, 0.1, None))
    assert queue.finish(db, second, MODEL, queue.Score(0.2, 0.2, None))
    assert not queue.finish(db, second, MODEL, queue.Score(0.3, 0.3, None))
    table = db.tables.submissions
    with db.read() as connection:
        row = connection.execute(sa.select(table).where(table.c.id == job_id)).one()
    assert (row.status, row.accuracy, row.attempts, row.claim) == ("scored", 0.2, 2, None)


def test_a_job_that_keeps_killing_its_scorer_is_rejected(db, backend, tmp_path):
    participant, (job_id,) = _queue_jobs(db, backend, 1, tmp_path)
    for attempt in range(1, queue.MAX_ATTEMPTS + 1):
        job = queue.claim(db, "doomed", 0.2, MODEL)
        assert job.id == job_id and job.attempts == attempt
        time.sleep(0.3)
    assert queue.claim(db, "next", 60, MODEL) is None
    view = queue.owned(db, job_id, participant.id)
    assert view["status"] == "rejected"
    assert view["error"] == (f"could not be scored in {queue.MAX_ATTEMPTS} attempts (the "
                             "server's log says why)")


def test_a_released_job_is_queued_again_without_counting_the_attempt(db, backend, tmp_path):
    participant, (job_id,) = _queue_jobs(db, backend, 1, tmp_path)
    job = queue.claim(db, "stopping", 60, MODEL)
    assert queue.release(db, job)
    assert queue.owned(db, job_id, participant.id)["status"] == "queued"
    again = queue.claim(db, "next", 60, MODEL)
    assert again.id == job_id and again.attempts == 1 and again.taken_from is None
    assert queue.release(db, again, counted=True)
    assert queue.claim(db, "next", 60, MODEL).attempts == 2


def test_the_stored_file_is_read_back_whole(db, backend, tmp_path):
    # 11 MiB and a bit: more chunks than one statement writes, the last one short.
    data = bytes(range(256)) * (storage.CHUNK_BYTES // 256 * 11) + b"tail"
    spool = tmp_path / "spool.npy"
    spool.write_bytes(data)
    participants.add(db, "Emmy Noether")
    participant = _participant(db, "Emmy Noether")
    received = uploads.Received(str(spool), "x.npy", len(data),
                                hashlib.sha256(data).hexdigest())
    store = _store(db, backend)
    accepted = queue.accept(db, store, queue.start_upload(db, participant.id, OPEN),
                            participant.id, received, (str(spool), len(data), received.sha256),
                            "black-box", "chunks")
    # The folder store moved the spool file into place; the database store copied it.
    assert spool.exists() == db.is_postgresql
    with store.opened(accepted.id, str(tmp_path)) as path:
        with open(path, "rb") as handle:
            assert handle.read() == data
    left = sorted(path.name for path in tmp_path.iterdir())
    assert left == (["spool.npy"] if db.is_postgresql else [])  # no copy left behind


def test_servers_sharing_a_database_must_check_alike(db):
    db.agree_on("settings", {"examples": 10000, "epsilon": 0.3}, "settings")
    db.agree_on("settings", {"examples": 10000, "epsilon": 0.3}, "settings")
    with pytest.raises(UserError, match="epsilon 0.3, examples 10000; this server has "
                                        "epsilon 0.1, examples 10000"):
        db.agree_on("settings", {"examples": 10000, "epsilon": 0.1}, "settings")


def test_bad_database_urls_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--database_url must be postgresql://"):
        database.Database("mysql://root@127.0.0.1/test", str(tmp_path), "MNIST")
    with pytest.raises(UserError, match="is not a database URL"):
        database.Database("not a url", str(tmp_path), "MNIST")
    unreachable = database.Database("postgresql://postgres:secret@127.0.0.1:1/test",
                                    str(tmp_path), "MNIST")
    with pytest.raises(UserError) as error:
        unreachable.create()
    message = str(error.value)
    assert message.startswith("cannot use the database postgresql+psycopg://postgres:***@"
                              "127.0.0.1:1/test: ") and "\n" not in message
    assert "secret" not in message
