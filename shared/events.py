"""The CloudEvents the system sends and receives: types and attributes.

Event types share one reverse-DNS prefix, defined here only. Incident events
carry the extension attributes ``priority`` (p0/p1/p2) and ``alertname``
because Knative Trigger filters match attributes, never ``data``.
"""

from __future__ import annotations

from typing import Any, Mapping

from shared.timefmt import rfc3339

EVENT_TYPE_PREFIX = "io.incidentresponse"

INCIDENT_REPORT = f"{EVENT_TYPE_PREFIX}.incident.report"
INCIDENT_OPENED = f"{EVENT_TYPE_PREFIX}.incident.opened"
INCIDENT_DIAGNOSED = f"{EVENT_TYPE_PREFIX}.incident.diagnosed"
INCIDENT_REMEDIATED = f"{EVENT_TYPE_PREFIX}.incident.remediated"
INCIDENT_REMEDIATION_FAILED = f"{EVENT_TYPE_PREFIX}.incident.remediation_failed"
INCIDENT_RESOLVED = f"{EVENT_TYPE_PREFIX}.incident.resolved"

ALL_TYPES = (
    INCIDENT_REPORT,
    INCIDENT_OPENED,
    INCIDENT_DIAGNOSED,
    INCIDENT_REMEDIATED,
    INCIDENT_REMEDIATION_FAILED,
    INCIDENT_RESOLVED,
)


def transition_of(event_type: str) -> str:
    """``io.incidentresponse.incident.opened`` -> ``opened``."""
    return event_type.rsplit(".", 1)[-1]


def incident_data(row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` of every incident event: what a subscriber needs without a query."""
    return {
        "incident_id": row["id"],
        "alert_name": row["alert_name"],
        "priority": row["priority"],
        "status": row["status"],
        "summary": row.get("summary") or "",
        "description": row.get("description") or "",
        "labels": row.get("labels") or {},
        "annotations": row.get("annotations") or {},
        "fingerprint": row.get("fingerprint"),
        "source": row.get("source"),
        "starts_at": rfc3339(row.get("starts_at")),
        "created_at": rfc3339(row.get("created_at")),
        "resolved_at": rfc3339(row.get("resolved_at")),
        "generation": row.get("generation") or 0,
    }


def incident_event(event_type: str, row: Mapping[str, Any], source: str, extra: Mapping[str, Any] | None = None) -> dict:
    """An outbox row for an incident event; the id is stable per incident,
    transition and generation, so a re-publish is recognisably the same event."""
    data = incident_data(row)
    if extra:
        data.update(extra)
    return {
        "id": f"{row['id']}.{transition_of(event_type)}.{row.get('generation') or 0}",
        "type": event_type,
        "source": source,
        "subject": row["id"],
        "extensions": {"priority": str(row["priority"]).lower(), "alertname": row["alert_name"]},
        "data": data,
    }
