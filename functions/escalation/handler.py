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
under claim keys of their own (``….root{n}``); an outcome of a root the
incident has left (a run or an approval of the old root, finishing,
stopping or not executed after the take-over) resolved nothing of the
current root: its ``remediated`` is stale, acknowledged with nothing sent,
and so is a failure that ran nothing. A failure of a run that acted (a
step ran, the run crashed while executing, a verify failed) is told, under
that root's claims, naming the previous root: a human must check what it
changed.

When every channel is done (sent, already sent, or off), the handler records
the completed claim ``escalated:{incident_id}:{generation}:{transition}``;
the reconciliation sweep looks for incidents without it.

A follow-up (``acknowledged``, ``resolved``) of a page is never lost to the
order events arrive in. What a channel sends is decided again once its
claim is held, by the event's whole judgement then (``_state``: generation,
status, who acknowledged, remediation outcome): an opening whose incident
was resolved meanwhile pages no one, and a resolve held up until the
incident was reopened resolves nothing. A follow-up follows up only this
generation's page, and an acknowledgement only a page it covers (one whose
sender saw no acknowledgement, recorded with the trigger: shared.acknowledge). A follow-up that finds the page's
trigger in flight answers ``409`` (the channel raises ``NotYet``) and the
Broker retries it once the trigger is recorded. A follow-up that came before
the trigger was claimed found nothing to follow up; after every other
transition the handler tells the follow-up the incident's state is due for
(``_follow_up``), under the follow-up's own claim key, so it is sent once
whichever delivery gets there first; its failure does not fail the event
that paged. The reconciliation sweep re-emits the follow-up of a page that
is still not followed up (shared/reconcile.py), read from the same claims.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
import time

import requests
import sqlalchemy as sa
from cloudevents.http import CloudEvent
from flask import Response
from sqlalchemy.exc import SQLAlchemyError

from functions.escalation.answer import accept_any_2xx
from functions.escalation import channels as registry
from functions.escalation.channels import Channel, Note, Outgoing
from functions.escalation.channels.base import NotYet
from shared.deadline import bounded
from functions.escalation.delivery import Delivery, send, worst_case_seconds
from shared import acknowledge, claims, db, events, eventio, incidents, members
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
# The transitions that follow up what a channel sent before (PagerDuty's
# acknowledge and resolve of its trigger).
FOLLOW_UPS = ("acknowledged", "resolved")


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


def acted(result: dict) -> bool:
    """Whether a remediation run may have changed something: a live action
    was attempted (one that failed may have changed its target before it
    failed; a revert is one too), or the run crashed while executing (what
    it ran is on the timeline, not in its result). Nothing ran when every
    record is a dry run, blocked by a rail, never reached a target (its
    parameters did not render) or only hands the incident to a human, as
    in a result that says "not executed" or a run stopped before its first
    step."""
    if result.get("crashed") or (result.get("reason") or "").startswith("remediation crashed"):
        return True
    return any(not record.get("dry_run") and not record.get("blocked_by") and record.get("target") is not None
               and record.get("action") != "escalate" for record in result.get("actions") or [])


def root_change(conn, incident: dict) -> str | None:
    """Why the incident's root is what it is now: the reason of its latest
    root change (shared.correlation.store), with how many alerts it groups."""
    entries = [t for t in incidents.get_timeline(conn, incident["id"]) if t["kind"] == "root_changed"]
    if not entries:
        return None
    count = (incident.get("correlation") or {}).get("alert_count")
    return entries[-1]["details"].get("reason", "") + (f" ({count} alerts in this incident)" if count else "")


# Through the index on work_claims.incident_id (migration 0025): the key is
# compared as text, whatever the database's collation.
_SENT_BY = sa.text(
    "SELECT key, completed_at IS NOT NULL AS done FROM work_claims WHERE incident_id = :i AND starts_with(key, :p)"
    " AND (completed_at IS NOT NULL OR claimed_at >= timezone('utc', now()) - make_interval(secs => :stale))")


