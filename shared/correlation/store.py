"""Joins and merges, inside the intake's transaction.

:func:`decide` runs only for alerts some rule concerns (the plan). It first
takes transaction-scoped advisory locks on every key and fingerprint the
batch touches (:func:`lock`, one sorted statement sent in the next
statement's round trip), so two intake replicas receiving the same storm
decide one after the other and reach the grouping one would alone; then it
reads, in one statement, the active incidents that offer or look for those
keys (locking them, so no incident resolves under a join) and the batch's
alerts that already are an incident's root. A batch whose alerts only look
for a root (:func:`seekers_only`: pod alerts) skips that statement: the
locks travel with the ingest upsert, which opens what no active incident
offers a key to and leaves the rest to :func:`decide`.
:func:`apply` writes what was decided once the batch's new incidents exist,
and announces a take-over (:func:`root_changed_event`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import db, events, proposals
from shared.alerts import Alert
from shared.correlation.plan import Links, subject
from shared.sqltext import UTC_NOW, compact
from shared.timeline import timeline_row

LOCK_KEYS = sa.text(
    "SELECT count(pg_advisory_xact_lock(k)) FROM "
    "(SELECT DISTINCT k FROM unnest(CAST(:keys AS bigint[])) AS k ORDER BY k) AS s"
)

# The members of active incidents that offer or look for the batch's keys,
# or are the batch's alerts, their incidents locked in id order; then the
# batch's alerts that are an active incident's own (member-less) root. One
# statement. The members are found first (the CTE is materialized), then
# each one's incident by primary key, locked in id order, and each alert's
# active incident by fingerprint: never a pass over every active incident,
# whatever the planner's statistics say of tables a storm has just filled
# (the status is compared as text so that the partial index of active
# fingerprints, filtered on the id, is never taken for the primary key).
CANDIDATES = sa.text(compact(
    f"""
    WITH found AS MATERIALIZED (
        SELECT incident_id, fingerprint, alert_name, provides, seeks, last_seen_at FROM incident_members
        WHERE fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:fps AS jsonb))))
           OR (provides <> '{{}}' AND provides && ARRAY(SELECT jsonb_array_elements_text(CAST(:seeks AS jsonb))))
           OR (seeks <> '{{}}' AND seeks && ARRAY(SELECT jsonb_array_elements_text(CAST(:provides AS jsonb))))
    ),
    locked AS (
        SELECT m.incident_id, m.fingerprint, m.alert_name, m.provides, m.seeks, i.alert_name AS root_name,
               (i.fingerprint = m.fingerprint) AS is_root,
               COALESCE((SELECT r.rank FROM incident_members r WHERE r.incident_id = i.id AND r.fingerprint = i.fingerprint), 0)
                   AS root_rank,
               EXTRACT(EPOCH FROM ({UTC_NOW} - m.last_seen_at)) AS idle,
               EXTRACT(EPOCH FROM ({UTC_NOW} - i.created_at)) AS age
        FROM (SELECT * FROM found ORDER BY incident_id) AS m
        CROSS JOIN LATERAL (SELECT id, fingerprint, alert_name, created_at FROM incidents
                            WHERE id = m.incident_id AND CAST(status AS text) IN ('open', 'investigating')
                            FOR UPDATE) AS i
    )
    SELECT *, false AS lone_root FROM locked
    UNION ALL
    SELECT NULL, f.fp, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true
    FROM unnest(ARRAY(SELECT jsonb_array_elements_text(CAST(:fps AS jsonb)))) AS f(fp)
    CROSS JOIN LATERAL (SELECT 1 FROM incidents WHERE fingerprint = f.fp AND status IN ('open', 'investigating') LIMIT 1) AS a
    """
))

# Taken just before CANDIDATES, in its round trip: the incidents it will
# lock and every active incident of the batch's own alerts (rule-less ones
# too), together, in id order. CANDIDATES locks only the first, and the
# upsert that follows the decision locks the second: two id-ordered runs,
# not one, so a batch holding a root that locked a node incident, then
# waited for its lone incident of a lower id, deadlocked against a resolve
# of both (which locks in id order). Found as CANDIDATES finds them: members
# first, then each incident by primary key. ``ids``: incidents to lock with
# them whatever their status (a flapping alert's, which may be resolved and
# reopened silently: :func:`hold`).
HOLD = sa.text(compact(
    """
    SELECT count(*) FROM (
        SELECT i.id FROM incidents i
        WHERE i.id = ANY(ARRAY(
              SELECT incident_id FROM incident_members
              WHERE fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:fps AS jsonb))))
                 OR (provides <> '{}' AND provides && ARRAY(SELECT jsonb_array_elements_text(CAST(:seeks AS jsonb))))
                 OR (seeks <> '{}' AND seeks && ARRAY(SELECT jsonb_array_elements_text(CAST(:provides AS jsonb))))
              UNION
              SELECT a.id FROM incidents a WHERE a.fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:fps AS jsonb))))
                AND CAST(a.status AS text) IN ('open', 'investigating')
              UNION
              SELECT jsonb_array_elements_text(CAST(:ids AS jsonb))))
          AND (CAST(i.status AS text) IN ('open', 'investigating')
               OR i.id = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)))))
        ORDER BY i.id
        FOR UPDATE
    ) AS held
    """
))

INSERT_MEMBERS = sa.text(compact(
    f"""
    INSERT INTO incident_members (incident_id, fingerprint, alert_name, labels, priority, status, starts_at,
                                  last_seen_at, joined_at, is_root, rank, correlation_reason, provides, seeks)
    SELECT x.incident_id, x.fingerprint, x.alert_name, x.labels, x.priority, 'firing', x.starts_at,
           {UTC_NOW}, {UTC_NOW}, false, x.rank, x.reason,
           ARRAY(SELECT jsonb_array_elements_text(x.provides)), ARRAY(SELECT jsonb_array_elements_text(x.seeks))
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(
        incident_id text, fingerprint text, alert_name text, labels jsonb, priority text, starts_at timestamp,
        rank integer, reason text, provides jsonb, seeks jsonb)
    ORDER BY x.incident_id, x.fingerprint
    ON CONFLICT (incident_id, fingerprint) DO UPDATE SET last_seen_at = {UTC_NOW}, status = 'firing', ends_at = NULL
    """
))

# A late root's merges, all at once: one statement moves the members of
# every merged incident to its survivor, one resolves them all. Two
# statements per merged incident held a node root's batch (and the locks of
# every incident it merges) for 33 s at 3000 pod incidents, past the intake's
# timeout. :rows holds {old, survivor, reason} per merged incident; the incidents
# are already locked (CANDIDATES), and are updated in id order.
MOVE_MEMBERS = sa.text(compact(
    """
    UPDATE incident_members SET incident_id = x.survivor, is_root = false,
           correlation_reason = x.reason || ' (was ' || incident_members.alert_name || ' of incident ' || x.old || ')'
    FROM (SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(old text, survivor text, reason text) ORDER BY old) AS x
    WHERE incident_members.incident_id = x.old
      AND incident_members.incident_id = ANY(ARRAY(SELECT jsonb_array_elements(CAST(:rows AS jsonb))->>'old'))
    RETURNING x.old, incident_members.fingerprint, incident_members.alert_name
    """
))

RESOLVE_MERGED = sa.text(compact(
    f"""
    UPDATE incidents SET status = 'resolved', resolved_by = 'merged', resolved_at = {UTC_NOW},
           updated_at = {UTC_NOW}, merged_into = x.survivor
    FROM (SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(old text, survivor text) ORDER BY old) AS x
    WHERE incidents.id = x.old AND incidents.status IN ('open', 'investigating')
    RETURNING incidents.*
    """
))

# A member that ranks above the root takes over: the incident's fingerprint,
# name, summary, description, labels and annotations become its (diagnostics,
# remediation and pages read them), the old root stays a member. The
# fingerprint moves with the root, so the root's resolve still finds it.
# The root generation counts the take-overs: diagnostics and remediation
# claim their step per root generation (shared.claims.step_key).
TAKE_OVER = sa.text(compact(
    f"""
    WITH old_root AS (
        UPDATE incident_members m SET is_root = false, correlation_reason = :old_reason
        FROM incidents i
        WHERE i.id = :id AND m.incident_id = i.id AND m.fingerprint = i.fingerprint AND m.fingerprint <> :fp
        RETURNING m.fingerprint, m.alert_name
    ),
    new_root AS (
        UPDATE incident_members SET is_root = true, correlation_reason = :new_reason
        WHERE incident_id = :id AND fingerprint = :fp
        RETURNING fingerprint
    )
    UPDATE incidents SET fingerprint = :fp, alert_name = :alert_name, summary = :summary, description = :description,
           labels = CAST(:labels AS jsonb), annotations = CAST(:annotations AS jsonb), updated_at = {UTC_NOW},
           root_generation = root_generation + 1
    WHERE id = :id AND status IN ('open', 'investigating') AND EXISTS (SELECT 1 FROM new_root)
    RETURNING incidents.*, (SELECT fingerprint FROM old_root) AS old_fingerprint,
              (SELECT alert_name FROM old_root) AS old_alert_name
    """
))

# The incident's priority is its highest member's (P0 sorts first).
RAISE_PRIORITY = sa.text(compact(
    f"""
    UPDATE incidents AS i SET priority = CAST(p.top AS incident_priority), updated_at = {UTC_NOW}
    FROM (SELECT incident_id, min(priority) AS top FROM incident_members
          WHERE incident_id = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:ids AS jsonb))))
          GROUP BY incident_id) AS p
    WHERE i.id = p.incident_id AND CAST(p.top AS incident_priority) < i.priority
    RETURNING i.*
    """
))


def raised_to_p0_event(row, event_source: str) -> dict:
    """An incident a member raised to P0 is announced as opened again, under
    an id of its own: escalation reads the priority from the database, so a
    channel that pages on P0 pages now, and one that already told this
    generation's opening (its notification claim is taken) says nothing twice."""
    event = events.incident_event(events.INCIDENT_OPENED, row, event_source, {"raised_to": "P0"})
    event["id"] = f"{event['id']}.raised-p0"
    return event


