"""Slack incoming webhook: a Block Kit message for every transition (the
opening only for the priorities in ``ANNOUNCE_ON_OPEN_PRIORITIES``).

Alert text is escaped per "Formatting text for app surfaces" (``&`` ``<``
``>`` become entities, in every text field, the fallback ``text`` included)
and bounded to Block Kit's limits; lengths are counted in UTF-16 code units,
never fewer than Slack counts. Every mrkdwn text object is ``verbatim``:
Slack links no URL or channel name and parses no mention in alert text. The webhook URL is the secret.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from functions.escalation.channels.actions import newest_first
from functions.escalation.channels.base import ChatChannel
from functions.escalation.answer import Answer, judged_on_own_hosts
from functions.escalation.channels.text import (
    TRANSITION_TITLES, Raw, description_of, diagnostics_summary, incident_url, probable_causes_brief, service_of, summary_of,
)
from functions.escalation.channels.text import fit as _fit
from shared.config import Settings

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


def escape(text: str) -> str:
    """Slack's three control characters as the entities it decodes."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fit(pieces: Iterable[str], limit: int, lines: bool = True) -> str:
    return _fit(pieces, limit, escape, lines)


def _fmt_action(a: dict, limit: int) -> str:
    pieces = [Raw(":white_check_mark: " if a.get("success") else ":x: "), Raw("`"), str(a.get("action")), Raw("` "),
              str(a.get("target") or "")]
    if a.get("from") is not None or a.get("to") is not None:
        pieces.append(f" {a.get('from')} → {a.get('to')}")
    if a.get("dry_run"):
        pieces.append(Raw(" (dry-run)"))
    if a.get("error"):
        pieces += [Raw(" — "), str(a["error"])]
    return fit(pieces, limit)


def _fmt_actions(incident: dict, limit: int) -> list[str]:
    """This generation's and root's actions, newest first (channels.actions)."""
    return [Raw(newest_first(incident, limit, _fmt_action, "\n"))]


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


def _fmt_causes(causes: list[dict]) -> list[str]:
    pieces: list[str] = []
    for n, c in enumerate(causes, 1):
        confidence = c["confidence"] if isinstance(c["confidence"], (int, float)) else 0
        pieces += [Raw(f"{'' if n == 1 else chr(10)}{n}. *"), c["cause"], Raw(f"* ({confidence:.0%}) "), c["summary"]]
    return pieces


def _mrkdwn(text: str) -> dict:
    """A mrkdwn text object that carries alert text: ``verbatim`` so that
    Slack leaves its plain text alone (a URL, a channel name or a mention in
    an alert is not linked or parsed) while our markup and our one link
    (``<url|…>``, a manual parsing string) still work (Block Kit's text
    object reference)."""
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _section(pieces: list[str], limit: int = SLACK_SECTION_MAX) -> dict:
    return {"type": "section", "text": _mrkdwn(fit(pieces, min(limit, SLACK_SECTION_MAX)))}


def _field(label: str, value: list[str]) -> dict:
    return _mrkdwn(fit([Raw(f"*{label}*\n"), *value], min(FIELD_VALUE_MAX + len(label) + 3, SLACK_FIELD_MAX), lines=False))


def slack_message(config: Settings, incident: dict, transition: str, reason: str | None) -> dict:
    name, priority = incident["alert_name"], incident["priority"]
    title = TRANSITION_TITLES.get(transition, transition)
    url = incident_url(config, incident["id"])
    summary = summary_of(incident)
    description = description_of(incident)
    causes = probable_causes_brief(incident.get("diagnostics"))
    text = fit([Raw(f"[{priority}] "), name, Raw(f" {title}: "), summary, Raw(" ("), url, Raw(")")], SLACK_FALLBACK_MAX, lines=False)
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
        {"type": "header", "text": {"type": "plain_text", "text": fit([Raw(f"[{priority}] "), name, Raw(f" {title}")], SLACK_HEADER_MAX,
                                                                    lines=False)}},
        _section(body),
        {"type": "section", "fields": fields},
        *([_section([Raw("*Probable cause*\n"), *_fmt_causes(causes)], DETAIL_SECTION_MAX)] if causes else []),
        _section([Raw("*Diagnostics*\n"), *_fmt_diagnostics(incident.get("diagnostics"))], DETAIL_SECTION_MAX),
        _section([Raw("*Remediation*\n"), *_fmt_actions(incident, DETAIL_SECTION_MAX - len("*Remediation*\n"))], DETAIL_SECTION_MAX),
    ]
    grouped = incident.get("correlation") or {}
    if grouped.get("alert_count", 0) > 1:
        counts = f"*Alerts*\n{grouped['alert_count']} alerts in this incident, {grouped.get('firing', 0)} firing"
        blocks.append(_section([Raw(counts), *([Raw("; latest: "), grouped["latest_reason"]] if grouped.get("latest_reason") else [])],
                               REASON_MAX))
    if reason:
        blocks.append(_section([Raw("*Acknowledged by*\n" if transition == "acknowledged" else "*Why*\n"), reason], REASON_MAX))
    # The one control sequence we send: a link to our own board.
    link = Raw(f"<{escape(url)}|Open incident {incident['id']}>")
    blocks.append({"type": "context", "elements": [_mrkdwn(fit([link], SLACK_SECTION_MAX))]})
    return {"text": text, "blocks": blocks[:SLACK_BLOCKS_MAX]}


# Slack's errors that say "not now" rather than "no" (its Web API's common
# errors: internal_error and fatal_error "likely due to a transient issue on
# our end", ratelimited, service_unavailable, request_timeout, and
# team_added_to_org while a workspace migrates). Slack says fatal_error may
# come after part of the work was done: a retry may then post the message
# twice, a duplicate accepted so that no message is ever lost.
SLACK_TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout", "team_added_to_org"})


# Slack's own incoming webhooks (GovSlack's live on slack-gov.com): only
# their answers are judged by the body. Anything else behind
# SLACK_WEBHOOK_URL is a Slack-compatible receiver with words of its own
# for "accepted" (Mattermost answers the text "ok", Rocket.Chat
# {"success": true}): judged by the status alone.
SLACK_WEBHOOK_HOSTS = frozenset({"hooks.slack.com", "hooks.slack-gov.com"})


def judge(status: int, body: str) -> Answer:
    """An incoming webhook accepts with ``200`` and the text ``ok``; a
    workflow's webhook trigger and the Web API answer JSON ``{"ok": true}``.
    ``{"ok": false, "error": "channel_not_found"}`` (with a ``200``) is
    Slack's own refusal: not retried, unless its error is a transient one.
    Anything else is not Slack speaking (a proxy's or a portal's page, a
    wrong endpoint): retried."""
    text = body.strip()
    if text == "ok":
        return Answer.ACCEPTED
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser goes ("[[[[…").
        return Answer.UNRECOGNISED
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        return Answer.UNRECOGNISED
    if answer["ok"]:
        return Answer.ACCEPTED
    error = answer.get("error")
    return Answer.UNRECOGNISED if isinstance(error, str) and error in SLACK_TRANSIENT_ERRORS else Answer.REFUSED


class Slack(ChatChannel):
    name = "slack"
    title = "Slack"
    setting = "SLACK_WEBHOOK_URL"
    build = staticmethod(slack_message)

    def __init__(self, config: Settings):
        super().__init__(config, config.slack_webhook_url)
        self.accept = judged_on_own_hosts(self.url.reveal() if self.url else "", SLACK_WEBHOOK_HOSTS, judge)

