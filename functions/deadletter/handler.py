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
from dataclasses import dataclass, replace

from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from cloudevents.sdk.converters.util import has_binary_headers
from flask import Request, Response

from shared import db, dead_letters, eventio, events, incidents
from shared.dead_letters import clip
from shared.errors import BadRequest
from shared.http import TOO_DEEP, parse_uuid, read_body

log = logging.getLogger("deadletter")
MAX_BYTES = 2 * 1024 * 1024
MAX_TIMELINE_NOTES = 20
LABEL = "reported by the Broker's dead-letter sink (not verified)"
REQUIRED = ("specversion", "id", "source", "type")


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


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is no finite number")
    return number


def _not_json(token: str):
    raise ValueError(f"{token} is not JSON")


def read_document(body: bytes) -> tuple[dict, tuple[str, ...]]:
    """A structured event's JSON, with every number strict JSON and jsonb
    can hold, and notes of those kept as text instead.

    Parsed strictly first (the C parser; only floats go through Python, to
    refuse one that overflows to Infinity): the usual letter costs that one
    parse. Only when it fails is the body parsed again keeping each number
    as Python reads it or, when Python cannot (NaN, Infinity, 1e400, a
    5000-digit integer: a 400 from the SDK, the letter lost), as its text."""
    try:
        try:
            document, notes = json.loads(body, parse_float=_finite, parse_constant=_not_json), ()
        except ValueError:
            try:  # integers in C still, unless one has more digits than int() converts
                document = json.loads(body, parse_float=_number, parse_constant=_number)
            except ValueError:
                document = json.loads(body, parse_int=_number, parse_float=_number, parse_constant=_number)
            notes = []
            # Strings are left alone here: the attributes' NUL and lone
            # surrogates are replaced when stored, the data's are kept.
            document = dead_letters.storable(document, notes, text=False)
    except RecursionError:
        raise BadRequest(f"not a valid CloudEvent: {TOO_DEEP}") from None
    except ValueError:
        raise BadRequest("not a valid CloudEvent: the body is not JSON") from None
    if not isinstance(document, dict):
        raise BadRequest("not a valid CloudEvent: the body is not a JSON object")
    return document, tuple(notes)


def keep_bytes(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Parsed:
    event: CloudEvent
    body: bytes  # the data, as it would be sent again
    data: object  # the data as JSON when it is any, to find the incident it names
    notes: tuple[str, ...] = ()  # what had to change for the letter to be stored
    data_base64: bool = False


def is_structured(request: Request, headers) -> bool:
    """As the HTTP binding says (3.1): the media type
    ``application/cloudevents`` (+json) is structured mode, whatever ce-*
    headers come with it; otherwise binary, or structured after all when
    the four required ce-* headers are missing (the SDK's leniency: such a
    letter was always read so)."""
    media = (request.mimetype or "").lower()
    if media.startswith("application/cloudevents-batch"):
        raise BadRequest("not a valid CloudEvent: batched mode is not accepted; the Broker sends one event")
    if media.startswith("application/cloudevents+") and media != "application/cloudevents+json":
        raise BadRequest(f"not a valid CloudEvent: event format {clip(media, 100)} is not supported")
    return media.startswith("application/cloudevents") or not has_binary_headers(
        {k.lower(): v for k, v in headers.items()})


def parse(request: Request) -> Parsed:
    body = read_body(request, MAX_BYTES)
    # Attribute headers are percent-encoded (binding 3.1.3.2); a letter whose
    # headers do not decode is still kept, as it came, rather than refused.
    try:
        headers = eventio.decode_headers(request.headers)
    except BadRequest:
        headers = dict(request.headers)
    if is_structured(request, headers):
        try:
            return parse_structured(body)
        except BadRequest:
            # Not an event in its body, but the four ce-* headers name one: a
            # sender that mislabelled a binary-mode letter. Kept, not lost.
            if not has_binary_headers({k.lower(): v for k, v in headers.items()}):
                raise
            # Without the media type that is not the data's: the SDK reads by it.
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    try:
        # The data is kept as bytes: the SDK would parse JSON data only to
        # refuse what Python cannot hold (a 5000-digit integer), losing the letter.
        event = from_http(headers, body, data_unmarshaller=keep_bytes)
    except CloudEventError as exc:
        raise BadRequest(f"not a valid CloudEvent: {clip(str(exc), 300)}") from None
    except (ValueError, TypeError):
        raise BadRequest("not a valid CloudEvent: the body cannot be parsed") from None
    body = event.get_data() or b""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):
        data = None
    return Parsed(event, body, data)


def parse_structured(body: bytes) -> Parsed:
    """The event from our one parse of the body (the SDK would parse it
    twice more). ``data_base64`` is kept as the bytes it encodes, never read
    as JSON: they are stored and sent again as they came."""
    document, notes = read_document(body)
    missing = [name for name in REQUIRED if name not in document]
    if missing:
        raise BadRequest(f"not a valid CloudEvent: missing required attributes: {', '.join(missing)}")
    if document["specversion"] not in ("1.0", "0.3"):
        raise BadRequest(f"not a valid CloudEvent: specversion {clip(text_of(document['specversion']), 40)} is not supported")
    attributes = {k: v for k, v in document.items() if k not in ("data", "data_base64")}
    data, is_base64 = document.get("data"), "data_base64" in document
    if is_base64:
        encoded = document["data_base64"]
        try:
            body = base64.b64decode(encoded) if isinstance(encoded, str) else None
        except (binascii.Error, ValueError):
            body = None
        if body is None:
            raise BadRequest("not a valid CloudEvent: data_base64 is not base64")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
    elif data is None:
        body = b""
    elif isinstance(data, str):
        body = data.encode("utf-8", "surrogatepass")
    else:
        try:
            body = json.dumps(data, allow_nan=False).encode()
        except RecursionError:
            raise BadRequest(f"not a valid CloudEvent: {TOO_DEEP}") from None
    try:
        event = CloudEvent(attributes, None)
    except CloudEventError as exc:
        raise BadRequest(f"not a valid CloudEvent: {clip(str(exc), 300)}") from None
    return Parsed(event, body, data, notes, is_base64)


def attributes_of(event: CloudEvent) -> dict:
    attributes = {k: v for k, v in event.get_attributes().items() if k != "data"}
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in attributes.items()}


def handle(request: Request) -> Response:
    parsed = parse(request)
    event = parsed.event
    attributes = attributes_of(event)
    letter = dead_letters.Letter(
        event_id=text_of(event["id"]),
        source=text_of(event["source"]),
        event_type=text_of(event["type"]),
        destination=text_of(attributes.get("knativeerrordest")),
        code=text_of(attributes.get("knativeerrorcode")),
        error=error_data(attributes.get("knativeerrordata")),
        attributes=attributes,
        body=parsed.body,
        cleaned=parsed.notes,
        data_base64=parsed.data_base64,
    )
    candidate = incident_id_of(parsed.data, attributes)
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
