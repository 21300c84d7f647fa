"""Incident events in, pages and Slack messages out, each exactly once per
incident, channel and transition.

The Triggers in ``knative/`` decide which events arrive; this handles each
by what it means. A notification is claimed before it is sent and recorded
(with a unique key) in the same transaction as the claim completes, so a
redelivered or concurrent event sends nothing twice. A notification that
still fails after its retries answers ``502`` so the Broker redelivers and
finally dead-letters: a page that was not accepted is never acknowledged.
"""

from __future__ import annotations

import logging

import requests
from cloudevents.http import CloudEvent
from flask import Response

from functions.escalation import messages
from functions.escalation.delivery import Delivery, send
from shared import claims, db, events, eventio, incidents
from shared.config import Settings
from shared.errors import BadGateway, Conflict

log = logging.getLogger("escalation")

ACCEPTED = (
    events.INCIDENT_OPENED,
    events.INCIDENT_REMEDIATED,
    events.INCIDENT_REMEDIATION_FAILED,
    events.INCIDENT_RESOLVED,
)
CLAIM_STALE_SECONDS = 300


class EscalationHandler:
    def __init__(self, config: Settings):
        self.config = config
        self.http = requests.Session()
        self.pagerduty = config.pagerduty_routing_key
        self.slack = config.slack_webhook_url
        if not self.pagerduty:
            log.warning("PagerDuty is off: PAGERDUTY_ROUTING_KEY is not set; incidents will not page anyone")
        if not self.slack:
            log.warning("Slack is off: SLACK_WEBHOOK_URL is not set; incidents will not be announced")

    def plan(self, transition: str, incident: dict) -> list[tuple[str, str]]:
        """(channel, what) pairs this transition means for this incident."""
        priority = incident["priority"]
        steps: list[tuple[str, str]] = []
        if transition == "opened" and priority in self.config.page_on_open_priorities:
            steps.append(("pagerduty", "trigger"))
        if transition == "remediation_failed" and priority in self.config.page_on_failure_priorities:
            steps.append(("pagerduty", "trigger"))
        if transition == "resolved":
            steps.append(("pagerduty", "resolve"))
        steps.append(("slack", "message"))
        return steps

    def handle(self, event: CloudEvent) -> Response:
        transition = events.transition_of(event["type"])
        incident_id = eventio.incident_id_of(event)
        data = event.get_data() if isinstance(event.get_data(), dict) else {}
        generation = int(data.get("generation") or 0)
        reason = (data.get("remediation") or {}).get("reason") if isinstance(data.get("remediation"), dict) else None
        with db.engine().connect() as conn:
            incident = incidents.get_incident(conn, incident_id)
        if incident is None:
            log.warning("Escalation skipped: no such incident", extra={"incident_id": incident_id})
            return eventio.ack()
        failures = []
        for channel, what in self.plan(transition, incident):
            outcome = self._notify(channel, what, transition, generation, incident, reason)
            if outcome is not None and not outcome.ok:
                failures.append(f"{channel}: {outcome.error}")
        if failures:
            raise BadGateway("notification not accepted: " + "; ".join(failures))
        return eventio.ack()

    def _notify(self, channel: str, what: str, transition: str, generation: int, incident: dict, reason: str | None) -> Delivery | None:
        incident_id = incident["id"]
        secret = self.pagerduty if channel == "pagerduty" else self.slack
        if not secret:
            log.info(f"{'PagerDuty' if channel == 'pagerduty' else 'Slack'} is off; not notifying", extra={"incident_id": incident_id, "transition": transition})
            return None
        key = f"notify:{channel}:{what}:{incident_id}:{generation}:{transition}"
        with db.transaction() as conn:
            if channel == "pagerduty" and what == "resolve" and not claims.any_completed(conn, incident_id, f"notify:pagerduty:trigger:{incident_id}:"):
                return None
            claim = claims.claim(conn, key, incident_id, CLAIM_STALE_SECONDS)
        if not claim.acquired:
            if claim.completed:
                log.info("Already notified", extra={"incident_id": incident_id, "channel": channel, "transition": transition})
                return None
            raise Conflict(f"{channel} notification for this transition is being sent elsewhere; retry later")
        try:
            if channel == "pagerduty":
                body = (messages.pagerduty_trigger(self.config, incident, secret.reveal(), transition, reason)
                        if what == "trigger" else messages.pagerduty_resolve(incident, secret.reveal()))
                url = self.config.pagerduty_events_url
            else:
                body = messages.slack_message(self.config, incident, transition, reason)
                url = secret.reveal()
            result = send(self.http, url, body, channel, self.config.notify_timeout_seconds,
                          self.config.notify_max_attempts, self.config.notify_max_retry_after_seconds)
        except Exception:
            with db.transaction() as conn:
                claims.release(conn, key)
            raise
        details = {"channel": channel, "action": what, "transition": transition, "outcome": "sent" if result.ok else "failed",
                   "status": result.status, "attempts": result.attempts}
        if result.error:
            details["error"] = result.error
        with db.transaction() as conn:
            incidents.add_timeline(conn, incident_id, "notification", details, "escalation", dedup_key=key if result.ok else None)
            if result.ok:
                claims.complete(conn, key)
            else:
                claims.release(conn, key)
        log.info("Notification %s" % details["outcome"], extra={"incident_id": incident_id, **{k: v for k, v in details.items() if k != "error"}})
        return result
