"""Reading incidents: one by id, pages of a filtered list, counts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import filters
from shared.errors import NotFound
from shared.filters import IncidentFilter
from shared.models import incidents_table

INCIDENT_COLUMNS = [c for c in incidents_table.c]


def get_incident(conn: Connection, incident_id: str) -> dict | None:
    row = conn.execute(sa.select(*INCIDENT_COLUMNS).where(incidents_table.c.id == incident_id)).mappings().first()
    return dict(row) if row else None


def require_incident(conn: Connection, incident_id: str) -> dict:
    row = get_incident(conn, incident_id)
    if row is None:
        raise NotFound(f"incident {incident_id} not found")
    return row


@dataclass(frozen=True)
class Cursor:
    """Keyset position: the last (created_at, id) of the previous page."""

    created_at: datetime
    id: str


def _conditions(flt: IncidentFilter) -> list:
    return filters.conditions(incidents_table, flt)


def list_incidents(
    conn: Connection, flt: IncidentFilter, limit: int = 50, after: Cursor | None = None
) -> tuple[list[dict], Cursor | None]:
    """Newest first; returns the page and the cursor of the next one (or None)."""
    query = sa.select(*INCIDENT_COLUMNS).where(*_conditions(flt))
    if after is not None:
        query = query.where(sa.tuple_(incidents_table.c.created_at, incidents_table.c.id) < sa.tuple_(sa.literal(after.created_at), sa.literal(after.id)))
    query = query.order_by(incidents_table.c.created_at.desc(), incidents_table.c.id.desc()).limit(limit + 1)
    rows = [dict(r) for r in conn.execute(query).mappings()]
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        return rows, Cursor(last["created_at"], last["id"])
    return rows, None


def count_by(conn: Connection, *columns: str) -> list[dict]:
    cols = [incidents_table.c[name] for name in columns]
    rows = conn.execute(sa.select(*cols, sa.func.count().label("count")).group_by(*cols)).mappings()
    return [dict(r) for r in rows]

