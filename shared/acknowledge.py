"""Acknowledging an incident: a person takes it.

Acknowledgement is a person's act, not a status: an ``open`` incident moves
to ``investigating`` (the lifecycle's ``open -> investigating``,
shared/lifecycle.py), and an incident diagnostics already moved there
(``mark_investigating``, which is no acknowledgement) stays as it is. The
timeline gets an entry with ``acknowledged: true`` and the actor: the
lifecycle's ``status_changed`` open → investigating, or ``acknowledged``
when the status does not change. The ``incident.acknowledged`` event makes PagerDuty
acknowledge its page (the Events API v2 ``acknowledge`` for the incident's
dedup key) and Slack carry a note naming who. Acknowledging again within the
same generation is harmless: nothing changes and nothing is sent. A reopened
incident (a new generation) is unacknowledged until someone takes it again.

An acknowledgement covers the pages of its generation that it could have
answered: a page whose trigger's sender, with the claim held, saw no
acknowledgement (it preceded or raced it), or tried and refused before it
and sent later, or reported stuck by the reconciliation sweep before it and
delivered later (a re-send, a dead letter redelivered); a trigger still in
flight is waited for. A page
decided after it is new news and is not acknowledged on the person's behalf
(:func:`covered_page_sql`): remediation failed since ("a human must act"),
or a P1 nobody paged was raised to P0 by a new member.

Not acknowledging a page does not make PagerDuty notify anyone for it. The
system keeps one PagerDuty alert per incident (``dedup_key`` = the incident
id), and PagerDuty adds a ``trigger`` for an alert that is already
acknowledged to that alert's log, with no notification (unless the
service's acknowledgement timeout runs out). So a failure page after an
acknowledged P0 opening folds into the acknowledged alert; only the chat
channels and the webhook carry it (docs/noise-control.md, "Acknowledge").
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

def _acknowledgement_sql(incident: str) -> str:
    """The acknowledgement entry of the incident's current generation (the
    entries after its latest reopening), newest first; ``incident`` is a
    SQL expression. One query text for the handler and the sweep (aliases
    of their own: it is nested in the sweep's statement)."""
    return (f"SELECT ack.actor, ack.at FROM incident_timeline ack WHERE ack.incident_id = {incident}"
            f" AND ack.kind IN ('status_changed', 'acknowledged') AND ack.details->>'acknowledged' = 'true'"
            f" AND ack.id > COALESCE((SELECT max(reo.id) FROM incident_timeline reo WHERE reo.incident_id = {incident}"
            f" AND reo.kind = 'reopened'), 0) ORDER BY ack.id DESC LIMIT 1")


def _reopened_after(incident: str, alias: str) -> str:
    """SQL condition: timeline entry ``alias`` is of the current generation
    (after the incident's latest reopening)."""
    return (f"{alias}.id > COALESCE((SELECT max(reo.id) FROM incident_timeline reo WHERE reo.incident_id = {incident}"
            f" AND reo.kind = 'reopened'), 0)")


def _failed_trigger_sql(channel: str, incident: str, transition: str) -> str:
    """SQL: the failed trigger attempts of ``channel`` for ``transition`` in
    the current generation, as ``try`` (a condition on them follows)."""
    return (f"SELECT 1 FROM incident_timeline try WHERE try.incident_id = {incident}"
            f" AND try.kind = 'notification' AND try.details->>'channel' = '{channel}'"
            f" AND try.details->>'action' = 'trigger' AND try.details->>'outcome' = 'failed'"
            f" AND try.details->>'transition' = {transition} AND {_reopened_after(incident, 'try')}")


def covered_page_sql(channel: str, incident: str, generation: str) -> str:
    """SQL condition: the incident's current generation is acknowledged,
    and the acknowledgement covers a page ``channel`` completed in that
    generation: one the person could have answered. Not decided by clocks
    (an acknowledgement's time is its transaction's start, which may have
    waited on the incident's row while the page went out), but by what the
    trigger's sender saw: its re-check, with the claim held, read whether
    the generation was acknowledged, and the trigger's timeline entry says
    ``decided_before_ack`` (:func:`trigger_decision`). True: it saw no
    acknowledgement (it preceded or raced it), or an attempt of it had
    failed before (PagerDuty was down; the Broker's retry got it through).
    False: a page decided after the acknowledgement, e.g. a P1 raised to P0
    by a new member (the opening's ``…:opened`` key) or a failure page; it
    stays a page. A trigger still in flight is not covered yet: the
    acknowledgement waits for it (NotYet, 409).
    A trigger sent before the entry carried the field: the opening's is
    covered, as it was then; another by its claim's time (at or before the
    acknowledgement's, or an attempt failed by then). A claim without a sent
    entry is judged by its time too.
    ``incident`` and ``generation`` are SQL expressions.
    Escalation (whether to send ``acknowledge``) and the reconciliation
    sweep (whether an ``acknowledge`` is missing) both read it, so the sweep
    re-emits only what the handler acts on. Claims are found through their
    incident (index of migration 0025), the key compared as text; the
    trigger's entry through its dedup key (the claim's key)."""
    prefix = f"'notify:{channel}:trigger:' || {incident} || ':' || {generation} || ':'"
    # The transition a claim key is of (``opened`` of ``…:opened.root1``),
    # as a failed attempt's timeline entry names it.
    transition = "split_part(split_part(page.key, ':', 6), '.', 1)"
    by_time = f"(page.claimed_at <= taken.at OR EXISTS ({_failed_trigger_sql(channel, incident, transition)} AND try.at <= taken.at))"
    decided = "sent.details->>'decided_before_ack'"
    return (f"EXISTS (SELECT 1 FROM work_claims page CROSS JOIN LATERAL ({_acknowledgement_sql(incident)}) taken"
            f" LEFT JOIN incident_timeline sent ON sent.dedup_key = page.key"
            f" WHERE page.incident_id = {incident} AND starts_with(page.key, {prefix}) AND page.completed_at IS NOT NULL"
            f" AND CASE WHEN {decided} IS NOT NULL THEN {decided} = 'true'"
            f" WHEN sent.id IS NOT NULL AND page.key = {prefix} || 'opened' THEN true"
            f" ELSE {by_time} END)")


def acknowledged_sql(incident: str) -> str:
    """SQL condition: a person took the incident in its current generation
    (``incident`` a SQL expression; the sweep nests it in its statement)."""
    return f"EXISTS ({_acknowledgement_sql(incident)})"


_ACKNOWLEDGED = sa.text(compact(_acknowledgement_sql(":id")))
_COVERED = sa.text(compact("SELECT " + covered_page_sql("pagerduty", ":id", "CAST(:gen AS text)")))


def acknowledgement(conn: Connection, incident_id: str) -> dict | None:
    """Who took the incident in its current generation, and when (None: nobody yet)."""
    row = conn.execute(_ACKNOWLEDGED, {"id": incident_id}).first()
    return None if row is None else {"actor": str(row.actor), "at": row.at}


def acknowledged_by(conn: Connection, incident_id: str) -> str | None:
    """Who took the incident in its current generation (None: nobody yet)."""
    entry = acknowledgement(conn, incident_id)
    return None if entry is None else entry["actor"]


def covers_page(conn: Connection, incident_id: str, generation: int, channel: str = "pagerduty") -> bool:
    """Does the acknowledgement of this generation cover a page ``channel``
    sent (:func:`covered_page_sql`)?"""
    query = _COVERED if channel == "pagerduty" else sa.text(compact("SELECT " + covered_page_sql(channel, ":id", "CAST(:gen AS text)")))
    return bool(conn.execute(query, {"id": incident_id, "gen": generation}).scalar())


def _failed_before_sql(channel: str) -> str:
    return (f"SELECT EXISTS ({_failed_trigger_sql(channel, ':id', ':transition')}"
            " AND (try.details->>'decided_before_ack' = 'true' OR (try.details->>'decided_before_ack' IS NULL AND try.at <= :at)))"
            # The sweep found this page due and not sent (the escalation step
            # stuck) before the person acknowledged: its re-send or dead
            # letter delivers a page decided before the acknowledgement.
            " OR EXISTS (SELECT 1 FROM incident_timeline stuck WHERE stuck.incident_id = :id AND stuck.kind = 'stuck'"
            " AND :transition IN ('opened', 'root_changed')"
            " AND stuck.details->>'step' = 'escalation:' || :transition AND stuck.at <= :at"
            " AND stuck.details->>'generation' = CAST(:gen AS text)"
            " AND COALESCE(stuck.details->>'root_generation', '0') = CAST(:root AS text)"
            f" AND {_reopened_after(':id', 'stuck')})")


def trigger_decision(conn: Connection, incident_id: str, channel: str, transition: str,
                     generation: int = 0, root_generation: int = 0) -> dict:
    """What a trigger's sender saw, read with its claim held, for its
    timeline entry (:func:`covered_page_sql`): ``acknowledged_seen``, whether
    the current generation was acknowledged, and ``decided_before_ack``: it
    was not, or an attempt of this trigger had failed before (one that says
    so, or an older entry recorded by the acknowledgement's time), or the
    reconciliation sweep had reported its escalation step stuck by then (a
    re-send or the step's dead letter delivers it late: shared/reconcile.py)."""
    taken = acknowledgement(conn, incident_id)
    if taken is None:
        return {"acknowledged_seen": False, "decided_before_ack": True}
    query = sa.text(compact(_failed_before_sql(channel)))
    failed_before = bool(conn.execute(query, {"id": incident_id, "transition": transition, "at": taken["at"],
                                                "gen": generation, "root": root_generation if transition == "root_changed" else 0}).scalar())
    return {"acknowledged_seen": True, "decided_before_ack": failed_before}


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
    # Not a status change: its own kind, so nothing reading status_changed
    # sees an investigating -> investigating that never happened.
    details = {"acknowledged": True, "status": "investigating", **({"note": note} if note else {})}
    add_timeline(conn, incident_id, "acknowledged", details, actor)
    event = events.incident_event(events.INCIDENT_ACKNOWLEDGED, row, event_source)
    outbox.enqueue(conn, [event])
    return dict(row), [event["id"]], True
