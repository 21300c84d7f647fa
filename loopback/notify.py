"""Loopback PagerDuty Events API v2 and Slack incoming-webhook receivers that
check every request against the documented shape and answer from a script."""

from __future__ import annotations

import functools
import json
import re
import time
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
    when the script is empty, validates and accepts."""

    def __init__(self, validate, accept_status: int, accept_body: bytes, refuse=None, accepted_but_wrong=None,
                 accept_type: str = "application/json"):
        self.validate = validate
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
        if problems:
            self.invalid.append((req, problems))
            return self.refuse(problems)
        if self.accepted_but_wrong:
            wrong = self.accepted_but_wrong(message)
            if wrong:
                self.invalid.append((req, wrong))
        return self.accept[0], {"Content-Type": self.accept_type}, self.accept[1]


def _refuse_json(problems: list[str]):
    return 400, {"Content-Type": "application/json"}, json.dumps({"status": "invalid event", "message": "Event object is invalid", "errors": problems}).encode()


def _refuse_slack(problems: list[str]):
    # Slack's incoming webhooks answer a bare error code.
    code = b"no_text" if problems and problems[0].startswith("text (") else b"invalid_blocks"
    return 400, {"Content-Type": "text/html"}, code


def pagerduty() -> ScriptedReceiver:
    return ScriptedReceiver(pagerduty_problems, 202, b'{"status":"success","message":"Event processed"}')


def slack() -> ScriptedReceiver:
    return ScriptedReceiver(slack_problems, 200, b"ok", refuse=_refuse_slack, accepted_but_wrong=slack_escaping_problems,
                            accept_type="text/html")
