"""Pieces of SQL text the data modules share."""

from __future__ import annotations

import re

UTC_NOW = "timezone('utc', now())"
# to_char of a naive UTC timestamp as RFC 3339 (shared.timefmt does the same in Python).
RFC3339_UTC = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


def compact(sql: str) -> str:
    """One line of SQL: pg8000 rewrites the parameter style by scanning the
    whole text on every execute, so long indented statements cost CPU."""
    return re.sub(r"\s+", " ", sql).strip()
