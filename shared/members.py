"""Reading an incident's member alerts (migration 0010): the alerts it
groups, each with its own status and why it joined, and the counts the lists
show. Writing them is shared.ingest's and shared.correlation.store's job."""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.models import incident_members as m

MEMBER_FIELDS = ("fingerprint", "alert_name", "labels", "status", "starts_at", "ends_at", "last_seen_at", "joined_at",
                 "correlation_reason", "is_root", "priority")


def members_of(conn: Connection, incident_id: str) -> list[dict]:
    """The root first, then in the order they joined."""
    rows = conn.execute(
        sa.select(*(m.c[name] for name in MEMBER_FIELDS)).where(m.c.incident_id == incident_id)
        .order_by(m.c.is_root.desc(), m.c.joined_at, m.c.fingerprint)
    ).mappings()
    return [dict(r) for r in rows]


def alert_counts(conn: Connection, incident_ids: Sequence[str]) -> dict[str, int]:
    """Members per incident, in one query for a page of incidents."""
    if not incident_ids:
        return {}
    rows = conn.execute(
        sa.select(m.c.incident_id, sa.func.count()).where(m.c.incident_id.in_(list(incident_ids))).group_by(m.c.incident_id)
    )
    return {incident_id: count for incident_id, count in rows}


def firing_count(conn: Connection, incident_id: str) -> int:
    return conn.execute(
        sa.select(sa.func.count()).where(m.c.incident_id == incident_id, m.c.status == "firing")
    ).scalar_one()


CORRELATION_COUNTS = sa.text(
    "SELECT (SELECT count(*) FROM incident_members) AS alerts, "
    "(SELECT count(*) FROM incidents) AS incidents, "
    "(SELECT count(*) FROM incidents WHERE merged_into IS NOT NULL) AS merged"
)


def correlation_counts(conn: Connection) -> tuple[int, int, int]:
    """Alerts received (distinct alerts stored as members), incidents opened
    (merged ones included: they were opened, and paged, before their root
    came) and incidents merged."""
    row = conn.execute(CORRELATION_COUNTS).one()
    return row.alerts, row.incidents, row.merged


PAGE_SUMMARY = sa.text(
    "SELECT count(*) AS alerts, count(*) FILTER (WHERE status = 'firing') AS firing, "
    "(SELECT correlation_reason FROM incident_members r WHERE r.incident_id = :id AND NOT r.is_root "
    " ORDER BY r.joined_at DESC, r.fingerprint LIMIT 1) AS latest_reason "
    "FROM incident_members WHERE incident_id = :id"
)


def page_summary(conn: Connection, incident_id: str) -> dict:
    """What a page says of the incident's members: how many alerts it groups
    (how many still fire) and why the latest one joined."""
    row = conn.execute(PAGE_SUMMARY, {"id": incident_id}).one()
    return {"alert_count": row.alerts, "firing": row.firing, "latest_reason": row.latest_reason}
