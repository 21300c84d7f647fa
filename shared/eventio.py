"""Receiving CloudEvents from the Broker and answering it.

A function behind a Trigger answers ``200`` with a binary-mode CloudEvent to
reply (the Broker ingests it), or ``202`` with no body to acknowledge; a
non-event body would be taken for a failed reply.
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http
from flask import Request, Response

from shared import events
from shared.errors import BadRequest
from shared.http import read_body

MAX_EVENT_BYTES = 1024 * 1024


def receive(request: Request, accepted_types: tuple[str, ...]) -> CloudEvent:
    body = read_body(request, MAX_EVENT_BYTES)
    try:
        event = from_http(dict(request.headers), body)
    except CloudEventError as exc:
        raise BadRequest(f"not a valid CloudEvent: {exc}") from None
    if event["type"] not in accepted_types:
        raise BadRequest(f"unsupported event type {event['type']!r}; accepted: {', '.join(accepted_types)}")
    return event


def incident_id_of(event: CloudEvent) -> str:
    data = event.get_data()
    raw = (data.get("incident_id") if isinstance(data, dict) else None) or event.get("subject")
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        raise BadRequest("the event names no incident (data.incident_id or subject must be a UUID)") from None


def ack() -> Response:
    return Response(status=202)


def reply(event_type: str, row: Mapping[str, Any], source: str, extra: Mapping[str, Any] | None = None) -> Response:
    """``200`` carrying the next event of the chain, id stable per incident,
    transition and generation (a redelivery replies the very same event)."""
    spec = events.incident_event(event_type, row, source, extra)
    attributes = {"id": spec["id"], "type": spec["type"], "source": spec["source"], "subject": spec["subject"]}
    attributes.update(spec["extensions"])
    headers, body = to_binary(CloudEvent(attributes, spec["data"]))
    return Response(body, status=200, headers=headers)
