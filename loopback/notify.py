"""Loopback PagerDuty Events API v2, Slack incoming-webhook, Microsoft Teams
Workflows webhook and signed outgoing-webhook receivers that check every
request against the documented shape and answer from a script."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import time
import uuid
from collections import deque
from datetime import datetime
from pathlib import Path

import jsonschema

from loopback.servers import Recorded, RecordingServer

PD_SEVERITIES = {"critical", "error", "warning", "info"}
PD_ACTIONS = {"trigger", "acknowledge", "resolve"}
PD_MAX_EVENT_BYTES = 512 * 1024
PD_SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "pagerduty-events-v2.openapi.json"
SLACK_BLOCKS = {"header", "section", "context", "divider", "actions", "image"}
# Block Kit limits (docs.slack.dev/reference/block-kit), counted in UTF-16
# code units: never fewer than Slack counts.
SLACK_HEADER_MAX = 150
SLACK_SECTION_MAX = 3000
SLACK_FIELD_MAX = 2000
SLACK_FIELDS_MAX = 10
SLACK_CONTEXT_ELEMENTS_MAX = 10
SLACK_BLOCKS_MAX = 50
SLACK_TEXT_MAX = 40000
# What Slack parses in text: <...> control sequences and &...; entities.
SLACK_CONTROL = re.compile(r"<([^<>]*)>")
SLACK_ENTITY = re.compile(r"&(amp|lt|gt);")
OUR_LINK = re.compile(r"^https?://[^|/\s]+/ui/incidents/[0-9a-f-]{36}\|Open incident [0-9a-f-]{36}$")


@functools.lru_cache(maxsize=1)
def pagerduty_validator() -> jsonschema.Draft7Validator:
    """The request body of POST /enqueue in PagerDuty's own OpenAPI document."""
    spec = json.loads(PD_SCHEMA_FILE.read_text())
    body = spec["paths"]["/enqueue"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft7Validator({**body, "components": spec["components"]}, format_checker=jsonschema.FormatChecker())


def pagerduty_problems(event) -> list[str]:
    """What the Events API v2 would refuse in this event: the official schema,
    then the limits its documentation states beside it."""
    if not isinstance(event, dict):
        return ["event must be an object"]
    problems = [f"{'/'.join(map(str, e.absolute_path)) or 'event'}: {e.message}" for e in pagerduty_validator().iter_errors(event)]
    if len(json.dumps(event).encode()) > PD_MAX_EVENT_BYTES:
        problems.append("the event is over 512 KB")
    if not isinstance(event.get("routing_key"), str) or len(event["routing_key"]) != 32:
        problems.append("routing_key must be a 32-character string")
    dedup = event.get("dedup_key")
    if dedup is not None and (not isinstance(dedup, str) or len(dedup) > 255):
        problems.append("dedup_key must be a string of at most 255 characters")
    if event.get("event_action") in ("acknowledge", "resolve") and not dedup:
        problems.append("dedup_key is required to acknowledge or resolve")
    if event.get("event_action") == "trigger":
        payload = event.get("payload")
        if not isinstance(payload, dict):
            return problems + ["payload is required for trigger"]
        summary = payload.get("summary")
        if not isinstance(summary, str) or not summary.strip() or len(summary) > 1024:
            problems.append("payload.summary must be 1-1024 characters")
        if "timestamp" in payload:
            try:
                datetime.fromisoformat(str(payload["timestamp"]).replace("Z", "+00:00"))
            except ValueError:
                problems.append("payload.timestamp must be ISO 8601")
        for link in event.get("links", []):
            if not isinstance(link, dict) or not str(link.get("href", "")).startswith(("http://", "https://")):
                problems.append("links[].href must be a URL")
    allowed = {"routing_key", "event_action", "dedup_key", "payload", "links", "images", "client", "client_url"}
    unknown = set(event) - allowed
    if unknown:
        problems.append(f"unknown fields {sorted(unknown)}")
    return problems


def u16(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def slack_texts(message) -> list[tuple[str, str]]:
    """(where, text) of every text Slack renders in the message."""
    texts = [("text", message.get("text", ""))] if isinstance(message.get("text"), str) else []
    for i, block in enumerate(message.get("blocks") or []):
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), dict):
            texts.append((f"blocks[{i}].text", str(block["text"].get("text", ""))))
        for j, f in enumerate(block.get("fields") or []):
            texts.append((f"blocks[{i}].fields[{j}]", str(f.get("text", "")) if isinstance(f, dict) else ""))
        for j, e in enumerate(block.get("elements") or []):
            if isinstance(e, dict) and "text" in e:
                texts.append((f"blocks[{i}].elements[{j}]", str(e["text"])))
    return texts


