"""Board sessions signed in with a person's own token (table
``board_sessions``, migration 0022).

Such a session is a row, not a cookie's word: the cookie carries a random
256-bit id and nothing else, and every request looks the row up by the
id's SHA-256. A cookie can be signed by anyone who holds the shared token
(or, without one, by nobody in particular), so a signed cookie that named
a person would let them be anyone; an id that no row holds names nobody.

The row keeps a stamp of the person's token at sign-in: when their token is
changed or they are removed from the list, the stamp no longer matches and
the session ends, on every replica. Sign-out deletes the row. Expired rows
are deleted a bounded batch at a time, at each sign-in."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

UTC_NOW = "timezone('utc', now())"
# last_seen is written at most this often per session: a board page is a read.
SEEN_EVERY_SECONDS = 300
PURGE_BATCH = 100

_CREATE = sa.text(
    "INSERT INTO board_sessions (id_hash, user_name, token_stamp, created_at, expires_at, last_seen) "
    f"VALUES (:id_hash, :user_name, :token_stamp, {UTC_NOW}, {UTC_NOW} + make_interval(secs => :seconds), {UTC_NOW}) "
    "RETURNING created_at, expires_at"
)
_FIND = sa.text(
    "SELECT user_name, token_stamp, created_at, expires_at, "
    f"last_seen < {UTC_NOW} - make_interval(secs => :seen_every) AS stale FROM board_sessions "
    f"WHERE id_hash = :id_hash AND expires_at > {UTC_NOW}"
)
_SEEN = sa.text(f"UPDATE board_sessions SET last_seen = {UTC_NOW} WHERE id_hash = :id_hash")
_END = sa.text("DELETE FROM board_sessions WHERE id_hash = :id_hash")
# Oldest first and a batch at most: a sign-in never waits on a large backlog;
# SKIP LOCKED leaves rows another sign-in is deleting to it.
_PURGE = sa.text(
    "DELETE FROM board_sessions WHERE id_hash IN (SELECT id_hash FROM board_sessions "
    f"WHERE expires_at <= {UTC_NOW} ORDER BY expires_at LIMIT :batch FOR UPDATE SKIP LOCKED)"
)


@dataclass(frozen=True)
class PersonalSession:
    user: str
    token_stamp: str
    created_at: datetime
    expires_at: datetime


def id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def create(conn: Connection, user: str, token_stamp: str, seconds: int) -> tuple[str, PersonalSession]:
    """A new session for ``user``: its id (for the cookie only) and its row."""
    session_id = secrets.token_urlsafe(32)
    conn.execute(_PURGE, {"batch": PURGE_BATCH})
    row = conn.execute(_CREATE, {"id_hash": id_hash(session_id), "user_name": user, "token_stamp": token_stamp,
                                 "seconds": seconds}).one()
    return session_id, PersonalSession(user, token_stamp, row.created_at, row.expires_at)


def find(conn: Connection, session_id: str) -> PersonalSession | None:
    """The unexpired session with this id, or None."""
    row = conn.execute(_FIND, {"id_hash": id_hash(session_id), "seen_every": SEEN_EVERY_SECONDS}).first()
    if row is None:
        return None
    if row.stale:
        conn.execute(_SEEN, {"id_hash": id_hash(session_id)})
    return PersonalSession(row.user_name, row.token_stamp, row.created_at, row.expires_at)


def end(conn: Connection, session_id: str) -> None:
    conn.execute(_END, {"id_hash": id_hash(session_id)})
