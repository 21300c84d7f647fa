"""Safety rails, judged before every action and kept in the database (the
function scales to zero and runs as many replicas, so memory would forget):
namespace allow-list, denied targets, node actions opt-in, a cooldown per
target and a cap on live actions per hour. The replica ceiling is applied by
``scale_deployment`` itself. A global advisory lock serialises the check and
the record, so two incidents cannot both pass a cooldown for one target."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from functions.remediation.actions import TargetRef, denied
from shared.config import Settings

LOCK_KEY = 727006
UTC_NOW = "timezone('utc', now())"


@dataclass(frozen=True)
class Verdict:
    blocked_by: str | None = None
    reason: str = ""


ALLOWED = Verdict()


def judge(conn: Connection, config: Settings, action: str, target: TargetRef, dry_run: bool) -> Verdict:
    if target.kind == "human":
        return ALLOWED
    if target.namespace is not None and target.namespace not in config.remediation_allowed_namespaces:
        allowed = ", ".join(config.remediation_allowed_namespaces) or "none"
        return Verdict("namespace_allow_list", f"namespace {target.namespace} is not in REMEDIATION_ALLOWED_NAMESPACES ({allowed})")
    if target.kind == "node" and not config.remediation_allow_node_actions:
        return Verdict("node_actions_disabled", "node actions need REMEDIATION_ALLOW_NODE_ACTIONS=true")
    pattern = denied(target, config.remediation_denied_targets)
    if pattern:
        return Verdict("denied_target", f"{target} matches REMEDIATION_DENIED_TARGETS pattern {pattern}")
    if config.remediation_cooldown_seconds > 0:
        last = conn.execute(
            sa.text(
                "SELECT started_at FROM remediation_runs WHERE action = :a AND target = :t AND NOT dry_run "
                f"AND blocked_by IS NULL AND started_at > {UTC_NOW} - make_interval(secs => :s) "
                "ORDER BY started_at DESC LIMIT 1"
            ),
            {"a": action, "t": str(target), "s": config.remediation_cooldown_seconds},
        ).scalar()
        if last is not None:
            return Verdict("cooldown", f"{action} ran on {target} at {last.isoformat()}Z, within the {config.remediation_cooldown_seconds}s cooldown")
    if not dry_run:
        count = conn.execute(
            sa.text(f"SELECT count(*) FROM remediation_runs WHERE NOT dry_run AND blocked_by IS NULL AND started_at > {UTC_NOW} - interval '1 hour'")
        ).scalar_one()
        if count >= config.remediation_max_actions_per_hour:
            return Verdict("hourly_cap", f"{count} live actions in the last hour reached REMEDIATION_MAX_ACTIONS_PER_HOUR ({config.remediation_max_actions_per_hour})")
    return ALLOWED


def judge_and_record(conn: Connection, config: Settings, incident_id: str, action: str, target: TargetRef, dry_run: bool) -> tuple[Verdict, int]:
    """Judge the action and record the attempt in one locked step."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
    verdict = judge(conn, config, action, target, dry_run)
    run_id = conn.execute(
        sa.text(
            "INSERT INTO remediation_runs (incident_id, action, target, dry_run, blocked_by, details) "
            "VALUES (:i, :a, :t, :d, :b, CAST(:details AS jsonb)) RETURNING id"
        ),
        {"i": incident_id, "a": action, "t": str(target), "d": dry_run, "b": verdict.blocked_by,
         "details": json.dumps({"reason": verdict.reason} if verdict.blocked_by else {})},
    ).scalar_one()
    return verdict, run_id


def finish(conn: Connection, run_id: int, success: bool) -> None:
    conn.execute(sa.text("UPDATE remediation_runs SET success = :s WHERE id = :id"), {"s": success, "id": run_id})
