"""Finds incidents stuck between steps and re-emits the event that drives
the missing step.

The Broker retries a delivery for about a minute, then hands it to the
dead-letter sink; when the database is down longer than that, the sink
cannot record it either and the event is gone. Every step records its work
in the database (a completed claim in ``work_claims``), so the database
knows what is missing:

============================  ==========================================  ==================
step                          missing when, after the grace period        re-emitted event
============================  ==========================================  ==================
``diagnostics``               opened (its event published), active,       ``opened``
                              no completed ``diagnostics:`` claim
``remediation``               diagnosed, active, no completed             ``diagnosed``
                              ``remediation:`` claim
``escalation:opened``         P0 opened, active, no completed             ``opened``
                              ``escalated:…:opened`` claim
``escalation:root_changed``   P0, a new root's opening published,         its ``opened``
                              active, no completed                        (``….root<n>``)
                              ``escalated:…:opened.root<n>`` claim
``escalation:remediated``,    remediation finished with that outcome,     that outcome
``escalation:remediation_     no completed ``escalated:…:<outcome>``
failed``                      claim
``escalation:resolved``       resolved (its event published), no         ``resolved``
                              completed ``escalated:…:resolved`` claim
``escalation:page_resolved``  resolved (its event published), PagerDuty   ``resolved``
                              paged it in this generation (a completed    (``….page.r<n>``)
                              ``notify:pagerduty:trigger:…:<gen>:…``
                              claim), no completed
                              ``notify:pagerduty:resolve:…`` claim of
                              this generation
``escalation:page_            acknowledged in this generation (its        ``acknowledged``
acknowledged``                event published), active, PagerDuty sent    (``….page.r<n>``)
                              a page of this generation the
                              acknowledgement covers
                              (shared.acknowledge.covered_page_sql), no
                              completed ``notify:pagerduty:acknowledge:…``
                              claim
============================  ==========================================  ==================

The last two are the follow-ups of a page whose event came before its
trigger was sent (the escalation handler tells them after the trigger,
functions/escalation/handler.py, and this is what catches it when that did
not get through). Their grace runs from the later of the event's
publication and the trigger's completed claim. "Paged" is read where the
handler reads it, from the trigger's claim (not the timeline, which is kept
longer than claims): the sweep re-emits only a follow-up the handler acts
on. The sweep cannot see whether PagerDuty is configured (it runs in the
intake); when it is off the handler completes the follow-up's claim with
nothing sent, which ends the re-emissions. Their re-emissions have ids of
their own (``<id>.<transition>.<gen>.page.r<n>``), counted apart from the
``escalation:resolved`` step's.

After another alert took over as root (migration 0017), the diagnostics,
remediation and outcome steps watched are the new root's (their claim keys
and events end in ``.root<n>``, shared.claims.step_key), and so is the
escalation of its opening (told as ``root_changed``). A step still stuck is
reported once per generation and root.

A re-emission is an outbox row with its own id, ``<event id>.r<n>``, so the
Broker and the consumers see a new delivery; the consumers' claims make a
re-emission that was not needed change nothing. At most
``RECONCILE_MAX_REEMITS`` per event, each waiting twice as long as the one
before; then the step is *stuck*: counted in ``/metrics``, noted once on the
incident's timeline and logged at error level, for a person. It is not
dropped there ("never lose a page"): in the same transaction the event the
sweep would have re-sent next (``….r<K+1>``) becomes a dead letter
(shared/dead_letters.py; destination ``reconcile:<step>``, code ``stuck``),
listed and re-driven like those the sink records, which matters when the
sink was down as the Broker gave up. And a stuck escalation of an incident
still active that no person has acknowledged (the steps of
``RESENT_WHILE_ACTIVE``) keeps being re-sent, at most once per
``RECONCILE_STUCK_RESEND_SECONDS`` (by default the longest backoff), until
it is told or the incident is acknowledged or resolved: the same event as
the re-emissions, so the same claims, and nothing pages twice. The page
follow-ups are not among them: a person resolved or took the incident.
Their ids, ``<event id>.s<n>``, number the window of that many seconds of
the clock they were sent in, so two sweeps at once enqueue one. A batch takes
them last, after the due re-emissions and give-ups. Each one the Broker gives
up on is a dead letter of its own (3 an hour per stuck step by default), and
dead letters are kept: redelivering one of an incident's is enough.

Cheap by construction: active incidents (status index) and incidents
resolved within ``RECONCILE_HORIZON_SECONDS`` (a remediation outcome of an
active incident is watched however long ago remediation finished: the
incident being active bounds it; retention keeps the opening's outbox row
of an active incident, shared/retention.py), joined to claims and outbox
rows by primary key, a page's claims through their incident (the
``work_claims (incident_id)`` index of migration 0025), and at most
``RECONCILE_BATCH`` re-emissions a run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from shared import acknowledge, db, dead_letters, events, incidents, outbox
from shared.config import Settings

log = logging.getLogger("reconcile")

UTC_NOW = "timezone('utc', now())"
EVENT_TYPES = {
    "opened": events.INCIDENT_OPENED,
    "diagnosed": events.INCIDENT_DIAGNOSED,
    "remediated": events.INCIDENT_REMEDIATED,
    "remediation_failed": events.INCIDENT_REMEDIATION_FAILED,
    "resolved": events.INCIDENT_RESOLVED,
    "acknowledged": events.INCIDENT_ACKNOWLEDGED,
}
STEPS = ("diagnostics", "remediation", "escalation:opened", "escalation:root_changed", "escalation:remediated",
         "escalation:remediation_failed", "escalation:resolved", "escalation:page_resolved", "escalation:page_acknowledged")
REASON_MAX = 1000
# Steps done again for a new root (their claims end in ``.root<n>``); the
# new root's opening is told as ``root_changed``.
ROOT_SCOPED_STEPS = ("diagnostics", "remediation", "escalation:root_changed", "escalation:remediated",
                     "escalation:remediation_failed")
# Escalations of an active incident: once stuck, still re-sent while nobody
# has acknowledged it. The others apply to an incident resolved (resolved,
# page_resolved) or acknowledged (page_acknowledged), where the person knows.
RESENT_WHILE_ACTIVE = ("escalation:opened", "escalation:root_changed", "escalation:remediated",
                       "escalation:remediation_failed")
# A stuck step's dead letter: its destination names the step, its code says why.
DESTINATION_PREFIX = "reconcile:"
STUCK_CODE = "stuck"

_ASSESSED = f"""
WITH recent AS (
    SELECT i.id, i.generation AS gen, i.priority, i.status, i.root_generation AS rg,
           CASE WHEN i.root_generation > 0 THEN '.root' || i.root_generation ELSE '' END AS rs
    FROM incidents i
    WHERE i.status IN ('open', 'investigating')
       OR (i.status = 'resolved' AND i.resolved_at > {UTC_NOW} - make_interval(secs => :horizon))
),
missing AS (
    SELECT 'diagnostics' AS step, 'opened' AS transition, r.id, r.gen, r.rs, '' AS tag, o.published_at AS since,
           'diagnostics:' || r.id || ':' || r.gen || r.rs AS claim_key
    FROM recent r JOIN event_outbox o ON o.id = r.id || '.opened.' || r.gen || r.rs
    WHERE r.status IN ('open', 'investigating') AND o.published_at IS NOT NULL
    UNION ALL
    SELECT 'escalation:opened', 'opened', r.id, r.gen, '', '', o.published_at,
           'escalated:' || r.id || ':' || r.gen || ':' || 'opened'
    FROM recent r JOIN event_outbox o ON o.id = r.id || '.opened.' || r.gen
    WHERE r.status IN ('open', 'investigating') AND r.priority::text = ANY(string_to_array(:page_on_open, ','))
      AND o.published_at IS NOT NULL
    UNION ALL
    SELECT 'escalation:root_changed', 'opened', r.id, r.gen, r.rs, '', o.published_at,
           'escalated:' || r.id || ':' || r.gen || ':' || 'opened' || r.rs
    FROM recent r JOIN event_outbox o ON o.id = r.id || '.opened.' || r.gen || r.rs
    WHERE r.rs <> '' AND r.status IN ('open', 'investigating') AND r.priority::text = ANY(string_to_array(:page_on_open, ','))
      AND o.published_at IS NOT NULL
    UNION ALL
    SELECT 'remediation', 'diagnosed', r.id, r.gen, r.rs, '', d.completed_at, 'remediation:' || r.id || ':' || r.gen || r.rs
    FROM recent r JOIN work_claims d ON d.key = 'diagnostics:' || r.id || ':' || r.gen || r.rs
    WHERE r.status IN ('open', 'investigating') AND d.completed_at IS NOT NULL
    UNION ALL
    SELECT 'escalation:' || x.transition, x.transition, r.id, r.gen, r.rs, '', m.completed_at,
           'escalated:' || r.id || ':' || r.gen || ':' || x.transition || r.rs
    FROM recent r JOIN work_claims m ON m.key = 'remediation:' || r.id || ':' || r.gen || r.rs
    CROSS JOIN LATERAL (
        SELECT CASE WHEN t.details->>'outcome' = 'remediated' THEN 'remediated' ELSE 'remediation_failed' END AS transition
        FROM incident_timeline t
        WHERE t.incident_id = r.id AND t.kind = 'remediation_result' AND t.details->>'generation' = CAST(r.gen AS text)
          AND COALESCE(t.details->>'root_generation', '0') = CAST(r.rg AS text)
        ORDER BY t.at DESC, t.id DESC LIMIT 1
    ) x
    WHERE m.completed_at IS NOT NULL
      AND (r.status IN ('open', 'investigating') OR m.completed_at > {UTC_NOW} - make_interval(secs => :horizon))
    UNION ALL
    SELECT 'escalation:resolved', 'resolved', r.id, r.gen, '', '', o.published_at,
           'escalated:' || r.id || ':' || r.gen || ':' || 'resolved'
    FROM recent r JOIN event_outbox o ON o.id = r.id || '.resolved.' || r.gen
    WHERE r.status = 'resolved' AND o.published_at IS NOT NULL
    UNION ALL
    SELECT 'escalation:page_' || f.transition, f.transition, r.id, r.gen, '', '.page', GREATEST(o.published_at, p.at),
           'notify:pagerduty:' || f.action || ':' || r.id || ':' || r.gen || ':' || f.transition
    FROM recent r
    CROSS JOIN LATERAL (
        SELECT CASE WHEN r.status = 'resolved' THEN 'resolved' ELSE 'acknowledged' END AS transition,
               CASE WHEN r.status = 'resolved' THEN 'resolve' ELSE 'acknowledge' END AS action
    ) f
    JOIN event_outbox o ON o.id = r.id || '.' || f.transition || '.' || r.gen
    CROSS JOIN LATERAL (
        SELECT max(c.completed_at) AS at FROM work_claims c
        WHERE c.incident_id = r.id AND starts_with(c.key, 'notify:pagerduty:trigger:' || r.id || ':' || r.gen || ':')
    ) p
    WHERE o.published_at IS NOT NULL AND p.at IS NOT NULL
      AND (f.transition = 'resolved' OR {acknowledge.covered_page_sql("pagerduty", "r.id", "CAST(r.gen AS text)")})
),
assessed AS (
    SELECT m.step, m.transition, m.id, m.gen, m.rs, m.tag, m.since, m.claim_key, re.n, re.last,
           CASE WHEN re.n > 0 AND re.last >= {UTC_NOW} - make_interval(secs => :backoff * power(2, re.n - 1)) THEN 'waiting'
                WHEN re.n >= :k THEN 'stuck'
                ELSE 'due' END AS state
    FROM missing m
    LEFT JOIN work_claims w ON w.key = m.claim_key
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, max(e.created_at) AS last FROM event_outbox e
        WHERE e.id IN (SELECT m.id || '.' || m.transition || '.' || m.gen || m.rs || m.tag || '.r' || g FROM generate_series(1, :k) AS g)
    ) re
    WHERE m.since < {UTC_NOW} - make_interval(secs => :grace)
      AND w.completed_at IS NULL
      AND NOT (w.key IS NOT NULL AND w.claimed_at > {UTC_NOW} - make_interval(secs => :grace))
)
"""

# The last condition of `assessed`: a step running now (a fresh claim) is not missing.
# A stuck step not yet given up on (no stuck entry) is given up on; a stuck
# escalation step of an incident still active and taken by nobody is re-sent
# every :resend seconds, counted from the stuck entry: one re-send per window
# of :resend seconds of the clock (``.s<n>``, the window's number, so two sweeps at once
# enqueue one), none while the previous window's is younger than :resend.
# Re-sends come after the due re-emissions and the give-ups: however many
# incidents stay stuck, they never hold up newer work in a batch.
_WORK = sa.text(" ".join((_ASSESSED + f"""
SELECT a.step, a.transition, a.id, a.gen, a.rs, a.tag, a.n, a.state, a.since, a.claim_key,
       s.id IS NOT NULL AS marked, x.slot
