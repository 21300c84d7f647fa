"""Remediation attempts (``remediation_runs``): what the rails need to know
across replicas and cold starts — when an action last ran on a target, and
how many live actions ran in the last hour."""

from __future__ import annotations

import json
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

LOCK_KEY = 727006
UTC_NOW = "timezone('utc', now())"


def lock(conn: Connection) -> None:
    """Serialise rail checks and their records until the transaction ends."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})


def last_live_run(conn: Connection, action: str, target: str, within_seconds: float) -> datetime | None:
    return conn.execute(
        sa.text(
            "SELECT started_at FROM remediation_runs WHERE action = :a AND target = :t AND NOT dry_run "
            f"AND blocked_by IS NULL AND started_at > {UTC_NOW} - make_interval(secs => :s) "
            "ORDER BY started_at DESC LIMIT 1"
        ),
        {"a": action, "t": target, "s": within_seconds},
    ).scalar()


def live_runs_last_hour(conn: Connection) -> int:
    return conn.execute(
        sa.text(f"SELECT count(*) FROM remediation_runs WHERE NOT dry_run AND blocked_by IS NULL AND started_at > {UTC_NOW} - interval '1 hour'")
    ).scalar_one()


def record(conn: Connection, incident_id: str, action: str, target: str, dry_run: bool, blocked_by: str | None, reason: str) -> int:
    return conn.execute(
        sa.text(
            "INSERT INTO remediation_runs (incident_id, action, target, dry_run, blocked_by, details) "
            "VALUES (:i, :a, :t, :d, :b, CAST(:details AS jsonb)) RETURNING id"
        ),
        {"i": incident_id, "a": action, "t": target, "d": dry_run, "b": blocked_by,
         "details": json.dumps({"reason": reason} if blocked_by else {})},
    ).scalar_one()


def finish(conn: Connection, run_id: int, success: bool, blocked_by: str | None = None, reason: str | None = None) -> None:
    """A rail judged inside the action (the blast radius reads the target
    first) marks the run blocked, so it counts toward no cooldown or cap."""
    if blocked_by:
        conn.execute(sa.text("UPDATE remediation_runs SET success = false, blocked_by = :b, "
                             "details = details || jsonb_build_object('reason', CAST(:r AS text)) WHERE id = :id"),
                     {"b": blocked_by, "r": reason or "", "id": run_id})
    else:
        conn.execute(sa.text("UPDATE remediation_runs SET success = :s WHERE id = :id"), {"s": success, "id": run_id})
