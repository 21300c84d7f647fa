"""Recording alerts: open, refresh, resolve and reopen incidents by fingerprint.

Every source's alerts arrive here (shared.alerts.Alert) through
:func:`record_alerts`, inside the caller's transaction. One statement per
kind of change whatever the batch size; each statement below reads on its own.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import events, ignored_alerts, noise, outbox, proposals
from shared.alerts import Alert
from shared.config import Settings, settings
from shared.correlation import store as correlation_store
from shared.correlation.plan import Links
from shared.sqltext import UTC_NOW, compact
from shared.timeline import insert_timeline_and_events, timeline_row


@dataclass(frozen=True)
class Outcome:
    """What one alert did: created, refreshed, resolved or ignored."""

    fingerprint: str
    action: str
    incident_id: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict:
        result = {"fingerprint": self.fingerprint, "incident_id": self.incident_id, "action": self.action}
        if self.reason:
            result["reason"] = self.reason
        return result


@dataclass
class RecordResult:
    outcomes: list[Outcome]
    event_ids: list[str]


# Opens or refreshes the batch's incidents, records them on the timeline and
# queues the events of the new ones, in one statement (one round trip, atomic
# on its own). Fingerprints whose last incident remediation resolved a moment
# ago are left out and named (`after_fix`): record_alerts decides about those
# separately (rare). The root's member row is written only for an alert some
# correlation rule concerns: a lone alert's incident is its own single member
# (shared.members shows it so), and the common path writes nothing more than
# before. Memberships are looked up with = ANY(ARRAY(...)): an
# index lookup per fingerprint, whatever the planner guesses of the batch's
# size (a join would scan every member). With ``defer_joins`` (a batch whose
# alerts only look for a root: shared.correlation.store.seekers_only), an
# alert some active incident offers a key it seeks is left out and named
# (`joinable`): only those need the correlation decision, so the common
# case (no root fires) costs no candidate statement. The offers are found
# as the candidate statement finds them: the members first (one scan of the
# provides index for all the batch's keys), then each one's incident by
# primary key, never a pass over the active incidents. (The status is
# compared as text so that the planner cannot take the partial index of
# active fingerprints, filtered on the id, for that lookup: after a storm
# its statistics say few incidents are active, and that index then visits
# every one of them for each member.) Those incidents and the batch's own
# active ones are locked together in id order (`held`) before anything is
# written, as the resolve statement and the candidate statement lock
# theirs: the upsert refreshing a batch's incident before the candidate
# statement locks a node incident of a lower id deadlocked against a
# resolve. Every batch takes them, not only one that seeks a root: a plain
# refresh of two incidents locked them in fingerprint order (the order the
# insert walks) against a resolve of both in id order, and each held the
# incident the other waited for. `held` gates every write of the statement (a one-time filter),
# so it is taken first. The events are built by Python beforehand for the id it
# proposes; a repeat keeps its existing id, so its proposed event joins nothing.
#
# The statement is the server-side function ingest_firing (its SQL is in
# migrations/versions/0018_intake_statements_as_functions.py; a change to it
# is a new migration, docs/deploy.md says how): sent as text it was parsed
# and planned on every batch, about 2 ms of database CPU, more than running
# it. The function's one plan is made once per server connection, which
# PgBouncer's transaction pooling leaves alone, and planned with sequential
# scans priced out, so that a plan made on nearly empty tables stays an
# index plan as they grow. A batch without correlation keys passes no
# sought keys and no provides or seeks: the correlation parts find nothing.
UPSERT_FIRING = sa.text("SELECT r FROM ingest_firing(CAST(:rows AS jsonb), CAST(:lock_also AS jsonb), :window, :actor, "
                        "CAST(:events AS jsonb), CAST(:sought AS jsonb)) AS r")

TIMESTAMP_COLUMNS = ("created_at", "updated_at", "resolved_at", "starts_at", "last_seen_at")


def _row_from_json(row: dict) -> dict:
    for name in TIMESTAMP_COLUMNS:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    return row


def _upsert(conn: Connection, alerts: list[Alert], window: int, actor: str, event_source: str,
            seen: dict[str, int] | None = None, plan: dict[str, Links] | None = None,
            members: dict[str, str] | None = None, joinable: set[str] | None = None,
            lock_also: Sequence[str] = ()) -> tuple[list[dict], set[str]]:
    """``seen`` counts the copies of each fingerprint the batch held (the
    batch keeps one), so repeat_count still counts every delivery. An alert
    already a (non-root) member of an active incident refreshes its
    membership instead, and lands in ``members`` (fingerprint -> incident).
    ``joinable``: when given, alerts an active incident offers a key to are
    left for the correlation decision and land in it. ``lock_also``: the
    fingerprints the batch resolves, whose incidents are locked with the
    batch's own (in one id order) before anything is written."""
    rows, after_fix = [], set()
    seen = seen or {}
    plan = plan or {}
    payload = [_alert_row(a, seen.get(a.fingerprint, 1), plan.get(a.fingerprint)) for a in alerts]
    proposed = [events.incident_event(events.INCIDENT_OPENED, {**row, "status": "open", "generation": 0}, event_source)
                for row in payload]
    # The keys the batch seeks, when the joinable are to be left out: one
    # array, so the lookup is one scan of the provides index.
    sought = sorted({key for row in payload for key in row["seeks"]}) if joinable is not None else []
    result = conn.execute(UPSERT_FIRING, {
        "rows": json.dumps(payload), "window": window, "actor": actor, "events": outbox.serialise(proposed),
        "sought": json.dumps(sought), "lock_also": json.dumps(sorted(lock_also))})
    for (row,) in result:
        if "joinable" in row:
            joinable.add(row["joinable"])
        elif "member_of" in row:
            if members is not None:
                members[row["member_of"]] = row["incident_id"]
        elif "after_fix" in row:
            after_fix.add(row["after_fix"])
        else:
            rows.append(_row_from_json(row))
    return rows, after_fix

