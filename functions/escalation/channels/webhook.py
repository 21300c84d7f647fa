"""A generic outgoing webhook: every transition of every incident, as JSON,
signed so that the receiver can tell it came from us and is fresh.

Body (compact JSON, UTF-8, ASCII-escaped)::

    {"id": "<incident>.<transition>.<generation>" (root_changed: "….root<n>"), "type": "incident.<transition>",
     "transition": "...", "sent_at": "RFC 3339",
     "incident": {"id", "alert_name", "priority", "status", "summary", "service",
                  "labels", "generation", "created_at", "resolved_at",
                  "links": {"incident": "...", "runbook": "..."}},
     "reason": "..." (remediation's reason, who acknowledged, or why the root changed)}

The body is at most ``WEBHOOK_BODY_MAX_BYTES`` (64 KiB, what the reference
receiver in loopback/notify.py accepts), measured as sent. The incident is
the bounded projection of the event catalogue; when that is still too large
(emoji are 12 bytes each in ASCII-escaped JSON: 32 labels of emoji alone
are over 130 KB), its text shrinks, a step at a time (:data:`SHRINK`): the
label values and the service, the summary, the reason, the alert name and
the label keys cut between user-perceived characters and ending in ``…``;
at the last step the runbook link is left out (a cut URL is another URL).

Headers: ``X-Incident-Signature: t=<unix seconds>,v1=<hex>`` where ``v1`` is
HMAC-SHA256 keyed with ``OUTGOING_WEBHOOK_SECRET`` over ``<t>.<raw body>``
(Stripe's scheme), and ``X-Incident-Delivery: <id>``, the same for every
retry of one notification, for the receiver to drop a duplicate. A receiver
verifies by recomputing the HMAC over the exact bytes it received, comparing
in constant time, and refusing a ``t`` more than a few minutes from its clock
(:func:`verify` is the reference).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import datetime, timezone

from functions.escalation.channels.base import Note, Outgoing, retry_by_default
from functions.escalation.answer import Answer, accept_any_2xx
from functions.escalation.channels.text import cut, incident_url, runbook_url, service_of, summary_of
from shared import events
from shared.config import Settings
from shared.timefmt import rfc3339

SIGNATURE_HEADER = "X-Incident-Signature"
DELIVERY_HEADER = "X-Incident-Delivery"
TOLERANCE_SECONDS = 300
REASON_MAX_CHARS = 1000
# As the reference receiver (loopback/notify.py WEBHOOK_MAX_BYTES).
WEBHOOK_BODY_MAX_BYTES = 64 * 1024
# Characters kept when the body is too large: (label value and service,
# summary, reason, alert name, label key), step by step. At the last,
# 32 labels, the summary, the reason and the name of 12-byte emoji are
# about 24 KB: it fits.
SHRINK = ((64, 256, 256, 200, 100), (16, 64, 64, 64, 32))


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, now: float | None = None, tolerance: float = TOLERANCE_SECONDS) -> bool:
    """What a receiver does: parse ``t`` and every ``v1``, recompute, compare
    in constant time, and refuse a stale (or future) timestamp."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1].encode()
    # As bytes: compare_digest raises TypeError on a non-ASCII str.
    return any(hmac.compare_digest(expected, candidate.encode("utf-8", "surrogatepass")) for candidate in parts.get("v1", []))


def projection(config: Settings, incident: dict) -> dict:
    """The incident, bounded the way incident events are."""
    labels, _ = events.bounded_labels(incident.get("labels"))
    links = {"incident": incident_url(config, incident["id"])}
    runbook = runbook_url(incident)
    if runbook:
        links["runbook"] = runbook
    service = service_of(incident)
    return {
        "id": incident["id"],
        "alert_name": events.bounded(incident["alert_name"], events.NAME_MAX_CHARS),
        "priority": incident["priority"],
        "status": incident["status"],
        "summary": events.bounded(summary_of(incident), events.SUMMARY_MAX_CHARS),
        "service": events.bounded(service, events.LABEL_VALUE_MAX_CHARS),
        "labels": labels,
        "generation": incident.get("generation") or 0,
        "created_at": rfc3339(incident.get("created_at")),
        "resolved_at": rfc3339(incident.get("resolved_at")),
        "links": links,
    }


def payload(config: Settings, note: Note) -> dict:
    incident = note.incident
    body = {
        "id": f"{incident['id']}.{note.transition}.{incident.get('generation') or 0}"
              + (f".root{incident['root_generation']}" if note.transition == "root_changed" else ""),
        "type": f"incident.{note.transition}",
        "transition": note.transition,
        "sent_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "incident": projection(config, incident),
    }
    if note.reason:
        body["reason"] = events.bounded(note.reason, REASON_MAX_CHARS)
    return body


def _shrunk(body: dict, limits: tuple[int, ...], with_runbook: bool) -> dict:
    value_max, summary_max, reason_max, name_max, key_max = limits
    incident = dict(body["incident"])
    labels: dict[str, str] = {}
    for key, value in incident["labels"].items():
        # Two keys cut to the same text would merge: keep the first.
        labels.setdefault(cut(key, key_max), cut(value, value_max))
    incident.update(labels=labels, summary=cut(incident["summary"], summary_max),
                    alert_name=cut(incident["alert_name"], name_max),
                    service=None if incident["service"] is None else cut(incident["service"], value_max))
    if not with_runbook:
        incident["links"] = {k: v for k, v in incident["links"].items() if k != "runbook"}
    out = {**body, "incident": incident}
    if "reason" in out:
        out["reason"] = cut(out["reason"], reason_max)
    return out


def encoded(body: dict) -> bytes:
    """The body as sent: compact JSON, ASCII-escaped."""
    return json.dumps(body, separators=(",", ":")).encode()


def fitted(body: dict) -> bytes:
    """``body`` encoded within :data:`WEBHOOK_BODY_MAX_BYTES`, shrunk by :data:`SHRINK` when it must be."""
    raw = encoded(body)
    steps = [(limits, True) for limits in SHRINK] + [(SHRINK[-1], False)]
    for limits, with_runbook in steps:
        if len(raw) <= WEBHOOK_BODY_MAX_BYTES:
            break
        raw = encoded(_shrunk(body, limits, with_runbook))
    return raw


class Webhook:
    name = "webhook"
    title = "The outgoing webhook"
    setting = "OUTGOING_WEBHOOK_URL"

    def __init__(self, config: Settings):
        self.config = config
        self.url = config.outgoing_webhook_url
        self.secret = config.outgoing_webhook_secret

    def configured(self) -> bool:
        # Settings refuse a URL without a secret: an unsigned request is never sent.
        return bool(self.url and self.secret)

    def retry(self, status: int) -> bool:
        return status == 408 or retry_by_default(status)

    def accept(self, status: int, body: str) -> Answer:
        # Our own receivers' contract: any 2xx, whatever its body.
        return accept_any_2xx(status, body)

    def message(self, note: Note) -> Outgoing | None:
        body = payload(self.config, note)
        raw = fitted(body)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret.reveal(), int(time.time()), raw),
            DELIVERY_HEADER: body["id"],
        }
        return Outgoing("event", self.url.reveal(), raw, headers)
