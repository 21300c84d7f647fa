"""What is sent: a PagerDuty Events API v2 event and a Slack message, built
from the incident as the database holds it now.

Everything that comes from an alert (names, labels, annotations, probe
output, action errors) is untrusted text of any length:

- Slack: escaped per "Formatting text for app surfaces" (``&`` ``<`` ``>``
  become entities, in every text field, the fallback ``text`` included) and
  bounded to Block Kit's limits. Text is cut *before* it is escaped, between
  user-perceived characters, so no entity, surrogate pair or combining
  sequence is ever cut in half; lengths are counted in UTF-16 code units,
  never fewer than Slack counts.
- PagerDuty: ``summary`` at most 1,024 characters and the whole event under
  the Events API's 512 KB, ``custom_details`` shrinking first.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Iterable, Iterator

from shared.config import Settings
from shared.domain import service_of as domain_service_of
from shared.timefmt import rfc3339

ELLIPSIS = "…"
TRANSITION_TITLES = {
    "opened": "opened",
    "remediated": "remediated automatically",
    "remediation_failed": "needs a human: remediation did not fix it",
    "resolved": "resolved",
}
PRIORITY_MARK = {"P0": ":red_circle: P0", "P1": ":large_orange_circle: P1", "P2": ":large_yellow_circle: P2"}

# Block Kit (docs.slack.dev/reference/block-kit): a header's plain_text at
# most 150 characters, a section's text 3,000, a field 2,000 and at most 10
# fields, a message at most 50 blocks. Slack truncates a message's `text`
# past 40,000 characters and asks clients to keep it to 4,000; the fallback
# is a one-line notification, so it is kept much shorter.
SLACK_HEADER_MAX = 150
SLACK_SECTION_MAX = 3000
SLACK_FIELD_MAX = 2000
SLACK_FIELDS_MAX = 10
SLACK_BLOCKS_MAX = 50
SLACK_FALLBACK_MAX = 3000
# Our own shares, so the whole message stays far below the size at which
# Slack refuses it as too long (about 13,000 characters of blocks, observed).
FIELD_VALUE_MAX = 300
DETAIL_SECTION_MAX = 2000
REASON_MAX = 1000

PAGERDUTY_SUMMARY_MAX = 1024
PAGERDUTY_FIELD_MAX = 255  # source, component, group, class; dedup_key's documented limit
PAGERDUTY_EVENT_MAX_BYTES = 512 * 1024
LINK_MAX = 2048


# --------------------------------------------------------------------------- text


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _extends(ch: str, previous: str) -> bool:
    """Does ``ch`` belong to the user-perceived character before it?"""
    cp = ord(ch)
    if previous.endswith("\u200d") or ch == "\u200d":
        return True
    if unicodedata.category(ch) in ("Mn", "Me", "Mc"):
        return True
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:  # variation selectors
        return True
    if 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F:  # skin tones, emoji tags
        return True
    if _regional(ch) and len(previous) == 1 and _regional(previous):  # a flag is two
        return True
    return ch == "\n" and previous == "\r"


def _regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def clusters(text: str) -> Iterator[str]:
    """``text`` in units that must never be split: a base character with its
    combining marks, ZWJ sequences, variation selectors, flags."""
    current = ""
    for ch in text:
        if current and _extends(ch, current):
            current += ch
        else:
            if current:
                yield current
            current = ch
    if current:
        yield current


def escape(text: str) -> str:
    """Slack's three control characters as the entities it decodes."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Raw(str):
    """Our own mrkdwn (``*Priority*``, emoji codes, a link we built): sent as
    is and never cut inside."""


def fit(pieces: Iterable[str], limit: int, escaped: bool = True) -> str:
    """Join ``pieces`` (data, or :class:`Raw` markup) into at most ``limit``
    UTF-16 units. Data is cut between clusters first and escaped after, one
    cluster at a time, so an entity is whole or absent; a cut ends in ``…``."""
    units: list[str] = []
    for piece in pieces:
        if isinstance(piece, Raw):
            units.append(str(piece))
        else:
            units.extend(escape(c) if escaped else c for c in clusters(piece))
    lengths = [utf16_len(u) for u in units]
    if sum(lengths) <= limit:
        return "".join(units)
    budget, used, kept = limit - utf16_len(ELLIPSIS), 0, []
    for unit, n in zip(units, lengths, strict=True):
        if used + n > budget:
            break
        kept.append(unit)
        used += n
    return "".join(kept) + ELLIPSIS


def plain(text: str, limit: int) -> str:
    """Cut, unescaped (PagerDuty), between clusters."""
    return fit([text], limit, escaped=False)


# --------------------------------------------------------------------------- incident facts


def service_of(incident: dict) -> str | None:
    labels = incident.get("labels") or {}
    return domain_service_of(labels)


