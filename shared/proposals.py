"""Remediation proposals: the exact actions a playbook would run, waiting
for a human to approve or reject them.

An approval is single-use and bound to the proposal's hash of (incident,
actions, targets, parameters): its status moves once, under a row lock, so
a hundred concurrent approvals produce one ``incident.remediation_approved``
event and one execution. Data functions take the caller's connection, so a
decision, its timeline entry and its event commit together."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import events, outbox
from shared.domain import ACTIVE_STATUSES
from shared.incident_queries import get_incident
from shared.sqltext import compact
from shared.timeline import add_timeline, insert_timeline_and_events, timeline_row

UTC_NOW = "timezone('utc', now())"
INCIDENT_REMEDIATION_APPROVED = events.INCIDENT_REMEDIATION_APPROVED
COLUMNS = ("id", "incident_id", "generation", "root_generation", "playbook", "actions", "preview", "hash", "status",
           "created_at", "expires_at", "decided_by", "decided_at", "started_at", "finished_at", "reason")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM remediation_proposals"


def fingerprint(incident_id: str, actions: list[dict]) -> str:
    """The hash an approval is bound to: the incident and, in order, each
    action's name, target and parameters (canonical JSON)."""
    canonical = json.dumps({"incident": incident_id, "actions": [
        {"action": a["action"], "target": a["target"], "params": a["params"]} for a in actions]},
        sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def lock_incident(conn: Connection, incident_id: str, for_update: bool = False) -> int | None:
    """Lock the incident row and return its generation (None: no such
    incident). Every transaction that writes proposals takes this first,
    then the proposals: a reopen (shared.lifecycle.transition) locks the
    incident, then its pending proposals, and a decision that locked its
    proposal first then waited for the incident (each timeline entry's
    foreign key takes a share lock on it) was a deadlock, lost by the
    reopen. FOR NO KEY UPDATE waits for the transition's FOR UPDATE and for
    every UPDATE of the incident (any reopen's new generation), but not for
    the share locks of other writers' timeline entries. ``for_update``: a
    transaction that may go on to lock the row FOR UPDATE (resolving it)
    takes that mode at once, never raising its own lock later."""
    position = _lock(conn, incident_id, for_update)
    return position[0] if position else None


def _lock(conn: Connection, incident_id: str, for_update: bool = False) -> tuple[int, int, str] | None:
    """lock_incident, returning (generation, root_generation, status)."""
    mode = "FOR UPDATE" if for_update else "FOR NO KEY UPDATE"
    row = conn.execute(sa.text(f"SELECT generation, root_generation, CAST(status AS text) FROM incidents WHERE id = :i {mode}"),
                       {"i": incident_id}).first()
    return (row[0], row[1] or 0, row[2]) if row else None


def create(conn: Connection, incident: dict, playbook: str, actions: list[dict], preview: list[dict], ttl_seconds: int) -> dict:
    """A pending proposal for ``incident["generation"]``; an earlier pending
    one of that generation or of an earlier one is superseded (only the
    newest can be approved). One planned for a generation the incident has
    left since (the incident read before a reopen) is stored superseded and
    supersedes nothing: the current generation's proposal stays pending.
    So is one planned on a root another alert has taken over from since
    (the incident read before the take-over): the take-over superseded the
    pending proposals of the roots before it (:func:`supersede_on_root_change`).
    And so is one planned on an incident resolved since: it is offered to
    nobody (a resolve itself stores nothing: :func:`stale_reason`)."""
    position = _lock(conn, incident["id"])
    current, current_root, status = position if position else (None, 0, None)
    generation, root = incident["generation"], incident.get("root_generation") or 0
    proposal_id = str(uuid.uuid4())
    stale = current is not None and (current > generation or (current == generation and current_root > root)
                                     or status not in ACTIVE_STATUSES)
    why = None
    if stale:
        why = (superseded_reason(generation, current) if current > generation
               else root_changed_reason(current_root, root) if current_root > root else RESOLVED_REASON)
    superseded = [] if stale else conn.execute(sa.text(
        "UPDATE remediation_proposals SET status = 'superseded', finished_at = timezone('utc', now()), "
        "reason = CASE WHEN generation < :g THEN 'the incident was reopened (generation ' || CAST(:g AS text) "
        "|| ') since it was proposed for generation ' || generation ELSE :newer END "
        "WHERE incident_id = :i AND status = 'pending' AND generation <= :g RETURNING id"),
        {"i": incident["id"], "g": generation, "newer": f"replaced by the newer proposal {proposal_id}"}).scalars().all()
    row = conn.execute(sa.text(
        "INSERT INTO remediation_proposals (id, incident_id, generation, root_generation, playbook, actions, preview, hash, "
        "expires_at, status, reason, finished_at) VALUES (:id, :i, :g, :rg, :p, CAST(:a AS jsonb), CAST(:pv AS jsonb), :h, "
        f"{UTC_NOW} + make_interval(secs => :ttl), :s, :r, CASE WHEN CAST(:stale AS boolean) THEN {UTC_NOW} END) "
        f"RETURNING {', '.join(COLUMNS)}"),
        {"id": proposal_id, "i": incident["id"], "g": generation, "rg": root, "p": playbook,
         "a": json.dumps(actions, default=str), "pv": json.dumps(preview, default=str),
         "h": fingerprint(incident["id"], actions), "ttl": ttl_seconds, "s": "superseded" if stale else "pending", "stale": stale,
         "r": why}).mappings().one()
    proposal = dict(row)
    add_timeline(conn, incident["id"], "remediation_proposed", {
        "proposal_id": proposal["id"], "playbook": playbook, "hash": proposal["hash"], "actions": actions,
        "preview": preview, "expires_at": proposal["expires_at"], "superseded": superseded,
        **({"status": "superseded", "reason": proposal["reason"]} if stale else {})}, "remediation")
    return proposal


def get(conn: Connection, incident_id: str, proposal_id: str, lock: bool = False) -> dict | None:
    row = conn.execute(sa.text(f"{_SELECT} WHERE id = :id AND incident_id = :i" + (" FOR UPDATE" if lock else "")),
                       {"id": proposal_id, "i": incident_id}).mappings().first()
    return dict(row) if row else None


def of_incident(conn: Connection, incident_id: str) -> list[dict]:
    rows = conn.execute(sa.text(f"{_SELECT} WHERE incident_id = :i ORDER BY created_at DESC, id"), {"i": incident_id}).mappings()
    return [dict(r) for r in rows]


def bare_name(actor: str) -> str:
    """``user:alice`` (verified), ``api:alice`` and ``board:alice`` (claimed) all name alice."""
    return actor.split(":", 1)[1] if ":" in actor else ""


def approver_refusal(actor: str, verified: bool, approvers: tuple[str, ...]) -> str | None:
    """Why this actor may not decide (None: it may). With no approver list
    anyone with a token decides, as before personal tokens. With one, only a
    verified identity counts: a name in ACTOR_HEADER or the board's free text
    field is the caller's word, and anyone holding the shared token could
    write an approver's name there."""
    if not approvers:
        return None
    name = bare_name(actor)
    if not verified:
        if name in approvers:
            return (f"unverified: {name} is named by the caller, not proven; REMEDIATION_APPROVERS needs {name}'s "
                    "personal token (INCIDENT_API_USERS) or a board session signed in with it")
        return "unverified and not in REMEDIATION_APPROVERS"
    if name not in approvers:
        return "not in REMEDIATION_APPROVERS"
    return None


@dataclass
class Decision:
    proposal: dict | None
    refusal: str | None = None  # not_found | forbidden | conflict | changed
    message: str = ""
    event_ids: tuple[str, ...] = ()


def decide(conn: Connection, incident_id: str, proposal_id: str, approve: bool, actor: str, approvers: tuple[str, ...],
           expected_hash: str | None, source: str, verified: bool = False) -> Decision:
    """Approve or reject a pending proposal, once. A refusal that must be
    remembered (an expiry found now, an approver not allowed) is written
    here and committed by the caller before it answers. ``verified``: the
    actor's name was proven (a personal token), not just claimed.

    The incident is locked before the proposal (lock_incident), and its
    generation, root and status read under that lock: a reopen, a take-over
    or a resolve either committed before (the proposal is refused) or
    waits for this decision (an approval of the generation or root it
    leaves, or of an incident resolved since, which remediation then does
    not execute). A pending proposal that is not of the incident's current
    generation and root is superseded here (:func:`stale_reason`): one left
    pending from before take-overs superseded proposals, or made by a
    replica of the previous release during a rollout. One of an incident
    no longer active is refused as superseded but stays pending: a resolve
    is not final (a flapping alert resolves and fires again, and its
    incident goes on silently at the same generation and root), so the
    proposal is offered again if the incident does."""
    position = _lock(conn, incident_id)
    proposal = get(conn, incident_id, proposal_id, lock=True) if position is not None else None
    if proposal is None:
        return Decision(None, "not_found", f"incident {incident_id} has no proposal {proposal_id}")
    verb = "approve" if approve else "reject"
    refusal = approver_refusal(actor, verified, approvers)
    if refusal is not None:
        add_timeline(conn, incident_id, "remediation_approval_refused", {
            "proposal_id": proposal_id, "decision": verb, "actor": actor, "verified": verified, "reason": refusal}, actor)
        return Decision(proposal, "forbidden", f"{actor} may not {verb} remediation proposals: {refusal}")
    if proposal["status"] == "pending" and _expired(conn, proposal):
        proposal = _set(conn, proposal_id, "expired", reason="approval TTL passed before a decision")
        add_timeline(conn, incident_id, "remediation_proposal_expired", {"proposal_id": proposal_id}, "system")
    if proposal["status"] == "pending":
        reason = stale_reason(proposal, *position)
        if reason == RESOLVED_REASON:
            # Shown superseded while the incident is resolved, as readers
            # show it (present); nothing is stored.
            return Decision({**proposal, "status": "superseded", "reason": reason}, "conflict",
                            f"proposal {proposal_id} is superseded: {reason}; it cannot be {verb}d")
        if reason:
            # Its actions were planned for a generation or a root the
            # incident has left: approved, remediation would only record
            # "not executed".
            proposal = _set(conn, proposal_id, "superseded", reason=reason)
            add_timeline(conn, incident_id, "remediation_proposal_superseded", {"proposal_id": proposal_id, "reason": reason}, "system")
            return Decision(proposal, "conflict", f"proposal {proposal_id} is superseded: {reason}; it cannot be {verb}d")
    if proposal["status"] != "pending":
        return Decision(proposal, "conflict", f"proposal {proposal_id} is {proposal['status']}"
                                              + (f" ({proposal['reason']})" if proposal.get("reason") else "")
                                              + f"; only a pending proposal can be {verb}d")
    if expected_hash is not None and expected_hash != proposal["hash"]:
        return Decision(proposal, "changed", f"proposal {proposal_id} has hash {proposal['hash']}, not {expected_hash}: "
                                              "review the current proposal and approve that")
    status = "approved" if approve else "rejected"
    proposal = _set(conn, proposal_id, status, decided_by=actor)
    add_timeline(conn, incident_id, f"remediation_{status}", {"proposal_id": proposal_id, "hash": proposal["hash"]}, actor)
    if not approve:
        return Decision(proposal)
    incident = get_incident(conn, incident_id)
    event = events.incident_event(INCIDENT_REMEDIATION_APPROVED, incident, source,
                                  {"proposal_id": proposal_id, "hash": proposal["hash"], "approved_by": actor})
    event["id"] = f"{incident_id}.remediation_approved.{proposal_id}"
    outbox.enqueue(conn, [event])
    return Decision(proposal, event_ids=(event["id"],))


RESOLVED_REASON = "the incident resolved before anyone approved"


def superseded_reason(proposed_at: int, generation: int) -> str:
    return f"the incident was reopened (generation {generation}) since it was proposed for generation {proposed_at}"


def root_changed_reason(root_generation: int, proposed_at: int | None) -> str:
    if proposed_at is None:
        return unknown_root_reason(root_generation)
    return (f"another alert took over as the incident's root (root generation {root_generation}) "
            f"since it was proposed for root generation {proposed_at}")


_UNKNOWN_ROOT = ("it names no root (proposed before proposals recorded theirs, or by the previous release) and another alert "
                 "took over as the incident's root (root generation {}): it may be of a root the incident has left")


# The reason above around the incident's root generation, for the SQL that writes it.
_UNKNOWN_ROOT_PARTS = dict(zip(("unknown_head", "unknown_tail"), _UNKNOWN_ROOT.split("{}"), strict=True))


def unknown_root_reason(root_generation: int) -> str:
    return _UNKNOWN_ROOT.format(root_generation)


def stale_reason(proposal: dict, generation: int, root_generation: int, status: str | None = None) -> str | None:
    """Why a pending ``proposal`` may no longer be approved, judged against
    the incident's ``generation``, ``root_generation`` and ``status`` (None:
    it may). A proposal is planned on one generation's diagnosis of one
    root. One with no root (a NULL ``root_generation``: made before
    migration 0028, or by the previous release during a rollout) is of the
    generation's first root while the incident has had no other; once
    another alert took over it may be of any root the generation had, so it
    is stale: approving it could run the old root's actions under the new
    one, and the new root's own proposal costs only a diagnosis. One of an
    incident no longer active is stale while it is: a resolve stores no
    supersede (the flapping alert's resolve is undone silently, at the same
    generation and root, when it fires again), so every reader (a
    decision, the approved run, :func:`present`) judges the status."""
    if proposal["generation"] != generation:
        return superseded_reason(proposal["generation"], generation)
    proposed_root = proposal.get("root_generation")
    if (proposed_root is None and root_generation > 0) or (proposed_root is not None and proposed_root != root_generation):
        return root_changed_reason(root_generation, proposed_root)
    if status is not None and status not in ACTIVE_STATUSES:
        return RESOLVED_REASON
    return None


# Each ends the pending proposals of a batch of incidents in one statement,
# the reason written per proposal from the row it joins; the caller holds
# the incidents' locks (its UPDATE of them came first), so the proposals
# are locked after the incident, as every writer of proposals locks them
# (lock_incident). Incident ids as a JSON array, as the intake passes them.
_ENDED = "RETURNING p.id, p.incident_id, p.reason"
_SUPERSEDE_FROM = (f"UPDATE remediation_proposals p SET status = 'superseded', finished_at = {UTC_NOW}, reason = {{reason}} "
                   "FROM incidents i WHERE p.incident_id = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)))) "
                   "AND i.id = p.incident_id AND p.status = 'pending' AND {which} " + _ENDED)
_REOPENED_REASON = "'the incident was reopened (generation ' || i.generation || ') since it was proposed for generation ' || p.generation"
_SUPERSEDE_REOPENED = sa.text(compact(_SUPERSEDE_FROM.format(reason=_REOPENED_REASON, which="p.generation < i.generation")))
# Judged in stale_reason's order: one of an earlier generation (left pending
# by the previous release's reopen) was reopened past, whatever its root.
_SUPERSEDE_ROOT_CHANGED = sa.text(compact(_SUPERSEDE_FROM.format(
    reason=(f"CASE WHEN p.generation < i.generation THEN {_REOPENED_REASON} "
            "WHEN p.root_generation IS NULL THEN :unknown_head || i.root_generation || :unknown_tail "
            "ELSE 'another alert took over as the incident''s root (root generation ' || i.root_generation "
            "|| ') since it was proposed for root generation ' || p.root_generation END"),
    which="p.generation <= i.generation")))


def supersede_on_reopen(conn: Connection, incident_ids: str | list[str], timeline: list[dict] | None = None) -> list[str]:
    """A reopen (the incident's generation is new) ends the pending
    proposals of the generations before it, in the reopen's transaction:
    the board stops offering them and nobody approves an action planned
    for the generation just left. Every reopen calls it (a person's, the
    intake's after a fix that did not hold, the flapping re-page), after
    its UPDATE of the incident (``incident_ids``: one, or a batch's).
    ``timeline``: a batch's entries (shared.ingest), appended to instead
    of written here, so they follow its ``reopened`` entries."""
    return _supersede(conn, _SUPERSEDE_REOPENED, incident_ids, {}, timeline)


def supersede_on_root_change(conn: Connection, incident_ids: str | list[str], timeline: list[dict] | None = None) -> list[str]:
    """A take-over (another alert became the root: the incident's
    root_generation is new) ends the pending proposals of the generation:
    each was planned on an earlier root's diagnosis (a proposal is made only
    from a diagnosis of the root the incident had then), and remediation
    acts only on the current root's (docs/correlation.md). The new root's
    diagnosis brings its own proposal if its playbook asks for one. Called
    in the take-over's transaction, after its UPDATE of the incident; each
    reason names the root the proposal was planned on. ``timeline`` as in
    supersede_on_reopen."""
    return _supersede(conn, _SUPERSEDE_ROOT_CHANGED, incident_ids, _UNKNOWN_ROOT_PARTS,
                      timeline)


def _supersede(conn: Connection, statement, incident_ids: str | list[str], params: dict, timeline: list[dict] | None) -> list[str]:
    ids = [incident_ids] if isinstance(incident_ids, str) else sorted(set(incident_ids))
    if not ids:
        return []
    ended = sorted(conn.execute(statement, {"ids": json.dumps(ids), **params}).all(), key=lambda r: (r.incident_id, r.id))
    rows = [timeline_row(r.incident_id, "remediation_proposal_superseded", "system", {"proposal_id": r.id, "reason": r.reason})
            for r in ended]
    if timeline is None:
        insert_timeline_and_events(conn, rows, [])
    else:
        timeline.extend(rows)
    return [r.id for r in ended]


def _expired(conn: Connection, proposal: dict) -> bool:
    return bool(conn.execute(sa.text(f"SELECT CAST(:e AS timestamp) <= {UTC_NOW}"), {"e": proposal["expires_at"]}).scalar())


def _set(conn: Connection, proposal_id: str, status: str, decided_by: str | None = None, reason: str | None = None) -> dict:
    decided = ", decided_by = :by, decided_at = timezone('utc', now())" if decided_by else ""
    finished = ", finished_at = timezone('utc', now())" if status in ("executed", "failed", "rejected", "expired", "superseded") else ""
    row = conn.execute(sa.text(
        f"UPDATE remediation_proposals SET status = :s, reason = coalesce(:r, reason){decided}{finished} "
        f"WHERE id = :id RETURNING {', '.join(COLUMNS)}"), {"s": status, "r": reason, "by": decided_by, "id": proposal_id}).mappings().one()
    return dict(row)


def claim_execution(conn: Connection, incident_id: str, proposal_id: str, stale_after_seconds: float) -> dict | None:
    """The one transition that lets an approved proposal run: a redelivered
    or duplicated approval event finds it no longer approved. An execution
    whose process died (still ``executing`` after the playbook's worst case)
    is taken over; the rails then judge each action again, so what already
    ran is not run twice within its cooldown."""
    row = conn.execute(sa.text(
        f"UPDATE remediation_proposals SET status = 'executing', started_at = {UTC_NOW} "
        "WHERE id = :id AND incident_id = :i AND (status = 'approved' OR "
        f"(status = 'executing' AND started_at < {UTC_NOW} - make_interval(secs => :stale))) "
        f"RETURNING {', '.join(COLUMNS)}"), {"id": proposal_id, "i": incident_id, "stale": stale_after_seconds}).mappings().first()
    return dict(row) if row else None


def finish(conn: Connection, proposal_id: str, executed: bool, reason: str) -> dict:
    return _set(conn, proposal_id, "executed" if executed else "failed", reason=reason)


def present(proposal: dict, generation: int | None = None, root_generation: int | None = None,
            status: str | None = None) -> dict:
    """``generation``, ``root_generation`` and ``status``: the incident's; a
    pending proposal of an earlier generation or root, or of an incident no
    longer active (a resolve stores nothing), shows as superseded, as a
    decision would find it."""
    out = {k: proposal[k] for k in COLUMNS}
    if out["status"] == "pending" and generation is not None:
        reason = stale_reason(out, generation, root_generation if root_generation is not None else (
            out["root_generation"] if out["root_generation"] is not None else 0), status)
        if reason:
            out["status"], out["reason"] = "superseded", reason
    # A pending proposal past its TTL can no longer be approved: show it as
    # what it is (the stored status follows at the first decision attempt).
    expires = out["expires_at"]
    if out["status"] == "pending" and isinstance(expires, datetime) and expires <= datetime.now(timezone.utc).replace(tzinfo=None):
        out["status"] = "expired"
    for key in ("created_at", "expires_at", "decided_at", "started_at", "finished_at"):
        value = out[key]
        out[key] = value.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(value, datetime) else value
    return out
