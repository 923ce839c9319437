"""Where accepted submission files live: `submissions/ID.npy` in the state folder (with SQLite),
or the database itself, in 1 MiB chunks (with PostgreSQL, so that scorers on other machines read
them). Either way the file is durable before the transaction that queues its job commits.

The names are the server's own random ids, never a name a client gave.
"""

import contextlib
import os
import tempfile

import sqlalchemy as sa

CHUNK_BYTES = 1 << 20
CHUNKS_PER_STATEMENT = 8


def fsync_folder(folder):
    """Makes a rename or a new file in `folder` durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_file(path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class FolderStore:
    """Files in `state_dir/submissions`."""

    def __init__(self, state_dir):
        self.folder = os.path.join(state_dir, "submissions")
        os.makedirs(self.folder, exist_ok=True)

    def path(self, submission_id):
        return os.path.join(self.folder, f"{submission_id}.npy")

    def keep(self, connection, submission_id, spool_path):
        """Moves the complete spool file (its bytes flushed to disk already) into place,
        durably; called inside the transaction that queues the job, before it commits."""
        os.replace(spool_path, self.path(submission_id))
        fsync_folder(self.folder)

    def forget(self, submission_id):
        """Removes the file of a submission whose transaction failed."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path(submission_id))

    @contextlib.contextmanager
    def opened(self, submission_id, work_dir):
        """The path of the file, to read."""
        yield self.path(submission_id)

    def orphans(self, known_ids):
        """Files of submissions the database does not know (a crash between the file and the
        commit)."""
        return [name for name in os.listdir(self.folder) if name.endswith(".npy")
                and name[:-len(".npy")] not in known_ids]


class DatabaseStore:
    """Files in the database's chunks table."""

    def __init__(self, db):
        self.db = db

    def keep(self, connection, submission_id, spool_path):
        table = self.db.tables.chunks
        with open(spool_path, "rb") as spool:
            seq = 0
            while True:
                rows = []
                for _ in range(CHUNKS_PER_STATEMENT):
                    data = spool.read(CHUNK_BYTES)
                    if not data:
                        break
                    rows.append({"submission_id": submission_id, "seq": seq, "data": data})
                    seq += 1
                if not rows:
                    break
                connection.execute(sa.insert(table), rows)

    def forget(self, submission_id):
        pass  # the chunks went with the transaction that failed

    @contextlib.contextmanager
    def opened(self, submission_id, work_dir):
        """The file, copied from the database into `work_dir` and removed after use."""
        table = self.db.tables.chunks
        handle, path = tempfile.mkstemp(dir=work_dir, prefix=f"{submission_id}.", suffix=".npy")
        try:
            with os.fdopen(handle, "wb") as target, self.db.read() as connection:
                seq = 0
                while True:
                    rows = connection.execute(
                        sa.select(table.c.seq, table.c.data)
                        .where(table.c.submission_id == submission_id, table.c.seq >= seq)
                        .order_by(table.c.seq).limit(CHUNKS_PER_STATEMENT)).all()
                    for row in rows:
                        target.write(row.data)
                    if len(rows) < CHUNKS_PER_STATEMENT:
                        break
                    seq = rows[-1].seq + 1
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def orphans(self, known_ids):
        return []
