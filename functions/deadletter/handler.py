"""Events the Broker could not deliver: recorded, logged at error level,
never lost. On the incident's timeline when the event names a known
incident, otherwise in ``dead_letters``. A redelivered dead letter is
recorded once."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid

from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import from_http
from flask import Request, Response

from shared import db, dead_letters, incidents
from shared.errors import BadRequest
from shared.http import read_body

log = logging.getLogger("deadletter")
MAX_BYTES = 2 * 1024 * 1024


def _error_data(raw: str | None) -> str | None:
    """Knative sends the subscriber's response body base64-encoded."""
    if not raw:
        return raw
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return raw


def _incident_id(data, attributes: dict) -> str | None:
    candidate = (data.get("incident_id") if isinstance(data, dict) else None) or attributes.get("subject")
    try:
        return str(uuid.UUID(str(candidate))) if candidate else None
    except ValueError:
        return None


def handle(request: Request) -> Response:
    body = read_body(request, MAX_BYTES)
    try:
        event = from_http(dict(request.headers), body)
    except CloudEventError as exc:
        raise BadRequest(f"not a valid CloudEvent: {exc}") from None
    attributes = {k: v for k, v in event.get_attributes().items() if k not in ("data",)}
    attributes = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in attributes.items()}
    data = event.get_data()
    details = {
        "event_id": event["id"],
        "event_type": event["type"],
        "event_source": event["source"],
        "destination": attributes.get("knativeerrordest"),
        "code": attributes.get("knativeerrorcode"),
        "error": (_error_data(attributes.get("knativeerrordata")) or "")[:2000],
    }
    log.error("Dead-lettered event", extra=details)
    incident_id = _incident_id(data, attributes)
    with db.transaction() as conn:
        if incident_id and incidents.get_incident(conn, incident_id) is not None:
            key = f"dead:{event['source']}:{event['id']}:{details['destination']}"[:200]
            incidents.add_timeline(conn, incident_id, "dead_letter", details, "broker", dedup_key=key)
        else:
            text = data if isinstance(data, str) else (json.dumps(data) if data is not None and not isinstance(data, bytes) else (data or b"").decode("utf-8", "replace"))
            dead_letters.record(conn, event["id"], event["source"], event["type"], details["destination"], details["code"],
                                details["error"], attributes, text)
    return Response(status=202)