def incident_url(config: Settings, incident_id: str) -> str:
    return f"{config.public_url}/ui/incidents/{incident_id}"


def summary_of(incident: dict) -> str:
    """What the alert says in one line. Rules write `summary`, `message`,
    `title` or only `description`; any of them beats the alert name alone."""
    annotations = incident.get("annotations") or {}
    for candidate in (incident.get("summary"), annotations.get("summary"), annotations.get("message"),
                      annotations.get("title"), incident.get("description"), annotations.get("description")):
        if isinstance(candidate, str):
            line = next((ln.strip() for ln in candidate.splitlines() if ln.strip()), "")
            if line:
                return line
    return "no summary or description in the alert"


def description_of(incident: dict) -> str:
    annotations = incident.get("annotations") or {}
    text = incident.get("description") or annotations.get("description") or ""
    return text.strip() if isinstance(text, str) else ""


def summary_line(incident: dict) -> str:
    """The seed's Test 5 title: ``EmailServiceDown - Service completely down``."""
    return plain(f"{incident['alert_name']} - {summary_of(incident)}", PAGERDUTY_SUMMARY_MAX)


def diagnostics_summary(diagnostics: Any) -> dict:
    if not isinstance(diagnostics, dict) or not diagnostics:
        return {}
    pods = diagnostics.get("pods")
    if isinstance(pods, dict) and "error" not in pods:
        pods = {name: {k: v.get(k) for k in ("ready", "status", "restarts")} for name, v in pods.items() if isinstance(v, dict)}
    return {"pods": pods, "metrics": diagnostics.get("metrics"), "dependencies": diagnostics.get("dependencies")}


# --------------------------------------------------------------------------- PagerDuty


def _clip(value: Any, max_str: int, max_items: int, depth: int = 0) -> Any:
    """``value`` with every string and collection bounded, for custom_details."""
    if depth > 6:
        return ELLIPSIS
    if isinstance(value, str):
        return plain(value, max_str)
    if isinstance(value, dict):
        items = list(value.items())
        out = {plain(str(k), 200): _clip(v, max_str, max_items, depth + 1) for k, v in items[:max_items]}
        if len(items) > max_items:
            out[ELLIPSIS] = f"{len(items) - max_items} more"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [_clip(v, max_str, max_items, depth + 1) for v in value[:max_items]]
        if len(value) > max_items:
            out_list.append(f"{len(value) - max_items} more")
        return out_list
    return value


def _size(event: dict) -> int:
    # requests sends json= with ensure_ascii: count what goes on the wire.
    return len(json.dumps(event, default=str).encode())


def _bounded(event: dict) -> dict:
    """Shrink custom_details until the event is under PagerDuty's 512 KB."""
    details = event["payload"]["custom_details"]
    for max_str, max_items in ((65536, 200), (8192, 50), (1024, 20), (256, 10), (64, 5)):
        if _size(event) <= PAGERDUTY_EVENT_MAX_BYTES:
            return event
        event["payload"]["custom_details"] = _clip(details, max_str, max_items)
    if _size(event) > PAGERDUTY_EVENT_MAX_BYTES:
        event["payload"]["custom_details"] = {k: details[k] for k in ("incident_id", "priority", "status", "transition")}
        event["payload"]["custom_details"]["truncated"] = "the details were too large for PagerDuty; see the incident link"
    return event


def pagerduty_trigger(config: Settings, incident: dict, routing_key: str, transition: str, reason: str | None) -> dict:
    labels = incident.get("labels") or {}
    annotations = incident.get("annotations") or {}
    links = [{"href": incident_url(config, incident["id"]), "text": "Incident"}]
    runbook = annotations.get("runbook_url", "")
    if isinstance(runbook, str) and runbook.startswith(("http://", "https://")) and len(runbook) <= LINK_MAX:
        links.append({"href": runbook, "text": "Runbook"})
    service = service_of(incident)
    payload = {
        "summary": summary_line(incident),
        "source": plain(service or config.cluster_name, PAGERDUTY_FIELD_MAX),
        "severity": config.pagerduty_severity.get(incident["priority"], "warning"),
        "timestamp": rfc3339(incident.get("created_at")),
        "class": plain(incident["alert_name"], PAGERDUTY_FIELD_MAX),
        "custom_details": {
            "incident_id": incident["id"],
            "priority": incident["priority"],
            "status": incident["status"],
            "transition": transition,
            "summary": summary_of(incident),
            "description": description_of(incident),
            "labels": labels,
            "diagnostics": diagnostics_summary(incident.get("diagnostics")),
            "remediation_actions": incident.get("remediation_actions") or [],
            **({"reason": reason} if reason else {}),
        },
    }
    if service:
        payload["component"] = plain(service, PAGERDUTY_FIELD_MAX)
    if labels.get("namespace"):
        payload["group"] = plain(labels["namespace"], PAGERDUTY_FIELD_MAX)
    if payload["timestamp"] is None:
        del payload["timestamp"]
    return _bounded({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": incident["id"],
        "payload": payload,
        "links": links,
        "client": "Incident Response",
        "client_url": f"{config.public_url}/ui",
    })


