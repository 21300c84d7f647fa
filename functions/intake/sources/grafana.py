"""Grafana-managed alerting webhooks (payload ``version: "1"``, Grafana 9-12),
``POST /webhook/grafana``; on the same route, legacy Grafana alerting's
one-rule notification (``ruleName``, ``state``, ``evalMatches``; Grafana 4-10:
Grafana 4 wrote ``rule_url`` and ``image_url`` and no tags, org or message).

Grafana's own Alertmanager posts AlertManager-shaped groups with extras per
alert: links to the rule, dashboard, panel, silence and image, and the
query values that fired. Grafana does not retry a ``4xx`` either, so the
group is validated alert by alert like AlertManager's; the extras are kept
when usable and dropped, never refused, when not.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from functions.intake.sources import alertmanager
from functions.intake.sources.base import Source
from shared.alerts import (
    MISSING,
    TRUNCATION_MARKER,
    Alert,
    InvalidPayload,
    Parsed,
    alert_name_of,
    build,
    clean,
    fingerprint_of,
    group_envelope,
    is_legacy_grafana,
    parse_group,
    priority_of,
    scalar_text,
    string_map,
    summary_from,
    version_text,
)
from shared.config import Settings

NAME = "grafana"
ACCEPTED_VERSIONS = ("1",)
# Grafana's link fields, kept as annotations (the board and the pages show
# annotations); an annotation the rule itself set under that name wins.
LINKS = {
    "generatorURL": "generator_url",
    "dashboardURL": "dashboard_url",
    "panelURL": "panel_url",
    "silenceURL": "silence_url",
    "imageURL": "image_url",
}
LINK_MAX = 2048
# The query values ("B": 44.2, "C": 1) and Grafana's text of them; a rule
# over many series can make these long, and they are context, not identity.
VALUES_MAX = 1000
_TITLE_STATUS = re.compile(r"^\s*\[[A-Z]+(?::\d+)?\]\s*")


def parse(payload: Any, config: Settings) -> Parsed:
    if not isinstance(payload, dict):
        raise InvalidPayload("", "the payload must be a JSON object")
    if is_legacy_grafana(payload):
        return Parsed(items=[parse_legacy(payload, config)])
    version = version_text(payload.get("version"))
    if version is not None and version not in ACCEPTED_VERSIONS:
        raise InvalidPayload(
            "version",
            f"must be \"1\" (Grafana-managed alerting webhook), got {version!r}; AlertManager posts to /webhook/alert",
        )
    fallback = _fallback_name(payload)
    items = parse_group(payload.get("alerts"), lambda raw, path: alertmanager.parse_alert(raw, path, config, NAME, fallback, _extras))
    return group_envelope(payload, items)


# Legacy alerting: one notification per rule and state change. "no_data" is
# sent only when the rule is set to "If no data: No Data"; the data a rule
# reads is gone, which is worth an incident, so it fires like "alerting" (the
# same rule, so the same fingerprint: after "alerting" it joins that incident).
# Grafana sends "ok" after "no_data" (no_data -> ok), which resolves it, but
# not when the data comes back firing and clears within the rule's "For"
# (no_data -> pending -> ok: pending -> ok is never notified, grafana#18940),
# nor in Grafana 6.2 (grafana#17780); such an incident stays open until it is
# resolved through the API or the board. "paused" and "pending" are states,
# never notifications, so they are refused, not guessed at.
LEGACY_STATES = {"alerting": "firing", "no_data": "firing", "ok": "resolved"}
_LEGACY_TITLE_STATE = re.compile(r"^\s*\[[^\]]*\]\s*")


def parse_legacy(payload: dict, config: Settings) -> Alert:
    """The rule is the alert: its name, tags, org and id are the labels (so
    its fingerprint is the same when it fires and when it is ok again), its
    message the description, its link, image and matched values the extras."""
    state = payload.get("state")
    status = LEGACY_STATES.get(state.strip().lower()) if isinstance(state, str) else None
    if status is None:
        raise InvalidPayload("state", f"must be one of {', '.join(LEGACY_STATES)} (legacy Grafana alerting), "
                                      f"got {_shown(state)}")
    name = payload.get("ruleName")
    if not (isinstance(name, str) and name.strip()):
        title = payload.get("title")
        name = _LEGACY_TITLE_STATE.sub("", title) if isinstance(title, str) else ""
    labels = string_map(payload.get("tags", MISSING), "tags")
    labels["alertname"] = clean(name.strip())
    for field_name, label in (("orgId", "grafana_org_id"), ("ruleId", "grafana_rule_id")):
        identity = scalar_text(payload.get(field_name))
        if identity:
            labels[label] = identity
    alert_name = alert_name_of(labels, "ruleName")
    message = payload.get("message")
    annotations = {"description": clean(message.strip())} if isinstance(message, str) and message.strip() else {}
    annotations.update(_legacy_extras(payload))
    return build(
        labels=labels,
        annotations=annotations,
        status=status,
        fingerprint=fingerprint_of(MISSING, labels, "fingerprint"),
        alert_name=alert_name,
        priority=priority_of(labels, config),
        summary=summary_from(annotations) or alert_name,
        description=annotations.get("description", ""),
        starts_at=None,
        ends_at=None,
        source=NAME,
        config=config,
    )


def _legacy_extras(payload: dict) -> dict[str, str]:
    extras = {}
    # Grafana 5 on writes ruleUrl and imageUrl; Grafana 4 wrote rule_url and image_url.
    for field_names, annotation in ((("ruleUrl", "rule_url"), "generator_url"), (("imageUrl", "image_url"), "image_url")):
        link = next(filter(None, (_link(payload.get(name)) for name in field_names)), None)
        if link:
            extras[annotation] = link
    matches = payload.get("evalMatches")
    if isinstance(matches, list):
        values = _values({m["metric"]: m.get("value") for m in matches if isinstance(m, dict) and isinstance(m.get("metric"), str)})
        if values:
            extras["values"] = values
    return extras


def _shown(value: Any) -> str:
    """A refused JSON value as the message shows it: short, whatever was sent."""
    if isinstance(value, str):
        return repr(clean(value[:40]))
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "an array"
    return json.dumps(value)[:40]


def _fallback_name(payload: dict) -> str:
    """Grafana always sets labels.alertname; a relay that dropped it still
    sent the group's common labels or its title ("[FIRING:1] Rule (team)")."""
    common = payload.get("commonLabels")
    if isinstance(common, dict) and isinstance(common.get("alertname"), str) and common["alertname"].strip():
        return clean(common["alertname"].strip())
    title = payload.get("title")
    return clean(_TITLE_STATUS.sub("", title).strip()) if isinstance(title, str) else ""