# After remediation resolved an incident, its alert may still arrive:
# - the same firing (same startsAt: AlertManager re-sends it every
#   repeat_interval) is noted on that incident, and nothing opens;
# - a new firing (the fix did not hold) reopens that incident as a new
#   generation, which runs the pipeline again; the remediation cooldown then
#   hands it to a human instead of looping. The previous generation's
#   pending proposals are superseded in the same transaction, in one
#   statement for the batch (record_alerts, shared.proposals.supersede_on_reopen).
#   The new generation starts from its first root (root_generation 0): its
#   claims and events are the plain ones reconciliation and escalation
#   expect of an opening.
# One statement for both; `continuing` tells them apart.
AFTER_REMEDIATION = sa.text(compact(
    f"""
    UPDATE incidents AS i
    SET status = CASE WHEN x.starts_at IS NOT NULL AND i.starts_at = x.starts_at
                      THEN i.status ELSE CAST('open' AS incident_status) END,
        resolved_at = CASE WHEN x.starts_at IS NOT NULL AND i.starts_at = x.starts_at THEN i.resolved_at END,
        resolved_by = CASE WHEN x.starts_at IS NOT NULL AND i.starts_at = x.starts_at THEN i.resolved_by END,
        generation = i.generation + CASE WHEN x.starts_at IS NOT NULL AND i.starts_at = x.starts_at THEN 0 ELSE 1 END,
        root_generation = CASE WHEN x.starts_at IS NOT NULL AND i.starts_at = x.starts_at THEN i.root_generation ELSE 0 END,
        repeat_count = i.repeat_count + CASE WHEN x.starts_at IS NOT NULL AND i.starts_at = x.starts_at THEN 1 ELSE 0 END,
        updated_at = {UTC_NOW}, last_seen_at = {UTC_NOW}
    FROM (SELECT DISTINCT ON (fingerprint) fingerprint, starts_at
          FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(fingerprint text, starts_at timestamp)
          ORDER BY fingerprint) AS x
    WHERE i.fingerprint = x.fingerprint AND i.status = 'resolved' AND i.resolved_by = 'remediation'
      AND i.resolved_at > {UTC_NOW} - make_interval(secs => :window)
      AND i.id = (SELECT b.id FROM incidents b WHERE b.fingerprint = i.fingerprint AND b.status = 'resolved'
                  ORDER BY b.resolved_at DESC LIMIT 1)
      AND NOT EXISTS (SELECT 1 FROM incidents a WHERE a.fingerprint = i.fingerprint
                      AND a.status IN ('open', 'investigating'))
    RETURNING i.id, i.fingerprint, i.repeat_count, i.status = 'resolved' AS continuing
    """
))

