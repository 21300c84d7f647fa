"""Building alerts for the tests the way the parsers would."""

from __future__ import annotations

import json
from pathlib import Path

from shared.alerts import Alert, label_fingerprint
from shared.config import load_settings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SETTINGS = load_settings({"DATABASE_URL": "postgresql+pg8000://u@h/db"})


def alert(name="TestIncident", status="firing", priority="P0", fingerprint=None, **labels) -> Alert:
    labels = {"alertname": name, **labels}
    return Alert(
        fingerprint=fingerprint or label_fingerprint(labels),
        status=status,
        alert_name=name,
        priority=priority,
        summary=f"{name} summary",
        description=f"{name} description",
        labels=labels,
        annotations={"summary": f"{name} summary"},
        starts_at=None,
        ends_at=None,
        source="alertmanager",
    )


def fixture_payload(name: str) -> dict:
    return json.loads((FIXTURES / "alertmanager" / name).read_text())


def webhook(alerts: list[dict], status: str = "firing", **extra) -> dict:
    """An AlertManager webhook version 4 around raw alert objects."""
    return {
        "receiver": "incident-webhook",
        "status": status,
        "alerts": alerts,
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.test",
        "version": "4",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
        **extra,
    }


def raw_alert(name="TestIncident", status="firing", severity="critical", fingerprint=None, **labels) -> dict:
    labels = {"alertname": name, "severity": severity, **labels}
    body = {
        "status": status,
        "labels": labels,
        "annotations": {"summary": f"{name} summary", "description": "details"},
        "startsAt": "2026-11-27T21:54:18.167506298Z",
        "endsAt": "2026-11-27T22:00:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": "",
    }
    if fingerprint is not False:
        body["fingerprint"] = fingerprint or label_fingerprint(labels)
    return body


def mark_diagnosed(conn, incident_id: str) -> dict:
    """What the diagnostics function leaves behind for the incident's
    current generation and root: investigating, and its step's completed
    claim (remediation acts only on a generation that was diagnosed).
    Returns the incident as it stands."""
    from shared import claims, incidents

    incidents.mark_investigating(conn, incident_id, "diagnostics")
    row = incidents.get_incident(conn, incident_id)
    key = claims.step_key("diagnostics", row)
    claims.claim(conn, key, incident_id, 0)
    claims.complete(conn, key)
    return incidents.get_incident(conn, incident_id)
