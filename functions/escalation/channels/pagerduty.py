"""PagerDuty Events API v2: pages (``trigger``), and follows up only what it
paged (``acknowledge``, ``resolve``).

A follow-up that arrives while the page's ``trigger`` is being sent waits
for it (:class:`~functions.escalation.channels.base.NotYet`, a ``409``);
one that arrived before the trigger was claimed found nothing to follow up,
so the handler tells the incident's current state once the trigger is sent
(``follows_up``), and the reconciliation sweep watches the rest.

``summary`` at most 1,024 characters and the whole event under the Events
API's 512 KB, ``custom_details`` shrinking first. PagerDuty renders no
markup: text goes as it is, only cut, and with its bidi controls and
zero-width characters shown as ``‹U+202E›`` (:mod:`shared.visible`).
"""

from __future__ import annotations

import json
from typing import Any

from functions.escalation.channels.base import Note, NotYet, Outgoing, retry_by_default
from functions.escalation.answer import Answer, judged_on_own_hosts
from shared.domain import ACTIVE_STATUSES, current_actions
from functions.escalation.channels.text import (
    ELLIPSIS, description_of, diagnostics_summary, incident_url, plain, prefix, probable_causes_brief, runbook_url, service_of,
    summary_of,
)
from shared.config import Settings
from shared.timefmt import rfc3339
from shared.visible import visible_deep

PAGERDUTY_SUMMARY_MAX = 1024
PAGERDUTY_FIELD_MAX = 255  # source, component, group, class; dedup_key's documented limit
PAGERDUTY_EVENT_MAX_BYTES = 512 * 1024


def summary_line(incident: dict) -> str:
    """The seed's Test 5 title: ``EmailServiceDown - Service completely down``."""
    return plain(f"{incident['alert_name']} - {summary_of(incident)}", PAGERDUTY_SUMMARY_MAX, lines=False)


def _clip(value: Any, max_str: int, max_items: int, depth: int = 0) -> Any:
    """``value`` with every string and collection bounded, for custom_details."""
    if depth > 6:
        return ELLIPSIS
    if isinstance(value, str):
        return plain(value, max_str)
    if isinstance(value, dict):
        items = list(value.items())
        out = {plain(str(k), 200): _clip(v, max_str, max_items, depth + 1) for k, v in items[:max_items]}
        if len(items) > max_items:
            out[ELLIPSIS] = f"{len(items) - max_items} more"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [_clip(v, max_str, max_items, depth + 1) for v in value[:max_items]]
        if len(value) > max_items:
            out_list.append(f"{len(value) - max_items} more")  # the later items: lists go newest first
        return out_list
    return value


def _size(event: dict) -> int:
    # requests sends json= with ensure_ascii: count what goes on the wire.
    return len(json.dumps(event, default=str).encode())


# (longest string, most items) of custom_details, step by step.
CLIP_STEPS = ((65536, 200), (8192, 50), (1024, 20), (256, 10), (64, 5))


def _chars(value: Any) -> int:
    """Characters in the strings (and keys) of a JSON-like value: at least
    one byte each on the wire."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(k) + _chars(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_chars(v) for v in value)
    return 0


def _prefixed(value: Any, limit: int) -> Any:
    """Every string value cut to the :func:`prefix` a cut to ``limit`` reads."""
    if isinstance(value, str):
        return prefix(value, limit)
    if isinstance(value, dict):
        return {k: _prefixed(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_prefixed(v, limit) for v in value]
    return value


def _details(details: dict) -> tuple[dict, bool]:
    """custom_details for people (shared.visible), and whether they are
    surely over PagerDuty's limit. Then every string is cut anyway (to
    CLIP_STEPS' longest): only what that cut can show is read, so the work
    is bounded by the limit, not by the megabytes an action's error stored."""
    over = _chars(details) > PAGERDUTY_EVENT_MAX_BYTES
    return visible_deep(_prefixed(details, CLIP_STEPS[0][0]) if over else details), over


