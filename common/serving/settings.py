"""What the processes of a challenge agree on through the database, beyond the checks' settings:
the model the challenge is scored on (its fingerprint), the public subset of the test images and
the closing time.

The model is recorded at the first start; a process started with another model refuses to run
unless told to move the challenge to it (`--rescore`), which queues every submission again.
With a private split (`fraction` < 1) a fixed, seeded subset of the test images gives the score
shown while the challenge is open and the rest the one shown once it closed (Kaggle's
convention); the subset is drawn once and stored, so every process and restart uses the same.
"""

import dataclasses
import datetime
import secrets

import numpy as np
import sqlalchemy as sa

from common.runtime.errors import UserError
from common.serving import queue
from common.serving.database import MODEL, get_meta, set_meta

SPLIT = "split"
CLOSES_AT = "closes_at"


def short(fingerprint):
    """The first 12 hex digits of a fingerprint, as messages show it."""
    return fingerprint[:12]


def adopt_model(db, fingerprint, rescore=False):
    """Records `fingerprint` as the challenge's model where none is; returns how many
    submissions were queued again. UserError where the database holds another model, unless
    `rescore`: then the challenge moves to this one and every submission is queued again, its
    old scores kept in the scores table but off the leaderboard."""
    submissions = db.tables.submissions
    with db.write() as connection:
        db.lock(connection)
        stored = get_meta(connection, db.tables, MODEL)
        if stored == fingerprint:
            return 0
        if stored is not None and not rescore:
            raise UserError(f"the database {db.shown_url} scores the challenge with model "
                            f"{short(stored)}; this server's model is {short(fingerprint)}: "
                            f"start it with the model {short(stored)}, or give --rescore to "
                            "move the challenge to this one and score every submission again")
        set_meta(connection, db.tables, MODEL, fingerprint)
        if stored is None:
            return 0
        return connection.execute(sa.update(submissions).values(
            status=queue.QUEUED, accuracy=None, public_accuracy=None, private_accuracy=None,
            model=None, error=None, attempts=0, claim=None, scorer=None, lease_until=None,
            started_at=None, finished_at=None)).rowcount


def check_fraction(fraction, examples):
    """UserError unless `fraction` of `examples` test images leaves at least one image public
    and, below 1, at least one private."""
    public = round(fraction * examples)
    if not 0 < fraction <= 1 or public < 1 or (fraction < 1 and public == examples):
        raise UserError(f"--public_fraction must leave at least one of the {examples} test "
                        f"images public and, below 1, at least one private; got {fraction}")


def public_subset(db, examples, fraction):
    """The indices of the public test images (None: all of them, no private split), drawn at
    the first start with a random seed and stored; UserError where the database holds another
    fraction."""
    check_fraction(fraction, examples)
    with db.write() as connection:
        db.lock(connection)
        stored = get_meta(connection, db.tables, SPLIT)
        if stored is None:
            stored = {"fraction": fraction, "seed": None, "public": None}
            if fraction < 1:
                seed = secrets.randbits(63)
                order = np.random.default_rng(seed).permutation(examples)
                public = sorted(int(index) for index in order[:round(fraction * examples)])
                stored = {"fraction": fraction, "seed": seed, "public": public}
            set_meta(connection, db.tables, SPLIT, stored)
    if stored["fraction"] != fraction:
        raise UserError(f"the database {db.shown_url} holds a challenge with --public_fraction="
                        f"{stored['fraction']}; this server has --public_fraction={fraction}")
    return None if stored["public"] is None else np.asarray(stored["public"])


def parse_time(text, flag="--closes_at"):
    """Seconds since the epoch of an ISO 8601 time with its zone (2026-06-30T23:59:00+02:00,
    ...Z); UserError without a zone or where it is no time."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(f"{flag} must be an ISO 8601 time with its zone, such as "
                        f"2026-06-30T23:59:00+00:00; got {text!r}") from None
    if moment.tzinfo is None:
        raise UserError(f"{flag} needs a zone (such as +00:00 or Z) after the time; got "
                        f"{text!r}")
    return moment.timestamp()


def set_closing(db, seconds):
    """Sets the time uploads stop being accepted (None: open again)."""
    with db.write() as connection:
        set_meta(connection, db.tables, CLOSES_AT, seconds)


@dataclasses.dataclass(frozen=True)
class Current:
    """The challenge's model, closing time (None: open), and whether it has a private split."""

    model: str | None
    closes_at: float | None
    split: bool

    def closed(self, now):
        return self.closes_at is not None and now >= self.closes_at

    def private(self, now):
        """Whether the pages show the private split's scores now."""
        return self.split and self.closed(now)


def current(db):
    """The Current settings, read in one transaction."""
    with db.read() as connection:
        split = get_meta(connection, db.tables, SPLIT)
        return Current(get_meta(connection, db.tables, MODEL),
                       get_meta(connection, db.tables, CLOSES_AT),
                       bool(split and split["public"] is not None))
