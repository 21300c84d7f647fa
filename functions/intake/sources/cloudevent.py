"""The ``incident.report`` CloudEvent other services send through the Broker
(schema in the README), on the intake's CloudEvent routes ``POST /`` and
``POST /events``. One alert per event."""

from __future__ import annotations

from typing import Any

from functions.intake.sources.base import CLOUDEVENT, Source
from shared.alerts import (
    MISSING,
    Alert,
    InvalidPayload,
    Parsed,
    alert_name_of,
    build,
    clean,
    fingerprint_of,
    optional_str,
    parse_time,
    priority_of,
    status_of,
    string_map,
    summary_from,
)
from shared.config import Settings
from shared.domain import PRIORITIES

NAME = "cloudevent"


def parse(data: Any, config: Settings) -> Parsed:
    """The event's data; a bad field is a ``400`` (one alert: nothing else
    in the event could be stored)."""
    return Parsed(items=[parse_report(data, config)])


def parse_report(data: Any, config: Settings) -> Alert:
    if not isinstance(data, dict):
        raise InvalidPayload("data", "must be a JSON object")
    data = {k: v for k, v in data.items() if v is not None}
    labels = string_map(data.get("labels", MISSING), "labels")
    annotations = string_map(data.get("annotations", MISSING), "annotations", compound_as_json=True)
    name = data.get("alert_name", labels.get("alertname"))
    if not isinstance(name, str):
        raise InvalidPayload("alert_name", "required, must be a string")
    labels = {**labels, "alertname": clean(name.strip())}
    alert_name = alert_name_of(labels, "alert_name")
    priority = data.get("priority")
    if priority is None:
        priority = priority_of(labels, config)
    elif not isinstance(priority, str) or priority.upper() not in PRIORITIES:
        raise InvalidPayload("priority", f"must be one of {', '.join(PRIORITIES)}")
    description = optional_str(data.get("description", MISSING), "description") or annotations.get("description", "")
    summary = optional_str(data.get("summary", MISSING), "summary") or summary_from({**annotations, "description": description})
    return build(
        labels=labels,
        annotations=annotations,
        status=status_of(data.get("status", "firing"), "status"),
        fingerprint=fingerprint_of(data.get("fingerprint", MISSING), labels, "fingerprint"),
        alert_name=alert_name,
        priority=priority.upper(),
        summary=summary,
        description=description,
        starts_at=parse_time(data.get("starts_at", MISSING), "starts_at"),
        ends_at=parse_time(data.get("ends_at", MISSING), "ends_at"),
        source=NAME,
        config=config,
    )


# The handler applies EVENTS_REQUIRE_TOKEN itself (the Broker sends no token
# unless configured to); the PingSource's sweep arrives on the same routes.
SOURCE = Source(name=NAME, parse=parse, routes=("/", "/events"), transport=CLOUDEVENT)