def pagerduty_resolve(incident: dict, routing_key: str) -> dict:
    return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": incident["id"]}


# --------------------------------------------------------------------------- Slack


def _fmt_actions(actions: Any) -> list[str]:
    pieces: list[str] = []
    for a in actions if isinstance(actions, list) else []:
        if not isinstance(a, dict):
            continue
        if pieces:
            pieces.append(Raw("\n"))
        pieces += [Raw(":white_check_mark: " if a.get("success") else ":x: "), Raw("`"), str(a.get("action")), Raw("` "),
                   str(a.get("target") or "")]
        if a.get("from") is not None or a.get("to") is not None:
            pieces.append(f" {a.get('from')} → {a.get('to')}")
        if a.get("dry_run"):
            pieces.append(Raw(" (dry-run)"))
        if a.get("error"):
            pieces += [Raw(" — "), str(a["error"])]
    return pieces or [Raw("none")]


def _fmt_diagnostics(diagnostics: Any) -> list[str]:
    d = diagnostics_summary(diagnostics)
    if not d:
        return [Raw("not collected yet")]
    lines: list[list[str]] = []
    pods = d.get("pods")
    if isinstance(pods, dict):
        lines += [[Raw("*"), str(name), Raw("*: "), f"{v.get('ready')} ready, {v.get('status')}"]
                  for name, v in pods.items() if isinstance(v, dict) and "ready" in v]
        if "error" in pods:
            lines.append([Raw("pods: "), str(pods["error"])])
    elif pods:
        lines.append([Raw("pods: "), str(pods)])
    metrics = d.get("metrics")
    if isinstance(metrics, dict):
        lines += [[f"{k}: {v}"] for k, v in metrics.items() if not isinstance(v, dict)]
    deps = d.get("dependencies")
    if isinstance(deps, dict) and deps:
        lines.append([Raw("dependencies: "), ", ".join(f"{k} {v if isinstance(v, str) else 'error'}" for k, v in deps.items())])
    pieces: list[str] = []
    for line in lines:
        if pieces:
            pieces.append(Raw("\n"))
        pieces += line
    return pieces or [Raw("nothing found")]


def _section(pieces: list[str], limit: int = SLACK_SECTION_MAX) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": fit(pieces, min(limit, SLACK_SECTION_MAX))}}


def _field(label: str, value: list[str]) -> dict:
    return {"type": "mrkdwn", "text": fit([Raw(f"*{label}*\n"), *value], min(FIELD_VALUE_MAX + len(label) + 3, SLACK_FIELD_MAX))}


def slack_message(config: Settings, incident: dict, transition: str, reason: str | None) -> dict:
    name, priority = incident["alert_name"], incident["priority"]
    title = TRANSITION_TITLES.get(transition, transition)
    url = incident_url(config, incident["id"])
    summary = summary_of(incident)
    description = description_of(incident)
    text = fit([Raw(f"[{priority}] "), name, Raw(f" {title}: "), summary, Raw(" ("), url, Raw(")")], SLACK_FALLBACK_MAX)
    body: list[str] = [summary]
    if description and description != summary:
        body += [Raw("\n"), description]
    fields = [
        _field("Priority", [Raw(PRIORITY_MARK.get(priority, escape(str(priority))))]),
        _field("Status", [str(incident["status"])]),
        _field("Alert", [name]),
        _field("Service", [service_of(incident) or "unknown"]),
    ][:SLACK_FIELDS_MAX]
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": fit([Raw(f"[{priority}] "), name, Raw(f" {title}")], SLACK_HEADER_MAX)}},
        _section(body),
        {"type": "section", "fields": fields},
        _section([Raw("*Diagnostics*\n"), *_fmt_diagnostics(incident.get("diagnostics"))], DETAIL_SECTION_MAX),
        _section([Raw("*Remediation*\n"), *_fmt_actions(incident.get("remediation_actions"))], DETAIL_SECTION_MAX),
    ]
    if reason:
        blocks.append(_section([Raw("*Why*\n"), reason], REASON_MAX))
    # The one control sequence we send: a link to our own board.
    link = Raw(f"<{escape(url)}|Open incident {incident['id']}>")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": fit([link], SLACK_SECTION_MAX)}]})
    return {"text": text, "blocks": blocks[:SLACK_BLOCKS_MAX]}
