"""``incident.diagnosed`` in, the playbook run once, ``incident.remediated``
or ``incident.remediation_failed`` out. Every action is committed as it
finishes, so a crash mid-playbook leaves an honest record.

A playbook that needs approval records a proposal instead (its actions,
rendered, with a dry-run preview) and replies ``remediation_failed`` saying
so, which tells the humans; ``incident.remediation_approved`` then executes
the proposal once, with the rails judged again. After live actions the
result is verified against Prometheus; not verified, what can be undone is
undone and a human is told."""

from __future__ import annotations

import logging

from cloudevents.http import CloudEvent
from flask import Response
from pydantic import ValidationError
import sqlalchemy as sa

from functions.remediation import actions as act
from functions.remediation import playbooks as pb
from functions.remediation import rails
from functions.remediation.actions import REGISTRY, ActionContext, ActionFailed, BlastRadiusExceeded, NotConfigured
from functions.diagnostics.handler import diagnosed_root_generation
from functions.remediation.approval import ApprovalFlow
from functions.remediation.result import Result, now_rfc3339, resolve_if_remediated, template_context
from functions.remediation.verify import Verifier
from shared import claims, db, diagnosis, events, eventio, incidents
from shared import remediation_runs as runs
from shared.config import Settings
from shared.errors import Conflict
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
    # Verification waits its window, then a revert may undo every step.
    window = max([config.remediation_verify_window_seconds] + [p.verify.within_seconds for p in playbooks
                                                                if p.verify and p.verify.within_seconds])
    return 2 * longest * per_step + window + 2 * config.db_timeout_seconds


def _revertible(record: dict) -> bool:
    """Live, successful, and changed something that has a recorded before."""
    if record.get("revert") or record.get("dry_run") or not record.get("success") or record.get("from") == record.get("to"):
        return False
    if record["action"] == "scale_deployment":
        return isinstance(record.get("from"), int) and record.get("from", 0) >= 1
    return record["action"] == "rollback_deployment" and isinstance((record.get("revision") or {}).get("from"), int)


