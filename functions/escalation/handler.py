"""Incident events in, notifications out, each exactly once per incident,
channel and transition.

Every incident transition arrives (the Triggers in ``knative/`` filter on
the type only); each channel of :mod:`functions.escalation.channels`
decides from the settings what the transition means to it, and the
database decides what happened. An event names an incident, a transition
and the generation and root it is of: one of an earlier generation (the
incident was reopened since) tells nothing, one the database never had is
``400`` (shared.claims.judge_event). One exception keeps every acknowledged
alert reaching a human: an opening of an earlier generation that a channel
never told (its page dead-lettered, then the alert fired again and the
intake reopened the incident, its new opening not told either) is told, while the incident is active, as the
current generation's opening, unless a person reopened or acknowledged it
(:meth:`EscalationHandler._untold_opening`).
Priority, status and remediation
outcome are read from the database, so a forged or stale event can at most
repeat a notification that is due, never add one (``notify:…`` keys carry
the stored generation).

A notification is claimed before it is sent and recorded (with a unique key)
in the same transaction as the claim completes, so a redelivered or
concurrent event sends nothing twice. A claim whose holder died goes stale
after the notification's worst-case duration (:func:`claim_stale_seconds`),
well inside the Broker's retry window; every failure the handler can catch
releases it at once. A notification that still fails after its retries
answers ``502`` so the Broker redelivers and finally dead-letters: a page
that was not accepted is never acknowledged.

A root change (another alert took over as the incident's root) arrives as
``incident.opened`` again, its ``data.root_generation`` above 0 (the
``….root{n}`` opening); every incident event names the root it is of, and
claims are scoped to it (an event from before migration 0017 is of root 0). It is never a second page: PagerDuty gets a ``trigger`` under the
same ``dedup_key`` (the incident id), which PagerDuty folds into the alert
it opened, its summary and details now the new root's; chat channels post a
follow-up naming the new root, why and the member count; the outgoing
webhook sends ``incident.root_changed``. An opening not told yet is told
once, with the new root. Remediation outcomes of the new root are told
under claim keys of their own (``….root{n}``).

When every channel is done (sent, already sent, or off), the handler records
the completed claim ``escalated:{incident_id}:{generation}:{transition}``;
the reconciliation sweep looks for incidents without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
import time

import requests
import sqlalchemy as sa
from cloudevents.http import CloudEvent
from flask import Response
from sqlalchemy.exc import SQLAlchemyError

from functions.escalation.answer import accept_any_2xx
from functions.escalation import channels as registry
from functions.escalation.channels import Channel, Note, Outgoing
from shared.deadline import bounded
from functions.escalation.delivery import Delivery, send, worst_case_seconds
from shared import claims, db, events, eventio, incidents, members
from shared.config import Settings
from shared.domain import ACTIVE_STATUSES
from shared.errors import BadGateway, Conflict, ServiceUnavailable

log = logging.getLogger("escalation")

ACCEPTED = (
    events.INCIDENT_OPENED,
    events.INCIDENT_REMEDIATED,
    events.INCIDENT_REMEDIATION_FAILED,
    events.INCIDENT_RESOLVED,
    events.INCIDENT_ACKNOWLEDGED,
)
RECORD_RETRY_INTERVAL = 0.25
# The transitions whose work is done again for a new root (diagnostics and
# remediation claim per root generation): told again, once per root.
ROOT_SCOPED = ("opened", "remediated", "remediation_failed")


def claim_stale_seconds(config: Settings) -> float:
    """How long a notification claim may be held: the send's worst case
    (every attempt times out, plus the backoff) and one database timeout for
    recording it. Past this its holder is dead, and a redelivery may retry."""
    return worst_case_seconds(config.notify_timeout_seconds, config.notify_max_attempts) + config.db_timeout_seconds


def escalated_key(incident_id: str, generation: int, transition: str) -> str:
    return f"escalated:{incident_id}:{generation}:{transition}"


def remediation_result(conn, incident: dict, root_generation: int = 0) -> dict | None:
    """The remediation result of the incident's current generation and of
    the root the event is of, as remediation recorded it (never as an event
    claims it). A result recorded before migration 0017 is of the first root."""
    results = [t["details"] for t in incidents.get_timeline(conn, incident["id"])
               if t["kind"] == "remediation_result" and t["details"].get("generation") == incident["generation"]
               and (t["details"].get("root_generation") or 0) == root_generation]
    return results[-1] if results else None


def root_change(conn, incident: dict) -> str | None:
    """Why the incident's root is what it is now: the reason of its latest
    root change (shared.correlation.store), with how many alerts it groups."""
    entries = [t for t in incidents.get_timeline(conn, incident["id"]) if t["kind"] == "root_changed"]
    if not entries:
        return None
    count = (incident.get("correlation") or {}).get("alert_count")
    return entries[-1]["details"].get("reason", "") + (f" ({count} alerts in this incident)" if count else "")


def acknowledgement(conn, incident: dict) -> dict | None:
    """The latest time a person took the incident (its timeline entry)."""
    entries = [t for t in incidents.get_timeline(conn, incident["id"])
               if t["kind"] == "status_changed" and t["details"].get("acknowledged")]
    return entries[-1] if entries else None


def sent_by(conn, channel: str, incident_id: str) -> frozenset[str]:
    """The actions a channel completed for the incident, in any generation
    (``trigger``), and each with its generation (``trigger:1``), from the
    claim keys ``notify:{channel}:{action}:{incident}:{generation}:…``."""
    rows = conn.execute(
        sa.text("SELECT key FROM work_claims WHERE incident_id = :i AND key LIKE :p AND completed_at IS NOT NULL"),
        {"i": incident_id, "p": f"notify:{channel}:".replace("%", r"\%").replace("_", r"\_") + "%"},
    ).scalars()
    parts = [key.split(":") for key in rows]
    return frozenset([p[2] for p in parts] + [f"{p[2]}:{p[4]}" for p in parts if len(p) > 4])


def told_openings(conn, incident_id: str, generation: int) -> frozenset[str]:
    """The channels that told an opening of the incident's ``generation``
    or of any later one (its first, a raise to P0, a new root's, or this
    opening told as a later generation's), from their completed claim keys
    ``notify:{channel}:{action}:{incident}:{generation}:opened…``. A later
    opening told means a human heard of the incident after this one, and an
    opening told as a later generation's is recorded under that generation's
    key: either way this one is not told again, in any generation."""
    rows = conn.execute(
        sa.text("SELECT key FROM work_claims WHERE incident_id = :i AND key LIKE 'notify:%' AND completed_at IS NOT NULL"),
        {"i": incident_id},
    ).scalars()
    parts = [key.split(":") for key in rows]
    return frozenset(p[1] for p in parts
                     if len(p) > 5 and p[4].isdigit() and int(p[4]) >= generation and p[5].split(".")[0] == "opened")


def taken_by_a_person(conn, incident: dict) -> str | None:
    """Why a person already has the incident's current generation: they
    reopened it by hand (the transition marks its entry ``by_hand``; the
    intake's and the flapping re-page's reopens are automation), or
    acknowledged it since the reopen. None when nobody did. An entry from
    before the mark counts as by hand when it went to investigating."""
    entries = incidents.get_timeline(conn, incident["id"])
    reopens = [i for i, t in enumerate(entries) if t["kind"] == "reopened"]
    since = reopens[-1] if reopens else 0
    details = entries[since]["details"] if reopens else {}
    by_hand = details.get("by_hand")
    if by_hand is None:  # written before the mark
        by_hand = details.get("to") == "investigating"
    if by_hand is True:
        return f"{entries[since]['actor']} reopened generation {incident['generation']} by hand"
    for t in entries[since:]:
        if t["kind"] == "status_changed" and t["details"].get("acknowledged"):
            return f"{t['actor']} acknowledged generation {incident['generation']}"
    return None


@dataclass(frozen=True)
class Round:
    """Which remediation outcome an event tells: the approved proposal it
    executed (None: the playbook's own run), and the link to a proposal
    still awaiting approval."""
    approved_proposal: str | None = None
    proposal_url: str | None = None


NO_ROUND = Round()


class EscalationHandler:
    def __init__(self, config: Settings, channels: list[Channel] | None = None):
        """``channels``: built (and the ones that are off named) by the
        caller already, as the function does at start."""
        self.config = config
        # Every attempt is bounded as a whole (lookup, connect, TLS, send, the whole answer).
        self.http = bounded(requests.Session())
        if channels is None:
            channels = registry.build(config)
            registry.name_the_ones_off(channels, log)
        self.channels: list[Channel] = channels
        self.stale_seconds = claim_stale_seconds(config)

    def _state(self, transition: str, incident_id: str, root_generation: int = 0,
               generation: int = 0) -> tuple[dict | None, str | None, str | None, Round]:
        """The incident, the reason to tell (remediation's, or who
        acknowledged), why the event does not match the database (None when
        it does), and which remediation round this is."""
        with db.engine().connect() as conn:
            incident = incidents.get_incident(conn, incident_id)
            if incident is None:
                return None, None, "no such incident", NO_ROUND
            # The event's generation and root are the database's or stale
            # (shared.claims.judge_event; one it never had is a 400); a root
            # change superseded by a later one is stale too.
            stale = claims.judge_event(incident, generation, root_generation)
            if not stale and transition == "opened" and 0 < root_generation < (incident.get("root_generation") or 0):
                stale = f"the event is of root {root_generation}; the incident's root is {incident['root_generation']} since"
            if stale:
                return incident, None, stale, NO_ROUND
            # The page tells how many alerts the incident groups, and why.
            incident["correlation"] = members.page_summary(conn, incident_id)
            if root_generation and transition == "opened":
                incident["root_change"] = root_change(conn, incident)
            if transition == "resolved" and incident["status"] not in ("resolved", "closed"):
                return incident, None, f"the incident is {incident['status']}, not resolved", NO_ROUND
            if transition == "acknowledged":
                entry = acknowledgement(conn, incident)
                if entry is None:
                    return incident, None, "nobody acknowledged the incident", NO_ROUND
                return incident, str(entry["actor"]), None, NO_ROUND
            if transition in ("remediated", "remediation_failed"):
                result = remediation_result(conn, incident, root_generation)
                outcome = "remediated" if transition == "remediated" else "failed"
                if result is None or result.get("outcome") != outcome:
                    return incident, None, (f"remediation recorded no {outcome} outcome for generation {incident['generation']}"
                                            f" (root {root_generation})"), NO_ROUND
                proposal = result.get("proposal") or {}
                pending = proposal.get("url") if proposal.get("status") == "pending" else None
                return incident, result.get("reason"), None, Round(result.get("approved_proposal"), pending)
        return incident, None, None, NO_ROUND

    def _untold_opening(self, transition: str, incident: dict | None, generation: int) -> frozenset[str] | None:
        """Every alert the intake acknowledged reaches a human. An opening
        of a generation the incident has left (a dead letter or a parked
        outbox row re-driven, a Broker retry still in flight) is stale; but
        when the intake reopened the incident (the alert fired again) and a
        channel that would tell the opening at the incident's priority told
        no opening of that generation or any later one (PagerDuty was down,
        the page dead-lettered, the new generation's opening not delivered
        yet), nobody was paged: it is told now as the current generation's
        opening, under the current generation's claims (told once, in any
        generation). A generation a person reopened by hand or acknowledged
        is theirs already: nothing is told. Returns the channels that say
        nothing; None when it tells nothing."""
        if (transition != "opened" or incident is None or incident["status"] not in ACTIVE_STATUSES
                or generation >= (incident.get("generation") or 0)):
            return None
        with db.engine().connect() as conn:
            told = told_openings(conn, incident["id"], generation)
            sent = {c.name: sent_by(conn, c.name, incident["id"]) for c in self.channels if c.configured() and c.name not in told}
            taken = taken_by_a_person(conn, incident)
        # A channel that would not tell this opening anyway (PagerDuty pages
        # no P1) was not owed it.
        untold = [c.name for c in self.channels if c.name in sent and c.message(Note("opened", incident, None, sent[c.name])) is not None]
        if not untold:
            return None
        if taken:
            log.info("Escalation: an opening never told, of a generation the incident has left, stays untold: a person has the "
                     "incident", extra={"incident_id": incident["id"], "generation": generation, "untold_by": untold, "reason": taken})
            return None
        return frozenset(c.name for c in self.channels if c.name not in untold)

    def handle(self, event: CloudEvent) -> Response:
        transition = events.transition_of(event["type"])
        incident_id = eventio.incident_id_of(event)
        # Which root the event is of: its claims are that root's, so an old
        # root's outcome redelivered after a take-over is not told again
        # as the new root's.
        root_generation = eventio.root_generation_of(event)
        incident, reason, mismatch, round_ = self._state(transition, incident_id, root_generation, eventio.generation_of(event))
        told_before: frozenset[str] = frozenset()
        if mismatch:
            told_before = self._untold_opening(transition, incident, eventio.generation_of(event))
            if told_before is None:
                log.warning("Escalation skipped: the event does not match the incident", extra={
                    "incident_id": incident_id, "transition": transition, "reason": mismatch})
                return eventio.ack()
            log.warning("Escalation: an opening never told, of a generation the incident has left, is told as the current "
                        "generation's", extra={"incident_id": incident_id, "reason": mismatch, "told_by": sorted(told_before)})
            root_generation = 0
            incident, reason, mismatch, round_ = self._state(transition, incident_id, 0, incident["generation"])
            if mismatch:
                raise Conflict(f"the incident changed while the event was judged ({mismatch}); retry")
        generation = incident["generation"]
        # The outcome of an approved proposal is a second remediation outcome
        # of this generation: its own claim keys, so it is told too.
        occasion = f"{transition}.{round_.approved_proposal}" if round_.approved_proposal else transition
        told = transition
        if root_generation and transition in ROOT_SCOPED:
            # An event of a root that took over (``….root{n}`` opening, or
            # that root's remediation outcome): told once per root, under its
            # own claim keys; the opening as a follow-up of what the
            # channels sent. An opening still untold is told with the root
            # the incident has now.
            occasion = f"{occasion}.root{root_generation}"
            incident["root_generation"] = root_generation
            if transition == "opened":
                told = "root_changed"
                reason = incident["root_change"]
        failures = []
        for channel in [c for c in self.channels if c.name not in told_before]:
            outcome = self._notify(channel, told, generation, incident, reason, occasion, round_.proposal_url)
            if outcome is not None and not outcome.ok:
                failures.append(f"{channel.name}: {outcome.error}")
        if failures:
            raise BadGateway("notification not accepted: " + "; ".join(failures))
        with db.transaction() as conn:
            # Reconciliation watches the plain key of the latest outcome.
            for key in dict.fromkeys((escalated_key(incident_id, generation, occasion), escalated_key(incident_id, generation, transition))):
                if not claims.claim(conn, key, incident_id, 0).completed:
                    claims.complete(conn, key)
        return eventio.ack()

    def _notify(self, channel: Channel, transition: str, generation: int, incident: dict, reason: str | None,
                occasion: str | None = None, proposal_url: str | None = None) -> Delivery | None:
        incident_id = incident["id"]
        if not channel.configured():
            log.info(f"{channel.title} is off; not notifying", extra={"incident_id": incident_id, "transition": transition})
            return None
        with db.engine().connect() as conn:
            sent = sent_by(conn, channel.name, incident_id)
        outgoing = channel.message(Note(transition, incident, reason, sent, proposal_url))
        if outgoing is None:
            return None
        key = f"notify:{channel.name}:{outgoing.action}:{incident_id}:{generation}:{occasion or transition}"
        with db.transaction() as conn:
            claim = claims.claim(conn, key, incident_id, self.stale_seconds)
        if not claim.acquired:
            if claim.completed:
                log.info("Already notified", extra={"incident_id": incident_id, "channel": channel.name, "transition": transition})
                return None
            raise Conflict(f"{channel.name} notification for this transition is being sent elsewhere; retry later")
        try:
            result = self._send(channel, outgoing)
        except Exception:
            self._release(key)
            raise
        self._record(channel.name, outgoing.action, transition, incident_id, key, result)
        return result

    def _send(self, channel: Channel, outgoing: Outgoing) -> Delivery:
        return send(self.http, outgoing.url, outgoing.body, channel.name, self.config.notify_timeout_seconds,
                    self.config.notify_max_attempts, self.config.notify_max_retry_after_seconds,
                    headers=outgoing.headers or None, retry=channel.retry,
                    # A channel written without a judge of its own: the status decides.
                    accept=getattr(channel, "accept", accept_any_2xx))

    def _record(self, channel: str, what: str, transition: str, incident_id: str, key: str, result: Delivery) -> None:
        """Timeline entry and claim in one transaction, retried through a
        database blip: a Slack message that was sent but not recorded is
        posted again by the next delivery (chat webhooks have no idempotency key),
        so the window between the two is kept as short as the claim allows."""
        details = {"channel": channel, "action": what, "transition": transition, "outcome": "sent" if result.ok else "failed",
                   "status": result.status, "attempts": result.attempts}
        if result.error:
            details["error"] = result.error  # built by delivery from the failure's kind, scrubbed
        deadline = time.monotonic() + self.config.db_timeout_seconds
        while True:
            try:
                with db.transaction() as conn:
                    incidents.add_timeline(conn, incident_id, "notification", details, "escalation", dedup_key=key if result.ok else None)
                    if result.ok:
                        claims.complete(conn, key)
                    else:
                        claims.release(conn, key)
                break
            except SQLAlchemyError as exc:
                if not db.is_transient(exc) or time.monotonic() >= deadline:
                    log.error("Notification outcome not recorded", extra={
                        "incident_id": incident_id, "channel": channel, "outcome": details["outcome"],
                        "duplicate_risk": result.ok and what != "trigger"})
                    self._release(key)
                    raise ServiceUnavailable("the notification's outcome could not be recorded; retry later") from None
                time.sleep(RECORD_RETRY_INTERVAL)
        log.info("Notification %s" % details["outcome"], extra={"incident_id": incident_id, **{k: v for k, v in details.items() if k != "error"}})

    def _release(self, key: str) -> None:
        """Give the claim back so the Broker's next retry need not wait for
        staleness; when the database is gone too, staleness does it."""
        try:
            with db.transaction() as conn:
                claims.release(conn, key)
        except SQLAlchemyError:
            log.warning("Claim not released; it goes stale", extra={"key": key, "stale_after_s": self.stale_seconds})
