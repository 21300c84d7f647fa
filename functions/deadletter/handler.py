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
import math
from dataclasses import replace

from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from cloudevents.sdk.converters import is_binary
from flask import Request, Response

from shared import db, dead_letters, eventio, events, incidents
from shared.dead_letters import clip
from shared.errors import BadRequest
from shared.http import TOO_DEEP, parse_uuid, read_body

log = logging.getLogger("deadletter")
MAX_BYTES = 2 * 1024 * 1024
MAX_TIMELINE_NOTES = 20
LABEL = "reported by the Broker's dead-letter sink (not verified)"


def text_of(value) -> str | None:
    """An attribute for a text column: a structured event may send any JSON
    value where a string belongs, kept as its JSON text."""
    return value if value is None or isinstance(value, str) else json.dumps(value, default=str)


def error_data(raw) -> str | None:
    """Knative sends the subscriber's response body base64-encoded; anything
    that is not valid base64 is kept as it came (a structured event may send
    any JSON value: kept as its JSON text)."""
    if not isinstance(raw, str):
        return text_of(raw)
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


def _number(text: str):
    """A JSON number as Python holds it, or as its text when Python cannot
    (NaN, ±Infinity, 1e400, more digits than int() converts)."""
    if text in ("NaN", "Infinity", "-Infinity"):
        return dead_letters.NumberText(text)
    try:
        number = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return dead_letters.NumberText(text)
    return number if math.isfinite(number) else dead_letters.NumberText(text)


def storable_document(body: bytes) -> tuple[bytes, tuple[str, ...]]:
    """A structured event's JSON with every number strict JSON and jsonb can
    hold, and notes of those kept as text instead. The CloudEvents SDK reads
    NaN, Infinity and 1e400 as floats PostgreSQL refuses, and a 5000-digit
    integer not at all (a 400: the letter lost); parsed here first, each
    becomes its own text and the letter is stored, noted as cleaned."""
    kept_as_text = []

    def number(text: str):
        value = _number(text)
        if isinstance(value, dead_letters.NumberText):
            kept_as_text.append(value)
        return value

    try:
        document = json.loads(body, parse_int=number, parse_float=number, parse_constant=number)
    except ValueError:
        return body, ()  # not JSON: the SDK says why
    if not kept_as_text:
        return body, ()  # the usual event: nothing to walk
    notes: list[str] = []
    # Strings are left alone: the SDK reads them back exactly, and the
    # attributes' NUL and lone surrogates are replaced when stored.
    document = dead_letters.storable(document, notes, text=False)
    return json.dumps(document).encode(), tuple(notes)


def keep_bytes(data: bytes) -> bytes:
    return data


def parse(request: Request) -> tuple[CloudEvent, bytes, tuple[str, ...]]:
    """The event, its data as bytes, exactly as it would be sent again, and
    notes of what had to change for the letter to be stored."""
    body = read_body(request, MAX_BYTES)
    notes: tuple[str, ...] = ()
    try:
        # Attribute headers are percent-encoded (binding 3.1.3.2); a letter whose
        # headers do not decode is still kept, as it came, rather than refused.
        try:
            headers = eventio.decode_headers(request.headers)
        except BadRequest:
            headers = dict(request.headers)
        if is_binary(headers):
            # The data is kept as bytes: the SDK would parse JSON data only to
            # refuse what Python cannot hold (a 5000-digit integer), losing the letter.
            event = from_http(headers, body, data_unmarshaller=keep_bytes)
        else:
            body, notes = storable_document(body)
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
    return event, body, notes


def data_of(event: CloudEvent, body: bytes):
    """The event's data as JSON if it is any, to find the incident it names."""
    data = event.get_data()
    if not isinstance(data, bytes):
        return data
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def attributes_of(event: CloudEvent) -> dict:
    attributes = {k: v for k, v in event.get_attributes().items() if k != "data"}
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in attributes.items()}


def handle(request: Request) -> Response:
    event, body, cleaned = parse(request)
    attributes = attributes_of(event)
    letter = dead_letters.Letter(
        event_id=text_of(event["id"]),
        source=text_of(event["source"]),
        event_type=text_of(event["type"]),
        destination=text_of(attributes.get("knativeerrordest")),
        code=text_of(attributes.get("knativeerrorcode")),
        error=error_data(attributes.get("knativeerrordata")),
        attributes=attributes,
        body=body,
        cleaned=cleaned,
    )
    candidate = incident_id_of(data_of(event, body), attributes)
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
