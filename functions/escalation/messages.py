"""What is sent: a PagerDuty Events API v2 event and a Slack message, built
from the incident as the database holds it now."""

from __future__ import annotations

from typing import Any

from shared.config import Settings
from shared.timefmt import rfc3339

SUMMARY_MAX = 1024
TRANSITION_TITLES = {
    "opened": "opened",
    "remediated": "remediated automatically",
    "remediation_failed": "needs a human: remediation did not fix it",
    "resolved": "resolved",
}
PRIORITY_MARK = {"P0": ":red_circle: P0", "P1": ":large_orange_circle: P1", "P2": ":large_yellow_circle: P2"}


def service_of(incident: dict) -> str | None:
    labels = incident.get("labels") or {}
    return labels.get("service") or labels.get("app") or labels.get("deployment") or labels.get("job")


def incident_url(config: Settings, incident_id: str) -> str:
    return f"{config.public_url}/ui/incidents/{incident_id}"


def summary_line(incident: dict) -> str:
    """The seed's Test 5 title: ``EmailServiceDown - Service completely down``."""
    text = f"{incident['alert_name']} - {incident.get('summary') or incident.get('description') or 'no summary'}"
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1] + "…"


def diagnostics_summary(diagnostics: Any) -> dict:
    if not isinstance(diagnostics, dict) or not diagnostics:
        return {}
    pods = diagnostics.get("pods")
    if isinstance(pods, dict) and "error" not in pods:
        pods = {name: {k: v.get(k) for k in ("ready", "status", "restarts")} for name, v in pods.items() if isinstance(v, dict)}
    return {"pods": pods, "metrics": diagnostics.get("metrics"), "dependencies": diagnostics.get("dependencies")}


def pagerduty_trigger(config: Settings, incident: dict, routing_key: str, transition: str, reason: str | None) -> dict:
    labels = incident.get("labels") or {}
    annotations = incident.get("annotations") or {}
    links = [{"href": incident_url(config, incident["id"]), "text": "Incident"}]
    if annotations.get("runbook_url", "").startswith(("http://", "https://")):
        links.append({"href": annotations["runbook_url"], "text": "Runbook"})
    payload = {
        "summary": summary_line(incident),
        "source": service_of(incident) or config.cluster_name,
        "severity": config.pagerduty_severity.get(incident["priority"], "warning"),
        "timestamp": rfc3339(incident.get("created_at")),
        "class": incident["alert_name"],
        "custom_details": {
            "incident_id": incident["id"],
            "priority": incident["priority"],
            "status": incident["status"],
            "transition": transition,
            "description": incident.get("description") or "",
            "labels": labels,
            "diagnostics": diagnostics_summary(incident.get("diagnostics")),
            "remediation_actions": incident.get("remediation_actions") or [],
            **({"reason": reason} if reason else {}),
        },
    }
    if service_of(incident):
        payload["component"] = service_of(incident)
    if labels.get("namespace"):
        payload["group"] = labels["namespace"]
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": incident["id"],
        "payload": payload,
        "links": links,
        "client": "Incident Response",
        "client_url": f"{config.public_url}/ui",
    }


def pagerduty_resolve(incident: dict, routing_key: str) -> dict:
    return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": incident["id"]}


def _fmt_actions(actions: list) -> str:
    lines = []
    for a in actions or []:
        mark = ":white_check_mark:" if a.get("success") else ":x:"
        change = f" {a.get('from')} → {a.get('to')}" if a.get("from") is not None or a.get("to") is not None else ""
        dry = " (dry-run)" if a.get("dry_run") else ""
        error = f" — {a['error']}" if a.get("error") else ""
        lines.append(f"{mark} `{a.get('action')}` {a.get('target') or ''}{change}{dry}{error}")
    return "\n".join(lines) or "none"


def _fmt_diagnostics(diagnostics: Any) -> str:
    d = diagnostics_summary(diagnostics)
    if not d:
        return "not collected yet"
    parts = []
    pods = d.get("pods")
    if isinstance(pods, dict):
        parts += [f"*{name}*: {v.get('ready')} ready, {v.get('status')}" for name, v in pods.items() if isinstance(v, dict) and "ready" in v]
        if "error" in pods:
            parts.append(f"pods: {pods['error']}")
    elif pods:
        parts.append(f"pods: {pods}")
    metrics = d.get("metrics")
    if isinstance(metrics, dict):
        parts += [f"{k}: {v}" for k, v in metrics.items() if not isinstance(v, dict)]
    deps = d.get("dependencies")
    if isinstance(deps, dict):
        parts.append("dependencies: " + ", ".join(f"{k} {v if isinstance(v, str) else 'error'}" for k, v in deps.items()))
    return "\n".join(parts) or "nothing found"


def _escape(text: str) -> str:
    # Slack mrkdwn: these three characters are control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(config: Settings, incident: dict, transition: str, reason: str | None) -> dict:
    title = f"[{incident['priority']}] {incident['alert_name']} {TRANSITION_TITLES.get(transition, transition)}"
    url = incident_url(config, incident["id"])
    text = f"{title}: {incident.get('summary') or ''} ({url})"
    fields = [
        f"*Priority*\n{PRIORITY_MARK.get(incident['priority'], incident['priority'])}",
        f"*Status*\n{incident['status']}",
        f"*Alert*\n{_escape(incident['alert_name'])}",
        f"*Service*\n{_escape(service_of(incident) or 'unknown')}",
    ]
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _escape(incident.get("summary") or "no summary")[:3000]}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
        {"type": "section", "text": {"type": "mrkdwn", "text": ("*Diagnostics*\n" + _escape(_fmt_diagnostics(incident.get("diagnostics"))))[:3000]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": ("*Remediation*\n" + _escape(_fmt_actions(incident.get("remediation_actions"))))[:3000]}},
    ]
    if reason:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Why*\n{_escape(reason)[:2900]}"}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{url}|Open incident {incident['id']}>"}]})
    return {"text": text[:3000], "blocks": blocks}
