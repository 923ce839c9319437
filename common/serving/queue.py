"""Submissions and their queue.

A submission is accepted with its file (`accept`: the file kept and the row written in one
transaction, before the server answers 202) and then moves through

    queued -> scoring -> scored | rejected

A scorer `claim`s the oldest queued job, or a job whose lease ran out (its scorer stopped
answering), in a transaction that locks the row (`FOR UPDATE SKIP LOCKED` on PostgreSQL, the
write lock on SQLite), so no two scorers take the same job. The claim carries a random id and a
lease that the scorer `renew`s while it works; its result is written only while that claim is
still the job's (`finish`), so a job taken over after a timeout is scored once. A job claimed
MAX_ATTEMPTS times without a result (a submission that kills its scorer) is rejected.

The rate limit counts every upload a participant started in the last hour, accepted or
refused, in the transaction that records the new one, under a lock of the participant's row.
"""

import dataclasses
import datetime
import hashlib
import secrets

import sqlalchemy as sa

from common.serving import storage
from common.serving.database import get_meta, set_meta

QUEUED, SCORING, SCORED, REJECTED = "queued", "scoring", "scored", "rejected"
TRACKS = ("white-box", "black-box")
DEFAULT_TRACK = "white-box"
MAX_ATTEMPTS = 3
RATE_WINDOW_SECONDS = 3600
MAX_ATTACK_TEXT = 200
REFERENCE = "reference"


