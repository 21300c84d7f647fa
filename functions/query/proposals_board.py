"""The board's approve and reject buttons for a remediation proposal
(CSRF-protected like every form of the board). The decision is the API's:
same approver list (a verified identity: a session signed in with a
personal token), same single use, same hash binding (the form carries the
hash the engineer saw)."""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Request, Response

from functions.query.board import Board
from functions.query.proposals_api import decide
from shared.errors import ApiError, BadRequest
from shared.http import parse_uuid


class ProposalsBoard:
    def __init__(self, board: Board):
        self.board = board

    def approve(self, request: Request, incident_id: str, proposal_id: str) -> Response:
        return self._decide(request, incident_id, proposal_id, True)

    def reject(self, request: Request, incident_id: str, proposal_id: str) -> Response:
        return self._decide(request, incident_id, proposal_id, False)

    def _decide(self, request: Request, incident_id: str, proposal_id: str, approve: bool) -> Response:
        session = self.board.form_session(request)
        if isinstance(session, Response):
            return session
        try:
            incident_id, proposal_id = parse_uuid(incident_id, "id"), parse_uuid(proposal_id, "proposal_id")
            actor = self.board.form_actor(request)
            expected = request.form.get("hash") or None
            if expected is not None and len(expected) != 64:
                raise BadRequest("hash: must be the proposal's 64 hex digit hash")
            proposal = decide(self.board.config, self.board.publisher, incident_id, proposal_id, approve, actor, expected,
                              verified=self.board.verified_user(request) is not None)
        except ApiError as exc:
            if exc.status >= 500:
                raise
            return self._back(incident_id, proposal_id, error=exc.message)
        verb = "approved: remediation runs it now" if approve else "rejected"
        return self._back(incident_id, proposal["id"], notice=f"Proposal {proposal['id']} {verb}.")

    def _back(self, incident_id: str, proposal_id: str, **message) -> Response:
        return self.board._redirect(f"/ui/incidents/{incident_id}?{urlencode(message)}#proposal-{proposal_id}")
