"""Safety rails, judged before every action and kept in the database (the
function scales to zero and runs as many replicas, so memory would forget):
namespace allow-list, denied targets, node actions opt-in, a cooldown per
target and a cap on live actions per hour. The replica ceiling is applied by
``scale_deployment`` itself. A global advisory lock serialises the check and
the record, so two incidents cannot both pass a cooldown for one target."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Connection

from functions.remediation.actions import TargetRef, denied
from shared import remediation_runs as runs
from shared.config import Settings


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
        last = runs.last_live_run(conn, action, str(target), config.remediation_cooldown_seconds)
        if last is not None:
            return Verdict("cooldown", f"{action} ran on {target} at {last.isoformat()}Z, within the {config.remediation_cooldown_seconds}s cooldown")
    if not dry_run:
        count = runs.live_runs_last_hour(conn)
        if count >= config.remediation_max_actions_per_hour:
            return Verdict("hourly_cap", f"{count} live actions in the last hour reached REMEDIATION_MAX_ACTIONS_PER_HOUR ({config.remediation_max_actions_per_hour})")
    return ALLOWED


def judge_and_record(conn: Connection, config: Settings, incident_id: str, action: str, target: TargetRef, dry_run: bool) -> tuple[Verdict, int]:
    """Judge the action and record the attempt in one locked step."""
    runs.lock(conn)
    verdict = judge(conn, config, action, target, dry_run)
    return verdict, runs.record(conn, incident_id, action, str(target), dry_run, verdict.blocked_by, verdict.reason)


finish = runs.finish
