"""What one remediation run produces, and what its playbook's placeholders
may name: shared by the playbook run and the approval flow."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import incidents
from shared.config import Settings
from shared.domain import service_of
from shared.errors import InvalidTransition


@dataclass
class Result:
    outcome: str  # remediated | failed
    reason: str
    actions: list[dict] = field(default_factory=list)
    playbook: str | None = None
    proposal: dict | None = None  # awaiting approval, or the approved one that ran
    verification: dict | None = None
    # The run crashed while executing: what it ran is on the timeline, not
    # in ``actions`` (escalation tells an old root's crashed run: it acted).
    crashed: bool = False

    def as_dict(self) -> dict:
        out = {"outcome": self.outcome, "reason": self.reason, "actions": self.actions, "playbook": self.playbook}
        if self.proposal:
            out["proposal"] = self.proposal
        if self.verification:
            out["verification"] = self.verification
        if self.crashed:
            out["crashed"] = True
        return out


def resolve_if_remediated(conn: Connection, incident_id: str, result: Result, event_source: str, generation: int,
                          root_generation: int) -> list[str]:
    """A remediated incident is resolved by remediation, in the caller's
    transaction, if it is still at the ``generation`` and the
    ``root_generation`` the run was for; returns the events to publish. A
    generation reopened during the run (a person thinks the fix did not
    hold, or the alert fired again) is not the run's to resolve, and
    neither is a root another alert took over as during the run: the run
    acted on the old root's diagnosis, and the new root's own diagnosis
    and remediation decide about the incident now."""
    if result.outcome != "remediated":
        return []
    # Locked as the transition locks it: a reopen or a take-over cannot slip in between.
    current = conn.execute(sa.text("SELECT generation, root_generation FROM incidents WHERE id = :i FOR UPDATE"),
                           {"i": incident_id}).first()
    if current is None or (current[0], current[1] or 0) != (generation, root_generation):
        return []
    try:
        _, event_ids = incidents.transition(conn, incident_id, "resolved", "remediation", event_source,
                                            note=result.reason, resolved_by="remediation")
    except InvalidTransition:
        return []  # resolved meanwhile by its alert or a person: nothing to change
    return event_ids


def proposal_url(config: Settings, incident_id: str, proposal_id: str) -> str:
    return f"{config.public_url}/ui/incidents/{incident_id}#proposal-{proposal_id}"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def template_context(incident: dict) -> dict:
    """What playbook placeholders may name; only what this incident has."""
    labels = incident.get("labels") or {}
    target = ((incident.get("diagnostics") or {}).get("target") or {}) if isinstance(incident.get("diagnostics"), dict) else {}
    context = {"labels": labels, "annotations": incident.get("annotations") or {}, "alertname": incident["alert_name"]}
    candidates = {
        "namespace": labels.get("namespace") or target.get("namespace"),
        "service": service_of(labels) or target.get("service"),
        "deployment": labels.get("deployment") or target.get("deployment"),
        "pod": labels.get("pod") or target.get("pod"),
        "node": labels.get("node") or (labels.get("instance", "").rsplit(":", 1)[0] or None),
    }
    context.update({k: v for k, v in candidates.items() if v})
    return context