def _bounded(event: dict, over: bool = False) -> dict:
    """Shrink custom_details until the event is under PagerDuty's 512 KB
    (``over``: it is known to be over as it is)."""
    details = event["payload"]["custom_details"]
    for step, (max_str, max_items) in enumerate(CLIP_STEPS):
        if not (over and step == 0) and _size(event) <= PAGERDUTY_EVENT_MAX_BYTES:
            return event
        event["payload"]["custom_details"] = _clip(details, max_str, max_items)
    if _size(event) > PAGERDUTY_EVENT_MAX_BYTES:
        event["payload"]["custom_details"] = {k: details[k] for k in ("incident_id", "priority", "status", "transition")}
        event["payload"]["custom_details"]["truncated"] = "the details were too large for PagerDuty; see the incident link"
    return event


def _correlation(incident: dict) -> dict:
    """The member count, and why the latest member joined, when there are several."""
    summary = incident.get("correlation") or {}
    if summary.get("alert_count", 0) < 2:
        return {}
    return {"alert_count": summary["alert_count"], "alerts_firing": summary.get("firing"),
            "correlation_reason": summary.get("latest_reason")}


def trigger_event(config: Settings, incident: dict, routing_key: str, transition: str, reason: str | None,
                  proposal_url: str | None = None) -> dict:
    labels = incident.get("labels") or {}
    links = [{"href": incident_url(config, incident["id"]), "text": "Incident"}]
    if proposal_url:
        links.append({"href": proposal_url, "text": "Approve or reject the proposed remediation"})
    runbook = runbook_url(incident)
    if runbook:
        links.append({"href": runbook, "text": "Runbook"})
    service = service_of(incident)
    actions, earlier = current_actions(incident)
    # PagerDuty shows these to the people paged: bidi controls and
    # zero-width characters shown (shared.visible), as in the summary.
    details, over = _details({
        "incident_id": incident["id"],
        "priority": incident["priority"],
        "status": incident["status"],
        "transition": transition,
        "summary": summary_of(incident),
        "description": description_of(incident),
        "labels": labels,
        "diagnostics": diagnostics_summary(incident.get("diagnostics")),
        "probable_causes": probable_causes_brief(incident.get("diagnostics")),
        # This generation's and root's, newest first: when the event
        # shrinks, _clip keeps a list's first items, the newest.
        "remediation_actions": actions,
        **({"earlier_remediation_actions": f"{earlier} of previous generations, on the incident page"} if earlier else {}),
        **({"reason": reason} if reason else {}),
        **_correlation(incident),
    })
    payload = {
        "summary": summary_line(incident),
        "source": plain(service or config.cluster_name, PAGERDUTY_FIELD_MAX, lines=False),
        "severity": config.pagerduty_severity.get(incident["priority"], "warning"),
        "timestamp": rfc3339(incident.get("created_at")),
        "class": plain(incident["alert_name"], PAGERDUTY_FIELD_MAX, lines=False),
        "custom_details": details,
    }
    if service:
        payload["component"] = plain(service, PAGERDUTY_FIELD_MAX, lines=False)
    if labels.get("namespace"):
        payload["group"] = plain(labels["namespace"], PAGERDUTY_FIELD_MAX, lines=False)
    if payload["timestamp"] is None:
        del payload["timestamp"]
    return _bounded(over=over, event={
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": incident["id"],
        "payload": payload,
        "links": links,
        "client": "Incident Response",
        "client_url": f"{config.public_url}/ui",
    })


def follow_up_event(incident: dict, routing_key: str, action: str) -> dict:
    """``acknowledge`` or ``resolve`` the alert the trigger opened (same dedup_key)."""
    return {"routing_key": routing_key, "event_action": action, "dedup_key": incident["id"]}


