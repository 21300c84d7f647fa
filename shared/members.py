"""Reading an incident's member alerts (migration 0010): the alerts it
groups, each with its own status and why it joined, and the counts the lists
show. Writing them is shared.ingest's and shared.correlation.store's job.

An incident whose alert no correlation rule concerns has no member row (the
common intake path writes nothing more than before): it is its own single
member, shown from the incident row. A merged incident has none left.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.models import ACTIVE_STATUSES, incident_members as m, incidents_table as i

MEMBER_FIELDS = ("fingerprint", "alert_name", "labels", "status", "starts_at", "ends_at", "last_seen_at", "joined_at",
                 "correlation_reason", "is_root", "priority")

# The incident is its own member: no row holds its fingerprint, and it was
# not merged away.
_ROWLESS_ROOT = sa.and_(
    i.c.merged_into.is_(None), i.c.fingerprint.is_not(None),
    ~sa.exists().where(m.c.incident_id == i.c.id, m.c.fingerprint == i.c.fingerprint),
)


def _own_member(incident: dict) -> dict:
    active = incident["status"] in ACTIVE_STATUSES
    return {"fingerprint": incident["fingerprint"], "alert_name": incident["alert_name"], "labels": incident["labels"] or {},
            "status": "firing" if active else "resolved", "starts_at": incident["starts_at"],
            "ends_at": None if active else incident["resolved_at"], "last_seen_at": incident["last_seen_at"],
            "joined_at": incident["created_at"], "correlation_reason": "root", "is_root": True,
            "priority": incident["priority"]}


def members_of(conn: Connection, incident_id: str) -> list[dict]:
    """The root first, then in the order they joined."""
    rows = [dict(r) for r in conn.execute(
        sa.select(*(m.c[name] for name in MEMBER_FIELDS)).where(m.c.incident_id == incident_id)
        .order_by(m.c.is_root.desc(), m.c.joined_at, m.c.fingerprint)
    ).mappings()]
    own = conn.execute(sa.select(i).where(i.c.id == incident_id, _ROWLESS_ROOT)).mappings().first()
    return ([_own_member(dict(own))] if own is not None else []) + rows


def alert_counts(conn: Connection, incident_ids: Sequence[str]) -> dict[str, int]:
    """Members per incident, in one query for a page of incidents."""
    if not incident_ids:
        return {}
    members = sa.select(sa.func.count()).where(m.c.incident_id == i.c.id).scalar_subquery()
    own = sa.case((_ROWLESS_ROOT, 1), else_=0)
    rows = conn.execute(sa.select(i.c.id, members + own).where(i.c.id.in_(list(incident_ids))))
    return {incident_id: count for incident_id, count in rows}


CORRELATION_COUNTS = sa.text(
    "SELECT (SELECT count(*) FROM incident_members) + "
    "       (SELECT count(*) FROM incidents i WHERE i.merged_into IS NULL AND i.fingerprint IS NOT NULL AND NOT EXISTS "
    "          (SELECT 1 FROM incident_members r WHERE r.incident_id = i.id AND r.fingerprint = i.fingerprint)) AS alerts, "
    "(SELECT count(*) FROM incidents) AS incidents, "
    "(SELECT count(*) FROM incidents WHERE merged_into IS NOT NULL) AS merged"
)


def correlation_counts(conn: Connection) -> tuple[int, int, int]:
    """Alerts received (distinct alerts stored as members, a lone incident's
    own alert included), incidents opened (merged ones included: they were
    opened, and paged, before their root came) and incidents merged."""
    row = conn.execute(CORRELATION_COUNTS).one()
    return row.alerts, row.incidents, row.merged


LATEST_REASON = sa.text(
    "SELECT correlation_reason FROM incident_members WHERE incident_id = :id AND NOT is_root "
    "ORDER BY joined_at DESC, fingerprint LIMIT 1"
)


def page_summary(conn: Connection, incident_id: str) -> dict:
    """What a page says of the incident's members: how many alerts it groups
    (how many still fire) and why the latest one joined."""
    members = members_of(conn, incident_id)
    return {"alert_count": len(members), "firing": sum(x["status"] == "firing" for x in members),
            "latest_reason": conn.execute(LATEST_REASON, {"id": incident_id}).scalar()}
