"""Incident events in, pages and Slack messages out, each exactly once per
incident, channel and transition.

The Triggers in ``knative/`` decide which events arrive; the database
decides what they mean. An event only names an incident and a transition:
its generation, priority, status and remediation outcome are read from the
database, so a forged or stale event can at most repeat a notification that
is due, never add one (``notify:…`` keys carry the stored generation).

A notification is claimed before it is sent and recorded (with a unique key)
in the same transaction as the claim completes, so a redelivered or
concurrent event sends nothing twice. A claim whose holder died goes stale
after the notification's worst-case duration (:func:`claim_stale_seconds`),
well inside the Broker's retry window; every failure the handler can catch
releases it at once. A notification that still fails after its retries
answers ``502`` so the Broker redelivers and finally dead-letters: a page
that was not accepted is never acknowledged.

When every channel is done (sent, already sent, or off), the handler records
the completed claim ``escalated:{incident_id}:{generation}:{transition}``;
the reconciliation sweep looks for incidents without it.
"""

from __future__ import annotations

import logging
import time

import requests
from cloudevents.http import CloudEvent
from flask import Response
from sqlalchemy.exc import SQLAlchemyError

from functions.escalation import messages
from functions.escalation.delivery import Delivery, send, worst_case_seconds
from shared import claims, db, events, eventio, incidents
from shared.config import Settings
from shared.errors import BadGateway, Conflict, ServiceUnavailable

log = logging.getLogger("escalation")

ACCEPTED = (
    events.INCIDENT_OPENED,
    events.INCIDENT_REMEDIATED,
    events.INCIDENT_REMEDIATION_FAILED,
    events.INCIDENT_RESOLVED,
)
ACTIVE = ("open", "investigating")
RECORD_RETRY_INTERVAL = 0.25


def claim_stale_seconds(config: Settings) -> float:
    """How long a notification claim may be held: the send's worst case
    (every attempt times out, plus the backoff) and one database timeout for
    recording it. Past this its holder is dead, and a redelivery may retry."""
    return worst_case_seconds(config.notify_timeout_seconds, config.notify_max_attempts) + config.db_timeout_seconds


def escalated_key(incident_id: str, generation: int, transition: str) -> str:
    return f"escalated:{incident_id}:{generation}:{transition}"


def remediation_result(conn, incident: dict) -> dict | None:
    """The remediation result of the incident's current generation, as
    remediation recorded it (never as an event claims it)."""
    results = [t["details"] for t in incidents.get_timeline(conn, incident["id"])
               if t["kind"] == "remediation_result" and t["details"].get("generation") == incident["generation"]]
    return results[-1] if results else None