def slack_control_sequences(message) -> list[str]:
    """Every <...> sequence Slack would parse (a mention, a channel ping, a
    link) anywhere in the message."""
    return [m for _, text in slack_texts(message) for m in SLACK_CONTROL.findall(text)]


def slack_escaping_problems(message) -> list[str]:
    """What Slack would render as something other than the text: a control
    sequence we did not mean (``<!channel>``, ``<@U123>``, a foreign link) or a
    bare ``&``, ``<``, ``>``. Slack accepts such a message (200) and pings or
    links; the receiver reports it so the tests fail."""
    problems = []
    for where, text in slack_texts(message):
        for seq in SLACK_CONTROL.findall(text):
            if not OUR_LINK.match(seq):
                problems.append(f"{where}: control sequence <{seq[:60]}>")
        rest = SLACK_ENTITY.sub("", SLACK_CONTROL.sub("", text))
        for ch in "&<>":
            if ch in rest:
                problems.append(f"{where}: unescaped {ch!r}")
    return problems


def slack_problems(message) -> list[str]:
    """What makes Slack answer 400 (``invalid_blocks``, ``no_text``)."""
    problems = []
    if not isinstance(message, dict):
        return ["message must be an object"]
    if not isinstance(message.get("text"), str) or not message["text"].strip():
        problems.append("text (the notification fallback) is required")
    elif u16(message["text"]) > SLACK_TEXT_MAX:
        problems.append("text is over 40,000 characters")
    blocks = message.get("blocks", [])
    if not isinstance(blocks, list) or len(blocks) > SLACK_BLOCKS_MAX:
        return problems + ["blocks must be a list of at most 50"]
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in SLACK_BLOCKS:
            problems.append(f"blocks[{i}].type {kind!r} is unknown")
            continue
        text = block.get("text")
        if kind == "header" and (not isinstance(text, dict) or text.get("type") != "plain_text"
                                 or not text.get("text") or u16(text["text"]) > SLACK_HEADER_MAX):
            problems.append(f"blocks[{i}] header must be plain_text of 1-150 characters")
        if kind == "section":
            if text is not None and (not isinstance(text, dict) or not text.get("text") or u16(text["text"]) > SLACK_SECTION_MAX):
                problems.append(f"blocks[{i}].text must be 1-3000 characters")
            fields = block.get("fields", [])
            if len(fields) > SLACK_FIELDS_MAX or any(not f.get("text") or u16(f["text"]) > SLACK_FIELD_MAX for f in fields):
                problems.append(f"blocks[{i}].fields: at most 10 of 1-2000 characters")
            if text is None and not fields:
                problems.append(f"blocks[{i}] section needs text or fields")
        if kind == "context":
            elements = block.get("elements") or []
            if not elements or len(elements) > SLACK_CONTEXT_ELEMENTS_MAX or any(u16(str(e.get("text", ""))) > SLACK_SECTION_MAX for e in elements):
                problems.append(f"blocks[{i}].elements: 1-10 of at most 3000 characters")
    return problems


class ScriptedReceiver:
    """Answers the next scripted response (status, headers, body) or 'hang:N';
    when the script is empty, validates and accepts (``accept_body``: bytes,
    or made from the request's JSON)."""

    def __init__(self, validate, accept_status: int, accept_body, refuse=None, accepted_but_wrong=None,
                 accept_type: str = "application/json", validate_request=None):
        self.validate = validate
        # Checks of the request itself (headers, signature, exact bytes).
        self.validate_request = validate_request
        self.accept = (accept_status, accept_body)
        self.accept_type = accept_type
        self.refuse = refuse or _refuse_json
        # Problems the real service accepts silently (Slack renders a ping):
        # recorded as invalid so that a test fails, answered as accepted.
        self.accepted_but_wrong = accepted_but_wrong
        self.script: deque = deque()
        self.invalid: list[tuple[Recorded, list[str]]] = []
        self.server = RecordingServer(self._respond)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Recorded]:
        return self.server.requests

    def bodies(self) -> list:
        return [r.json() for r in self.server.requests]

    def reset(self):
        self.script.clear()
        self.invalid.clear()
        self.server.requests.clear()

    def _respond(self, req: Recorded):
        if self.script:
            step = self.script.popleft()
            if callable(step):
                return step(req)
            if isinstance(step, str) and step.startswith("hang:"):
                time.sleep(float(step.split(":")[1]))
                return 504, {}, b""
            return step
        try:
            message = json.loads(req.body) if req.body else None
        except ValueError:
            message = None
        problems = self.validate(message) if message is not None else ["empty or malformed body"]
        if self.validate_request:
            problems = self.validate_request(req) + problems
        if problems:
            self.invalid.append((req, problems))
            return self.refuse(problems)
        if self.accepted_but_wrong:
            wrong = self.accepted_but_wrong(message)
            if wrong:
                self.invalid.append((req, wrong))
        status, body = self.accept
        return status, {"Content-Type": self.accept_type}, body(message) if callable(body) else body