def _extras(raw: dict) -> dict[str, str]:
    extras = {}
    for field_name, annotation in LINKS.items():
        link = _link(raw.get(field_name))
        if link:
            extras[annotation] = link
    values = _values(raw.get("values"))
    if values:
        extras["values"] = values
    value_string = raw.get("valueString")
    if isinstance(value_string, str) and value_string.strip():
        extras["value_string"] = _bounded(clean(value_string.strip()), VALUES_MAX)
    return extras


def _link(value: Any) -> str | None:
    """Only web links: the board renders these as links, and a
    ``javascript:`` URL there would run in the reader's session."""
    if not isinstance(value, str):
        return None
    value = clean(value.strip())
    if len(value) > LINK_MAX or not value.lower().startswith(("https://", "http://")):
        return None
    return value


def _values(value: Any) -> str | None:
    """The numbers as JSON text, as many entries (by name) as fit the bound;
    Grafana writes null for a value that is not a number."""
    if not isinstance(value, dict):
        return None
    kept: dict[str, float | int | None] = {}
    for name in sorted(value, key=str):
        number = value[name]
        if isinstance(number, bool) or not (number is None or isinstance(number, (int, float))):
            continue
        if isinstance(number, float) and not math.isfinite(number):
            number = None
        candidate = {**kept, clean(str(name))[:100]: number}
        if len(json.dumps(candidate, ensure_ascii=False)) > VALUES_MAX:
            break
        kept = candidate
    return json.dumps(kept, ensure_ascii=False) if kept else None


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


SOURCE = Source(name=NAME, parse=parse, routes=("/webhook/grafana",), group_commit=True)
