"""``make demo``: the seed's Test 2, 4 and 5 alerts through a running
``make run``, and each incident as it ends up."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
INTAKE = f"http://127.0.0.1:{os.environ.get('INTAKE_PORT', '8081')}"
QUERY = f"http://127.0.0.1:{os.environ.get('QUERY_PORT', '8080')}"

SEED_ALERTS = [
    ("Test 2", {"alertname": "TestIncident", "severity": "critical", "service": "email"},
     {"summary": "Test incident creation", "description": "This is a test"}),
    ("Test 4", {"alertname": "KafkaConsumerLagHigh", "severity": "warning", "service": "email"},
     {"summary": "Kafka lag >15000"}),
    ("Test 5", {"alertname": "EmailServiceDown", "severity": "critical", "service": "email"},
     {"summary": "Service completely down"}),
]


def token() -> str:
    if os.environ.get("INCIDENT_API_TOKEN"):
        return os.environ["INCIDENT_API_TOKEN"]
    path = os.environ.get("INCIDENT_API_TOKEN_FILE") or ROOT / ".run" / "api-token"
    return Path(path).read_text().strip()


def show(incident: dict) -> None:
    print(f"\n  {incident['alert_name']}  [{incident['priority']}]  status: {incident['status']}  id: {incident['id']}")
    print(f"    summary:      {incident['summary']}")
    d = incident.get("diagnostics") or {}
    for section in ("pods", "metrics", "dependencies"):
        print(f"    {section + ':':<14}{d.get(section, '-')}")
    actions = incident.get("remediation_actions") or []
    if not actions:
        print("    remediation:  none")
    for a in actions:
        mode = "dry-run" if a.get("dry_run") else "live"
        result = "ok" if a.get("success") else f"FAILED ({a.get('error')})"
        print(f"    remediation:  {a['action']} {a.get('target')} {a.get('from')} -> {a.get('to')} [{mode}] {result}")
    for t in incident.get("timeline", []):
        if t["kind"] == "remediation_result":
            print(f"    outcome:      {t['details']['outcome']}: {t['details']['reason']}")
        if t["kind"] == "notification":
            n = t["details"]
            print(f"    escalation:   {n['channel']} {n['action']} on {n['transition']}: {n['outcome']}")
    print("    timeline:     " + " -> ".join(t["kind"] for t in incident.get("timeline", [])))


def main() -> None:
    headers = {"Authorization": f"Bearer {token()}"}
    try:
        requests.get(QUERY + "/health", timeout=2)
    except requests.ConnectionError:
        sys.exit("make demo needs a running `make run` (nothing answers on %s)" % QUERY)
    ids = []
    for name, labels, notes in SEED_ALERTS:
        payload = {"version": "4", "status": "firing", "receiver": "incident-webhook",
                   "alerts": [{"status": "firing", "labels": labels, "annotations": notes}]}
        response = requests.post(INTAKE + "/webhook/alert", json=payload, headers=headers, timeout=10)
        response.raise_for_status()
        result = response.json()["results"][0]
        print(f"{name}: {labels['alertname']} -> {result['action']} {result['incident_id'] or result.get('reason', '')}")
        if result["incident_id"]:
            ids.append(result["incident_id"])
    deadline = time.monotonic() + 30
    incidents = {}
    while time.monotonic() < deadline:
        incidents = {i: requests.get(f"{QUERY}/incidents/{i}", headers=headers, timeout=10).json() for i in ids}
        if all(any(t["kind"] == "remediation_result" for t in inc["timeline"]) for inc in incidents.values()):
            time.sleep(1)  # let the escalations that follow land
            incidents = {i: requests.get(f"{QUERY}/incidents/{i}", headers=headers, timeout=10).json() for i in ids}
            break
        time.sleep(0.5)
    print("\nWhere each incident ended up:")
    for incident in incidents.values():
        show(incident)
    # Resolve the demo's alerts, as AlertManager would when they clear, so the
    # next `make demo` opens fresh incidents instead of refreshing these.
    alerts = [{"status": "resolved", "labels": labels, "annotations": notes,
               "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} for _, labels, notes in SEED_ALERTS]
    payload = {"version": "4", "status": "resolved", "receiver": "incident-webhook", "alerts": alerts}
    results = requests.post(INTAKE + "/webhook/alert", json=payload, headers=headers, timeout=10).json()["results"]
    print("\nResolved the demo alerts: " + ", ".join(f"{a['labels']['alertname']} {r['action']}" for a, r in zip(alerts, results, strict=True)))


if __name__ == "__main__":
    main()
