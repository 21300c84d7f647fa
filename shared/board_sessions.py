"""Board sessions signed in with a person's own token (table
``board_sessions``, migration 0022).

Such a session is a row, not a cookie's word: the cookie carries a random
256-bit id and nothing else, and every request looks the row up by the
id's SHA-256. A cookie can be signed by anyone who holds the shared token
(or, without one, by nobody in particular), so a signed cookie that named
a person would let them be anyone; an id that no row holds names nobody.

The row keeps a stamp of the person's token at sign-in: when their token is
changed or they are removed from the list, the stamp no longer matches and
the session ends, on every replica (the row is deleted when it is next
presented, so putting the person back does not bring it back). Sign-out
deletes the row, and so does a new sign-in from the same browser.

A person has at most ``KEEP_PER_USER`` live sessions: a sign-in deletes
their oldest beyond that, in its own transaction, so a token holder signing
in in a loop keeps ten rows, not one per attempt. With an idle timeout
(``BOARD_IDLE_TIMEOUT_MINUTES``) a session not used for that long ends too:
``last_seen`` is written at most every ``SEEN_EVERY_SECONDS``, so the
timeout holds to within that. Expired and idle rows are deleted a bounded
batch at a time at each sign-in and by the retention sweep
(shared/retention.py)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

UTC_NOW = "timezone('utc', now())"
# last_seen is written at most this often per session: a board page is a read.
SEEN_EVERY_SECONDS = 60
# The shortest idle timeout: several times SEEN_EVERY_SECONDS, which it is only as exact as.
IDLE_MINIMUM_MINUTES = 5
KEEP_PER_USER = 10
PURGE_BATCH = 100

_CREATE = sa.text(
    "INSERT INTO board_sessions (id_hash, user_name, token_stamp, created_at, expires_at, last_seen) "
    f"VALUES (:id_hash, :user_name, :token_stamp, {UTC_NOW}, {UTC_NOW} + make_interval(secs => :seconds), {UTC_NOW}) "
    "RETURNING created_at, expires_at"
)
# Live: not expired, and used within the idle timeout when there is one (0: none).
LIVE = (f"expires_at > {UTC_NOW} AND (:idle = 0 OR last_seen > {UTC_NOW} - make_interval(secs => :idle))")
_FIND = sa.text(
    "SELECT user_name, token_stamp, created_at, expires_at, "
    f"last_seen < {UTC_NOW} - make_interval(secs => :seen_every) AS stale FROM board_sessions "
    f"WHERE id_hash = :id_hash AND {LIVE}"
)
_SEEN = sa.text(f"UPDATE board_sessions SET last_seen = {UTC_NOW} WHERE id_hash = :id_hash")
_END = sa.text("DELETE FROM board_sessions WHERE id_hash = :id_hash")
# The person's sessions past the newest KEEP_PER_USER (the one just made is
# the newest); SKIP LOCKED: a concurrent sign-in deleting the same rows is
# not waited for, so a burst may leave a few more until the next sign-in.
_TRIM = sa.text(
    "DELETE FROM board_sessions WHERE id_hash IN (SELECT id_hash FROM board_sessions WHERE user_name = :user_name "
    "AND id_hash <> :mine ORDER BY created_at DESC, id_hash OFFSET :keep FOR UPDATE SKIP LOCKED)"
)
# Oldest first and a batch at most: a sign-in never waits on a large backlog;
# SKIP LOCKED leaves rows another sign-in is deleting to it.
PURGE = (
    "DELETE FROM board_sessions WHERE id_hash IN (SELECT id_hash FROM board_sessions "
    f"WHERE NOT ({LIVE}) ORDER BY expires_at LIMIT :batch FOR UPDATE SKIP LOCKED)"
)


@dataclass(frozen=True)
class PersonalSession:
    user: str
    token_stamp: str
    created_at: datetime
    expires_at: datetime


def id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


def create(conn: Connection, user: str, token_stamp: str, seconds: int, idle_seconds: int = 0,
           replaces: str | None = None) -> tuple[str, PersonalSession]:
    """A new session for ``user``: its id (for the cookie only) and its row.
    ``replaces``: the id of the personal session this browser had, ended."""
    session_id = secrets.token_urlsafe(32)
    if replaces:
        conn.execute(_END, {"id_hash": id_hash(replaces)})
    conn.execute(sa.text(PURGE), {"batch": PURGE_BATCH, "idle": idle_seconds})
    mine = id_hash(session_id)
    row = conn.execute(_CREATE, {"id_hash": mine, "user_name": user, "token_stamp": token_stamp, "seconds": seconds}).one()
    conn.execute(_TRIM, {"user_name": user, "mine": mine, "keep": KEEP_PER_USER - 1})
    return session_id, PersonalSession(user, token_stamp, row.created_at, row.expires_at)


def find(conn: Connection, session_id: str, idle_seconds: int = 0) -> PersonalSession | None:
    """The live session with this id, or None."""
    row = conn.execute(_FIND, {"id_hash": id_hash(session_id), "seen_every": SEEN_EVERY_SECONDS, "idle": idle_seconds}).first()
    if row is None:
        return None
    if row.stale:
        conn.execute(_SEEN, {"id_hash": id_hash(session_id)})
    return PersonalSession(row.user_name, row.token_stamp, row.created_at, row.expires_at)


def end(conn: Connection, session_id: str) -> None:
    conn.execute(_END, {"id_hash": id_hash(session_id)})
