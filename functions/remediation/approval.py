"""Remediation that waits for a human: a proposal (the rendered actions and
their dry-run preview) instead of acting, and the execution of an approved
proposal, once, when ``incident.remediation_approved`` arrives.

A mixin of ``RemediationHandler``: it runs the steps, records and replies
the same way as the playbook's own run."""

from __future__ import annotations

import logging

from cloudevents.http import CloudEvent
from flask import Response
from pydantic import ValidationError

from functions.remediation import playbooks as pb
from functions.remediation import rails
from functions.remediation.actions import REGISTRY, ActionContext, ActionFailed, BlastRadiusExceeded, NotConfigured
from functions.remediation.result import Result, now_rfc3339, proposal_url, resolve_if_remediated, template_context
from shared import claims, db, eventio, incidents, proposals
from shared.errors import Conflict
from shared.http import parse_uuid
from shared.templating import TemplateError

log = logging.getLogger("remediation")


class ApprovalFlow:
    """Uses the handler's ``config``, ``playbooks``, ``publisher``,
    ``claim_stale_seconds``, ``_execute``, ``_record`` and ``_reply``."""

    def _propose(self, incident: dict, playbook: pb.Playbook) -> Result:
        """Render every action, preview it in dry-run (the blast radius and the
        current state are read now), and record the proposal."""
        context = template_context(incident)
        planned, preview, records = [], [], []
        for step in playbook.steps:
            spec = REGISTRY[step.action]
            record = {"action": step.action, "target": None, "from": None, "to": None, "timestamp": now_rfc3339(),
                      "success": False, "dry_run": True, "error": None}
            try:
                params = spec.params.model_validate(pb.render_params(step.params, context))
            except (TemplateError, ValidationError) as exc:
                record["error"] = f"parameters: {str(exc) if isinstance(exc, TemplateError) else exc.errors()[0]['msg']}"
                self._record(incident["id"], record, None)
                return Result("failed", record["error"], records + [record], playbook.name)
            target = spec.target(params)
            record.update(target=target.name, **({"namespace": target.namespace} if target.namespace else {}))
            with db.engine().connect() as conn:
                verdict = rails.judge(conn, self.config, step.action, target, False)
            ctx = ActionContext(self.config, incident, True, self.config.remediation_verify_timeout_seconds)
            try:
                outcome = spec.run(ctx, params)
                record.update({"target": outcome.target, "from": outcome.before, "to": outcome.after, "success": True, **outcome.details})
            except BlastRadiusExceeded as exc:
                record.update(error=f"blocked by blast_radius: {exc}", blocked_by="blast_radius")
            except NotConfigured as exc:
                record.update(success=True, note=f"{exc}: would run with {params.model_dump()}")
            except ActionFailed as exc:
                record["error"] = str(exc)
            if verdict.blocked_by:
                record["rails_now"] = f"blocked by {verdict.blocked_by}: {verdict.reason} (judged again when approved)"
            if not record["success"]:
                # A proposal that cannot work is not worth a human's approval.
                self._record(incident["id"], record, None)
                return Result("failed", record["error"], records + [record], playbook.name)
            records.append(record)
            planned.append({"action": step.action, "target": str(target), "params": params.model_dump(mode="json")})
            preview.append(record)
        with db.transaction() as conn:
            proposal = proposals.create(conn, incident, playbook.name, planned, preview, self.config.remediation_approval_ttl_seconds)
        url = proposal_url(self.config, incident["id"], proposal["id"])
        summary = "; ".join(f"{a['action']} {a['target']}" for a in planned)
        reason = f"awaiting approval: {summary}. Approve or reject proposal {proposal['id']} at {url}"
        if proposal["status"] != "pending":
            # Planned for a generation the incident left meanwhile.
            reason = f"not proposed: {summary}; proposal {proposal['id']} is {proposal['status']} ({proposal['reason']})"
        log.info("Remediation proposed", extra={"incident_id": incident["id"], "proposal_id": proposal["id"], "playbook": playbook.name})
        return Result("failed", reason, [], playbook.name,
                      proposal={"id": proposal["id"], "hash": proposal["hash"], "url": url, "status": proposal["status"],
                                "expires_at": proposals.present(proposal)["expires_at"]})

    def handle_approved(self, event: CloudEvent) -> Response:
        incident_id = eventio.incident_id_of(event)
        data = event.get_data() if isinstance(event.get_data(), dict) else {}
        proposal_id = parse_uuid(data.get("proposal_id"), "data.proposal_id", detail="field")
        # The root the approval was given at: the event is made in the
        # decision's transaction, under the incident's lock, and a pending
        # proposal is always of the incident's root then (a take-over
        # supersedes the pending ones: shared.proposals.supersede_on_root_change).
        approved_root = eventio.root_generation_of(event)
        with db.transaction() as conn:
            incident = incidents.get_incident(conn, incident_id)
            if incident is not None:
                # A generation or root the incident never had (forged, or
                # from another database) is 400 before the proposal is
                # claimed: it must not end a real approval as "not executed".
                # An earlier one is judged below, as the proposal's outcome.
                claims.judge_event(incident, eventio.generation_of(event), approved_root)
            proposal = proposals.claim_execution(conn, incident_id, proposal_id, self.claim_stale_seconds)
            current = proposal or proposals.get(conn, incident_id, proposal_id)
        if current is None:
            log.warning("Approval names no proposal", extra={"incident_id": incident_id, "proposal_id": proposal_id})
            return eventio.ack()
        if proposal is None:
            return self._replay_approved(current)
        log.info("Executing approved remediation", extra={"incident_id": incident_id, "proposal_id": proposal_id})
        try:
            result = self._run_approved(proposal, approved_root)
            event_ids, root_generation = self._finish_approved(proposal, result, approved_root)
        except Exception as exc:
            # Some actions may have run: executing again could act twice. The
            # run becomes a recorded failure, which escalation pages on and a
            # redelivery replays. If even that cannot be written (the database
            # is gone), the 5xx leaves the proposal executing, to be taken over
            # after the playbook's worst case.
            log.exception("Approved remediation crashed", extra={"incident_id": incident_id, "proposal_id": proposal_id})
            result = Result("failed", f"remediation crashed while executing ({type(exc).__name__}); the actions it ran are on the "
                                      "timeline; a human must check the target",
                            playbook=proposal["playbook"], proposal=approved_summary(proposal), crashed=True)
            event_ids, root_generation = self._finish_approved(proposal, result, approved_root)
        self.publisher.submit(event_ids)
        return self._reply(incident_id, result, self._approved_event_id(proposal, result), root_generation, proposal["generation"])

    def _run_approved(self, proposal: dict, approved_root: int) -> Result:
        with db.engine().connect() as conn:
            incident = incidents.require_incident(conn, proposal["incident_id"])
        approved = approved_summary(proposal)
        if incident["status"] not in ("open", "investigating") or incident["generation"] != proposal["generation"]:
            return Result("failed", f"not executed: the incident is {incident['status']} (generation {incident['generation']}) "
                                    f"since the proposal (generation {proposal['generation']})", playbook=proposal["playbook"], proposal=approved)
        if (incident.get("root_generation") or 0) != approved_root:
            # Planned on the old root's diagnosis; remediation acts only on
            # the current root's, which brings its own proposal or run.
            return Result("failed", f"not executed: another alert took over as the incident's root (root generation "
                                    f"{incident.get('root_generation') or 0}) since the approval (root generation {approved_root})",
                          playbook=proposal["playbook"], proposal=approved)
        stale = proposals.stale_reason(proposal, incident["generation"], incident.get("root_generation") or 0)
        if stale:
            # Approved by a replica of the previous release, which judged no
            # root: a proposal of another root (or of none, after a
            # take-over) is not run under this one.
            return Result("failed", f"not executed: {stale}", playbook=proposal["playbook"], proposal=approved)
        playbook = next((p for p in self.playbooks if p.name == proposal["playbook"]), None)
        if playbook is None:
            return Result("failed", f"not executed: playbook {proposal['playbook']} is no longer loaded", proposal=approved)
        current = self._planned(incident, playbook)
        if current is None or proposals.fingerprint(incident["id"], current) != proposal["hash"]:
            # The approval was for other parameters: it does not carry over.
            fresh = self._propose(incident, playbook)
            fresh.reason = "not executed: the actions or parameters changed since the approval; " + fresh.reason
            return fresh
        result = self._execute(incident, playbook, dry_run=False)
        result.proposal = approved
        return result

    def _planned(self, incident: dict, playbook: pb.Playbook) -> list[dict] | None:
        context = template_context(incident)
        planned = []
        for step in playbook.steps:
            spec = REGISTRY[step.action]
            try:
                params = spec.params.model_validate(pb.render_params(step.params, context))
            except (TemplateError, ValidationError):
                return None
            planned.append({"action": step.action, "target": str(spec.target(params)), "params": params.model_dump(mode="json")})
        return planned

    def _finish_approved(self, proposal: dict, result: Result, approved_root: int) -> tuple[list[str], int]:
        """The events to publish, and the root generation the outcome is of.
        The outcome is of the proposal's generation and of the root the
        approval was given at: one the incident has left since (it was
        reopened) is recorded and replied as that generation's, stale to
        escalation, not told as the current one's; a root another alert
        took over from is told under that root's claims, not the new one's."""
        root_generation = approved_root
        with db.transaction() as conn:
            # The incident before the proposal, as every writer of proposals
            # locks them (shared.proposals.lock_incident), in the mode
            # resolve_if_remediated takes right after.
            proposals.lock_incident(conn, proposal["incident_id"], for_update=True)
            event_ids = resolve_if_remediated(conn, proposal["incident_id"], result, self.config.event_source, proposal["generation"],
                                              root_generation)
            executed = bool(result.actions) and all(r["success"] for r in result.actions if not r.get("revert"))
            proposals.finish(conn, proposal["id"], executed and result.outcome == "remediated", result.reason)
            incidents.add_timeline(conn, proposal["incident_id"], "remediation_result", {
                **result.as_dict(), "generation": proposal["generation"], "root_generation": root_generation,
                "approved_proposal": proposal["id"]}, "remediation")
        return event_ids, root_generation

    def _approved_event_id(self, proposal: dict, result: Result) -> str:
        transition = "remediated" if result.outcome == "remediated" else "remediation_failed"
        return f"{proposal['incident_id']}.{transition}.{proposal['generation']}.{proposal['id']}"

    def _replay_approved(self, proposal: dict) -> Response:
        if proposal["status"] in ("pending", "rejected", "expired", "superseded"):
            log.warning("Approval event for a proposal that is not approved", extra={
                "incident_id": proposal["incident_id"], "proposal_id": proposal["id"], "status": proposal["status"]})
            return eventio.ack()
        with db.engine().connect() as conn:
            entries = [t for t in incidents.get_timeline(conn, proposal["incident_id"])
                       if t["kind"] == "remediation_result" and t["details"].get("approved_proposal") == proposal["id"]]
        if not entries:
            raise Conflict(f"proposal {proposal['id']} is {proposal['status']}; its result is not recorded yet; retry")
        d = entries[-1]["details"]
        result = Result(d["outcome"], d["reason"], d["actions"], d.get("playbook"), d.get("proposal"), d.get("verification"),
                        crashed=bool(d.get("crashed")))
        return self._reply(proposal["incident_id"], result, self._approved_event_id(proposal, result), d.get("root_generation") or 0,
                           proposal["generation"])


def approved_summary(proposal: dict) -> dict:
    """How a result names the approved proposal it ran."""
    return {"id": proposal["id"], "hash": proposal["hash"], "approved_by": proposal["decided_by"]}
