"""Events the Broker could not deliver: recorded, logged at error level,
never lost. Every dead letter goes into ``dead_letters`` with what it takes
to redeliver it; one that names a known incident is also noted on that
incident's timeline. A dead letter handed over twice is recorded once.

Anything inside the cluster can post here, so a dead letter is evidence,
not truth: the timeline note is short, bounded, labelled as reported by
the dead-letter sink, only for the system's own event types, and at most
``MAX_TIMELINE_NOTES`` per incident.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import replace

from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from flask import Request, Response

from shared import db, dead_letters, eventio, events, incidents
from shared.dead_letters import clip
from shared.errors import BadRequest
from shared.http import TOO_DEEP, parse_uuid, read_body

log = logging.getLogger("deadletter")
MAX_BYTES = 2 * 1024 * 1024
MAX_TIMELINE_NOTES = 20
LABEL = "reported by the Broker's dead-letter sink (not verified)"


def error_data(raw: str | None) -> str | None:
    """Knative sends the subscriber's response body base64-encoded; anything
    that is not valid base64 is kept as it came."""
    if not raw:
        return raw
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return raw


def incident_id_of(data, attributes: dict) -> str | None:
    candidate = (data.get("incident_id") if isinstance(data, dict) else None) or attributes.get("subject")
    try:
        return parse_uuid(candidate, "incident_id") if candidate else None
    except BadRequest:
        return None


def parse(request: Request) -> tuple[CloudEvent, bytes]:
    """The event and its data as bytes, exactly as it would be sent again."""
    body = read_body(request, MAX_BYTES)
    try:
        # Attribute headers are percent-encoded (binding 3.1.3.2); a letter whose
        # headers do not decode is still kept, as it came, rather than refused.
        try:
            headers = eventio.decode_headers(request.headers)
        except BadRequest:
            headers = dict(request.headers)
        event = from_http(headers, body)
    except CloudEventError as exc:
        raise BadRequest(f"not a valid CloudEvent: {clip(str(exc), 300)}") from None
    except RecursionError:
        raise BadRequest(f"not a valid CloudEvent: {TOO_DEEP}") from None
    except (ValueError, TypeError):
        raise BadRequest("not a valid CloudEvent: the body cannot be parsed") from None
    if (request.mimetype or "").startswith("application/cloudevents"):
        data = event.get_data()
        if data is None:
            body = b""
        elif isinstance(data, bytes):
            body = data
        elif isinstance(data, str):
            body = data.encode("utf-8", "surrogatepass")
        else:
            body = json.dumps(data).encode()
    return event, body


def attributes_of(event: CloudEvent) -> dict:
    attributes = {k: v for k, v in event.get_attributes().items() if k != "data"}
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in attributes.items()}


def handle(request: Request) -> Response:
    event, body = parse(request)
    attributes = attributes_of(event)
    letter = dead_letters.Letter(
        event_id=str(event["id"]),
        source=str(event["source"]),
        event_type=str(event["type"]),
        destination=attributes.get("knativeerrordest"),
        code=attributes.get("knativeerrorcode"),
        error=error_data(attributes.get("knativeerrordata")),
        attributes=attributes,
        body=body,
    )
    candidate = incident_id_of(event.get_data(), attributes)
    with db.transaction() as conn:
        known = candidate if candidate and incidents.get_incident(conn, candidate) is not None else None
        letter = replace(letter, incident_id=known)
        letter_id, redeliveries, _ = dead_letters.record(conn, letter)
        if known and letter.event_type in events.ALL_TYPES:
            note(conn, known, letter_id, redeliveries, letter)
    log.error("Dead-lettered event", extra={
        "dead_letter_id": letter_id, "event_id": clip(letter.event_id, 200), "event_type": clip(letter.event_type, 200),
        "incident_id": known, "destination": clip(letter.destination, 300), "code": clip(letter.code, 10),
        "error": clip(letter.error, 300)})
    return Response(status=202)


def note(conn, incident_id: str, letter_id: int, redeliveries: int, letter: dead_letters.Letter) -> None:
    """A short, labelled pointer to the dead letter on the incident's timeline."""
    if dead_letters.timeline_entries(conn, incident_id) >= MAX_TIMELINE_NOTES:
        return
    details = {
        "label": LABEL,
        "dead_letter_id": letter_id,
        "event_id": clip(letter.event_id, 120),
        "event_type": letter.event_type,
        "destination": clip(letter.destination, 200),
        "code": clip(letter.code, 10),
        "error": clip(letter.error, 300),
    }
    incidents.add_timeline(conn, incident_id, "dead_letter", details, "deadletter",
                           dedup_key=f"dead:{letter_id}:{redeliveries}")
