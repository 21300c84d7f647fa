"""Loopback PagerDuty Events API v2 and Slack incoming-webhook receivers that
check every request against the documented shape and answer from a script."""

from __future__ import annotations

import json
import time
from collections import deque
from datetime import datetime

from tests.loopback import Recorded, RecordingServer

PD_SEVERITIES = {"critical", "error", "warning", "info"}
PD_ACTIONS = {"trigger", "acknowledge", "resolve"}
SLACK_BLOCKS = {"header", "section", "context", "divider", "actions", "image"}


def pagerduty_problems(event) -> list[str]:
    """What the Events API v2 would refuse in this event."""
    problems = []
    if not isinstance(event, dict):
        return ["event must be an object"]
    if not isinstance(event.get("routing_key"), str) or len(event["routing_key"]) != 32:
        problems.append("routing_key must be a 32-character string")
    if event.get("event_action") not in PD_ACTIONS:
        problems.append("event_action must be trigger, acknowledge or resolve")
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
        if not isinstance(summary, str) or not summary or len(summary) > 1024:
            problems.append("payload.summary must be 1-1024 characters")
        if not isinstance(payload.get("source"), str) or not payload["source"]:
            problems.append("payload.source is required")
        if payload.get("severity") not in PD_SEVERITIES:
            problems.append("payload.severity must be critical, error, warning or info")
        if "timestamp" in payload:
            try:
                datetime.fromisoformat(str(payload["timestamp"]).replace("Z", "+00:00"))
            except ValueError:
                problems.append("payload.timestamp must be ISO 8601")
        for name in ("component", "group", "class"):
            if name in payload and not isinstance(payload[name], str):
                problems.append(f"payload.{name} must be a string")
        if "custom_details" in payload and not isinstance(payload["custom_details"], dict):
            problems.append("payload.custom_details must be an object")
        for link in event.get("links", []):
            if not isinstance(link, dict) or not str(link.get("href", "")).startswith(("http://", "https://")):
                problems.append("links[].href must be a URL")
    allowed = {"routing_key", "event_action", "dedup_key", "payload", "links", "images", "client", "client_url"}
    unknown = set(event) - allowed
    if unknown:
        problems.append(f"unknown fields {sorted(unknown)}")
    return problems


def slack_problems(message) -> list[str]:
    problems = []
    if not isinstance(message, dict):
        return ["message must be an object"]
    if not isinstance(message.get("text"), str) or not message["text"]:
        problems.append("text (the notification fallback) is required")
    blocks = message.get("blocks", [])
    if not isinstance(blocks, list) or len(blocks) > 50:
        problems.append("blocks must be a list of at most 50")
        return problems
    for i, block in enumerate(blocks):
        kind = block.get("type")
        if kind not in SLACK_BLOCKS:
            problems.append(f"blocks[{i}].type {kind!r} is unknown")
        if kind == "header" and (block["text"].get("type") != "plain_text" or len(block["text"]["text"]) > 150):
            problems.append(f"blocks[{i}] header must be plain_text of at most 150 characters")
        if kind == "section":
            if "text" in block and len(block["text"]["text"]) > 3000:
                problems.append(f"blocks[{i}].text is over 3000 characters")
            if len(block.get("fields", [])) > 10 or any(len(f["text"]) > 2000 for f in block.get("fields", [])):
                problems.append(f"blocks[{i}].fields: at most 10 of 2000 characters")
            if "text" not in block and "fields" not in block:
                problems.append(f"blocks[{i}] section needs text or fields")
    return problems


class ScriptedReceiver:
    """Answers the next scripted response (status, headers, body) or 'hang:N';
    when the script is empty, validates and accepts."""

    def __init__(self, validate, accept_status: int, accept_body: bytes):
        self.validate = validate
        self.accept = (accept_status, accept_body)
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
            if isinstance(step, str) and step.startswith("hang:"):
                time.sleep(float(step.split(":")[1]))
                return 504, {}, b""
            return step
        problems = self.validate(json.loads(req.body)) if req.body else ["empty body"]
        if problems:
            self.invalid.append((req, problems))
            return 400, {"Content-Type": "application/json"}, json.dumps({"status": "invalid event", "errors": problems}).encode()
        return self.accept[0], {"Content-Type": "application/json"}, self.accept[1]


def pagerduty() -> ScriptedReceiver:
    return ScriptedReceiver(pagerduty_problems, 202, b'{"status":"success","message":"Event processed"}')


def slack() -> ScriptedReceiver:
    return ScriptedReceiver(slack_problems, 200, b"ok")
