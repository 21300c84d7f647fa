"""CloudEvents over HTTP: receiving them from the Broker, answering it, and
the header encoding every sender and receiver of ours shares.

A function behind a Trigger answers ``200`` with a binary-mode CloudEvent to
reply (the Broker ingests it), or ``202`` with no body to acknowledge; a
non-event body is a failed delivery (Knative's broker answers ``502``).

Binary mode carries attributes in ``ce-*`` headers, whose values the HTTP
binding (§3.1.3.2) percent-encodes: space, ``"``, ``%`` and everything
outside printable ASCII, as the bytes of its UTF-8 form. The cloudevents SDK
(1.12) neither encodes nor decodes them, so every event leaves through
:func:`to_http` and every received one is read by :func:`parse_event` (or
its headers by :func:`decode_headers`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from flask import Request, Response

from shared import events
from shared.errors import BadRequest
from shared.http import parse_uuid, read_body

MAX_EVENT_BYTES = 1024 * 1024
ATTRIBUTE_PREFIX = "ce-"

_SAFE = frozenset(range(0x21, 0x7F)) - {0x22, 0x25}
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_QUOTED_PAIR = re.compile(r"\\(.)")


def encode_header_value(value: Any) -> str:
    """An attribute value as a binary-mode header value (§3.1.3.2)."""
    data = str(value).encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in data)


def decode_header_value(raw: str) -> str:
    """The attribute value a binary-mode header carries.

    A double-quoted value (older senders) is unquoted first, then one round
    of percent-decoding; a ``%`` not followed by two hex digits is kept as
    it is (senders that do not encode at all). Bytes that are not UTF-8 are
    refused, as the binding requires: ``ValueError``.
    """
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
    try:
        # WSGI hands header bytes over as Latin-1 text: a sender that put raw
        # UTF-8 in a header is read back as it meant it.
        data = raw.encode("latin-1")
    except UnicodeEncodeError:
        data = raw.encode("utf-8", "surrogatepass")
    decoded = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("percent-encoded bytes are not valid UTF-8") from None


def decode_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers with every ``ce-*`` value decoded; ``BadRequest`` naming
    the header when one is not valid. Other headers are left as they are."""
    result = {}
    for name, value in headers.items():
        if name.lower().startswith(ATTRIBUTE_PREFIX):
            try:
                value = decode_header_value(value)
            except ValueError as exc:
                raise BadRequest(f"header {name}: {exc}") from None
        result[name] = value
    return result


def encode_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    return {name: encode_header_value(value) if name.lower().startswith(ATTRIBUTE_PREFIX) else value
            for name, value in headers.items()}


def to_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Binary mode, attribute headers encoded."""
    headers, body = to_binary(event)
    return encode_headers(headers), body


def parse_event(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """A received CloudEvent (binary or structured); ``BadRequest`` if it is not one."""
    try:
        event = from_http(decode_headers(dict(headers)), body)
    except CloudEventError as exc:
        raise BadRequest(f"not a valid CloudEvent: {exc}") from None
    except ValueError as exc:
        # The SDK lets these through for a structured event: a null required
        # attribute, a body that is not UTF-8, an integer over int()'s digits.
        raise BadRequest(f"not a valid CloudEvent: {str(exc).split(';')[0][:200]}") from None
    for attribute in ("id", "source", "type"):
        if not str(event[attribute]):
            raise BadRequest(f"not a valid CloudEvent: the {attribute} attribute is empty")
    return event


def receive(request: Request, accepted_types: tuple[str, ...]) -> CloudEvent:
    event = parse_event(request.headers, read_body(request, MAX_EVENT_BYTES))
    if event["type"] not in accepted_types:
        raise BadRequest(f"unsupported event type {event['type']!r}; accepted: {', '.join(accepted_types)}")
    return event


def incident_id_of(event: CloudEvent) -> str:
    """The incident an event is about: ``data.incident_id`` where the data
    names one, else the subject. A data field of another type (0, false,
    "") is refused rather than passed over for the subject, and a subject
    naming another incident than the data is refused: which of the two to
    act on is not this function's guess (our events name it in both)."""
    data = event.get_data()
    named = data.get("incident_id") if isinstance(data, dict) else None
    subject = event.get("subject")
    if named is None:
        return parse_uuid(subject, "subject", detail="field")
    incident_id = parse_uuid(named, "data.incident_id", detail="field")
    if subject not in (None, "") and parse_uuid(subject, "subject", detail="field") != incident_id:
        raise BadRequest("subject and data.incident_id name different incidents", field="subject")
    return incident_id


# Generations are PostgreSQL integers (incidents.generation, .root_generation).
GENERATION_MAX = 2**31 - 1


def _counter(event: CloudEvent, name: str) -> int:
    """``data.<name>``, a generation counter: a whole JSON number from 0 to
    GENERATION_MAX, never a bool, a string or a float (``BadRequest``). An
    event that names none is of the first (0): events from before a counter
    existed, and senders that do not know it."""
    data = event.get_data()
    value = data.get(name) if isinstance(data, dict) else None
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= GENERATION_MAX:
        raise BadRequest(f"data.{name} must be a whole number from 0 to {GENERATION_MAX}")
    return value


def generation_of(event: CloudEvent) -> int:
    """The incident generation an incident event is of (``data.generation``,
    shared.events.incident_data): the consumers compare it with the
    database's (shared.claims.judge_event) and do nothing for a stale one."""
    return _counter(event, "generation")


def root_generation_of(event: CloudEvent) -> int:
    """The root generation an incident event is of (shared.events); an
    event sent before migration 0017 names none and is of the first root."""
    return _counter(event, "root_generation")


def ack() -> Response:
    return Response(status=202)


def reply(event_type: str, row: Mapping[str, Any], source: str, extra: Mapping[str, Any] | None = None,
          event_id: str | None = None) -> Response:
    """``200`` carrying the next event of the chain, id stable per incident,
    transition and generation (a redelivery replies the very same event);
    ``event_id`` names a second reply of one generation (an approved
    proposal's execution) so it is not taken for the first."""
    spec = events.incident_event(event_type, row, source, extra)
    if event_id:
        spec["id"] = event_id
    attributes = {"id": spec["id"], "type": spec["type"], "source": spec["source"], "subject": spec["subject"],
                  "datacontenttype": "application/json"}
    attributes.update(spec["extensions"])
    headers, body = to_http(CloudEvent(attributes, spec["data"]))
    return Response(body, status=200, headers=headers)
