"""Acknowledging an incident: a person takes it.

It is the lifecycle's ``open -> investigating`` (shared/lifecycle.py), whose
``incident.acknowledged`` event makes PagerDuty acknowledge its page (the
Events API v2 ``acknowledge`` for the incident's dedup key) and Slack carry
a note; the timeline names the actor. Acknowledging again is harmless: an
incident already being investigated is left as it is and nothing is sent.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import lifecycle
from shared.errors import Conflict, NotFound
from shared.incident_queries import INCIDENT_COLUMNS
from shared.models import incidents_table


def acknowledge(conn: Connection, incident_id: str, actor: str, event_source: str, note: str | None = None) -> tuple[dict, list[str], bool]:
    """(incident, events to publish, whether this call acknowledged it)."""
    row = conn.execute(sa.select(*INCIDENT_COLUMNS).where(incidents_table.c.id == incident_id).with_for_update()).mappings().first()
    if row is None:
        raise NotFound(f"incident {incident_id} not found")
    if row["status"] == "investigating":
        return dict(row), [], False
    if row["status"] != "open":
        raise Conflict(f"the incident is {row['status']}: there is nothing to acknowledge "
                       "(to reopen it, PATCH its status to investigating)", current_status=row["status"])
    updated, event_ids = lifecycle.transition(conn, incident_id, "investigating", actor, event_source, note=note)
    return updated, event_ids, True