def root_changed_event(row, event_source: str, change: dict) -> dict:
    """A new root is announced as the incident opened again, under an id of
    its own per root generation (``{id}.opened.{generation}.root{n}``), in
    the take-over's transaction: diagnostics, which listens to openings,
    diagnoses the new root under a fresh claim (shared.claims.step_key),
    remediation follows its diagnosis, and escalation, reading the root
    generation from the database, follows up the page it sent instead of
    paging again (functions/escalation/handler.py)."""
    event = events.incident_event(events.INCIDENT_OPENED, row, event_source, {"root_changed": change})
    event["id"] = f"{event['id']}.root{row['root_generation']}"
    return event


def lock_id(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True)


@dataclass
class _Provider:
    target: str  # an incident id, or "new:<fingerprint>" for one this batch opens
    alert_name: str
    root_rank: int
    age: float
    idle: float
    root_name: str = ""


@dataclass
class Decision:
    joins: dict[str, tuple[str, str]] = field(default_factory=dict)  # fingerprint -> (target, reason)
    merges: dict[str, tuple[str, str]] = field(default_factory=dict)  # incident id -> (target, reason)
    takeovers: dict[str, tuple[str, str]] = field(default_factory=dict)  # incident id -> (new root's fingerprint, reason)
    touched: set[str] = field(default_factory=set)  # fingerprints already members of an active incident