def _refuse_json(problems: list[str]):
    return 400, {"Content-Type": "application/json"}, json.dumps({"status": "invalid event", "message": "Event object is invalid", "errors": problems}).encode()


def _refuse_slack(problems: list[str]):
    # Slack's incoming webhooks answer a bare error code.
    code = b"no_text" if problems and problems[0].startswith("text (") else b"invalid_blocks"
    return 400, {"Content-Type": "text/html"}, code


def _pagerduty_accepted(event: dict) -> bytes:
    # components.responses.Success of the Events API v2 OpenAPI document:
    # the dedup_key is the event's, or one PagerDuty made for a trigger without one.
    dedup_key = event.get("dedup_key") or uuid.uuid4().hex
    return json.dumps({"status": "success", "message": "Event processed", "dedup_key": dedup_key}).encode()


def pagerduty() -> ScriptedReceiver:
    return ScriptedReceiver(pagerduty_problems, 202, _pagerduty_accepted)


def slack() -> ScriptedReceiver:
    # An incoming webhook answers 200 with the text "ok" (as text/html).
    return ScriptedReceiver(slack_problems, 200, b"ok", refuse=_refuse_slack, accepted_but_wrong=slack_escaping_problems,
                            accept_type="text/html")


# --------------------------------------------------------------------------- Microsoft Teams
# Workflows "Post to a channel when a webhook request is received" and the
# incoming webhooks take {"type": "message", "attachments": [{"contentType":
# "application/vnd.microsoft.card.adaptive", "content": <AdaptiveCard>}]}
# (Microsoft Learn, "Create incoming webhooks with Workflows for Microsoft
# Teams"); a message over about 28 KB is refused as too large.
TEAMS_MAX_BYTES = 28 * 1024
TEAMS_CARD_VERSIONS = {"1.0", "1.1", "1.2", "1.3", "1.4", "1.5"}
TEAMS_ELEMENTS = {"TextBlock", "FactSet", "ColumnSet", "Container", "Image", "RichTextBlock"}
# What a TextBlock's Markdown subset (and CommonMark below it) gives meaning
# to; in alert text each must come escaped with a backslash.
MARKDOWN_SIGNIFICANT = set("\\*_[]()~`#><-+!|{}&")
MARKDOWN_ESCAPE = re.compile(r"\\[!-/:-@\[-`{-~]")


def teams_card(message) -> dict | None:
    try:
        return message["attachments"][0]["content"]
    except (KeyError, IndexError, TypeError):
        return None


def teams_texts(message) -> list[tuple[str, str]]:
    """(where, text) of every text Teams renders as Markdown in the card."""
    card = teams_card(message) or {}
    texts = []
    for i, element in enumerate(card.get("body") or []):
        if element.get("type") == "TextBlock":
            texts.append((f"body[{i}]", element.get("text", "")))
        for j, fact in enumerate(element.get("facts") or []):
            texts.append((f"body[{i}].facts[{j}]", fact.get("value", "")))
    return texts


def teams_unescaped(message) -> list[str]:
    """Markdown a card's text would render (a link, emphasis, a heading):
    Teams accepts it, so the receiver records it for the tests to fail."""
    problems = []
    for where, text in teams_texts(message):
        rest = MARKDOWN_ESCAPE.sub("", text)
        bad = sorted(set(rest) & MARKDOWN_SIGNIFICANT)
        if bad:
            problems.append(f"{where}: unescaped {''.join(bad)!r}")
    return problems


def teams_problems(message) -> list[str]:
    if not isinstance(message, dict) or message.get("type") != "message":
        return ["type must be message"]
    attachments = message.get("attachments")
    if not isinstance(attachments, list) or len(attachments) != 1:
        return ["attachments must hold exactly one card"]
    if attachments[0].get("contentType") != "application/vnd.microsoft.card.adaptive":
        return ["contentType must be application/vnd.microsoft.card.adaptive"]
    card = attachments[0].get("content")
    if not isinstance(card, dict) or card.get("type") != "AdaptiveCard":
        return ["content must be an AdaptiveCard"]
    problems = []
    if card.get("$schema") != "http://adaptivecards.io/schemas/adaptive-card.json":
        problems.append("$schema must be the Adaptive Card schema")
    if card.get("version") not in TEAMS_CARD_VERSIONS:
        problems.append(f"version {card.get('version')!r} is not one Teams renders")
    body = card.get("body")
    if not isinstance(body, list) or not body:
        return problems + ["body must be a non-empty list"]
    for i, element in enumerate(body):
        kind = element.get("type") if isinstance(element, dict) else None
        if kind not in TEAMS_ELEMENTS:
            problems.append(f"body[{i}].type {kind!r} is unknown")
        elif kind == "TextBlock" and (not isinstance(element.get("text"), str) or not element["text"]):
            problems.append(f"body[{i}].text must be a non-empty string")
        elif kind == "FactSet":
            facts = element.get("facts")
            if not isinstance(facts, list) or not facts or any(
                    not isinstance(f, dict) or not isinstance(f.get("title"), str) or not isinstance(f.get("value"), str) for f in facts):
                problems.append(f"body[{i}].facts must be title/value strings")
    for i, action in enumerate(card.get("actions") or []):
        if action.get("type") != "Action.OpenUrl" or not str(action.get("url", "")).startswith(("http://", "https://")) \
                or not action.get("title"):
            problems.append(f"actions[{i}] must be an Action.OpenUrl with a title and an http(s) url")
    return problems