def sent_by(conn, channel: str, incident_id: str, stale_seconds: float = 0) -> tuple[frozenset[str], frozenset[str]]:
    """The actions a channel completed for the incident, in any generation
    (``trigger``), and each with its generation (``trigger:1``), from the
    claim keys ``notify:{channel}:{action}:{incident}:{generation}:…``; and,
    in the same form, the ones it is sending right now (claimed, not
    completed, not yet stale after ``stale_seconds``: their holder is alive)."""
    rows = conn.execute(_SENT_BY, {"i": incident_id, "p": f"notify:{channel}:", "stale": stale_seconds}).all()

    def actions(keys: list[str]) -> frozenset[str]:
        parts = [key.split(":") for key in keys]
        return frozenset([p[2] for p in parts] + [f"{p[2]}:{p[4]}" for p in parts if len(p) > 4])
    return actions([r.key for r in rows if r.done]), actions([r.key for r in rows if not r.done])


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
    # Either timeline kind an acknowledgement has (shared.acknowledge).
    who = acknowledge.acknowledged_by(conn, incident["id"])
    return f"{who} acknowledged generation {incident['generation']}" if who else None


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
            previous_root = (transition in ("remediated", "remediation_failed")
                             and root_generation < (incident.get("root_generation") or 0))
            if not stale and previous_root:
                # A run or an approval of a root another alert took over
                # from resolved nothing: the new root's own remediation
                # outcome is the one told, not "remediated automatically".
                # A failure is told only if the run acted on the old root's
                # diagnosis (a step ran, the run crashed, a verify failed
                # and it reverted): a human must check what it changed. One
                # that only stopped or was not executed is acknowledged with
                # nothing sent, as remediation acknowledges the old root's
                # late diagnosis.
                result = remediation_result(conn, incident, root_generation) if transition == "remediation_failed" else None
                if result is None or result.get("outcome") != "failed" or not acted(result):
                    stale = (f"the event is of root {root_generation}'s remediation; the incident's root is "
                             f"{incident['root_generation']} since")
            if stale:
                return incident, None, stale, NO_ROUND
            # The page tells how many alerts the incident groups, and why.
            incident["correlation"] = members.page_summary(conn, incident_id)
            if root_generation and transition == "opened":
                incident["root_change"] = root_change(conn, incident)
            if transition == "resolved" and incident["status"] not in ("resolved", "closed"):
                return incident, None, f"the incident is {incident['status']}, not resolved", NO_ROUND
            if transition == "acknowledged":
                if incident["status"] not in ACTIVE_STATUSES:
                    return incident, None, f"the incident is {incident['status']}: nothing to acknowledge", NO_ROUND
                # Per generation: an acknowledgement before a reopening is not this generation's.
                entry = acknowledge.acknowledgement(conn, incident_id)
                if entry is None:
                    return incident, None, f"nobody acknowledged generation {incident['generation']} of the incident", NO_ROUND
                return incident, entry["actor"], None, NO_ROUND
            if transition in ("remediated", "remediation_failed"):
                result = remediation_result(conn, incident, root_generation)
                outcome = "remediated" if transition == "remediated" else "failed"
                if result is None or result.get("outcome") != outcome:
                    return incident, None, (f"remediation recorded no {outcome} outcome for generation {incident['generation']}"
                                            f" (root {root_generation})"), NO_ROUND
                proposal = result.get("proposal") or {}
                pending = proposal.get("url") if proposal.get("status") == "pending" else None
                reason = result.get("reason")
                if previous_root:
                    reason = (f"remediation of the previous root (root generation {root_generation}), before another alert "
                              f"took over as the incident's root (root generation {incident['root_generation']}), acted and "
                              f"failed: {reason}")
                return incident, reason, None, Round(result.get("approved_proposal"), pending)
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
            # (sent, sending) per channel, as Note takes them.
            sent = {c.name: sent_by(conn, c.name, incident["id"], self.stale_seconds) for c in self.channels
                    if c.configured() and c.name not in told}
            taken = taken_by_a_person(conn, incident)
        # A channel that would not tell this opening anyway (PagerDuty pages
        # no P1) was not owed it.
        untold = [c.name for c in self.channels if c.name in sent
                  and c.message(Note("opened", incident, None, sent=sent[c.name][0], sending=sent[c.name][1])) is not None]
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
        # What the event is due for, judged again once a claim is held: its
        # generation (a reopening since makes it stale, shared.claims.judge_event),
        # the status its transition needs, who acknowledged, the outcome.
        judge = lambda: self._state(transition, incident_id, root_generation, generation)  # noqa: E731
        failures, waiting = [], []
        for channel in [c for c in self.channels if c.name not in told_before]:
            try:
                outcome = self._notify(channel, told, generation, incident, reason, judge, occasion, round_.proposal_url)
            except NotYet as exc:
                waiting.append(exc)  # the other channels are told meanwhile
                continue
            if outcome is not None and not outcome.ok:
                failures.append(f"{channel.name}: {outcome.error}")
        if transition not in FOLLOW_UPS:
            # The follow-up has its own claim (and the sweep watches it): it
            # failing does not undo what this event told.
            self._follow_up(incident_id)
        if failures:
            raise BadGateway("notification not accepted: " + "; ".join(failures))
        if waiting:
            raise waiting[0]
        with db.transaction() as conn:
            # Reconciliation watches the plain key of the latest outcome.
            for key in dict.fromkeys((escalated_key(incident_id, generation, occasion), escalated_key(incident_id, generation, transition))):
                if not claims.claim(conn, key, incident_id, 0).completed:
                    claims.complete(conn, key)
        return eventio.ack()

    def _notify(self, channel: Channel, transition: str, generation: int, incident: dict, reason: str | None,
                judge, occasion: str | None = None, proposal_url: str | None = None) -> Delivery | None:
        """``judge``: reads the event's state again (``_state``), once the claim is held."""
        incident_id = incident["id"]
        if not channel.configured():
            log.info(f"{channel.title} is off; not notifying", extra={"incident_id": incident_id, "transition": transition})
            self._follow_up_off(channel, transition, generation, incident_id)
            return None
        follows_up = getattr(channel, "follows_up", False)
        with db.engine().connect() as conn:
            sent, sending = sent_by(conn, channel.name, incident_id, self.stale_seconds)
            covered = follows_up and transition == "acknowledged" and acknowledge.covers_page(conn, incident_id, generation, channel.name)
        note = Note(transition, incident, reason, sent, proposal_url, sending, covered)
        outgoing = channel.message(note)
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
            outgoing = self._still_due(channel, note, outgoing, judge)
            if outgoing is None:
                self._release(key)
                return None
            seen = None
            if follows_up and outgoing.action == "trigger":
                # Whether this page is one an acknowledgement covers is what
                # its sender saw, with the claim held (shared.acknowledge.
                # covered_page_sql): an acknowledgement committed after this
                # read finds the claim in flight and waits for it.
                with db.engine().connect() as conn:
                    seen = acknowledge.trigger_decision(conn, incident_id, channel.name, transition, generation,
                                                        incident.get("root_generation") or 0)
            result = self._send(channel, outgoing)
        except Exception:
            self._release(key)
            raise
        self._record(channel.name, outgoing.action, transition, incident_id, key, result, seen)
        return result

    def _still_due(self, channel: Channel, note: Note, outgoing: Outgoing, judge) -> Outgoing | None:
        """What the channel sends, decided again now that the claim is held,
        by the event's whole judgement (``_state``: the generation, the
        status its transition needs, who acknowledged, the remediation
        outcome). A change made before this claim was visible is seen here:
        a trigger for an incident resolved meanwhile is not sent, nor a
        resolve held up until the incident was reopened (the page it would
        resolve is the new generation's). A change made after waits for the
        claim (NotYet). None: nothing is due any more."""
        incident, _, mismatch, _ = judge()
        if mismatch or incident is None or incident["generation"] != note.incident["generation"]:
            log.info("Not notifying: the incident changed before the notification's claim was held", extra={
                "incident_id": note.incident["id"], "channel": channel.name, "transition": note.transition,
                "reason": mismatch or "reopened since"})
            return None
        if incident["status"] == note.incident["status"]:
            return outgoing
        again = channel.message(replace(note, incident={**note.incident, "status": incident["status"]}))
        return again if again is not None and again.action == outgoing.action else None

    def _follow_up(self, incident_id: str) -> None:
        """Tell the follow-up the incident's state is due for (resolved, or
        acknowledged by a person in this generation) on the channels whose
        follow-ups depend on what they sent. Its delivery may have come
        before the page was sent and found nothing to follow up; the claim
        key is the follow-up's own, so it is sent once either way. An
        acknowledgement is sent only for a page it covers
        (shared.acknowledge.covered_page_sql): not for a page decided after
        it. A follow-up that fails, or whose state the database fails to
        give, is logged and left to its own claim: the event's own
        notifications went out, and the reconciliation sweep re-emits the
        follow-up's event."""
        channels = [c for c in self.channels if getattr(c, "follows_up", False) and c.configured()]
        if not channels:
            return
        try:
            with db.engine().connect() as conn:
                incident = incidents.get_incident(conn, incident_id)
                if incident is None:
                    return
                due = "resolved" if incident["status"] in ("resolved", "closed") else "acknowledged"
            generation = incident["generation"]
            incident, reason, mismatch, _ = self._state(due, incident_id, 0, generation)
        except (ServiceUnavailable, SQLAlchemyError) as exc:
            # The event's own notifications went out: reading what is due
            # failing must not fail it (its retry would find them done and
            # try this again anyway); the follow-up's delivery or the sweep
            # tells it.
            log.warning("Follow-up not judged after this event (database); left to its own delivery", extra={
                "incident_id": incident_id, "reason": str(exc)[:200]})
            return
        if mismatch:
            return  # nobody acknowledged this generation, or it changed meanwhile
        judge = lambda: self._state(due, incident_id, 0, generation)  # noqa: E731
        for channel in channels:
            try:
                outcome = self._notify(channel, due, incident["generation"], incident, reason, judge)
            except (Conflict, ServiceUnavailable, SQLAlchemyError) as exc:
                # Its own delivery (or another trigger) holds it now, or the
                # database failed it: that delivery, or the sweep, finishes it.
                log.warning("Follow-up not told after this event; left to its own delivery", extra={
                    "incident_id": incident_id, "channel": channel.name, "transition": due, "reason": str(exc)[:200]})
                continue
            if outcome is not None and not outcome.ok:
                log.warning("Follow-up not accepted after this event; left to its own delivery", extra={
                    "incident_id": incident_id, "channel": channel.name, "transition": due, "error": outcome.error})

    def _follow_up_off(self, channel: Channel, transition: str, generation: int, incident_id: str) -> None:
        """A follow-up of a page for a channel that is off in this replica
        (it paged while it was on, here or in another replica). Nothing can
        be sent from here, and nothing says the channel is off on purpose:
        a replica started without the optional Secret during a rollout looks
        the same. So the follow-up's claim is left open: the timeline says
        once that it was skipped (``outcome: skipped``, ``reason``), a
        warning is logged, and the reconciliation sweep keeps re-emitting it,
        so a replica with the channel on sends it. If the channel is off
        everywhere, the sweep reports it stuck after its re-emissions: the
        alert the channel opened is still open there and needs a person."""
        action = (getattr(channel, "follow_up_actions", None) or {}).get(transition)
        if action is None:
            return
        key = f"notify:{channel.name}:{action}:{incident_id}:{generation}:{transition}"
        with db.transaction() as conn:
            sent, _ = sent_by(conn, channel.name, incident_id)
            if f"trigger:{generation}" not in sent or claims.is_completed(conn, key):
                return
            # Its own dedup key: the entry of the follow-up sent later keeps the claim's.
            incidents.add_timeline(conn, incident_id, "notification", {
                "channel": channel.name, "action": action, "transition": transition, "outcome": "skipped",
                "reason": f"{channel.title} is off in the replica that handled it; left to one where it is on"},
                "escalation", dedup_key=f"{key}:skipped")
        log.warning(f"{channel.title} is off here, but it paged for this incident: its {action} is left to a replica where "
                    "it is on (the reconciliation sweep re-emits it)", extra={
                        "incident_id": incident_id, "channel": channel.name, "transition": transition, "generation": generation})

    def _send(self, channel: Channel, outgoing: Outgoing) -> Delivery:
        return send(self.http, outgoing.url, outgoing.body, channel.name, self.config.notify_timeout_seconds,
                    self.config.notify_max_attempts, self.config.notify_max_retry_after_seconds,
                    headers=outgoing.headers or None, retry=channel.retry,
                    # A channel written without a judge of its own: the status decides.
                    accept=getattr(channel, "accept", accept_any_2xx))

    def _record(self, channel: str, what: str, transition: str, incident_id: str, key: str, result: Delivery,
                seen: dict | None = None) -> None:
        """Timeline entry and claim in one transaction, retried through a
        database blip: a Slack message that was sent but not recorded is
        posted again by the next delivery (chat webhooks have no idempotency key),
        so the window between the two is kept as short as the claim allows.
        ``seen``: a trigger's ``acknowledged_seen`` and ``decided_before_ack``
        (shared.acknowledge.trigger_decision)."""
        details = {"channel": channel, "action": what, "transition": transition, "outcome": "sent" if result.ok else "failed",
                   "status": result.status, "attempts": result.attempts, **(seen or {})}
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