def _provider_text(key: str, alert_name: str) -> str:
    if key.startswith("labels:"):
        return f"as {alert_name} (rule {key.split(':', 2)[1]})"
    return f"where {alert_name} fires"


def _sought_text(key: str) -> str:
    """Why an incident's root looked for ``key`` (its member row keeps the
    key, not the sentence)."""
    kind, _, rest = key.partition(":")
    if kind == "node":
        return f"it runs on node {rest}"
    if kind == "workload":
        namespace, workload_kind, name = rest.split("/", 2)
        return f"it belongs to {workload_kind.lower()} {namespace}/{name}"
    if kind == "dependency":
        return f"it depends on {rest.split(':', 1)[1]}"
    return f"same {rest.split(':', 1)[1]}"


def seekers_only(alerts: list[Alert], plan: dict[str, Links]) -> bool:
    """Does no alert of the batch offer anything to others (pod alerts,
    which only look for their node, workload or dependency)? Such a batch
    needs no candidate statement of its own: the ingest upsert opens every
    alert no active incident offers a key to and hands back the others
    (shared/ingest.py, ``joinable``), and only those go through
    :func:`decide`."""
    return not any(plan[a.fingerprint].provides for a in alerts if a.fingerprint in plan)


def lock(conn: Connection, alerts: list[Alert], plan: dict[str, Links]) -> None:
    """Transaction-scoped advisory locks on every key and fingerprint the
    batch touches, in one sorted statement. It travels in the next
    statement's round trip, ahead of it (db.later): the server still takes
    the locks before that statement's snapshot (under READ COMMITTED each
    statement takes its own), so the statement sees whatever the replica
    that held them committed. Taking them again is harmless (they nest)."""
    keyed = [a for a in alerts if a.fingerprint in plan]
    keys = {k for a in keyed for k in plan[a.fingerprint].seeks} | {k for a in keyed for k in plan[a.fingerprint].provides}
    ids = {lock_id("key:" + k) for k in keys} | {lock_id("fp:" + a.fingerprint) for a in keyed}
    if ids:
        db.later(conn, LOCK_KEYS, {"keys": sorted(ids)})