def _teams_size(req: Recorded) -> list[str]:
    return [f"the message is {len(req.body)} bytes, over 28 KB"] if len(req.body) > TEAMS_MAX_BYTES else []


def _refuse_teams(problems: list[str]):
    if problems and "over 28 KB" in problems[0]:
        return 413, {"Content-Type": "text/plain"}, b"Request Entity Too Large"
    return 400, {"Content-Type": "application/json"}, json.dumps({"error": {"code": "InvalidRequestContent", "message": problems[0]}}).encode()


def teams() -> ScriptedReceiver:
    # A workflow answers 202 Accepted with an empty body.
    return ScriptedReceiver(teams_problems, 202, b"", refuse=_refuse_teams, accepted_but_wrong=teams_unescaped,
                            accept_type="text/plain", validate_request=_teams_size)


# --------------------------------------------------------------------------- a signed outgoing webhook
# What a receiver is told to do (docs/extending.md, functions/escalation/channels/webhook.py):
# X-Incident-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">, t within 5 minutes.
WEBHOOK_TOLERANCE_SECONDS = 300
WEBHOOK_TRANSITIONS = {"opened", "root_changed", "acknowledged", "remediated", "remediation_failed", "resolved"}
WEBHOOK_INCIDENT_KEYS = {"id", "alert_name", "priority", "status", "summary", "service", "labels", "generation",
                         "created_at", "resolved_at", "links"}
WEBHOOK_MAX_BYTES = 64 * 1024


def webhook_signature_problems(secret: str, req: Recorded) -> list[str]:
    headers = {k.lower(): v for k, v in req.headers.items()}
    if not headers.get("content-type", "").startswith("application/json"):
        return ["Content-Type must be application/json"]
    fields: dict[str, list[str]] = {}
    for item in headers.get("x-incident-signature", "").split(","):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return ["X-Incident-Signature has no t=<unix seconds>"]
    if abs(time.time() - timestamp) > WEBHOOK_TOLERANCE_SECONDS:
        return ["the signature's timestamp is outside the tolerance"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + req.body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, v) for v in fields.get("v1", [])):
        return ["the signature does not match the body"]
    problems = []
    if len(req.body) > WEBHOOK_MAX_BYTES:
        problems.append("the body is over 64 KB")
    try:
        delivery = json.loads(req.body).get("id")
    except (ValueError, AttributeError):
        delivery = None
    if headers.get("x-incident-delivery") != delivery:
        problems.append("X-Incident-Delivery must name the body's id")
    return problems


def webhook_problems(message) -> list[str]:
    if not isinstance(message, dict):
        return ["body must be an object"]
    problems = []
    transition = message.get("transition")
    if transition not in WEBHOOK_TRANSITIONS:
        problems.append(f"unknown transition {transition!r}")
    if message.get("type") != f"incident.{transition}":
        problems.append("type must be incident.<transition>")
    incident = message.get("incident")
    if not isinstance(incident, dict) or set(incident) != WEBHOOK_INCIDENT_KEYS:
        return problems + [f"incident must hold exactly {sorted(WEBHOOK_INCIDENT_KEYS)}"]
    if not str(message.get("id", "")).startswith(f"{incident['id']}.{transition}."):
        problems.append("id must be <incident>.<transition>.<generation>")
    if not isinstance(incident["labels"], dict) or len(incident["labels"]) > 32:
        problems.append("labels must be an object of at most 32")
    if not str(incident["links"].get("incident", "")).startswith(("http://", "https://")):
        problems.append("links.incident must be a URL")
    return problems


def _refuse_webhook(problems: list[str]):
    status = 401 if any("signature" in p for p in problems) else 400
    return status, {"Content-Type": "application/json"}, json.dumps({"error": problems[0]}).encode()


def signed_webhook(secret: str) -> ScriptedReceiver:
    return ScriptedReceiver(webhook_problems, 204, b"", refuse=_refuse_webhook,
                            validate_request=functools.partial(webhook_signature_problems, secret))
