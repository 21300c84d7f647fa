"""Times leave the system as RFC 3339 in UTC. The database keeps naive UTC
(the seed's ``sa.DateTime``), so a naive value gets its ``Z`` here."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def rfc3339(value: Any) -> Any:
    """A datetime as RFC 3339 UTC; anything else unchanged (None stays None)."""
    if isinstance(value, datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    return value


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for rows that hold datetimes."""
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
