"""``incident.diagnosed`` in, the playbook run once, ``incident.remediated``
or ``incident.remediation_failed`` out. Every action is committed as it
finishes, so a crash mid-playbook leaves an honest record."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cloudevents.http import CloudEvent
from flask import Response
from pydantic import ValidationError

from functions.remediation import playbooks as pb
from functions.remediation import rails
from functions.remediation.actions import REGISTRY, ActionContext, ActionFailed, BlastRadiusExceeded, NotConfigured
from shared import claims, db, events, eventio, incidents
from shared.config import Settings
from shared.domain import service_of
from shared.errors import Conflict, InvalidTransition
from shared.publisher import Publisher
from shared.templating import TemplateError

log = logging.getLogger("remediation")
# Kubernetes calls one action makes besides its verification (read, patch, re-read).
CALLS_PER_ACTION = 3


def claim_stale_seconds(config: Settings, playbooks: list[pb.Playbook]) -> float:
    """How long a remediation claim protects a run: the worst case of the
    longest playbook (every step's calls at their timeout, then its
    verification), plus the database writes. A claim whose holder died is
    taken over after that, not after a fixed half hour that outlives every
    Broker retry and every reconciliation attempt."""
    longest = max((len(p.steps) for p in playbooks), default=1)
    per_step = config.remediation_verify_timeout_seconds + CALLS_PER_ACTION * config.probe_timeout_seconds
    return longest * per_step + 2 * config.db_timeout_seconds


@dataclass
class Result:
    outcome: str  # remediated | failed
    reason: str
    actions: list[dict] = field(default_factory=list)
    playbook: str | None = None

    def as_dict(self) -> dict:
        return {"outcome": self.outcome, "reason": self.reason, "actions": self.actions, "playbook": self.playbook}


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


class RemediationHandler:
    def __init__(self, config: Settings, playbooks: list[pb.Playbook], publisher: Publisher):
        self.config = config
        self.playbooks = playbooks
        self.publisher = publisher
        self.claim_stale_seconds = claim_stale_seconds(config, playbooks)

    def handle(self, event: CloudEvent) -> Response:
        incident_id = eventio.incident_id_of(event)
        with db.transaction() as conn:
            step = claims.begin_step(conn, "remediation", incident_id, self.claim_stale_seconds)
        if step.state == "skip":
            # Remediating after the alert resolved is how peers deleted healthy pods.
            status = step.incident["status"] if step.incident else "missing"
            log.info("Remediation skipped: incident is %s" % status, extra={"incident_id": incident_id})
            return eventio.ack()
        if step.state == "replay":
            # A redelivery (the first reply may have been lost): same answer.
            return self._replay(step.incident)
        incident, key = step.incident, step.key
        log.info("Running remediation", extra={"incident_id": incident_id, "alert_name": incident["alert_name"], "mode": self.config.remediation_mode})
        try:
            result = self._run(incident)
            event_ids = self._finish(incident, key, result)
        except Exception:
            with db.transaction() as conn:
                claims.release(conn, key)
            raise
        self.publisher.submit(event_ids)
        log.info("Remediation finished", extra={"incident_id": incident_id, "outcome": result.outcome, "reason": result.reason})
        return self._reply(incident_id, result)

    # ------------------------------------------------------------------ the run

    def _run(self, incident: dict) -> Result:
        if self.config.remediation_mode == "off":
            return Result("failed", "REMEDIATION_MODE is off: a human decides")
        playbook = pb.find(self.playbooks, incident["alert_name"], incident.get("labels") or {})
        if playbook is None:
            return Result("failed", f"no playbook matches {incident['alert_name']}")
        dry_run = self.config.remediation_mode == "dry-run"
        context = template_context(incident)
        result = Result("remediated", "", playbook=playbook.name)
        escalation = None
        for step in playbook.steps:
            record = self._step(incident, step, context, dry_run)
            result.actions.append(record)
            if record.get("escalate"):
                escalation = record.get("reason")
            if not record["success"]:
                result.outcome = "failed"
                result.reason = record["error"]
                return result
        if escalation:
            result.outcome, result.reason = "failed", f"the playbook hands this to a human: {escalation}"
        elif dry_run:
            result.outcome, result.reason = "failed", "dry-run: nothing was changed, a human must act"
        else:
            result.reason = "every action succeeded and was verified"
        return result

    def _step(self, incident: dict, step: pb.Step, context: dict, dry_run: bool) -> dict:
        spec = REGISTRY[step.action]
        record = {"action": step.action, "target": None, "from": None, "to": None, "timestamp": now_rfc3339(),
                  "success": False, "dry_run": dry_run, "error": None}
        try:
            params = spec.params.model_validate(pb.render_params(step.params, context))
        except (TemplateError, ValidationError) as exc:
            message = str(exc) if isinstance(exc, TemplateError) else exc.errors()[0]["msg"]
            record["error"] = f"parameters: {message}"
            self._record(incident["id"], record, None)
            return record
        target = spec.target(params)
        # The seed's shape names the workload ("email-service"); the namespace
        # goes beside it.
        record["target"] = target.name
        if target.namespace:
            record["namespace"] = target.namespace
        with db.transaction() as conn:
            verdict, run_id = rails.judge_and_record(conn, self.config, incident["id"], step.action, target, dry_run)
        if verdict.blocked_by:
            record.update(error=f"blocked by {verdict.blocked_by}: {verdict.reason}", blocked_by=verdict.blocked_by)
            self._record(incident["id"], record, None)
            log.warning("Remediation action blocked", extra={"incident_id": incident["id"], "action": step.action, "target": str(target), "rail": verdict.blocked_by})
            return record
        ctx = ActionContext(self.config, incident, dry_run, self.config.remediation_verify_timeout_seconds)
        try:
            outcome = spec.run(ctx, params)
            record.update({"target": outcome.target, "from": outcome.before, "to": outcome.after, "success": True})
            record.update(outcome.details)
        except BlastRadiusExceeded as exc:
            record.update(error=f"blocked by blast_radius: {exc}", blocked_by="blast_radius")
            log.warning("Remediation action blocked", extra={"incident_id": incident["id"], "action": step.action, "target": str(target), "rail": "blast_radius"})
        except NotConfigured as exc:
            if dry_run:
                # Nothing to read the current state from, but the intent is
                # still worth recording: this is what live mode would try.
                record.update(success=True, note=f"{exc}: would run with {params.model_dump()}")
            else:
                record["error"] = str(exc)
        except ActionFailed as exc:
            record["error"] = str(exc)
        except Exception as exc:  # an action bug is a failed action, recorded
            log.exception("Remediation action crashed", extra={"incident_id": incident["id"], "action": step.action})
            record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        record["timestamp"] = now_rfc3339()
        self._record(incident["id"], record, run_id)
        return record

    def _record(self, incident_id: str, record: dict, run_id: int | None) -> None:
        with db.transaction() as conn:
            incidents.append_remediation_action(conn, incident_id, record)
            incidents.add_timeline(conn, incident_id, "remediation_action", record, "remediation")
            if run_id is not None:
                rails.finish(conn, run_id, record["success"], record.get("blocked_by"), record.get("error"))

    def _finish(self, incident: dict, key: str, result: Result) -> list[str]:
        event_ids: list[str] = []
        with db.transaction() as conn:
            if result.outcome == "remediated":
                try:
                    _, event_ids = incidents.transition(
                        conn, incident["id"], "resolved", "remediation", self.config.event_source,
                        note=result.reason, resolved_by="remediation",
                    )
                except InvalidTransition:
                    pass  # resolved meanwhile by its alert or a person: nothing to change
            incidents.add_timeline(
                conn, incident["id"], "remediation_result", {**result.as_dict(), "generation": incident["generation"]}, "remediation"
            )
            claims.complete(conn, key)
        return event_ids

    # ------------------------------------------------------------------ replies

    def _replay(self, incident: dict) -> Response:
        with db.engine().connect() as conn:
            entries = [t for t in incidents.get_timeline(conn, incident["id"]) if t["kind"] == "remediation_result"
                       and t["details"].get("generation") == incident["generation"]]
        if not entries:
            raise Conflict("remediation finished but its result is not recorded yet; retry")
        d = entries[-1]["details"]
        log.info("Remediation already ran; replying again", extra={"incident_id": incident["id"]})
        return self._reply(incident["id"], Result(d["outcome"], d["reason"], d["actions"], d.get("playbook")))

    def _reply(self, incident_id: str, result: Result) -> Response:
        with db.engine().connect() as conn:
            incident = incidents.require_incident(conn, incident_id)
        event_type = events.INCIDENT_REMEDIATED if result.outcome == "remediated" else events.INCIDENT_REMEDIATION_FAILED
        return eventio.reply(event_type, incident, self.config.event_source, {"remediation": result.as_dict()})
