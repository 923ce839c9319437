"""Where accepted submission files live: `submissions/ID.npy.gz` in the state folder (with
SQLite), or the database itself, in 1 MiB chunks (with PostgreSQL, so that scorers on other
machines read them). Either way the file is durable before the transaction that queues its job
commits.

A file is stored compacted (`compact`): as float32 where every value of the upload round-trips
exactly through float32 (adversarial examples almost always do: they are computed in float32),
else as float64, and gzip-compressed. Both are lossless: the checks and the score see the values
of the upload. An upload that would leave less than the host's minimum free space is refused
(507), and a failed write is a StorageError (507 for a full disk, else 503), never a crash.

The names are the server's own random ids, never a name a client gave.
"""

import contextlib
import errno
import gzip
import os
import shutil
import tempfile

import numpy as np
import sqlalchemy as sa

from common.evaluation import submission
from common.io import download

CHUNK_BYTES = 1 << 20
CHUNKS_PER_STATEMENT = 8
SUFFIX = ".npy.gz"
COMPRESSION_LEVEL = 6
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class StorageError(Exception):
    """The server cannot store an upload: the HTTP status (507 or 503) and a one-line message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def write_error(error):
    """The StorageError of an OSError raised while writing an upload."""
    if error.errno in FULL_DISK:
        return StorageError(507, "the server's disk is full: the upload was not stored; try "
                                 "again later")
    return StorageError(503, f"the server cannot store uploads now ({error.strerror or error}); "
                             "try again later")


def check_free(folder, needed, min_free):
    """StorageError(507) where writing `needed` more bytes into `folder` would leave less than
    `min_free` bytes free there."""
    free = shutil.disk_usage(folder).free
    if free - needed < min_free:
        raise StorageError(507, f"the server keeps at least {min_free} bytes of its disk free "
                                f"(--min_free_bytes) and this upload of up to {needed} bytes would "
                                "leave less: try again later")


def compact(path, shape, shape_text, spool_dir):
    """Writes the (checked) `.npy` upload at `path` compacted into a new file of `spool_dir`;
    returns that file's path, size and SHA-256. StorageError where it cannot be written."""
    values = submission.load_submission(path, shape, shape_text)  # float64, exactly the upload's
    narrow = values.astype(np.float32)
    kept = narrow if np.array_equal(narrow, values) else values
    handle, target = tempfile.mkstemp(dir=spool_dir, prefix="stored-", suffix=SUFFIX)
    try:
        with os.fdopen(handle, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=COMPRESSION_LEVEL,
                               mtime=0) as packed:
                np.save(packed, kept, allow_pickle=False)
            raw.flush()
            os.fsync(raw.fileno())
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(target)
        raise write_error(error) from error
    return target, os.path.getsize(target), download.sha256_of(target)


@contextlib.contextmanager
def expanded(path, work_dir):
    """The stored file at `path`, decompressed into a `.npy` file of `work_dir` removed after
    use."""
    handle, target = tempfile.mkstemp(dir=work_dir, prefix="expanded-", suffix=".npy")
    try:
        with os.fdopen(handle, "wb") as plain, gzip.open(path, "rb") as packed:
            shutil.copyfileobj(packed, plain, CHUNK_BYTES)
        yield target
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(target)


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
        return os.path.join(self.folder, submission_id + SUFFIX)

    def keep(self, connection, submission_id, spool_path):
        """Moves the complete spool file (its bytes flushed to disk already) into place,
        durably; called inside the transaction that queues the job, before it commits."""
        try:
            os.replace(spool_path, self.path(submission_id))
            fsync_folder(self.folder)
        except OSError as error:
            raise write_error(error) from error

    def forget(self, submission_id):
        """Removes the file of a submission whose transaction failed (where it got there: the
        error that failed the transaction is the one reported)."""
        with contextlib.suppress(OSError):
            os.remove(self.path(submission_id))

    @contextlib.contextmanager
    def opened(self, submission_id, work_dir):
        """The path of the file, to read."""
        yield self.path(submission_id)

    def orphans(self, known_ids):
        """Files of submissions the database does not know (a crash between the file and the
        commit)."""
        return [name for name in os.listdir(self.folder) if name.endswith(SUFFIX)
                and name[:-len(SUFFIX)] not in known_ids]


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
        handle, path = tempfile.mkstemp(dir=work_dir, prefix=f"{submission_id}.", suffix=SUFFIX)
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
