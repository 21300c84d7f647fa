"""Acknowledging an incident: a person takes it.

Acknowledgement is a person's act, not a status: an ``open`` incident moves
to ``investigating`` (the lifecycle's ``open -> investigating``,
shared/lifecycle.py), and an incident diagnostics already moved there
(``mark_investigating``, which is no acknowledgement) stays as it is. Either
way the timeline gets a ``status_changed`` entry with ``acknowledged: true``
and the actor, and the ``incident.acknowledged`` event makes PagerDuty
acknowledge its page (the Events API v2 ``acknowledge`` for the incident's
dedup key) and Slack carry a note naming who. Acknowledging again within the
same generation is harmless: nothing changes and nothing is sent. A reopened
incident (a new generation) is unacknowledged until someone takes it again.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import events, lifecycle, outbox
from shared.errors import Conflict, NotFound
from shared.incident_queries import INCIDENT_COLUMNS
from shared.models import incidents_table
from shared.sqltext import compact
from shared.timeline import add_timeline

# The entries of the current generation are the ones after the latest reopening.
_ACKNOWLEDGED = sa.text(compact(
    """
    SELECT actor, at FROM incident_timeline
    WHERE incident_id = :id AND kind = 'status_changed' AND details->>'acknowledged' = 'true'
      AND id > COALESCE((SELECT max(id) FROM incident_timeline WHERE incident_id = :id AND kind = 'reopened'), 0)
    ORDER BY id DESC LIMIT 1
    """
))


def acknowledged_by(conn: Connection, incident_id: str) -> str | None:
    """Who took the incident in its current generation (None: nobody yet)."""
    row = conn.execute(_ACKNOWLEDGED, {"id": incident_id}).first()
    return None if row is None else str(row.actor)


def acknowledge(conn: Connection, incident_id: str, actor: str, event_source: str, note: str | None = None) -> tuple[dict, list[str], bool]:
    """(incident, events to publish, whether this call acknowledged it)."""
    # The row lock orders concurrent acknowledgements: one of them is the first.
    row = conn.execute(sa.select(*INCIDENT_COLUMNS).where(incidents_table.c.id == incident_id).with_for_update()).mappings().first()
    if row is None:
        raise NotFound(f"incident {incident_id} not found")
    if row["status"] == "open":
        updated, event_ids = lifecycle.transition(conn, incident_id, "investigating", actor, event_source, note=note)
        return updated, event_ids, True
    if row["status"] != "investigating":
        raise Conflict(f"the incident is {row['status']}: there is nothing to acknowledge "
                       "(to reopen it, PATCH its status to investigating)", current_status=row["status"])
    if acknowledged_by(conn, incident_id) is not None:
        return dict(row), [], False
    # Investigating, but nobody took it: diagnostics moved it. This is the
    # first acknowledgement, told as one.
    details = {"from": "investigating", "to": "investigating", "acknowledged": True, **({"note": note} if note else {})}
    add_timeline(conn, incident_id, "status_changed", details, actor)
    event = events.incident_event(events.INCIDENT_ACKNOWLEDGED, row, event_source)
    outbox.enqueue(conn, [event])
    return dict(row), [event["id"]], True