class EscalationHandler:
    def __init__(self, config: Settings):
        self.config = config
        self.http = requests.Session()
        self.pagerduty = config.pagerduty_routing_key
        self.slack = config.slack_webhook_url
        self.stale_seconds = claim_stale_seconds(config)
        if not self.pagerduty:
            log.warning("PagerDuty is off: PAGERDUTY_ROUTING_KEY is not set; incidents will not page anyone")
        if not self.slack:
            log.warning("Slack is off: SLACK_WEBHOOK_URL is not set; incidents will not be announced")

    def plan(self, transition: str, incident: dict, page_triggered: bool = True) -> list[tuple[str, str]]:
        """(channel, what) pairs this transition means for this incident, as
        the database holds it."""
        priority, active = incident["priority"], incident["status"] in ACTIVE
        steps: list[tuple[str, str]] = []
        if transition == "opened" and active and priority in self.config.page_on_open_priorities:
            steps.append(("pagerduty", "trigger"))
        if transition == "remediation_failed" and active and priority in self.config.page_on_failure_priorities:
            steps.append(("pagerduty", "trigger"))
        if transition == "resolved" and page_triggered:
            steps.append(("pagerduty", "resolve"))
        steps.append(("slack", "message"))
        return steps

    def _state(self, transition: str, incident_id: str) -> tuple[dict | None, str | None, str | None]:
        """The incident, the reason to tell (remediation's), and why the event
        does not match the database (None when it does)."""
        with db.engine().connect() as conn:
            incident = incidents.get_incident(conn, incident_id)
            if incident is None:
                return None, None, "no such incident"
            if transition == "resolved" and incident["status"] not in ("resolved", "closed"):
                return incident, None, f"the incident is {incident['status']}, not resolved"
            if transition in ("remediated", "remediation_failed"):
                result = remediation_result(conn, incident)
                outcome = "remediated" if transition == "remediated" else "failed"
                if result is None or result.get("outcome") != outcome:
                    return incident, None, f"remediation recorded no {outcome} outcome for generation {incident['generation']}"
                return incident, result.get("reason"), None
        return incident, None, None

    def handle(self, event: CloudEvent) -> Response:
        transition = events.transition_of(event["type"])
        incident_id = eventio.incident_id_of(event)
        incident, reason, mismatch = self._state(transition, incident_id)
        if mismatch:
            log.warning("Escalation skipped: the event does not match the incident", extra={
                "incident_id": incident_id, "transition": transition, "reason": mismatch})
            return eventio.ack()
        generation = incident["generation"]
        with db.engine().connect() as conn:
            page_triggered = claims.any_completed(conn, incident_id, f"notify:pagerduty:trigger:{incident_id}:")
        failures = []
        for channel, what in self.plan(transition, incident, page_triggered):
            outcome = self._notify(channel, what, transition, generation, incident, reason)
            if outcome is not None and not outcome.ok:
                failures.append(f"{channel}: {outcome.error}")
        if failures:
            raise BadGateway("notification not accepted: " + "; ".join(failures))
        with db.transaction() as conn:
            key = escalated_key(incident_id, generation, transition)
            claims.claim(conn, key, incident_id, 0)
            claims.complete(conn, key)
        return eventio.ack()

    def _notify(self, channel: str, what: str, transition: str, generation: int, incident: dict, reason: str | None) -> Delivery | None:
        incident_id = incident["id"]
        secret = self.pagerduty if channel == "pagerduty" else self.slack
        if not secret:
            log.info(f"{'PagerDuty' if channel == 'pagerduty' else 'Slack'} is off; not notifying", extra={"incident_id": incident_id, "transition": transition})
            return None
        key = f"notify:{channel}:{what}:{incident_id}:{generation}:{transition}"
        with db.transaction() as conn:
            claim = claims.claim(conn, key, incident_id, self.stale_seconds)
        if not claim.acquired:
            if claim.completed:
                log.info("Already notified", extra={"incident_id": incident_id, "channel": channel, "transition": transition})
                return None
            raise Conflict(f"{channel} notification for this transition is being sent elsewhere; retry later")
        try:
            result = self._send(channel, what, transition, incident, reason, secret.reveal())
        except Exception:
            self._release(key)
            raise
        self._record(channel, what, transition, incident_id, key, result)
        return result

    def _send(self, channel: str, what: str, transition: str, incident: dict, reason: str | None, secret: str) -> Delivery:
        if channel == "pagerduty":
            body = (messages.pagerduty_trigger(self.config, incident, secret, transition, reason)
                    if what == "trigger" else messages.pagerduty_resolve(incident, secret))
            url = self.config.pagerduty_events_url
        else:
            body = messages.slack_message(self.config, incident, transition, reason)
            url = secret
        return send(self.http, url, body, channel, self.config.notify_timeout_seconds,
                    self.config.notify_max_attempts, self.config.notify_max_retry_after_seconds)

    def _record(self, channel: str, what: str, transition: str, incident_id: str, key: str, result: Delivery) -> None:
        """Timeline entry and claim in one transaction, retried through a
        database blip: a Slack message that was sent but not recorded is
        posted again by the next delivery (Slack has no idempotency key),
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
                        "duplicate_risk": result.ok and channel == "slack"})
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
