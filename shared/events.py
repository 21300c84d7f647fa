"""The CloudEvents the system sends and receives: types and attributes.

Event types share one reverse-DNS prefix, defined here only. Incident events
carry the extension attributes ``priority`` (p0/p1/p2) and ``alertname``
because Knative Trigger filters match attributes, never ``data``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from shared.timefmt import rfc3339

EVENT_TYPE_PREFIX = "io.incidentresponse"

INCIDENT_REPORT = f"{EVENT_TYPE_PREFIX}.incident.report"
INCIDENT_OPENED = f"{EVENT_TYPE_PREFIX}.incident.opened"
INCIDENT_DIAGNOSED = f"{EVENT_TYPE_PREFIX}.incident.diagnosed"
INCIDENT_REMEDIATED = f"{EVENT_TYPE_PREFIX}.incident.remediated"
INCIDENT_REMEDIATION_FAILED = f"{EVENT_TYPE_PREFIX}.incident.remediation_failed"
INCIDENT_RESOLVED = f"{EVENT_TYPE_PREFIX}.incident.resolved"
# A person took the incident (open -> investigating through the API or the board).
INCIDENT_ACKNOWLEDGED = f"{EVENT_TYPE_PREFIX}.incident.acknowledged"
# An engineer approved a remediation proposal; remediation executes it.
INCIDENT_REMEDIATION_APPROVED = f"{EVENT_TYPE_PREFIX}.incident.remediation_approved"

ALL_TYPES = (
    INCIDENT_REPORT,
    INCIDENT_OPENED,
    INCIDENT_DIAGNOSED,
    INCIDENT_REMEDIATED,
    INCIDENT_REMEDIATION_FAILED,
    INCIDENT_RESOLVED,
    INCIDENT_ACKNOWLEDGED,
    INCIDENT_REMEDIATION_APPROVED,
)


def transition_of(event_type: str) -> str:
    """``io.incidentresponse.incident.opened`` -> ``opened``."""
    return event_type.rsplit(".", 1)[-1]


# Events carry a bounded projection of the incident, never the whole row:
# the intake accepts 1 MiB bodies, subscribers refuse events over
# shared.eventio.MAX_EVENT_BYTES (1 MiB), and every consumer reads the
# incident from the database anyway. Bounds are in characters; the worst
# case in bytes is 12 per character (an astral character is a JSON
# surrogate pair, ``\ud83d\ude00``), which EVENT_DATA_MAX_BYTES accounts for.
NAME_MAX_CHARS = 200
SUMMARY_MAX_CHARS = 1024
LABELS_MAX = 32
LABEL_KEY_MAX_CHARS = 100
LABEL_VALUE_MAX_CHARS = 256
TEXT_MAX_CHARS = 200  # fingerprint, source, status, times
EXTRA_MAX_BYTES = 32 * 1024  # what a step adds (diagnostics, remediation result)
EXTRA_STRING_MAX_CHARS = 1024
EXTRA_ITEMS_MAX = 50
EXTRA_DEPTH_MAX = 5
EVENT_DATA_MAX_BYTES = 256 * 1024
# Labels a reader looks for first keep their place when some must go.
_KEY_LABELS = ("alertname", "severity", "priority", "service", "namespace", "pod", "deployment", "node",
               "instance", "job", "container", "app")
TRUNCATED = "…"


def bounded(text: Any, limit: int) -> Any:
    """``text`` cut to ``limit`` characters (the last one an ellipsis); None stays None."""
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + TRUNCATED


def bounded_labels(labels: Mapping[str, Any] | None) -> tuple[dict[str, str], int]:
    """At most LABELS_MAX labels (the well-known ones first), each bounded;
    and how many were left out."""
    labels = labels or {}
    order = [k for k in _KEY_LABELS if k in labels] + sorted(k for k in labels if k not in _KEY_LABELS)
    kept: dict[str, str] = {}
    for key in order:
        short = bounded(key, LABEL_KEY_MAX_CHARS)
        # Two long keys cut to the same text would silently merge: keep the first.
        if len(kept) < LABELS_MAX and short not in kept:
            kept[short] = bounded(labels[key], LABEL_VALUE_MAX_CHARS)
    return kept, len(order) - len(kept)


def _bounded_json(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return bounded(value, EXTRA_STRING_MAX_CHARS)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= EXTRA_DEPTH_MAX:
        return TRUNCATED
    if isinstance(value, Mapping):
        items = list(value.items())[:EXTRA_ITEMS_MAX]
        return {bounded(k, EXTRA_STRING_MAX_CHARS): _bounded_json(v, depth + 1) for k, v in items}
    if isinstance(value, (list, tuple)):
        return [_bounded_json(v, depth + 1) for v in list(value)[:EXTRA_ITEMS_MAX]]
    return bounded(rfc3339(value), EXTRA_STRING_MAX_CHARS)


def bounded_extra(value: Any) -> Any:
    """What a step adds to its event, bounded in shape and in size; what is
    still too big is replaced by a note (the database has the full record)."""
    shaped = _bounded_json(value)
    size = len(json.dumps(shaped, default=str))
    if size > EXTRA_MAX_BYTES:
        return {"omitted": f"{size} bytes of JSON is over the event limit of {EXTRA_MAX_BYTES}; read the incident"}
    return shaped


def incident_data(row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` of every incident event: the bounded projection."""
    labels, labels_omitted = bounded_labels(row.get("labels"))
    data = {
        "incident_id": row["id"],
        "alert_name": bounded(row["alert_name"], NAME_MAX_CHARS),
        "priority": row["priority"],
        "status": row["status"],
        "summary": bounded(row.get("summary") or "", SUMMARY_MAX_CHARS),
        "labels": labels,
        "fingerprint": bounded(row.get("fingerprint"), TEXT_MAX_CHARS),
        "source": bounded(row.get("source"), TEXT_MAX_CHARS),
        "starts_at": bounded(rfc3339(row.get("starts_at")), TEXT_MAX_CHARS),
        "created_at": bounded(rfc3339(row.get("created_at")), TEXT_MAX_CHARS),
        "resolved_at": bounded(rfc3339(row.get("resolved_at")), TEXT_MAX_CHARS),
        "generation": row.get("generation") or 0,
        # Which root of the generation the event is of (migration 0017): the
        # consumers scope their claims by it. Events from before it carry
        # none and are of the first root (0).
        "root_generation": row.get("root_generation") or 0,
    }
    if labels_omitted:
        data["labels_omitted"] = labels_omitted
    return data


def step_event_id(event_type: str, row: Mapping[str, Any]) -> str:
    """The id of a step's reply (``incident.diagnosed``…): stable per
    incident, transition and generation, and per root once another alert
    took over as root (migration 0017), so the new root's diagnosis is not
    taken for a redelivery of the first one's."""
    base = f"{row['id']}.{transition_of(event_type)}.{row.get('generation') or 0}"
    return f"{base}.root{row['root_generation']}" if row.get("root_generation") else base


def incident_event(event_type: str, row: Mapping[str, Any], source: str, extra: Mapping[str, Any] | None = None) -> dict:
    """An outbox row for an incident event; the id is stable per incident,
    transition and generation, so a re-publish is recognisably the same event."""
    data = incident_data(row)
    for key, value in (extra or {}).items():
        data[key] = bounded_extra(value)
    return {
        "id": f"{row['id']}.{transition_of(event_type)}.{row.get('generation') or 0}",
        "type": event_type,
        "source": source,
        "subject": row["id"],
        "extensions": {"priority": str(row["priority"]).lower(), "alertname": bounded(row["alert_name"], NAME_MAX_CHARS)},
        "data": data,
    }
