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

Each score records the fingerprint of the model that gave it (`model`); the leaderboard shows
only the scores of the challenge's current model, and `requeue_all` queues every submission
again when the challenge moves to another model (the old scores stay in the scores table).

The rate limits count the uploads a participant started in the last hour, in the transaction
that records the new one, under a lock of the participant's row: those accepted or still being
received against one allowance, those refused against their own, larger one (a participant
fumbling with the file format is not locked out, a flood is stopped); and the accepted
submissions of all time against a third.
"""

import dataclasses
import datetime
import hashlib
import secrets

import sqlalchemy as sa

from common.serving.database import MODEL, get_meta, set_meta

QUEUED, SCORING, SCORED, REJECTED = "queued", "scoring", "scored", "rejected"
TRACKS = ("white-box", "black-box")
DEFAULT_TRACK = "white-box"
MAX_ATTEMPTS = 3
RATE_WINDOW_SECONDS = 3600
MAX_ATTACK_TEXT = 200
REFERENCE = "reference"


class RateLimited(Exception):
    """An upload over one of the limits; `retry_after` seconds until one more is allowed (None
    where waiting does not help)."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class ModelChanged(Exception):
    """The challenge moved to another model (--rescore) than the one this scorer has."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Uploads per participant: accepted (or being received) per hour, refused per hour, and
    accepted submissions in all."""

    per_hour: int
    refused_per_hour: int
    total: int


@dataclasses.dataclass(frozen=True)
class Score:
    """A model's accuracy on a submission: on every test image, on the public subset, and on
    the private rest (None without a private split)."""

    accuracy: float
    public: float
    private: float | None


@dataclasses.dataclass(frozen=True)
class Job:
    """A claimed job."""

    id: str
    claim: str
    participant: str
    track: str
    filename: str
    stored_size: int
    stored_sha256: str
    attempts: int
    taken_from: str | None  # the scorer whose lease ran out, where the job was one


def iso_time(seconds):
    """Seconds since the epoch as ISO 8601 in UTC, or None."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def shown_time(seconds):
    """A time as pages and messages show it: date, time of day and zone (UTC), or a dash."""
    if seconds is None:
        return "—"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def page_hash(page_key):
    return hashlib.sha256(page_key.encode()).hexdigest()


def start_upload(db, participant_id, limits):
    """Records an upload by the participant and returns its id; RateLimited, nothing recorded,
    where it would pass one of the `limits`."""
    uploads, participants = db.tables.uploads, db.tables.participants
    submissions = db.tables.submissions
    with db.write() as connection:
        connection.execute(sa.select(participants.c.id).where(participants.c.id == participant_id)
                           .with_for_update())
        now = connection.execute(sa.select(db.now)).scalar_one()
        recent = connection.execute(
            sa.select(uploads.c.at, uploads.c.outcome)
            .where(uploads.c.participant_id == participant_id,
                   uploads.c.at > now - RATE_WINDOW_SECONDS)
            .order_by(uploads.c.at)).all()
        counted = [row.at for row in recent if row.outcome in ("receiving", "accepted")]
        refused = [row.at for row in recent if row.outcome not in ("receiving", "accepted")]
        _check_hourly(counted, limits.per_hour, now, "uploads an hour (accepted or being "
                      "received; the server's --max_submissions_per_hour)")
        _check_hourly(refused, limits.refused_per_hour, now, "refused uploads an hour (the "
                      "server's --max_refused_per_hour)")
        total = connection.execute(sa.select(sa.func.count()).where(
            submissions.c.participant_id == participant_id)).scalar_one()
        if total >= limits.total:
            raise RateLimited(f"you have {total} submissions, the most one participant may "
                              f"make ({limits.total}, the server's --max_submissions_total)")
        return connection.execute(sa.insert(uploads).values(
            participant_id=participant_id, at=now, outcome="receiving")
            .returning(uploads.c.id)).scalar_one()


def _check_hourly(times, limit, now, what):
    """RateLimited where `limit` of the upload `times` (sorted) fall in the last hour."""
    if len(times) >= limit:
        retry_after = max(1, int(times[len(times) - limit] + RATE_WINDOW_SECONDS - now) + 1)
        raise RateLimited(f"at most {limit} {what}: try again in {retry_after} s", retry_after)


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


def accept(db, store, upload_id, participant_id, received, stored, track, attack):
    """Keeps the `stored` file (`storage.compact`'s path, size and SHA-256 of the `received`
    upload) and queues its job, durably, in one transaction; returns the submission's id and
    the key of its status page."""
    submissions, uploads = db.tables.submissions, db.tables.uploads
    submission_id = secrets.token_hex(12)
    page_key = secrets.token_urlsafe(24)
    stored_path, stored_size, stored_sha256 = stored
    try:
        with db.write() as connection:
            connection.execute(sa.insert(submissions).values(
                id=submission_id, participant_id=participant_id, page_hash=page_hash(page_key),
                track=track, attack=attack, filename=received.filename, size=received.size,
                sha256=received.sha256, stored_size=stored_size, stored_sha256=stored_sha256,
                status=QUEUED, submitted_at=db.now, attempts=0, hidden=False))
            store.keep(connection, submission_id, stored_path)
            connection.execute(sa.update(uploads).where(uploads.c.id == upload_id)
                               .values(outcome="accepted", submission_id=submission_id))
    except BaseException:
        store.forget(submission_id)
        raise
    return Accepted(submission_id, page_key)


def claim(db, scorer, lease_seconds, model):
    """Claims the oldest job that is queued, or whose lease ran out; returns the Job or None.
    A job claimed MAX_ATTEMPTS times already is rejected instead. ModelChanged where the
    challenge's model is no longer `model` (a fingerprint)."""
    submissions, participants = db.tables.submissions, db.tables.participants
    while True:
        with db.write() as connection:
            current = get_meta(connection, db.tables, MODEL)
            if current != model:
                raise ModelChanged(f"the challenge moved to model {current[:12]}; this scorer "
                                   f"has {model[:12]}")
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
                          submissions.c.track, submissions.c.filename,
                          submissions.c.stored_size, submissions.c.stored_sha256,
                          submissions.c.attempts)
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


