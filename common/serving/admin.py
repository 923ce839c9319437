"""What a host does to a running challenge from the command line: list the participants, hide
a submission from the leaderboard (kept, and shown again on request), and export the
leaderboard. Each is one short transaction, so it runs beside the server's own processes."""

import csv
import dataclasses
import json
import os
import time

import sqlalchemy as sa

from common.io.files import written_in_place
from common.runtime.errors import UserError
from common.serving import queue, settings

EXPORT_FIELDS = ("id", "participant", "track", "accuracy", "submitted_at", "attack")


@dataclasses.dataclass(frozen=True)
class Standing:
    """A participant, the submissions they made, and their best shown accuracy per track (None
    where none is scored by the challenge's model)."""

    name: str
    submissions: int
    best: dict


def _board(db):
    """The leaderboard the pages show now."""
    current = settings.current(db)
    if current.model is None:
        return []
    return queue.leaderboard(db, current.model, current.private(time.time()))


def standings(db):
    """Every participant's Standing, by name: hidden submissions count, but do not make a
    best."""
    participants, submissions = db.tables.participants, db.tables.submissions
    with db.read() as connection:
        counts = connection.execute(
            sa.select(participants.c.name, sa.func.count(submissions.c.id))
            .select_from(participants.outerjoin(
                submissions, submissions.c.participant_id == participants.c.id))
            .group_by(participants.c.name).order_by(participants.c.name)).all()
    best = {}
    for row in _board(db):
        best.setdefault(row["participant"], {})[row["track"]] = row["accuracy"]
    return [Standing(name, count, best.get(name, {})) for name, count in counts]


def set_hidden(db, submission_id, hidden):
    """Takes the submission off the leaderboard (`hidden`) or puts it back; UserError for an
    unknown id."""
    submissions = db.tables.submissions
    with db.write() as connection:
        result = connection.execute(sa.update(submissions)
                                    .where(submissions.c.id == submission_id)
                                    .values(hidden=hidden))
    if result.rowcount != 1:
        raise UserError(f"there is no submission {submission_id!r} (the ids are in the "
                        "leaderboard's export and the server's log)")


def export(db, path):
    """Writes the leaderboard of the challenge's model to `path`, CSV or JSON by its extension;
    returns the number of rows."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".json"):
        raise UserError(f"--export needs a path ending in .csv or .json, got {path!r}")
    rows = _board(db)
    with written_in_place(path, "w") as target:
        if extension == ".json":
            json.dump(rows, target, indent=1)
            target.write("\n")
        else:
            writer = csv.DictWriter(target, EXPORT_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)