# A resolved alert resolves its membership; the incident resolves (by alert)
# only when no member still fires. The incidents are locked first, in id
# order, so two replicas resolving the last two members of one incident
# cannot each see the other's member still firing. Each by primary key (the
# status compared as text, as in UPSERT_FIRING): never the partial index of
# active fingerprints filtered on the id.
RESOLVE_MEMBERS = sa.text(compact(
    f"""
    WITH x AS (
        SELECT DISTINCT ON (fingerprint) fingerprint, ends_at
        FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(fingerprint text, ends_at timestamp)
        ORDER BY fingerprint
    ),
    locked AS (
        SELECT i.id, i.fingerprint FROM incidents i
        WHERE CAST(i.status AS text) IN ('open', 'investigating')
          AND i.id = ANY(ARRAY(
              SELECT a.id FROM incidents a WHERE a.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x))
              UNION
              SELECT m.incident_id FROM incident_members m WHERE m.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x))))
        ORDER BY i.id
        FOR UPDATE
    ),
    resolved AS (
        UPDATE incident_members m SET status = 'resolved', ends_at = LEAST(COALESCE(x.ends_at, {UTC_NOW}), {UTC_NOW}),
            last_seen_at = {UTC_NOW}
        FROM x WHERE m.fingerprint = x.fingerprint AND m.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x))
          AND m.incident_id = ANY(ARRAY(SELECT id FROM locked))
        RETURNING m.incident_id, m.fingerprint
    )
    SELECT incident_id, fingerprint, CAST(NULL AS timestamp) AS ends_at FROM resolved
    UNION ALL
    SELECT l.id, l.fingerprint, x.ends_at FROM locked l JOIN x ON x.fingerprint = l.fingerprint
    WHERE NOT EXISTS (SELECT 1 FROM incident_members m WHERE m.incident_id = l.id AND m.fingerprint = l.fingerprint)
    """
))

# A sender's endsAt is kept, but never after now: an endsAt of 9999 would hold
# the incident inside the reopen window for ever. An endsAt before the firing's
# startsAt is kept: AlertManager sends one when a resolution is posted to its
# API with its own startsAt (tests/fixtures/alertmanager/testincident-*.json).
RESOLVE_WHEN_ALL_RESOLVED = sa.text(compact(
    f"""
    UPDATE incidents AS i
    SET status = 'resolved', updated_at = {UTC_NOW}, resolved_by = 'alert',
        resolved_at = LEAST(COALESCE((SELECT max(m.ends_at) FROM incident_members m WHERE m.incident_id = i.id),
                                     x.ends_at, {UTC_NOW}), {UTC_NOW})
    FROM (SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(id text, ends_at timestamp) ORDER BY id) AS x
    WHERE i.id = x.id AND i.status IN ('open', 'investigating')
      AND NOT EXISTS (SELECT 1 FROM incident_members m WHERE m.incident_id = i.id AND m.status = 'firing')
    RETURNING i.*
    """
))


def _alert_row(alert: Alert, seen: int = 1, links: Links | None = None) -> dict:
    return {
        "rank": links.rank if links else 0,
        "provides": sorted(links.provides) if links else [],
        "seeks": sorted(links.seeks) if links else [],
        "seen": seen,
        "id": str(uuid.uuid4()),
        "alert_name": alert.alert_name,
        "priority": alert.priority,
        "summary": alert.summary,
        "description": alert.description,
        "fingerprint": alert.fingerprint,
        "labels": alert.labels,
        "annotations": alert.annotations,
        "source": alert.source,
        "starts_at": alert.starts_at.isoformat() if alert.starts_at else None,
    }


