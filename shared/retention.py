"""Retention: what grows with every event bounds itself; incidents stay.

Run by the outbox sweep (the PingSource, every minute; POST /outbox/sweep).
Each kind of row is deleted oldest first in batches of ``RETENTION_BATCH``,
one short transaction per batch, at most ``RETENTION_MAX_BATCHES`` batches
per kind and sweep, so a sweep never holds locks for long and a backlog
after a long outage drains over a few sweeps instead of in one huge delete.
The partial indexes of migrations 0014 and 0016 find each batch without a scan.

- Published outbox rows, ``RETENTION_OUTBOX_HOURS`` (168) after publishing.
  Unpublished and parked rows are never pruned: they are work to do or for
  an operator to look at. Nor is the opening of an active incident's
  generation (and of its current root): reconciliation watches the steps
  after it from that row, and keeps re-sending a stuck escalation while the
  incident is active (shared/reconcile.py), however long that is.
- Completed work claims, ``RETENTION_CLAIMS_HOURS`` (168) after completion,
  and only of incidents that are no longer active: a claim is how a
  redelivered event finds its step already done and how reconciliation
  knows an open incident went through diagnostics, so it outlives the
  Broker's redelivery and RECONCILE_HORIZON_SECONDS (the settings refuse a
  shorter retention). Unfinished claims are never pruned.
- Timeline entries, ``RETENTION_TIMELINE_DAYS`` (365) old, of incidents
  that are resolved or closed. /metrics counts notifications and dead
  letters from the timeline, so those counts cover the retained period.
- Alerts a maintenance window held, ``RETENTION_SUPPRESSED_DAYS`` (30)
  after the window released them (one row per fingerprint, and pod names
  make fingerprints endless). Alerts still held are never pruned: the
  window's end replays them.
- The ignored-alert counts of a name not ignored for
  ``RETENTION_IGNORED_DAYS`` (30), which frees its place among the
  ``IGNORED_ALERTS_MAX_NAMES`` counted apart; then any names past that bound
  are folded into ``__other__`` (shared/ignored_alerts.py). The
  ``__other__`` counts are never pruned. The fold gives way to the intake:
  a row lock held past its 200 ms lock_timeout leaves it to the next sweep.

- Personal board sessions (shared/board_sessions.py) once expired, or idle
  past ``BOARD_IDLE_TIMEOUT_MINUTES``: they are no session any more, so no
  setting keeps them.

0 keeps a kind forever. Incidents themselves are never pruned: they are the record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import board_sessions, db, ignored_alerts
from shared.config import Settings
from shared.db import sqlstate
from shared.sqltext import UTC_NOW

log = logging.getLogger("retention")

LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out

# Each statement deletes one batch, oldest first; SKIP LOCKED leaves rows a
# concurrent transaction holds (a publisher marking an event) to a later sweep.
PRUNE = {
    "outbox": f"""
        DELETE FROM event_outbox WHERE id IN (
            SELECT o.id FROM event_outbox o
            WHERE o.published_at IS NOT NULL AND o.published_at < {UTC_NOW} - make_interval(secs => :age)
              AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.id = o.subject AND i.status IN ('open', 'investigating')
                              AND o.id IN (i.id || '.opened.' || i.generation,
                                           i.id || '.opened.' || i.generation || '.root' || i.root_generation))
            ORDER BY o.published_at LIMIT :batch FOR UPDATE OF o SKIP LOCKED)
        """,
    "claims": f"""
        DELETE FROM work_claims WHERE key IN (
            SELECT w.key FROM work_claims w LEFT JOIN incidents i ON i.id = w.incident_id
            WHERE w.completed_at IS NOT NULL AND w.completed_at < {UTC_NOW} - make_interval(secs => :age)
              AND (i.id IS NULL OR i.status NOT IN ('open', 'investigating'))
            ORDER BY w.completed_at LIMIT :batch FOR UPDATE OF w SKIP LOCKED)
        """,
    "timeline": f"""
        DELETE FROM incident_timeline WHERE id IN (
            SELECT t.id FROM incident_timeline t JOIN incidents i ON i.id = t.incident_id
            WHERE t.at < {UTC_NOW} - make_interval(secs => :age) AND i.status IN ('resolved', 'closed')
            ORDER BY t.at LIMIT :batch FOR UPDATE OF t SKIP LOCKED)
        """,
    "suppressed": f"""
        DELETE FROM suppressed_alerts WHERE fingerprint IN (
            SELECT fingerprint FROM suppressed_alerts
            WHERE released_at IS NOT NULL AND released_at < {UTC_NOW} - make_interval(secs => :age)
            ORDER BY released_at LIMIT :batch FOR UPDATE SKIP LOCKED)
        """,
    "ignored": f"""
        DELETE FROM ignored_alerts WHERE (alert_name, reason) IN (
            SELECT alert_name, reason FROM ignored_alerts
            WHERE alert_name <> '{ignored_alerts.OTHER}' AND last_seen_at < {UTC_NOW} - make_interval(secs => :age)
            ORDER BY last_seen_at LIMIT :batch FOR UPDATE SKIP LOCKED)
        """,
}


@dataclass
class Report:
    pruned: dict[str, int]
    seconds: float


def ages(config: Settings) -> dict[str, float]:
    """Seconds each kind is kept (0: forever)."""
    return {"outbox": config.retention_outbox_hours * 3600, "claims": config.retention_claims_hours * 3600,
            "timeline": config.retention_timeline_days * 86400, "suppressed": config.retention_suppressed_days * 86400,
            "ignored": config.retention_ignored_days * 86400}


def run(bind: Engine, config: Settings) -> Report:
    started = time.monotonic()
    pruned: dict[str, int] = {}
    for kind, age in ages(config).items():
        if age > 0:
            pruned[kind] = _batches(bind, config, PRUNE[kind], {"age": age})
    pruned["board_sessions"] = _batches(bind, config, board_sessions.PURGE,
                                        {"idle": config.board_idle_timeout_minutes * 60})
    folded = _fold_ignored(bind, config.ignored_alerts_max_names)
    if folded:
        pruned["ignored_past_bound"] = folded
    report = Report(pruned, time.monotonic() - started)
    if any(pruned.values()):
        log.info("Retention pruned old rows", extra={"pruned": pruned, "seconds": round(report.seconds, 3)})
    return report


def _batches(bind: Engine, config: Settings, statement: str, params: dict) -> int:
    """Batches of one statement, each its own transaction, until one is short or the sweep's share is used."""
    total = 0
    for _ in range(config.retention_max_batches):
        with bind.begin() as conn:
            deleted = conn.execute(sa.text(statement), {**params, "batch": config.retention_batch}).rowcount
        total += deleted
        if deleted < config.retention_batch:
            break
    return total


def _fold_ignored(bind: Engine, max_names: int) -> int:
    """Fold the ignored-alert names past the bound; a lock it met is left to the next sweep."""
    try:
        with bind.begin() as conn:
            ignored_alerts.prepare_fold(conn, max_names)
        with bind.begin() as conn:
            return ignored_alerts.fold_extra(conn, max_names)
    except sa.exc.DBAPIError as exc:
        if sqlstate(exc) != LOCK_NOT_AVAILABLE:
            raise
        log.info("Folding ignored-alert names met a lock held by the intake; the next sweep folds them")
        return 0


def run_safely(bind: Engine, config: Settings) -> Report | None:
    """For the sweep: a failed pruning must not stop the outbox from draining."""
    return db.for_the_sweep("Retention", lambda: run(bind, config), log)