def judge(status: int, body: str) -> Answer:
    """The Events API v2 accepts an event with ``202`` and JSON
    ``{"status": "success", "message": "Event processed", "dedup_key": …}``
    (its OpenAPI document, ``components.responses.Success``). Any other
    ``2xx`` body is not PagerDuty speaking (a proxy's or a portal's page, a
    wrong endpoint): retried, which is harmless, as a repeated event with the
    same ``dedup_key`` changes nothing."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser goes ("[[[[…").
        return Answer.UNRECOGNISED
    return Answer.ACCEPTED if isinstance(answer, dict) and answer.get("status") == "success" else Answer.UNRECOGNISED


# PagerDuty's own Events API hosts (US and EU service regions): only their
# answers are judged by the body. PAGERDUTY_EVENTS_URL may point elsewhere
# (a relay, a compatible receiver, a mock), whose words for "accepted" are
# its own: judged by the status alone, as Slack-compatible receivers are.
PAGERDUTY_EVENTS_HOSTS = frozenset({"events.pagerduty.com", "events.eu.pagerduty.com"})


class PagerDuty:
    name = "pagerduty"
    title = "PagerDuty"
    setting = "PAGERDUTY_ROUTING_KEY"
    # Its acknowledge and resolve depend on the trigger it sent: the
    # handler tells them after a trigger too (EscalationHandler._follow_up).
    follows_up = True
    # The claim action of each follow-up (``notify:pagerduty:{action}:…``):
    # a replica where the channel is off records it skipped and leaves the
    # claim open for one where it is on (EscalationHandler._follow_up_off).
    follow_up_actions = {"acknowledged": "acknowledge", "resolved": "resolve"}

    def __init__(self, config: Settings):
        self.config = config
        self.routing_key = config.pagerduty_routing_key
        self.accept = judged_on_own_hosts(config.pagerduty_events_url, PAGERDUTY_EVENTS_HOSTS, judge)

    def configured(self) -> bool:
        return bool(self.routing_key)

    def retry(self, status: int) -> bool:
        return retry_by_default(status)

    def message(self, note: Note) -> Outgoing | None:
        action = self._action(note)
        if action is None:
            return None
        key = self.routing_key.reveal()
        body = (trigger_event(self.config, note.incident, key, note.transition, note.reason, note.proposal_url) if action == "trigger"
                else follow_up_event(note.incident, key, action))
        return Outgoing(action, self.config.pagerduty_events_url, body)

    def _action(self, note: Note) -> str | None:
        """Page by priority; acknowledge and resolve only an alert this
        channel triggered (PagerDuty would otherwise answer an unknown dedup_key)."""
        incident, transition = note.incident, note.transition
        priority, active = incident["priority"], incident["status"] in ACTIVE_STATUSES
        if transition == "opened" and active and priority in self.config.page_on_open_priorities:
            return "trigger"
        paged_now = f"trigger:{incident.get('generation') or 0}" in note.sent
        if transition == "root_changed" and active and (priority in self.config.page_on_open_priorities or paged_now):
            # The same dedup_key: PagerDuty folds it into the alert it
            # opened in this generation (no second page), which now reads
            # as the new root. A page of an earlier generation was
            # resolved: updating it would page again.
            return "trigger"
        if transition == "remediation_failed" and active and priority in self.config.page_on_failure_priorities:
            return "trigger"
        if transition in ("acknowledged", "resolved") and f"trigger:{incident.get('generation') or 0}" in note.sending:
            # Not paged yet, or a trigger updating the page is on its way: a
            # resolve that overtook it would leave the alert it opens open.
            raise NotYet(f"the page is being sent; its {transition} follows once it is recorded (retry later)")
        if transition == "acknowledged" and paged_now and note.covered and active:
            # Only a page the person's acknowledgement covers: a failure
            # page decided after it must still reach someone.
            return "acknowledge"
        if transition == "resolved" and paged_now:
            # This generation's page: an earlier one was resolved with its
            # generation, and a reopened incident pages anew.
            return "resolve"
        return None