def finish(db, job, model, score=None, error=None):
    """Writes the job's result (the Score given by `model`, a fingerprint, or the error that
    rejects the submission); False, and nothing written, where the claim is no longer this
    one's."""
    submissions = db.tables.submissions
    values = {"status": REJECTED, "error": error} if score is None else {
        "status": SCORED, "accuracy": score.accuracy, "public_accuracy": score.public,
        "private_accuracy": score.private, "model": model}
    with db.write() as connection:
        result = connection.execute(sa.update(submissions).where(_mine(db, job)).values(
            finished_at=db.now, claim=None, lease_until=None, **values))
        if result.rowcount == 1 and score is not None:
            connection.execute(sa.insert(db.tables.scores).values(
                submission_id=job.id, model=model, accuracy=score.accuracy,
                public_accuracy=score.public, private_accuracy=score.private,
                scored_at=db.now))
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


def _shown(submissions, private):
    """The score the pages show: on the private rest once a challenge with a private split
    closed, else on the public subset (every image without a split)."""
    return submissions.c.private_accuracy if private else submissions.c.public_accuracy


def _public(row):
    return {"id": row.id, "status": row.status, "accuracy": row.shown, "error": row.error,
            "submitted_at": iso_time(row.submitted_at), "track": row.track}


def owned(db, submission_id, participant_id, private=False):
    """The API's view of a submission of the participant, or None (unknown, or another's)."""
    submissions = db.tables.submissions
    with db.read() as connection:
        row = connection.execute(sa.select(submissions, _shown(submissions, private).label(
            "shown")).where(submissions.c.id == submission_id,
                            submissions.c.participant_id == participant_id)).first()
    return None if row is None else _public(row)


def by_page(db, submission_id, page_key, private=False):
    """What the status page of a submission shows, given its id and the key of its page, or
    None: the API's view plus the participant, the attack, the file's name and, while queued,
    how many jobs are ahead."""
    submissions, participants = db.tables.submissions, db.tables.participants
    with db.read() as connection:
        row = connection.execute(
            sa.select(submissions, participants.c.name.label("participant"),
                      _shown(submissions, private).label("shown"))
            .join(participants, participants.c.id == submissions.c.participant_id)
            .where(submissions.c.id == submission_id,
                   submissions.c.page_hash == page_hash(page_key))).first()
        if row is None:
            return None
        ahead = None
        if row.status == QUEUED:
            ahead = connection.execute(sa.select(sa.func.count()).where(
                submissions.c.status.in_((QUEUED, SCORING)),
                submissions.c.submitted_at < row.submitted_at)).scalar_one()
    return {**_public(row), "participant": row.participant, "attack": row.attack,
            "filename": row.filename, "ahead": ahead}


def leaderboard(db, model, private=False):
    """Each participant's best (lowest accuracy, then earliest) visible submission per track
    scored by `model` (a fingerprint), strongest attack first, as dicts with id, participant,
    track, accuracy, submitted_at and attack.

    One query: for each participant and track, the best submission's id is one seek in an index
    (`submissions_best_*`), so the time grows with the participants, not their submissions.
    """
    submissions, participants = db.tables.submissions, db.tables.participants
    shown = _shown(submissions, private)
    tracks = sa.union_all(*(sa.select(sa.literal(track).label("track")) for track in TRACKS))
    tracks = tracks.subquery("tracks")
    candidate = submissions.alias("candidate")
    candidate_shown = _shown(candidate, private)
    best = (sa.select(candidate.c.id)
            .where(candidate.c.participant_id == participants.c.id,
                   candidate.c.track == tracks.c.track, candidate.c.model == model,
                   candidate.c.status == SCORED, candidate.c.hidden == sa.false())
            .order_by(candidate_shown, candidate.c.submitted_at, candidate.c.id)
            .limit(1).correlate(participants, tracks).scalar_subquery())
    query = (sa.select(submissions.c.id, participants.c.name, submissions.c.track,
                       shown.label("accuracy"), submissions.c.submitted_at,
                       submissions.c.attack)
             .select_from(participants.join(tracks, sa.true())
                          .join(submissions, submissions.c.id == best))
             .order_by(shown, submissions.c.submitted_at, submissions.c.id))
    with db.read() as connection:
        rows = connection.execute(query).all()
    return [{"id": row.id, "participant": row.name, "track": row.track,
             "accuracy": row.accuracy, "submitted_at": iso_time(row.submitted_at),
             "attack": row.attack} for row in rows]


def _reference_key(model):
    return f"{REFERENCE}/{model}"


def set_reference(db, model, reference):
    """Stores the clean accuracy of `model` (a fingerprint): a dict with accuracy, public,
    private and examples."""
    with db.write() as connection:
        set_meta(connection, db.tables, _reference_key(model), reference)


def get_reference(db, model):
    with db.read() as connection:
        return get_meta(connection, db.tables, _reference_key(model))


def submission_ids(db):
    submissions = db.tables.submissions
    with db.read() as connection:
        return set(connection.execute(sa.select(submissions.c.id)).scalars())
