"""Signed-out board sessions (table ``revoked_sessions``, migration 0008).

A board session is a signed cookie, valid on its own until it expires; a
sign-out records its id here until that expiry, and every board request
looks the id up (one primary-key probe)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

UTC_NOW = "timezone('utc', now())"

_REVOKE = sa.text(
    "INSERT INTO revoked_sessions (session_id, expires_at) VALUES (:session_id, :expires_at) "
    "ON CONFLICT (session_id) DO NOTHING"
)
_IS_REVOKED = sa.text("SELECT 1 FROM revoked_sessions WHERE session_id = :session_id")
_PURGE = sa.text(f"DELETE FROM revoked_sessions WHERE expires_at < {UTC_NOW}")


def revoke(conn: Connection, session_id: str, expires_at: datetime) -> None:
    """``expires_at`` is the cookie's own expiry (naive UTC): after it the
    signature check refuses the cookie anyway, so the row can go."""
    conn.execute(_REVOKE, {"session_id": session_id, "expires_at": expires_at})


def is_revoked(conn: Connection, session_id: str) -> bool:
    return conn.execute(_IS_REVOKED, {"session_id": session_id}).first() is not None


def purge_expired(conn: Connection) -> int:
    return conn.execute(_PURGE).rowcount
