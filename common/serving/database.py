"""The server's tables, on SQLite (a file in the state folder, the default) or PostgreSQL, through
SQLAlchemy Core.

Every table is named after the challenge (`mnist_submissions`, `cifar10_participants`, ...), so
that both challenges can share one PostgreSQL database. Times are seconds since the epoch on the
database's own clock, so that scorers on several machines agree on when a lease runs out.

Transactions that write (`Database.write`) take the write lock at once: `BEGIN IMMEDIATE` on
SQLite, so that reading then writing in one transaction (counting uploads, claiming a job) is
atomic; on PostgreSQL the statements lock the rows they read (`FOR UPDATE`). SQLite runs in WAL
mode with `synchronous=FULL`: a committed transaction is on disk.
"""

import contextlib
import json
import os
import re

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from common.runtime.errors import UserError

SQLITE_FILE = "serve.sqlite3"
# The meta key of the fingerprint of the model the challenge is scored on.
MODEL = "model"
SCHEMA_VERSION = 2
# Held while PostgreSQL's tables are created, so that processes starting together do not race.
_SCHEMA_LOCK = 0x6D616472795F73
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_POSTGRESQL_NOW = "(extract(epoch from clock_timestamp())::float8)"


def table_prefix(challenge_name):
    """`mnist_` for "MNIST", `cifar10_` for "CIFAR-10"."""
    return re.sub(r"[^a-z0-9]", "", challenge_name.lower()) + "_"