class RemediationHandler(ApprovalFlow):
    def __init__(self, config: Settings, playbooks: list[pb.Playbook], publisher: Publisher):
        self.config = config
        self.playbooks = playbooks
        self.publisher = publisher
        self.claim_stale_seconds = claim_stale_seconds(config, playbooks)
        self.verifier = Verifier(config)

    def handle(self, event: CloudEvent) -> Response:
        if event["type"] == events.INCIDENT_REMEDIATION_APPROVED:
            return self.handle_approved(event)
        incident_id = eventio.incident_id_of(event)
        generation, root_generation = eventio.generation_of(event), eventio.root_generation_of(event)
        with db.transaction() as conn:
            step = claims.begin_step(conn, "remediation", incident_id, self.claim_stale_seconds, generation, root_generation)
            # The playbook acts on this generation's diagnosis only: a
            # generation reopened by a person is never diagnosed, and the
            # diagnosis stored is the previous generation's.
            undiagnosed = step.state == "run" and not claims.diagnosed(conn, step.incident)
            if undiagnosed:
                claims.release(conn, step.key)
        if step.state == "stale":
            # A late diagnosis of a generation the incident has left.
            log.info("Remediation skipped: stale event", extra={"incident_id": incident_id, "reason": step.reason})
            return eventio.ack()
        if undiagnosed:
            log.info("Remediation skipped: the incident's generation was not diagnosed", extra={
                "incident_id": incident_id, "generation": step.incident["generation"]})
            return eventio.ack()
        if step.state == "skip":
            # Remediating after the alert resolved is how peers deleted healthy pods.
            status = step.incident["status"] if step.incident else "missing"
            log.info("Remediation skipped: incident is %s" % status, extra={"incident_id": incident_id})
            return eventio.ack()
        if step.state == "replay":
            # A redelivery (the first reply may have been lost): same answer.
            return self._replay(step.incident)
        incident, key = step.incident, step.key
        diagnosed = diagnosed_root_generation(incident.get("diagnostics") or {}, incident)
        if diagnosed != (incident.get("root_generation") or 0):
            # The diagnosis is of a root another alert has since taken over
            # from (the old root's incident.diagnosed arriving late): the
            # new root's diagnosis follows, and remediation acts on that one.
            with db.transaction() as conn:
                claims.release(conn, key)
            log.info("Remediation waits for the new root's diagnosis", extra={
                "incident_id": incident_id, "diagnosed_root_generation": diagnosed, "root_generation": incident.get("root_generation")})
            return eventio.ack()
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
        return self._reply(incident_id, result, root_generation=incident.get("root_generation") or 0, generation=incident["generation"])

    # ------------------------------------------------------------------ the run

    def _run(self, incident: dict) -> Result:
        if self.config.remediation_mode == "off":
            return Result("failed", "REMEDIATION_MODE is off: a human decides")
        playbook = pb.find(self.playbooks, incident["alert_name"], incident.get("labels") or {}, diagnosis.top_cause(incident.get("diagnostics")))
        if playbook is None:
            return Result("failed", f"no playbook matches {incident['alert_name']}")
        dry_run = self.config.remediation_mode == "dry-run"
        if not dry_run and playbook.needs_approval(self.config.remediation_mode):
            return self._propose(incident, playbook)
        return self._execute(incident, playbook, dry_run)

    def _execute(self, incident: dict, playbook: pb.Playbook, dry_run: bool) -> Result:
        context = template_context(incident)
        result = Result("remediated", "", playbook=playbook.name)
        escalation = None
        for step in playbook.steps:
            gone = self._left_behind(incident)
            if gone:
                # Judged once when the run began; a step's rollout can take
                # minutes, and the incident may be resolved, reopened or
                # taken over by another root meanwhile: the steps left are
                # not this run's to take (never act on a resolved alert).
                result.outcome = "failed"
                result.reason = f"stopped before {step.action}: {gone}" + (
                    "; the actions before it are on the timeline" if result.actions else "")
                log.info("Remediation stopped between steps", extra={"incident_id": incident["id"], "reason": gone})
                return result
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
            self._verify(incident, playbook, context, result)
        return result

    def _left_behind(self, incident: dict) -> str | None:
        """Why the run, begun on ``incident``, may take no further step
        (None: it may): the incident is no longer active, or no longer at
        the generation and root the run is for."""
        with db.engine().connect() as conn:
            now = conn.execute(sa.text("SELECT CAST(status AS text) AS status, generation, root_generation FROM incidents "
                                       "WHERE id = :i"), {"i": incident["id"]}).mappings().first()
        if now is None:
            return "the incident is gone"
        if now["status"] not in ("open", "investigating"):
            return f"the incident is {now['status']} since the run began"
        if now["generation"] != incident["generation"]:
            return f"the incident was reopened (generation {now['generation']}) since the run began at generation {incident['generation']}"
        if (now.get("root_generation") or 0) != (incident.get("root_generation") or 0):
            return (f"another alert took over as the incident's root (root generation {now.get('root_generation') or 0}) "
                    f"since the run began at root generation {incident.get('root_generation') or 0}")
        return None

    # ------------------------------------------------------------------ verification and revert

    def _verify(self, incident: dict, playbook: pb.Playbook, context: dict, result: Result) -> None:
        verdict = self.verifier.check(incident, playbook, context)
        if verdict.verified is None and not verdict.reason:
            return  # nothing to ask (no PROMETHEUS_URL, no verify declared): readiness was the check
        result.verification = {"verified": verdict.verified, "reason": verdict.reason, "query": verdict.query}
        with db.transaction() as conn:
            incidents.add_timeline(conn, incident["id"], "remediation_verification", result.verification, "remediation")
        if verdict.verified:
            result.reason = f"every action succeeded; {verdict.reason}"
            return
        result.outcome, result.reason = "failed", verdict.reason
        if verdict.verified is False:
            reverted = [self._revert(incident, record) for record in reversed(result.actions) if _revertible(record)]
            result.actions.extend(reverted)
            done = [f"{r['action']} on {r['target']}" for r in reverted if r["success"]]
            failed = [f"{r['action']} on {r['target']} ({r['error']})" for r in reverted if not r["success"]]
            if done:
                result.reason += "; reverted " + ", ".join(done)
            if failed:
                result.reason += "; could not revert " + ", ".join(failed)

    def _revert(self, incident: dict, record: dict) -> dict:
        """Undo one verified-but-unhelpful action to the state recorded before it."""
        out = {"action": record["action"], "revert": True, "target": record["target"], "namespace": record.get("namespace"),
               "from": record["to"], "to": record["from"], "timestamp": now_rfc3339(), "success": False, "dry_run": False, "error": None}
        ctx = ActionContext(self.config, incident, False, self.config.remediation_verify_timeout_seconds)
        target = act.DeploymentParams(namespace=record["namespace"], name=record["target"])
        with db.transaction() as conn:
            run_id = runs.record(conn, incident["id"], f"revert:{record['action']}", f"{target.namespace}/{target.name}", False, None, "")
        try:
            if record["action"] == "scale_deployment":
                done = act.revert_scale(ctx, target, record["from"])
                out.update({"from": done.before, "to": done.after})
            else:
                revision = record["revision"]["from"]
                done = act.rollback_deployment(ctx, act.RollbackParams(namespace=target.namespace, name=target.name, to_revision=revision))
                out.update({"from": done.before, "to": revision, "revision": done.details.get("revision")})
            out["success"] = True
        except ActionFailed as exc:
            out["error"] = str(exc)
        except Exception as exc:  # a revert bug is a failed revert, recorded
            log.exception("Remediation revert crashed", extra={"incident_id": incident["id"], "action": record["action"]})
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out["timestamp"] = now_rfc3339()
        self._record(incident, out, run_id)
        return out

    def _step(self, incident: dict, step: pb.Step, context: dict, dry_run: bool) -> dict:
        spec = REGISTRY[step.action]
        record = {"action": step.action, "target": None, "from": None, "to": None, "timestamp": now_rfc3339(),
                  "success": False, "dry_run": dry_run, "error": None}
        try:
            params = spec.params.model_validate(pb.render_params(step.params, context))
        except (TemplateError, ValidationError) as exc:
            message = str(exc) if isinstance(exc, TemplateError) else exc.errors()[0]["msg"]
            record["error"] = f"parameters: {message}"
            self._record(incident, record, None)
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
            self._record(incident, record, None)
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
        self._record(incident, record, run_id)
        return record

    def _record(self, incident: dict, record: dict, run_id: int | None) -> None:
        # Stamped with the generation and root the action was taken under
        # (the incident as this run read it): a message about a later round
        # shows that round's actions, not this one's.
        record.update(generation=incident["generation"], root_generation=incident.get("root_generation") or 0)
        incident_id = incident["id"]
        with db.transaction() as conn:
            incidents.append_remediation_action(conn, incident_id, record)
            incidents.add_timeline(conn, incident_id, "remediation_action", record, "remediation")
            if run_id is not None:
                rails.finish(conn, run_id, record["success"], record.get("blocked_by"), record.get("error"))

    def _finish(self, incident: dict, key: str, result: Result) -> list[str]:
        with db.transaction() as conn:
            event_ids = resolve_if_remediated(conn, incident["id"], result, self.config.event_source, incident["generation"],
                                              incident.get("root_generation") or 0)
            incidents.add_timeline(
                conn, incident["id"], "remediation_result",
                {**result.as_dict(), "generation": incident["generation"], "root_generation": incident.get("root_generation") or 0,
                 "root": incident["alert_name"]}, "remediation"
            )
            claims.complete(conn, key)
        return event_ids

    # ------------------------------------------------------------------ replies

    def _replay(self, incident: dict) -> Response:
        with db.engine().connect() as conn:
            entries = [t for t in incidents.get_timeline(conn, incident["id"]) if t["kind"] == "remediation_result"
                       and t["details"].get("generation") == incident["generation"]
                       and (t["details"].get("root_generation") or 0) == (incident.get("root_generation") or 0)]
        if not entries:
            raise Conflict("remediation finished but its result is not recorded yet; retry")
        d = entries[-1]["details"]
        log.info("Remediation already ran; replying again", extra={"incident_id": incident["id"]})
        return self._reply(incident["id"], Result(d["outcome"], d["reason"], d["actions"], d.get("playbook"),
                                                  d.get("proposal"), d.get("verification")), root_generation=d.get("root_generation") or 0,
                           generation=d["generation"])

    def _reply(self, incident_id: str, result: Result, event_id: str | None = None, root_generation: int = 0,
               generation: int = 0) -> Response:
        """The outcome of the generation and root the run acted on (in the
        reply's id and data), whatever the incident is at by now: escalation
        tells it under that root's claims, and a reply a reopen overtook is
        stale to it (nothing told), never a pair of generation and root that
        did not exist together (a 400 no re-drive could deliver)."""
        with db.engine().connect() as conn:
            incident = incidents.require_incident(conn, incident_id)
        incident["generation"], incident["root_generation"] = generation, root_generation
        event_type = events.INCIDENT_REMEDIATED if result.outcome == "remediated" else events.INCIDENT_REMEDIATION_FAILED
        return eventio.reply(event_type, incident, self.config.event_source, {"remediation": result.as_dict()},
                             event_id or events.step_event_id(event_type, incident))