def hold(conn: Connection, alerts: Sequence[Alert], plan: dict[str, Links], incident_ids: Sequence[str] = ()) -> None:
    """Every lock the batch's later statements take, taken now in the one
    global order: the advisory locks (:func:`lock`), then in one id-ordered
    statement every incident the ingest upsert, the decision and the resolve
    statement would lock for ``alerts`` (HOLD), with ``incident_ids``. For a
    batch that must touch incidents before those statements run (noise
    control's flapping, shared/flapping.py): their own locks then find the
    incidents already held, and wait for nothing."""
    keyed = [a for a in alerts if a.fingerprint in plan]
    lock(conn, keyed, plan)
    conn.execute(HOLD, {"fps": json.dumps(sorted({a.fingerprint for a in alerts})),
                        "seeks": json.dumps(sorted({k for a in keyed for k in plan[a.fingerprint].seeks})),
                        "provides": json.dumps(sorted({k for a in keyed for k in plan[a.fingerprint].provides})),
                        "ids": json.dumps(sorted(set(incident_ids)))})


def decide(conn: Connection, alerts: list[Alert], plan: dict[str, Links], lock_also: Sequence[str] = ()) -> Decision:
    """``lock_also``: fingerprints the batch resolves, whose incidents are
    locked with the others (HOLD) before any candidate is read."""
    decision = Decision()
    keyed = [a for a in alerts if a.fingerprint in plan]
    if not keyed:
        return decision
    seeks = sorted({k for a in keyed for k in plan[a.fingerprint].seeks})
    provides = sorted({k for a in keyed for k in plan[a.fingerprint].provides})
    fps = sorted(a.fingerprint for a in keyed)
    lock(conn, keyed, plan)
    db.later(conn, HOLD, {"fps": json.dumps(sorted({a.fingerprint for a in alerts} | set(lock_also))), "seeks": json.dumps(seeks),
                          "provides": json.dumps(provides), "ids": "[]"})
    found = conn.execute(CANDIDATES, {"fps": json.dumps(fps), "seeks": json.dumps(seeks),
                                      "provides": json.dumps(provides)}).mappings().all()
    rows = [r for r in found if not r["lone_root"]]
    wanted = set(fps)
    # A lone incident's alert has no member row: it is touched all the same.
    decision.touched = {r["fingerprint"] for r in found if r["fingerprint"] in wanted}
    providers: dict[str, list[_Provider]] = {}
    for r in rows:
        for key in r["provides"] or ():
            providers.setdefault(key, []).append(
                _Provider(r["incident_id"], r["alert_name"], r["root_rank"], float(r["age"]), float(r["idle"]), r["root_name"]))
    roots_seeking: dict[str, list[dict]] = {}
    for r in rows:
        if r["is_root"]:
            for key in r["seeks"] or ():
                roots_seeking.setdefault(key, []).append(r)
    # Roots first (node, then workload, then the rest), so a batch holding a
    # node and its pods opens the node's incident and the pods join it.
    for alert in sorted(keyed, key=lambda a: (-plan[a.fingerprint].rank, a.fingerprint)):
        if alert.fingerprint in decision.touched:
            continue
        links = plan[alert.fingerprint]
        best: tuple | None = None
        for key, why in sorted(links.seeks.items()):
            for p in providers.get(key, ()):
                if key in links.join_window and p.idle > links.join_window[key]:
                    continue
                # The strongest root wins; among equals, the oldest incident.
                rank = (-p.root_rank, -p.age, p.target)
                if best is None or rank < best[0]:
                    best = (rank, p, key, why)
        if best is not None:
            _, p, key, why = best
            decision.joins[alert.fingerprint] = (p.target, f"{subject(alert)} joined: {why}, {_provider_text(key, p.alert_name)}")
            target, root_rank = p.target, p.root_rank
            if links.rank > root_rank and not target.startswith("new:"):
                # It ranks above the root it joins (a labels rule's root list,
                # a dependency over its dependents): it becomes the root.
                decision.takeovers[target] = (
                    alert.fingerprint, f"{subject(alert)} took over as root from {p.root_name}: {links.rank_reason}")
                root_rank = links.rank
                for listed in providers.values():
                    for other in listed:
                        if other.target == target:
                            other.root_rank, other.root_name = root_rank, alert.alert_name
        else:
            target, root_rank = f"new:{alert.fingerprint}", links.rank
        # A late root: the incidents its symptoms opened (their root seeks
        # what this alert provides) within the rule's window merge into the
        # incident this alert is now in.
        for key in sorted(links.provides):
            window = links.merge_window.get(key, 0)
            for r in roots_seeking.get(key, ()):
                if window and r["root_rank"] < root_rank and float(r["age"]) <= window \
                        and r["incident_id"] not in decision.merges and r["incident_id"] != target:
                    decision.merges[r["incident_id"]] = (target, f"{r['alert_name']} joined when {subject(alert)} arrived: "
                                                                 f"{_sought_text(key)}, {_provider_text(key, alert.alert_name)}")
        for key in links.provides:
            providers.setdefault(key, []).append(_Provider(target, alert.alert_name, root_rank, 0.0, 0.0))
    return decision