class Tables:
    """The tables of one challenge, their names starting with `prefix`."""

    def __init__(self, prefix):
        self.metadata = metadata = sa.MetaData()
        self.participants = sa.Table(
            f"{prefix}participants", metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("name", sa.String(64), nullable=False, unique=True),
            sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
            sa.Column("created_at", sa.Float, nullable=False))
        # Every upload a participant started, accepted or refused: the rate limit counts them.
        self.uploads = sa.Table(
            f"{prefix}uploads", metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("participant_id", sa.Integer, sa.ForeignKey(self.participants.c.id),
                      nullable=False),
            sa.Column("at", sa.Float, nullable=False),
            sa.Column("outcome", sa.String(16), nullable=False),
            sa.Column("submission_id", sa.String(32)),
            sa.Index(f"{prefix}uploads_by_participant", "participant_id", "at"))
        # The accepted submissions, which are also the queue: status queued -> scoring -> scored
        # or rejected; a job being scored holds a claim whose lease its scorer keeps renewing.
        self.submissions = sa.Table(
            f"{prefix}submissions", metadata,
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("participant_id", sa.Integer, sa.ForeignKey(self.participants.c.id),
                      nullable=False, index=True),
            sa.Column("page_hash", sa.String(64), nullable=False, unique=True),
            sa.Column("track", sa.String(16), nullable=False),
            sa.Column("attack", sa.String(200), nullable=False),
            sa.Column("filename", sa.String(200), nullable=False),
            sa.Column("size", sa.BigInteger, nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            # The stored file: the upload compacted (storage.compact) and compressed.
            sa.Column("stored_size", sa.BigInteger, nullable=False),
            sa.Column("stored_sha256", sa.String(64), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            # The score of the model `model` (its fingerprint): on every test image, on the
            # public subset and on the private rest (None without a private split).
            sa.Column("accuracy", sa.Float),
            sa.Column("public_accuracy", sa.Float),
            sa.Column("private_accuracy", sa.Float),
            sa.Column("model", sa.String(64)),
            sa.Column("hidden", sa.Boolean, nullable=False, default=False),
            sa.Column("error", sa.Text),
            sa.Column("submitted_at", sa.Float, nullable=False),
            sa.Column("started_at", sa.Float),
            sa.Column("finished_at", sa.Float),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("claim", sa.String(32)),
            sa.Column("scorer", sa.String(200)),
            sa.Column("lease_until", sa.Float),
            sa.Index(f"{prefix}submissions_queue", "status", "submitted_at"),
            # A participant's best per track is one seek in these (queue.leaderboard).
            *(sa.Index(f"{prefix}submissions_best_{column}", "participant_id", "track", "model",
                       "status", "hidden", column, "submitted_at", "id")
              for column in ("public_accuracy", "private_accuracy")))
        # Every score a submission was given, by which model: kept when the challenge moves to
        # another model (--rescore).
        self.scores = sa.Table(
            f"{prefix}scores", metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("submission_id", sa.String(32), sa.ForeignKey(self.submissions.c.id),
                      nullable=False, index=True),
            sa.Column("model", sa.String(64), nullable=False),
            sa.Column("accuracy", sa.Float, nullable=False),
            sa.Column("public_accuracy", sa.Float, nullable=False),
            sa.Column("private_accuracy", sa.Float),
            sa.Column("scored_at", sa.Float, nullable=False))
        # The files of the submissions, where the database holds them (PostgreSQL).
        self.chunks = sa.Table(
            f"{prefix}submission_chunks", metadata,
            sa.Column("submission_id", sa.String(32), sa.ForeignKey(self.submissions.c.id),
                      primary_key=True),
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("data", sa.LargeBinary, nullable=False))
        # Settings every process must agree on, the model's fingerprint, the public subset, the
        # closing time and the clean accuracy of each model.
        self.meta = sa.Table(
            f"{prefix}meta", metadata,
            sa.Column("key", sa.String(100), primary_key=True),
            sa.Column("value", sa.Text, nullable=False))


def _engine_url(database_url, state_dir):
    if database_url is None:
        return sa.engine.URL.create("sqlite", database=os.path.join(
            os.path.abspath(state_dir), SQLITE_FILE))
    try:
        url = sa.engine.make_url(database_url)
    except sa.exc.ArgumentError as error:
        raise UserError(f"--database_url {database_url!r} is not a database URL") from error
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite") and url.database:
        return url
    raise UserError(f"--database_url must be postgresql://USER@HOST:PORT/DATABASE (or "
                    f"sqlite:///PATH), got {url.render_as_string(hide_password=True)}")


def _first_line(error):
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Database:
    """The engine and tables of one challenge; `database_url` None means SQLite in
    `state_dir`."""

    def __init__(self, database_url, state_dir, challenge_name):
        url = _engine_url(database_url, state_dir)
        self.is_postgresql = url.get_backend_name() == "postgresql"
        self.shown_url = url.render_as_string(hide_password=True)
        self.tables = Tables(table_prefix(challenge_name))
        if self.is_postgresql:
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8,
                                           max_overflow=16)
            self.now = sa.literal_column(_POSTGRESQL_NOW, sa.Float)
        else:
            self.engine = sa.create_engine(url, pool_size=8, max_overflow=16)
            self.now = sa.literal_column(_SQLITE_NOW, sa.Float)
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)

    @contextlib.contextmanager
    def read(self):
        """A connection in a transaction that only reads."""
        with self.engine.connect() as connection, connection.begin():
            yield connection

    @contextlib.contextmanager
    def write(self):
        """A connection in a transaction that writes, committed at the end of the block."""
        with self.engine.connect() as connection:
            connection.execution_options(serving_write=True)
            with connection.begin():
                yield connection

    def lock(self, connection):
        """Makes processes starting together set the database up one at a time (on SQLite the
        write transaction is that lock already)."""
        if self.is_postgresql:
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": _SCHEMA_LOCK})

    def create(self):
        """Creates the tables where missing and checks the schema's version; UserError where
        the database cannot be reached."""
        try:
            with self.write() as connection:
                self.lock(connection)
                self.tables.metadata.create_all(connection)
                version = get_meta(connection, self.tables, "schema")
                if version is None:
                    set_meta(connection, self.tables, "schema", SCHEMA_VERSION)
                elif version != SCHEMA_VERSION:
                    raise UserError(f"the database {self.shown_url} has tables of schema "
                                    f"version {version}; this server needs {SCHEMA_VERSION}")
        except sa.exc.SQLAlchemyError as error:
            raise UserError(f"cannot use the database {self.shown_url}: "
                            f"{_first_line(error)}") from error

    def agree_on(self, key, value, what):
        """Stores `value` under `key` where nothing is stored yet; UserError where another value
        is (servers sharing a database must check submissions alike)."""
        with self.write() as connection:
            self.lock(connection)
            stored = get_meta(connection, self.tables, key)
            if stored is None:
                set_meta(connection, self.tables, key, value)
            elif stored != value:
                raise UserError(f"the database {self.shown_url} holds submissions of {what} "
                                f"{_describe(stored)}; this server has {_describe(value)}: "
                                "give it another --state_dir or --database_url")

    def clock(self):
        """The database's time, in seconds since the epoch."""
        with self.read() as connection:
            return connection.execute(sa.select(self.now)).scalar_one()

    def dispose(self):
        self.engine.dispose()


def _describe(value):
    if isinstance(value, dict):
        return ", ".join(f"{key} {item}" for key, item in sorted(value.items()))
    return str(value)


def get_meta(connection, tables, key):
    """The JSON value stored under `key`, or None."""
    value = connection.execute(sa.select(tables.meta.c.value)
                               .where(tables.meta.c.key == key)).scalar_one_or_none()
    return None if value is None else json.loads(value)


def set_meta(connection, tables, key, value):
    """Stores the JSON `value` under `key`, replacing what was there."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(tables.meta).values(key=key, value=json.dumps(value))
    connection.execute(statement.on_conflict_do_update(
        index_elements=[tables.meta.c.key], set_={"value": statement.excluded.value}))


def _sqlite_connect(dbapi_connection, connection_record):
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin); sqlite3's own transaction handling
    # would begin only at the first write, too late for a read-then-write transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection):
    write = connection.get_execution_options().get("serving_write")
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
