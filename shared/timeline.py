"""The incident timeline: what happened to an incident, in order.

Functions take the caller's ``Connection``, so an entry commits with the
change it records.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import outbox
from shared.models import incident_timeline
from shared.sqltext import compact
from shared.timefmt import json_default

INSERT_TIMELINE = sa.text(compact(
    """
    INSERT INTO incident_timeline (incident_id, kind, actor, details, dedup_key)
    SELECT x.incident_id, x.kind, x.actor, x.details, x.dedup_key
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
         AS x(incident_id text, kind text, actor text, details jsonb, dedup_key text)
    ON CONFLICT (dedup_key) DO NOTHING
    """
))

# The timeline entries and the outbox events of a batch in one round trip
# (the same two inserts as INSERT_TIMELINE and outbox.enqueue).
INSERT_TIMELINE_AND_EVENTS = sa.text(compact(
    """
    WITH timeline AS (
        INSERT INTO incident_timeline (incident_id, kind, actor, details, dedup_key)
        SELECT x.incident_id, x.kind, x.actor, x.details, x.dedup_key
        FROM jsonb_to_recordset(CAST(:timeline AS jsonb))
             AS x(incident_id text, kind text, actor text, details jsonb, dedup_key text)
        ON CONFLICT (dedup_key) DO NOTHING
    )
    INSERT INTO event_outbox (id, type, source, subject, extensions, data)
    SELECT x.id, x.type, x.source, x.subject, x.extensions, x.data
    FROM jsonb_to_recordset(CAST(:events AS jsonb))
         AS x(id text, type text, source text, subject text, extensions jsonb, data jsonb)
    ON CONFLICT (id) DO NOTHING
    """
))

ADD_ENTRY = sa.text(compact(
    """
    INSERT INTO incident_timeline (incident_id, kind, actor, details, dedup_key)
    VALUES (:incident_id, :kind, :actor, CAST(:details AS jsonb), :dedup_key)
    ON CONFLICT (dedup_key) DO NOTHING RETURNING id
    """
))


def timeline_row(incident_id: str, kind: str, actor: str, details: dict, dedup_key: str | None = None) -> dict:
    return {"incident_id": incident_id, "kind": kind, "actor": actor, "details": details, "dedup_key": dedup_key}


def insert_timeline_and_events(conn: Connection, rows: list[dict], new_events: list[dict]) -> None:
    """The timeline entries and the outbox events of a batch, in one round trip."""
    if rows and new_events:
        conn.execute(INSERT_TIMELINE_AND_EVENTS, {"timeline": json.dumps(rows, default=json_default), "events": outbox.serialise(new_events)})
    elif rows:
        conn.execute(INSERT_TIMELINE, {"rows": json.dumps(rows, default=json_default)})
    elif new_events:
        outbox.enqueue(conn, new_events)


def add_timeline(
    conn: Connection,
    incident_id: str,
    kind: str,
    details: dict | None = None,
    actor: str = "system",
    dedup_key: str | None = None,
) -> bool:
    """Append one entry; with a ``dedup_key``, only the first call inserts
    (returns False for a repeat), which makes it a once-only claim."""
    result = conn.execute(
        ADD_ENTRY,
        {
            "incident_id": incident_id,
            "kind": kind,
            "actor": actor,
            "details": json.dumps(details or {}, default=json_default),
            "dedup_key": dedup_key,
        },
    )
    return result.first() is not None


def get_timeline(conn: Connection, incident_id: str) -> list[dict]:
    rows = conn.execute(
        sa.select(incident_timeline.c.at, incident_timeline.c.kind, incident_timeline.c.actor, incident_timeline.c.details)
        .where(incident_timeline.c.incident_id == incident_id)
        .order_by(incident_timeline.c.at, incident_timeline.c.id)
    ).mappings()
    return [dict(r) for r in rows]