@dataclass
class Applied:
    joined: dict[str, str]  # fingerprint -> incident id
    timeline: list[dict]
    new_events: list[dict]


def apply(conn: Connection, decision: Decision, alerts: list[Alert], plan: dict[str, Links], opened: dict[str, str],
          actor: str, event_source: str) -> Applied:
    """``opened``: the incident id each fingerprint of the batch ended in
    (the upsert's outcome), which names the incidents the batch opened."""

    def resolve(target: str) -> str | None:
        seen = set()
        while target.startswith("new:") or target in decision.merges:
            if target in seen:
                return None
            seen.add(target)
            target = opened.get(target[4:]) if target.startswith("new:") else decision.merges[target][0]
            if target is None:
                return None
        return target

    by_fp = {a.fingerprint: a for a in alerts}
    timeline: list[dict] = []
    new_events: list[dict] = []
    joined: dict[str, str] = {}
    rows = []
    for fp, (target, reason) in sorted(decision.joins.items()):
        incident_id = resolve(target)
        if incident_id is None:
            continue
        alert, links = by_fp[fp], plan[fp]
        joined[fp] = incident_id
        rows.append({"incident_id": incident_id, "fingerprint": fp, "alert_name": alert.alert_name, "labels": alert.labels,
                     "priority": alert.priority, "starts_at": alert.starts_at.isoformat() if alert.starts_at else None,
                     "rank": links.rank, "reason": reason, "provides": sorted(links.provides), "seeks": sorted(links.seeks)})
        timeline.append(timeline_row(incident_id, "alert_joined", actor,
                                     {"fingerprint": fp, "alert_name": alert.alert_name, "reason": reason}))
    if rows:
        conn.execute(INSERT_MEMBERS, {"rows": json.dumps(rows)})
    taken_over: list[str] = []
    for incident_id, (fp, reason) in sorted(decision.takeovers.items()):
        if resolve(incident_id) != incident_id or joined.get(fp) != incident_id:
            continue  # merged away in this batch: the survivor's root stands
        alert = by_fp[fp]
        done = conn.execute(TAKE_OVER, {
            "id": incident_id, "fp": fp, "alert_name": alert.alert_name, "summary": alert.summary,
            "description": alert.description, "labels": json.dumps(alert.labels), "annotations": json.dumps(alert.annotations),
            "new_reason": f"root: {reason}", "old_reason": f"root until {subject(alert)} took over"}).mappings().first()
        if done is not None:
            change = {"from": done["old_fingerprint"], "from_alert_name": done["old_alert_name"], "to": fp,
                      "alert_name": alert.alert_name, "reason": reason, "root_generation": done["root_generation"]}
            timeline.append(timeline_row(incident_id, "root_changed", actor, change))
            taken_over.append(incident_id)
            new_events.append(root_changed_event(dict(done), event_source, change))
    # Proposals planned on the old roots' diagnoses end with them (the
    # incidents are locked by TAKE_OVER), in one statement for the batch.
    proposals.supersede_on_root_change(conn, taken_over, timeline)
    touched_incidents = set(joined.values())
    merging = []
    for old, (target, reason) in sorted(decision.merges.items()):
        into = resolve(target)
        if into is not None and into != old:
            merging.append({"old": old, "survivor": into, "reason": reason})
    if merging:
        rows = json.dumps(merging)
        moved: dict[str, list] = {}
        for member in conn.execute(MOVE_MEMBERS, {"rows": rows}).mappings():
            moved.setdefault(member["old"], []).append(member)
        # The update returns them in the table's order: each incident's by fingerprint, as they were told one by one.
        for members in moved.values():
            members.sort(key=lambda m: m["fingerprint"])
        merged = {row["id"]: row for row in conn.execute(RESOLVE_MERGED, {"rows": rows}).mappings()}
        for merge in merging:
            old, into, reason = merge["old"], merge["survivor"], merge["reason"]
            touched_incidents.add(into)
            for member in moved.get(old, ()):
                timeline.append(timeline_row(into, "alert_joined", actor, {
                    "fingerprint": member["fingerprint"], "alert_name": member["alert_name"], "reason": reason,
                    "merged_from": old}))
            if old in merged:
                timeline.append(timeline_row(old, "merged", actor, {"into": into, "reason": reason,
                                                                   "members": len(moved.get(old, ()))}))
                new_events.append(events.incident_event(events.INCIDENT_RESOLVED, merged[old], event_source,
                                                        {"merged_into": into}))
    if touched_incidents:
        for row in conn.execute(RAISE_PRIORITY, {"ids": json.dumps(sorted(touched_incidents))}).mappings():
            timeline.append(timeline_row(row["id"], "priority_raised", actor, {"to": row["priority"], "reason": "a member's priority"}))
            if row["priority"] == "P0":
                new_events.append(raised_to_p0_event(row, event_source))
    return Applied(joined, timeline, new_events)