class RateLimited(Exception):
    """Too many uploads in the last hour; `retry_after` seconds until one more is allowed."""

    def __init__(self, limit, retry_after):
        super().__init__(f"more than {limit} uploads in the last hour: try again in "
                         f"{retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Job:
    """A claimed job."""

    id: str
    claim: str
    participant: str
    track: str
    filename: str
    size: int
    sha256: str
    attempts: int
    taken_from: str | None  # the scorer whose lease ran out, where the job was one


def iso_time(seconds):
    """Seconds since the epoch as ISO 8601 in UTC, or None."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def page_hash(page_key):
    return hashlib.sha256(page_key.encode()).hexdigest()


def start_upload(db, participant_id, limit):
    """Records an upload by the participant and returns its id; RateLimited where `limit`
    uploads were started in the last hour (that one is not recorded)."""
    uploads, participants = db.tables.uploads, db.tables.participants
    with db.write() as connection:
        connection.execute(sa.select(participants.c.id).where(participants.c.id == participant_id)
                           .with_for_update())
        now = connection.execute(sa.select(db.now)).scalar_one()
        recent = connection.execute(
            sa.select(uploads.c.at).where(uploads.c.participant_id == participant_id,
                                          uploads.c.at > now - RATE_WINDOW_SECONDS)
            .order_by(uploads.c.at)).scalars().all()
        if len(recent) >= limit:
            oldest = recent[len(recent) - limit]
            raise RateLimited(limit, max(1, int(oldest + RATE_WINDOW_SECONDS - now) + 1))
        return connection.execute(sa.insert(uploads).values(
            participant_id=participant_id, at=now, outcome="receiving")
            .returning(uploads.c.id)).scalar_one()


def end_upload(db, upload_id, outcome):
    """Records how a refused upload ended (an accepted one is recorded by `accept`)."""
    uploads = db.tables.uploads
    with db.write() as connection:
        connection.execute(sa.update(uploads).where(uploads.c.id == upload_id)
                           .values(outcome=outcome[:16]))


@dataclasses.dataclass(frozen=True)
class Accepted:
    id: str
    page_key: str


def accept(db, store, upload_id, participant_id, received, track, attack):
    """Keeps the received file and queues its job, durably, in one transaction; returns the
    submission's id and the key of its status page."""
    submissions, uploads = db.tables.submissions, db.tables.uploads
    submission_id = secrets.token_hex(12)
    page_key = secrets.token_urlsafe(24)
    # The file's bytes reach the disk before the write lock is taken: a large flush under it
    # would hold up every other upload and the scorers' lease renewals.
    storage.fsync_file(received.path)
    try:
        with db.write() as connection:
            connection.execute(sa.insert(submissions).values(
                id=submission_id, participant_id=participant_id, page_hash=page_hash(page_key),
                track=track, attack=attack, filename=received.filename, size=received.size,
                sha256=received.sha256, status=QUEUED, submitted_at=db.now, attempts=0))
            store.keep(connection, submission_id, received.path)
            connection.execute(sa.update(uploads).where(uploads.c.id == upload_id)
                               .values(outcome="accepted", submission_id=submission_id))
    except BaseException:
        store.forget(submission_id)
        raise
    return Accepted(submission_id, page_key)


def claim(db, scorer, lease_seconds):
    """Claims the oldest job that is queued, or whose lease ran out; returns the Job or None.
    A job claimed MAX_ATTEMPTS times already is rejected instead."""
    submissions, participants = db.tables.submissions, db.tables.participants
    while True:
        with db.write() as connection:
            row = connection.execute(
                sa.select(submissions.c.id, submissions.c.attempts, submissions.c.status,
                          submissions.c.scorer)
                .where(sa.or_(submissions.c.status == QUEUED,
                              sa.and_(submissions.c.status == SCORING,
                                      submissions.c.lease_until < db.now)))
                .order_by(submissions.c.submitted_at, submissions.c.id).limit(1)
                .with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            if row.attempts >= MAX_ATTEMPTS:
                connection.execute(sa.update(submissions).where(submissions.c.id == row.id).values(
                    status=REJECTED, finished_at=db.now, claim=None, lease_until=None,
                    error=f"could not be scored in {row.attempts} attempts (the server's log "
                          "says why)"))
                continue
            token = secrets.token_hex(8)
            connection.execute(sa.update(submissions).where(submissions.c.id == row.id).values(
                status=SCORING, claim=token, scorer=scorer[:200], started_at=db.now,
                lease_until=db.now + lease_seconds, attempts=submissions.c.attempts + 1))
            job = connection.execute(
                sa.select(submissions.c.id, submissions.c.claim, participants.c.name,
                          submissions.c.track, submissions.c.filename, submissions.c.size,
                          submissions.c.sha256, submissions.c.attempts)
                .join(participants, participants.c.id == submissions.c.participant_id)
                .where(submissions.c.id == row.id)).one()
            return Job(*job, taken_from=row.scorer if row.status == SCORING else None)


def _mine(db, job):
    submissions = db.tables.submissions
    return sa.and_(submissions.c.id == job.id, submissions.c.claim == job.claim,
                   submissions.c.status == SCORING)


def renew(db, job, lease_seconds):
    """Extends the job's lease; False where the claim is no longer this one's."""
    with db.write() as connection:
        result = connection.execute(sa.update(db.tables.submissions).where(_mine(db, job))
                                    .values(lease_until=db.now + lease_seconds))
    return result.rowcount == 1


def finish(db, job, accuracy=None, error=None):
    """Writes the job's result (its accuracy, or the error that rejects it); False, and nothing
    written, where the claim is no longer this one's."""
    values = {"status": SCORED, "accuracy": accuracy} if error is None else \
        {"status": REJECTED, "error": error}
    with db.write() as connection:
        result = connection.execute(sa.update(db.tables.submissions).where(_mine(db, job)).values(
            finished_at=db.now, claim=None, lease_until=None, **values))
    return result.rowcount == 1


def release(db, job, counted=False):
    """Puts a job its scorer gives up back in the queue at once: the attempt not `counted` where
    the scorer is stopping, counted where scoring failed."""
    submissions = db.tables.submissions
    attempts = submissions.c.attempts if counted else submissions.c.attempts - 1
    with db.write() as connection:
        result = connection.execute(sa.update(submissions).where(_mine(db, job)).values(
            status=QUEUED, claim=None, lease_until=None, started_at=None, attempts=attempts))
    return result.rowcount == 1


def _public(row):
    return {"id": row.id, "status": row.status, "accuracy": row.accuracy, "error": row.error,
            "submitted_at": iso_time(row.submitted_at), "track": row.track}


def owned(db, submission_id, participant_id):
    """The API's view of a submission of the participant, or None (unknown, or another's)."""
    submissions = db.tables.submissions
    with db.read() as connection:
        row = connection.execute(sa.select(submissions).where(
            submissions.c.id == submission_id,
            submissions.c.participant_id == participant_id)).first()
    return None if row is None else _public(row)


def by_page_key(db, page_key):
    """What the status page of `page_key` shows, or None: the API's view plus the participant,
    the attack, the file's name and, while queued, how many jobs are ahead."""
    submissions, participants = db.tables.submissions, db.tables.participants
    with db.read() as connection:
        row = connection.execute(
            sa.select(submissions, participants.c.name.label("participant"))
            .join(participants, participants.c.id == submissions.c.participant_id)
            .where(submissions.c.page_hash == page_hash(page_key))).first()
        if row is None:
            return None
        ahead = None
        if row.status == QUEUED:
            ahead = connection.execute(sa.select(sa.func.count()).where(
                submissions.c.status.in_((QUEUED, SCORING)),
                submissions.c.submitted_at < row.submitted_at)).scalar_one()
    return {**_public(row), "participant": row.participant, "attack": row.attack,
            "filename": row.filename, "ahead": ahead}


def leaderboard(db):
    """Each participant's best (lowest accuracy, then earliest) scored submission per track,
    strongest attack first, as dicts with participant, track, accuracy, submitted_at and
    attack; and the model's clean accuracy (None until a scorer has measured it)."""
    submissions, participants = db.tables.submissions, db.tables.participants
    with db.read() as connection:
        rows = connection.execute(
            sa.select(participants.c.name, submissions.c.track, submissions.c.accuracy,
                      submissions.c.submitted_at, submissions.c.attack)
            .join(participants, participants.c.id == submissions.c.participant_id)
            .where(submissions.c.status == SCORED)
            .order_by(submissions.c.accuracy, submissions.c.submitted_at,
                      submissions.c.id)).all()
        reference = get_meta(connection, db.tables, REFERENCE)
    best, seen = [], set()
    for row in rows:
        if (row.name, row.track) in seen:
            continue
        seen.add((row.name, row.track))
        best.append({"participant": row.name, "track": row.track, "accuracy": row.accuracy,
                     "submitted_at": iso_time(row.submitted_at), "attack": row.attack})
    return best, reference


def set_reference(db, reference):
    """Stores the model's clean accuracy (a dict with accuracy, checkpoint, examples)."""
    with db.write() as connection:
        set_meta(connection, db.tables, REFERENCE, reference)


def get_reference(db):
    with db.read() as connection:
        return get_meta(connection, db.tables, REFERENCE)


def submission_ids(db):
    submissions = db.tables.submissions
    with db.read() as connection:
        return set(connection.execute(sa.select(submissions.c.id)).scalars())
