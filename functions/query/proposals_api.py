"""Remediation proposals over the API: list them, approve or reject one
(the actor recorded, an approver list applied to verified identities only,
each decision taken once).

The decision and its audit entries commit before the answer: a refused
approver (403) and an expiry found by a late approval (409) stay on the
incident's timeline."""

from __future__ import annotations

import re

from flask import Request

from functions.query.api import check_parameters

from shared import db, incidents, proposals
from shared.config import Settings
from shared.errors import BadRequest, Conflict, Forbidden, NotFound
from shared.http import has_body, parse_json_body, parse_uuid, verified_user
from shared.publisher import Publisher

HASH = re.compile(r"[0-9a-f]{64}")


def decide(config: Settings, publisher: Publisher, incident_id: str, proposal_id: str, approve: bool,
           actor: str, expected_hash: str | None, verified: bool = False) -> dict:
    """Shared by the API and the board: raises the typed error of a refusal
    after its audit entry is committed. ``verified``: the actor was proven by
    a personal token (the API's bearer, or the board session's sign-in)."""
    with db.transaction() as conn:
        if incidents.get_incident(conn, incident_id) is None:
            raise NotFound(f"incident {incident_id} not found")
        decision = proposals.decide(conn, incident_id, proposal_id, approve, actor, config.remediation_approvers,
                                    expected_hash, config.event_source, verified)
    if decision.refusal == "not_found":
        raise NotFound(decision.message)
    if decision.refusal == "forbidden":
        raise Forbidden(decision.message, actor=actor)
    if decision.refusal == "conflict":
        raise Conflict(decision.message, proposal_status=decision.proposal["status"])
    if decision.refusal == "changed":
        raise Conflict(decision.message, proposal_status=decision.proposal["status"], hash=decision.proposal["hash"])
    publisher.submit(list(decision.event_ids))
    return proposals.present(decision.proposal)


class ProposalsApi:
    def __init__(self, config: Settings, publisher: Publisher, actor):
        self.config = config
        self.publisher = publisher
        self.actor = actor

    def list(self, request: Request, incident_id: str) -> dict:
        incident_id = parse_uuid(incident_id, "id")
        check_parameters(request.args, ())
        with db.engine().connect() as conn:
            incident = incidents.require_incident(conn, incident_id)
            rows = proposals.of_incident(conn, incident_id)
        return {"items": [proposals.present(r, incident["generation"], incident.get("root_generation") or 0, incident["status"])
                          for r in rows]}

    def get(self, request: Request, incident_id: str, proposal_id: str) -> dict:
        incident_id, proposal_id = parse_uuid(incident_id, "id"), parse_uuid(proposal_id, "proposal_id")
        check_parameters(request.args, ())
        with db.engine().connect() as conn:
            incident = incidents.require_incident(conn, incident_id)
            row = proposals.get(conn, incident_id, proposal_id)
        if row is None:
            raise NotFound(f"incident {incident_id} has no proposal {proposal_id}")
        return proposals.present(row, incident["generation"], incident.get("root_generation") or 0, incident["status"])

    def approve(self, request: Request, incident_id: str, proposal_id: str) -> dict:
        return self._decide(request, incident_id, proposal_id, True)

    def reject(self, request: Request, incident_id: str, proposal_id: str) -> dict:
        return self._decide(request, incident_id, proposal_id, False)

    def _decide(self, request: Request, incident_id: str, proposal_id: str, approve: bool) -> dict:
        incident_id, proposal_id = parse_uuid(incident_id, "id"), parse_uuid(proposal_id, "proposal_id")
        check_parameters(request.args, ())
        expected = None
        body = parse_json_body(request, 4096, allow_empty=True) if has_body(request) else None
        if body is not None:
            if not isinstance(body, dict):
                raise BadRequest('the body must be a JSON object like {"hash": "..."} (or empty)')
            unknown = sorted(set(body) - {"hash"})
            if unknown:
                raise BadRequest(f"unknown field {unknown[0][:60]!r}; allowed: hash", field=unknown[0][:60])
            expected = body.get("hash")
            if expected is not None and (not isinstance(expected, str) or not HASH.fullmatch(expected)):
                raise BadRequest("hash: must be the proposal's 64 hex digit hash", field="hash")
        return decide(self.config, self.publisher, incident_id, proposal_id, approve, self.actor(request), expected,
                      verified=verified_user(request) is not None)
