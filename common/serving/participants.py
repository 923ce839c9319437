"""Participants and their tokens. A token is 32 random bytes (URL-safe base64); the database keeps
only its SHA-256, so a copy of the database gives no one a valid token."""

import dataclasses
import hashlib
import hmac
import secrets

import sqlalchemy as sa

from common.runtime.errors import UserError

MAX_NAME = 64
MAX_TOKEN = 200


@dataclasses.dataclass(frozen=True)
class Participant:
    id: int
    name: str


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name):
    """The name without surrounding spaces; UserError unless it is 1 to 64 printable
    characters."""
    name = (name or "").strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise UserError(f"a participant's name must be 1 to {MAX_NAME} printable characters, "
                        f"got {name!r}")
    return name


def add(db, name, replace=False):
    """Adds the participant `name` (or, with `replace`, gives an existing one a new token, the
    old one no longer valid); returns the token, which is shown only here."""
    name = check_name(name)
    token = secrets.token_urlsafe(32)
    table = db.tables.participants
    with db.write() as connection:
        existing = connection.execute(sa.select(table.c.id).where(table.c.name == name)
                                      .with_for_update()).scalar_one_or_none()
        if replace:
            if existing is None:
                raise UserError(f"there is no participant {name!r}")
            connection.execute(sa.update(table).where(table.c.id == existing)
                               .values(token_hash=token_hash(token)))
        else:
            if existing is not None:
                raise _exists(name)
            try:
                connection.execute(sa.insert(table).values(
                    name=name, token_hash=token_hash(token), created_at=db.now))
            except sa.exc.IntegrityError as error:  # added at the same moment elsewhere
                raise _exists(name) from error
    return token


def _exists(name):
    return UserError(f"participant {name!r} exists already (--reset_token={name} gives it a "
                     "new token)")


def authenticate(db, token):
    """The Participant whose token is `token`, or None."""
    if not token or len(token) > MAX_TOKEN:
        return None
    digest = token_hash(token)
    table = db.tables.participants
    with db.read() as connection:
        row = connection.execute(sa.select(table.c.id, table.c.name, table.c.token_hash)
                                 .where(table.c.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return Participant(row.id, row.name)


def bearer_token(authorization):
    """The token of an `Authorization: Bearer TOKEN` header value, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