FROM assessed a
CROSS JOIN LATERAL (SELECT CAST(floor(extract(epoch FROM {UTC_NOW}) / :resend) AS bigint) AS slot,
                           a.id || '.' || a.transition || '.' || a.gen || a.rs || a.tag || '.s' AS prefix) x
LEFT JOIN incident_timeline s ON s.dedup_key = 'reconcile-stuck:' || a.step || ':' || a.id || ':' || a.gen || a.rs
WHERE a.state = 'due'
   OR (a.state = 'stuck' AND s.id IS NULL)
   OR (a.state = 'stuck' AND a.step = ANY(CAST(:resent AS text[])) AND s.at < {UTC_NOW} - make_interval(secs => :resend)
       AND EXISTS (SELECT 1 FROM incidents i WHERE i.id = a.id AND i.status IN ('open', 'investigating'))
       AND NOT {acknowledge.acknowledged_sql("a.id")}
       AND NOT EXISTS (SELECT 1 FROM event_outbox e WHERE e.id = x.prefix || x.slot)
       AND NOT EXISTS (SELECT 1 FROM event_outbox e WHERE e.id = x.prefix || (x.slot - 1)
                       AND e.created_at > {UTC_NOW} - make_interval(secs => :resend)))
ORDER BY a.state = 'stuck' AND s.id IS NOT NULL, a.since, a.id LIMIT :batch
""").split()))

_COUNTS = sa.text(" ".join((_ASSESSED + "SELECT step, state, count(*) AS n FROM assessed GROUP BY 1, 2").split()))

_REMEDIATION_RESULT = sa.text(
    "SELECT details FROM incident_timeline WHERE incident_id = :id AND kind = 'remediation_result' "
    "AND details->>'generation' = :gen AND COALESCE(details->>'root_generation', '0') = :root ORDER BY at DESC, id DESC LIMIT 1"
)


def _params(config: Settings) -> dict:
    return {"grace": config.reconcile_grace_seconds, "backoff": config.reconcile_backoff_seconds,
            "k": config.reconcile_max_reemits, "horizon": config.reconcile_horizon_seconds,
            # The opening of an incident that pages must reach escalation: the
            # same setting that decides the page decides what is watched.
            "page_on_open": ",".join(config.page_on_open_priorities)}


@dataclass
class Report:
    reemitted: list[str] = field(default_factory=list)  # re-emissions and re-sends of stuck escalations alike
    stuck: list[tuple[str, str, int]] = field(default_factory=list)  # (step, incident id, generation)
    dead_letters: list[int] = field(default_factory=list)  # the rows written for the steps given up on

    def as_dict(self) -> dict:
        return {"reemitted": len(self.reemitted), "stuck": len(self.stuck), "dead_lettered": len(self.dead_letters)}


def assess(conn: Connection, config: Settings) -> dict[tuple[str, str], int]:
    """(step, state) -> incidents; state is ``due`` or ``waiting`` (being
    re-driven) or ``stuck`` (re-emissions exhausted)."""
    return {(r.step, r.state): r.n for r in conn.execute(_COUNTS, _params(config))}


def run(bind: Engine, config: Settings) -> Report:
    """One reconciliation pass; returns what it re-emitted and what it gave up on."""
    report = Report()
    with bind.begin() as conn:
        rows = conn.execute(_WORK, {**_params(config), "batch": config.reconcile_batch,
                                    "resend": config.stuck_resend_seconds(), "resent": list(RESENT_WHILE_ACTIVE)}
                            ).mappings().all()
        due: dict[tuple, list[dict]] = {}
        for row in rows:
            if row["state"] == "stuck" and not row["marked"]:
                _give_up(conn, config, row, report)
                continue
            # A page's follow-up (tag ``.page``) is re-emitted and counted
            # apart; a stuck escalation is re-sent under its window's number.
            suffix = f".s{row['slot']}" if row["state"] == "stuck" else f".r{row['n'] + 1}"
            due.setdefault((row["id"], row["transition"], row["gen"], row["rs"], row["tag"], suffix), []).append(dict(row))
        new_events = []
        for key, steps in due.items():
            event = _event(conn, config, key[:5], steps, key[5])
            if event is not None:
                new_events.append(event)
                _log_reemission(config, event, key, steps)
        outbox.enqueue(conn, new_events)
    report.reemitted = [e["id"] for e in new_events]
    if report.reemitted:
        log.warning("Re-emitted the events of incidents stuck between steps",
                    extra={"events": len(report.reemitted), "first": report.reemitted[0]})
    return report


def run_safely(bind: Engine, config: Settings) -> Report | None:
    """For the sweep: a failed reconciliation must not stop the outbox from draining."""
    return db.for_the_sweep("Reconciliation", lambda: run(bind, config), log)


def _event(conn: Connection, config: Settings, key: tuple[str, str, int, str, str], steps: list[dict],
           suffix: str) -> dict | None:
    """The event that drives ``steps`` again, its id ending in ``suffix``;
    None when the incident moved on meanwhile (the next pass sees it as it is now)."""
    incident_id, transition, generation, root, tag = key
    incident = incidents.get_incident(conn, incident_id)
    if incident is None or incident["generation"] != generation:
        return None  # reopened or gone meanwhile: the next pass sees the new generation
    current = f".root{incident['root_generation']}" if incident.get("root_generation") else ""
    if root != current and any(s["step"] in ROOT_SCOPED_STEPS for s in steps):
        return None  # another alert took over as root meanwhile: the next pass sees the new root's steps
    # The event names the root its step is of (the plain opening still
    # untold is the first root's), as the consumers scope their claims by it.
    incident["root_generation"] = int(root.removeprefix(".root")) if root else 0
    extra = (_remediation_extra(conn, incident_id, generation, incident["root_generation"])
             if transition in ("remediated", "remediation_failed") else None)
    event = events.incident_event(EVENT_TYPES[transition], incident, config.event_source, extra)
    event["id"] = f"{event['id']}{root}{tag}{suffix}"
    return event


def _log_reemission(config: Settings, event: dict, key: tuple, steps: list[dict]) -> None:
    facts = {"incident_id": key[0], "steps": [s["step"] for s in steps], "generation": key[2], "event_id": event["id"]}
    if steps[0]["state"] == "stuck":
        log.error("Escalation still stuck and nobody has taken the incident; re-sending its event",
                  extra={**facts, "every_seconds": config.stuck_resend_seconds()})
    else:
        log.warning("Incident stuck between steps; re-emitting its event",
                    extra={**facts, "reemission": steps[0]["n"] + 1, "max_reemits": config.reconcile_max_reemits})


def _remediation_extra(conn: Connection, incident_id: str, generation: int, root_generation: int) -> dict:
    details = conn.execute(_REMEDIATION_RESULT, {"id": incident_id, "gen": str(generation),
                                                 "root": str(root_generation)}).scalar() or {}
    return {"remediation": {"outcome": details.get("outcome"), "reason": str(details.get("reason") or "")[:REASON_MAX],
                            "playbook": details.get("playbook")}}


def _give_up(conn: Connection, config: Settings, row, report: Report) -> None:
    """Noted once on the timeline (the dedup key), logged once at error
    level, and the event the sweep would have re-sent kept as a dead letter
    (shared/dead_letters.py), in the same transaction: re-drivable from
    ``/dead-letters`` like any the Broker gave up on, and counted in
    ``dead_letters_not_redriven``."""
    key = (row["id"], row["transition"], row["gen"], row["rs"], row["tag"])
    event = _event(conn, config, key, [row], f".r{row['n'] + 1}")
    if event is None:
        return  # the incident moved on meanwhile: the next pass sees it as it is now
    # One report per step, generation and root (a new root's step can be stuck too).
    dedup = f"reconcile-stuck:{row['step']}:{row['id']}:{row['gen']}{row['rs']}"
    resent = row["step"] in RESENT_WHILE_ACTIVE
    details = {"step": row["step"], "generation": row["gen"], "root_generation": int(row["rs"].removeprefix(".root") or 0),
               "reemissions": row["n"], "dead_letter_event_id": event["id"],
               "note": ("re-emitting its event did not complete this step; it is kept as a dead letter to redeliver"
                        + (", and re-sent while the incident is active and nobody has acknowledged it" if resent else "")
                        + "; a person must look")}
    if not incidents.add_timeline(conn, row["id"], "stuck", details, "reconcile", dedup_key=dedup):
        return  # another sweep gave up on it first
    letter_id, _, _ = dead_letters.record(conn, _letter(row, event))
    report.stuck.append((row["step"], row["id"], row["gen"]))
    report.dead_letters.append(letter_id)
    log.error("Incident stuck between steps: re-emissions exhausted; its event kept as a dead letter", extra={
        "incident_id": row["id"], "step": row["step"], "generation": row["gen"], "reemissions": row["n"],
        "dead_letter_id": letter_id, "event_id": event["id"]})


def _letter(row, event: dict) -> dead_letters.Letter:
    """The event as the Broker would have handed it to the dead-letter sink
    (binary-mode attributes, JSON data), the error saying why the sweep gave up."""
    attributes = {"specversion": "1.0", "id": event["id"], "type": event["type"], "source": event["source"],
                  "subject": event["subject"], "time": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                  "datacontenttype": "application/json", **event["extensions"]}
    error = (f"the sweep gave up after {row['n']} re-sends of this event: the {row['step']} step of incident {row['id']} "
             f"(generation {row['gen']}{', root ' + row['rs'].removeprefix('.root') if row['rs'] else ''}) is judged stuck, "
             f"as no re-send completed it: still no completed claim {row['claim_key']} since "
             f"{row['since'].isoformat()}Z (the event's publication), past RECONCILE_GRACE_SECONDS and the last "
             "re-send's backoff. Redeliver once what it reaches works again: the consumers' claims make a "
             "redelivery that is not needed change nothing.")
    return dead_letters.Letter(event_id=event["id"], source=event["source"], event_type=event["type"],
                               destination=f"{DESTINATION_PREFIX}{row['step']}", code=STUCK_CODE, error=error,
                               attributes=attributes, body=json.dumps(event["data"], default=str).encode(),
                               incident_id=row["id"])