def record_alerts(
    conn: Connection, alerts: Sequence[Alert], event_source: str, actor: str, reopen_window_seconds: int = 0,
    config: Settings | None = None, plan: dict[str, Links] | None = None,
) -> RecordResult:
    """Open, refresh, join or resolve incidents for a batch of alerts.

    One statement per kind of change whatever the batch size. Within a batch
    the last alert of a fingerprint wins (AlertManager never sends two, a
    hand-written payload might; a firing its own resolution follows in the
    same batch is answered with the resolution's outcome). Every writer
    takes its locks in one global order: noise control's rows (held alerts,
    then flapping rows, each by fingerprint), then the correlation advisory
    keys (sorted), then the incidents, in id order and in one statement,
    before any incident row is written or referenced (a timeline entry's
    foreign key locks its incident too). Normally the batch's first
    statement that locks incidents takes them all; a batch whose flapping
    alert must touch its incident during noise control takes them all
    before that (correlation_store.hold), so two concurrent batches, a
    replica's or the group commit's other writer, cannot deadlock. ``plan``
    (shared.correlation.plan, made before the transaction) names what the
    correlation rules relate; alerts outside it take the common path, whose
    only addition is the indexed membership lookup.
    """
    latest: dict[str, Alert] = {}
    for alert in alerts:
        latest.pop(alert.fingerprint, None)
        latest[alert.fingerprint] = alert
    # Noise control (shared/noise.py): heartbeats, maintenance windows, flapping.
    # A flapping alert's incident is touched there, before the upsert: the
    # batch then takes every incident lock first, in the global order
    # (noise control's rows, the advisory locks, the incidents in id order).
    screened = noise.screen(conn, list(latest.values()), config or settings(),
                            hold=lambda screened, ids: correlation_store.hold(conn, screened, plan or {}, ids))
    outcome_of: dict[str, Outcome] = {fp: Outcome(fp, *settled) for fp, settled in screened.settled.items()}
    for extra in screened.extra:
        latest.setdefault(extra.fingerprint, extra)
    firing = sorted((a for a in latest.values() if a.status == "firing" and not a.ignored_reason and a.fingerprint not in outcome_of),
                    key=lambda a: a.fingerprint)
    resolving = sorted((a for a in latest.values() if a.status == "resolved" and a.fingerprint not in outcome_of),
                       key=lambda a: a.fingerprint)
    for alert in latest.values():
        if alert.status == "firing" and alert.ignored_reason:
            outcome_of[alert.fingerprint] = Outcome(alert.fingerprint, "ignored", reason=alert.ignored_reason)
    # The resolutions' incidents are locked with the firing alerts' (one id-ordered statement).
    resolving_fps = [a.fingerprint for a in resolving]

    timeline: list[dict] = []
    new_events: list[dict] = []
    published: list[str] = []  # events the upsert itself queued
    reopened: set[str] = set()
    if firing:
        members: dict[str, str] = {}
        seen: dict[str, int] = {}
        for alert in alerts:
            if alert.status == "firing":
                seen[alert.fingerprint] = seen.get(alert.fingerprint, 0) + 1
        rows: list[dict] = []

        def open_incidents(opening: list[Alert], joinable: set[str] | None = None) -> None:
            """Open or refresh incidents for ``opening`` (reopening what
            remediation resolved a moment ago)."""
            found, after_fix = _upsert(conn, opening, reopen_window_seconds, actor, event_source, seen, plan, members, joinable,
                                       lock_also=resolving_fps)
            rows.extend(found)
            if not after_fix:
                return
            again = [a for a in opening if a.fingerprint in after_fix and a.fingerprint not in (joinable or ())]
            keys = json.dumps([{"fingerprint": a.fingerprint, "starts_at": a.starts_at.isoformat() if a.starts_at else None} for a in again])
            touched = conn.execute(AFTER_REMEDIATION, {"rows": keys, "window": reopen_window_seconds}).mappings().all() if again else []
            for row in touched:
                if row["continuing"]:
                    outcome_of[row["fingerprint"]] = Outcome(row["fingerprint"], "refreshed", row["id"])
                    timeline.append(timeline_row(row["id"], "repeated", actor, {"repeat_count": row["repeat_count"], "note": "still firing after remediation resolved it"}))
                else:
                    reopened.add(row["id"])
            continuing = {row["fingerprint"] for row in touched if row["continuing"]}
            rest = [a for a in again if a.fingerprint not in continuing]
            if rest:
                more, _ = _upsert(conn, rest, 0, actor, event_source, seen, plan, members)
                rows.extend(more)

        decision = None
        if plan and correlation_store.seekers_only(firing, plan):
            # Only alerts that look for a root: the upsert opens those no
            # active incident offers a key to, and the decision is taken for
            # the others alone (none, unless a root fires).
            correlation_store.lock(conn, firing, plan)
            joinable: set[str] = set()
            open_incidents(firing, joinable)
            if joinable:
                waiting = [a for a in firing if a.fingerprint in joinable]
                decision = correlation_store.decide(conn, waiting, plan)
                left = [a for a in waiting if a.fingerprint not in decision.joins]
                if left:
                    open_incidents(left)
        else:
            decision = correlation_store.decide(conn, firing, plan, lock_also=resolving_fps) if plan else None
            joining = set(decision.joins) if decision else set()
            opening = [a for a in firing if a.fingerprint not in joining]
            if opening:
                open_incidents(opening)
        for fingerprint, incident_id in members.items():
            outcome_of[fingerprint] = Outcome(fingerprint, "refreshed", incident_id)
        # The upsert already wrote the timeline and the new incidents' events.
        for row in rows:
            if row["id"] in reopened:
                outcome_of[row["fingerprint"]] = Outcome(row["fingerprint"], "reopened", row["id"])
                timeline.append(timeline_row(row["id"], "reopened", actor, {"from": "resolved", "to": "open", "generation": row["generation"], "reason": "the alert fired again soon after remediation resolved it"}))
                new_events.append(events.incident_event(events.INCIDENT_OPENED, row, event_source))
                continue
            outcome_of[row["fingerprint"]] = Outcome(row["fingerprint"], "created" if row["created"] else "refreshed", row["id"])
            if row["created"]:
                published.append(f"{row['id']}.opened.0")
        if reopened:
            # Locked by AFTER_REMEDIATION's update: their proposals next, in one statement for the batch.
            proposals.supersede_on_reopen(conn, sorted(reopened), timeline)
        if decision is not None and (decision.joins or decision.merges):
            opened = {fp: o.incident_id for fp, o in outcome_of.items() if o.incident_id}
            applied = correlation_store.apply(conn, decision, firing, plan, opened, actor, event_source)
            for fingerprint, incident_id in applied.joined.items():
                outcome_of[fingerprint] = Outcome(fingerprint, "joined", incident_id)
            timeline += applied.timeline
            new_events += applied.new_events
    if resolving:
        payload = [{"fingerprint": a.fingerprint, "ends_at": a.ends_at.isoformat() if a.ends_at else None} for a in resolving]
        hits = conn.execute(RESOLVE_MEMBERS, {"rows": json.dumps(payload)}).mappings().all()
        for hit in hits:
            outcome_of[hit["fingerprint"]] = Outcome(hit["fingerprint"], "resolved", hit["incident_id"])
        # A lone incident's own alert (no member row) brings its ends_at.
        ends: dict[str, str | None] = {}
        for hit in hits:
            if hit["ends_at"] is not None or hit["incident_id"] not in ends:
                ends[hit["incident_id"]] = hit["ends_at"].isoformat() if hit["ends_at"] else None
        rows = [{"id": incident_id, "ends_at": end} for incident_id, end in sorted(ends.items())]
        done = conn.execute(RESOLVE_WHEN_ALL_RESOLVED, {"rows": json.dumps(rows)}).mappings().all() if rows else []
        finished = {row["id"] for row in done}
        for row in done:
            timeline.append(timeline_row(row["id"], "resolved", actor, {"from": "alert", "resolved_at": row["resolved_at"]}))
            new_events.append(events.incident_event(events.INCIDENT_RESOLVED, row, event_source))
        for hit in hits:
            if hit["incident_id"] not in finished:
                timeline.append(timeline_row(hit["incident_id"], "alert_resolved", actor,
                                             {"fingerprint": hit["fingerprint"], "note": "other members still fire"}))
        for alert in resolving:
            outcome_of.setdefault(
                alert.fingerprint, Outcome(alert.fingerprint, "ignored", reason="no open incident with this fingerprint")
            )
    insert_timeline_and_events(conn, timeline, new_events)
    ignored_alerts.count(conn, [(a.alert_name, a.ignored_reason) for a in alerts if a.status == "firing" and a.ignored_reason],
                         (config or settings()).ignored_alerts_max_names)
    # Report in the order the alerts came, once per alert (duplicates share an outcome).
    return RecordResult([outcome_of[a.fingerprint] for a in alerts], published + [e["id"] for e in new_events])


def resolve_by_fingerprint(conn: Connection, fingerprint: str, event_source: str, actor: str, ends_at: datetime | None = None) -> str | None:
    """Resolve the active incident of this fingerprint; its id, or None."""
    alert = Alert(fingerprint=fingerprint, status="resolved", alert_name="", priority="P2", summary="", description="",
                  labels={}, annotations={}, starts_at=None, ends_at=ends_at, source="api")
    result = record_alerts(conn, [alert], event_source, actor)
    return result.outcomes[0].incident_id
