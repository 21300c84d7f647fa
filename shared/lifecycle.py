"""The incident lifecycle: status transitions and what the pipeline records
on an incident (diagnostics, remediation actions).

Functions take the caller's ``Connection``; a transition, its timeline entry
and its outbox event commit together.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from shared import events, outbox, proposals
from shared.errors import Conflict, InvalidTransition, NotFound
from shared.incident_queries import INCIDENT_COLUMNS
from shared.models import ACTIVE_STATUSES, incidents_table
from shared.sqltext import UTC_NOW
from shared.timefmt import json_default
from shared.timeline import add_timeline

# The seed's lifecycle: open -> investigating -> resolved -> closed. An alert
# may resolve before anyone investigates; a resolved incident may reopen;
# closed is final.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "open": ("investigating", "resolved"),
    "investigating": ("resolved",),
    "resolved": ("investigating", "closed"),
    "closed": (),
}


def transition(
    conn: Connection,
    incident_id: str,
    to_status: str,
    actor: str,
    event_source: str,
    note: str | None = None,
    resolved_by: str = "api",
) -> tuple[dict, list[str]]:
    """Move an incident along the lifecycle; refuses what the lifecycle forbids.

    Returns the updated incident and the ids of the events to publish.
    """
    row = conn.execute(sa.select(*INCIDENT_COLUMNS).where(incidents_table.c.id == incident_id).with_for_update()).mappings().first()
    if row is None:
        raise NotFound(f"incident {incident_id} not found")
    current = row["status"]
    allowed = list(TRANSITIONS[current])
    if to_status not in allowed:
        raise InvalidTransition(current, to_status, allowed)
    values: dict[str, Any] = {"status": to_status, "updated_at": sa.text(UTC_NOW)}
    if to_status == "resolved":
        values["resolved_at"] = sa.text(UTC_NOW)
        values["resolved_by"] = resolved_by
    reopening = current == "resolved" and to_status == "investigating"
    if reopening and row.get("merged_into"):
        # Its alerts are members of the survivor now; reopening it would put
        # a fingerprint in two active incidents.
        raise Conflict(f"cannot reopen: incident {incident_id} was merged into {row['merged_into']}; reopen that one",
                       merged_into=row["merged_into"])
    if reopening:
        values["resolved_at"] = None
        values["resolved_by"] = None
        values["generation"] = incidents_table.c.generation + 1
        # Root generations count take-overs within a generation: the
        # reopened one starts from its first root's claims and events.
        values["root_generation"] = 0
    try:
        with conn.begin_nested():
            updated = conn.execute(
                incidents_table.update().where(incidents_table.c.id == incident_id).values(**values).returning(*INCIDENT_COLUMNS)
            ).mappings().one()
    except IntegrityError:
        other = conn.execute(
            sa.select(incidents_table.c.id).where(
                incidents_table.c.fingerprint == row["fingerprint"], incidents_table.c.status.in_(ACTIVE_STATUSES)
            )
        ).scalar()
        raise Conflict(
            f"cannot reopen: incident {other} is already active for the same alert fingerprint",
            active_incident_id=other,
        ) from None
    details: dict[str, Any] = {"from": current, "to": to_status}
    if reopening:
        # Only a person reopens through a transition (the API, the board):
        # said here, as escalation must not guess it from the statuses (the
        # flapping re-page writes a reopened entry too).
        details["by_hand"] = True
    # A person taking an open incident is an acknowledgement: the channels
    # tell it (PagerDuty acknowledges its page). Diagnostics moves it with
    # mark_investigating, which is not one: a person taking it after that
    # is acknowledged by shared/acknowledge.py without a status change.
    acknowledged = current == "open" and to_status == "investigating"
    if acknowledged:
        details["acknowledged"] = True
    if note:
        details["note"] = note
    add_timeline(conn, incident_id, "reopened" if reopening else "status_changed", details, actor)
    if reopening:
        # A proposal planned for the generation just left can no longer be approved.
        proposals.supersede_on_reopen(conn, incident_id)
    event_ids: list[str] = []
    announced = {"resolved": events.INCIDENT_RESOLVED}.get(to_status) or (events.INCIDENT_ACKNOWLEDGED if acknowledged else None)
    if announced:
        event = events.incident_event(announced, updated, event_source)
        outbox.enqueue(conn, [event])
        event_ids.append(event["id"])
    return dict(updated), event_ids


def mark_investigating(conn: Connection, incident_id: str, actor: str) -> bool:
    """open -> investigating if still open (a conditional update, safe to repeat)."""
    result = conn.execute(
        sa.text(
            f"UPDATE incidents SET status = 'investigating', updated_at = {UTC_NOW} "
            "WHERE id = :id AND status = 'open' RETURNING id"
        ),
        {"id": incident_id},
    ).first()
    if result is not None:
        add_timeline(conn, incident_id, "status_changed", {"from": "open", "to": "investigating"}, actor)
    return result is not None


def store_diagnostics(conn: Connection, incident_id: str, diagnostics: dict, of: dict | None = None) -> bool:
    """Store ``diagnostics``; with ``of`` (the incident as the diagnosis
    read it) only while the incident is still at that generation and root
    generation. A slow diagnosis of a root another alert has since taken
    over from must not overwrite the new root's. Returns whether it was stored."""
    condition = ""
    params = {"d": json.dumps(diagnostics, default=json_default), "id": incident_id}
    if of is not None:
        condition = " AND generation = :generation AND root_generation = :root_generation"
        params.update(generation=of["generation"], root_generation=of.get("root_generation") or 0)
    return conn.execute(
        sa.text(f"UPDATE incidents SET diagnostics = CAST(:d AS json), updated_at = {UTC_NOW} WHERE id = :id{condition} RETURNING id"),
        params,
    ).first() is not None


def append_remediation_action(conn: Connection, incident_id: str, action: dict) -> None:
    """Append one action record (the seed's shape) to ``remediation_actions``,
    the history of every generation: never cleared, as the board shows it
    all. A record without ``generation`` and ``root_generation`` is stamped
    with the incident's current ones; remediation stamps its own with those
    it read, the ones the action was taken under (messages show only the
    current generation's and root's, :func:`shared.domain.current_actions`)."""
    conn.execute(
        sa.text(
            "UPDATE incidents SET remediation_actions = "
            "CAST(COALESCE(CAST(remediation_actions AS jsonb), '[]'::jsonb) || jsonb_build_array("
            "jsonb_build_object('generation', COALESCE(generation, 0), 'root_generation', COALESCE(root_generation, 0)) "
            "|| CAST(:a AS jsonb)) AS json), "
            f"updated_at = {UTC_NOW} WHERE id = :id"
        ),
        {"a": json.dumps(action, default=json_default), "id": incident_id},
    )
