"""Microsoft Teams: an Adaptive Card posted to a Workflows ("Post to a
channel when a webhook request is received") or incoming webhook URL, for
every transition (the opening only for ``ANNOUNCE_ON_OPEN_PRIORITIES``).

The message is ``{"type": "message", "attachments": [{"contentType":
"application/vnd.microsoft.card.adaptive", "content": <AdaptiveCard 1.4>}]}``
(Microsoft Learn, "Create incoming webhooks with Workflows for Microsoft
Teams"). A TextBlock renders a Markdown subset, so every piece of alert text
has its ASCII punctuation backslash-escaped (CommonMark lets any ASCII
punctuation be escaped that way): an alert cannot make a link, a heading or
a list. The whole request stays under Teams' 28 KB message limit, measured
as the bytes sent (JSON with ``\\uXXXX`` escapes); text shrinks until it fits,
and a runbook link too long to fit is left out (whole: a cut URL is another
URL), the card saying so.
The URL carries the workflow's signature: it is the secret.

Success is the status: a workflow answers ``202 Accepted`` with no body and
a (retiring) Microsoft 365 connector ``200`` with the text ``1``; neither
gives a body that says more, so no ``2xx`` is second-guessed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from functions.escalation.channels.actions import newest_first
from functions.escalation.channels.base import ChatChannel
from functions.escalation.channels.text import (
    TRANSITION_TITLES, Raw, description_of, diagnostics_lines, fit, incident_url, runbook_url, service_of, summary_of,
)
from shared.config import Settings

CARD_VERSION = "1.4"
CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
# Teams refuses a message over about 28 KB ("Request Entity Too Large");
# keep a margin for what the workflow wraps around the card.
TEAMS_MESSAGE_MAX_BYTES = 26 * 1024
# (header, body, fact value, details, reason) in UTF-16 units, largest first.
SHARES = ((200, 3000, 300, 2000, 1000), (200, 1500, 200, 1000, 500), (150, 600, 120, 400, 300), (100, 200, 60, 150, 150))
RUNBOOK_LEFT_OUT = "Runbook link left out: too long for a Teams message."
NEWLINE = Raw("\n\n")  # a single newline does not break a TextBlock line
_MARKDOWN = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def escape(text: str) -> str:
    """Alert text as literal text in a TextBlock: ASCII punctuation escaped."""
    return _MARKDOWN.sub(r"\\\1", text)


def _text(pieces: Iterable[str], limit: int, lines: bool = True) -> str:
    return fit(pieces, limit, escape, lines)


def _block(text: str, **style: Any) -> dict:
    return {"type": "TextBlock", "text": text, "wrap": True, **style}


def _action_text(a: dict, limit: int) -> str:
    line = f"{'ok' if a.get('success') else 'failed'}: {a.get('action')} {a.get('target') or ''}"
    if a.get("from") is not None or a.get("to") is not None:
        line += f" {a.get('from')} → {a.get('to')}"
    if a.get("dry_run"):
        line += " (dry-run)"
    if a.get("error"):
        line += f" — {a['error']}"
    return _text([line], limit)


def _actions_text(incident: dict, limit: int) -> list[str]:
    """This generation's and root's actions, newest first (channels.actions)."""
    return [Raw(newest_first(incident, limit, _action_text, NEWLINE))]


def _diagnostics_text(diagnostics: Any) -> list[str]:
    pieces: list[str] = []
    for name, value in diagnostics_lines(diagnostics):
        if pieces:
            pieces.append(NEWLINE)
        pieces.append(f"{name}: {value}")
    return pieces or ["not collected yet" if not diagnostics else "nothing found"]


def card(config: Settings, incident: dict, transition: str, reason: str | None, shares: tuple[int, ...],
         with_runbook: bool = True) -> dict:
    header, body_max, fact_max, details_max, reason_max = shares
    name, priority = incident["alert_name"], str(incident["priority"])
    summary, description = summary_of(incident), description_of(incident)
    body_pieces: list[str] = [summary]
    if description and description != summary:
        body_pieces += [NEWLINE, description]
    body = [
        _block(_text([f"[{priority}] ", name, f" {TRANSITION_TITLES.get(transition, transition)}"], header, lines=False),
               weight="Bolder", size="Medium"),
        _block(_text(body_pieces, body_max)),
        {"type": "FactSet", "facts": [{"title": title, "value": _text([value], fact_max, lines=False)} for title, value in (
            ("Priority", priority), ("Status", str(incident["status"])), ("Alert", name),
            ("Service", service_of(incident) or "unknown"))]},
        _block("Diagnostics", weight="Bolder", spacing="Medium"),
        _block(_text(_diagnostics_text(incident.get("diagnostics")), details_max), isSubtle=True),
        _block("Remediation", weight="Bolder", spacing="Medium"),
        _block(_text(_actions_text(incident, details_max), details_max), isSubtle=True),
    ]
    grouped = incident.get("correlation") or {}
    if grouped.get("alert_count", 0) > 1:
        counts = f"{grouped['alert_count']} alerts in this incident, {grouped.get('firing', 0)} firing"
        latest = [Raw("; latest: "), grouped["latest_reason"]] if grouped.get("latest_reason") else []
        body += [_block("Alerts", weight="Bolder", spacing="Medium"), _block(_text([Raw(counts), *latest], reason_max))]
    if reason:
        body += [_block("Acknowledged by" if transition == "acknowledged" else "Why", weight="Bolder", spacing="Medium"),
                 _block(_text([reason], reason_max))]
    actions = [{"type": "Action.OpenUrl", "title": "Open incident", "url": incident_url(config, incident["id"])}]
    runbook = runbook_url(incident)
    if runbook and with_runbook:
        actions.append({"type": "Action.OpenUrl", "title": "Runbook", "url": runbook})
    elif runbook:
        # A link is whole or absent: a cut URL leads somewhere else.
        body.append(_block(RUNBOOK_LEFT_OUT, isSubtle=True, spacing="Medium"))
    return {"$schema": CARD_SCHEMA, "type": "AdaptiveCard", "version": CARD_VERSION, "msteams": {"width": "Full"},
            "body": body, "actions": actions}


def size_of(message: dict) -> int:
    # requests sends json= with ensure_ascii: count what goes on the wire.
    return len(json.dumps(message).encode())


def teams_message(config: Settings, incident: dict, transition: str, reason: str | None) -> dict:
    """The largest card of :data:`SHARES` that fits the size limit, with
    the runbook link; else the largest without it. The alert's runbook URL
    is up to 2,048 characters, and each emoji in it is 12 bytes of JSON
    escapes: 24 KB alone. Without it the smallest card's alert text is
    about 1,200 UTF-16 units, at most 6 bytes each on the wire: it fits."""
    for with_runbook in (True, False):
        for shares in SHARES:
            message = _message(card(config, incident, transition, reason, shares, with_runbook))
            if size_of(message) <= TEAMS_MESSAGE_MAX_BYTES:
                return message
    # Not reached with our shares; should they grow, the header and the link still go.
    content = card(config, incident, transition, None, SHARES[-1], with_runbook=False)
    content["body"] = content["body"][:1]
    return _message(content)


def _message(content: dict) -> dict:
    return {"type": "message", "attachments": [{"contentType": CARD_CONTENT_TYPE, "contentUrl": None, "content": content}]}


class Teams(ChatChannel):
    name = "teams"
    title = "Microsoft Teams"
    setting = "TEAMS_WEBHOOK_URL"
    build = staticmethod(teams_message)

    def __init__(self, config: Settings):
        super().__init__(config, config.teams_webhook_url)
