"""Alert sources: pure parse functions from a payload to :class:`Alert`.

One parser per source (AlertManager webhook version 4, the CloudEvent
``incident.report`` of other services). Parsing never touches the database;
a payload that can never succeed raises :class:`InvalidPayload` naming the
field, which the HTTP layer answers with ``400``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from shared.config import PRIORITIES, Settings
from shared.errors import BadRequest

ALERT_NAME_MAX = 100  # the seed's alert_name String(100)
FINGERPRINT_MAX = 128
_FNV64_OFFSET = 14695981039346656037
_FNV64_PRIME = 1099511628211
_LABEL_SEPARATOR = 0xFF


class InvalidPayload(BadRequest):
    """The payload can never be stored; ``field`` names what is wrong."""

    code = "invalid_payload"

    def __init__(self, field_path: str, problem: str):
        super().__init__(f"{field_path}: {problem}" if field_path else problem, field=field_path)
        self.field = field_path
        self.problem = problem


@dataclass(frozen=True)
class Alert:
    """One alert, whatever sent it, normalised for storage."""

    fingerprint: str
    status: str  # firing | resolved
    alert_name: str
    priority: str
    summary: str
    description: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: datetime | None
    ends_at: datetime | None
    source: str
    ignored_reason: str | None = field(default=None, compare=False)

    @property
    def service(self) -> str | None:
        return self.labels.get("service") or self.labels.get("app") or self.labels.get("deployment")


@dataclass(frozen=True)
class Webhook:
    receiver: str
    group_key: str
    status: str
    truncated_alerts: int
    alerts: list[Alert]


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """AlertManager's fingerprint of a label set (FNV-1a 64 over sorted pairs)."""
    value = _FNV64_OFFSET
    for name in sorted(labels):
        for chunk in (name, labels[name]):
            for byte in chunk.encode("utf-8"):
                value = ((value ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
            value = ((value ^ _LABEL_SEPARATOR) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def _clean(text: str) -> str:
    """Make any string storable without losing the alert: PostgreSQL cannot
    hold NUL, and a lone UTF-16 surrogate (legal in JSON escapes) is not UTF-8."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def _string_map(value: Any, path: str, required: bool = False) -> dict[str, str]:
    if value is _MISSING or (value is None and required):
        if required:
            raise InvalidPayload(path, "required")
        return {}
    if not isinstance(value, dict):
        raise InvalidPayload(path, "must be an object of strings")
    result = {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidPayload(f"{path}.{key}", "must be a string")
        result[_clean(key)] = _clean(item)
    return result


_MISSING = object()


def _optional_str(value: Any, path: str) -> str:
    """Absent is empty; present must be a string (AlertManager never sends null)."""
    if value is _MISSING:
        return ""
    if not isinstance(value, str):
        raise InvalidPayload(path, "must be a string")
    return _clean(value)


def parse_time(value: Any, path: str) -> datetime | None:
    """RFC 3339 to naive UTC; AlertManager's zero time means "not set"."""
    if value is _MISSING:
        return None
    if not isinstance(value, str):
        raise InvalidPayload(path, "must be an RFC 3339 time string")
    if value.startswith("0001-01-01"):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise InvalidPayload(path, f"not an RFC 3339 time: {value[:40]!r}") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def priority_of(labels: Mapping[str, str], config: Settings) -> str:
    """A ``priority`` label wins, then ``severity`` through the mapping, else P2."""
    explicit = labels.get("priority", "").strip().upper()
    if explicit in PRIORITIES:
        return explicit
    severity = labels.get("severity", "").strip().lower()
    return config.severity_priority.get(severity, "P2")


def ignored_reason(alert_name: str, labels: Mapping[str, str], priority: str, config: Settings) -> str | None:
    if alert_name in config.ignored_alertnames:
        return f"alertname {alert_name} is in IGNORED_ALERTNAMES"
    severity = labels.get("severity", "").strip().lower()
    if severity and severity in config.ignored_severities:
        return f"severity {severity} is in IGNORED_SEVERITIES"
    if not config.priority_opens_incident(priority):
        return f"priority {priority} is below MIN_INCIDENT_PRIORITY {config.min_incident_priority}"
    return None


def _alert_name(labels: Mapping[str, str], path: str) -> str:
    name = labels.get("alertname", "")
    if not name:
        raise InvalidPayload(path, "required")
    if len(name) > ALERT_NAME_MAX:
        raise InvalidPayload(path, f"longer than {ALERT_NAME_MAX} characters")
    return name


def _fingerprint(value: Any, labels: Mapping[str, str], path: str) -> str:
    if value is _MISSING or value == "":
        return label_fingerprint(labels)
    if not isinstance(value, str):
        raise InvalidPayload(path, "must be a string")
    if len(value) > FINGERPRINT_MAX:
        raise InvalidPayload(path, f"longer than {FINGERPRINT_MAX} characters")
    return _clean(value)


def _status(value: Any, path: str) -> str:
    if value not in ("firing", "resolved"):
        raise InvalidPayload(path, "must be 'firing' or 'resolved'" + ("" if value is not None else " (required)"))
    return value


def _build(
    labels: dict[str, str],
    annotations: dict[str, str],
    status: str,
    fingerprint: str,
    alert_name: str,
    priority: str,
    summary: str,
    description: str,
    starts_at: datetime | None,
    ends_at: datetime | None,
    source: str,
    config: Settings,
) -> Alert:
    return Alert(
        fingerprint=fingerprint,
        status=status,
        alert_name=alert_name,
        priority=priority,
        summary=summary,
        description=description,
        labels=labels,
        annotations=annotations,
        starts_at=starts_at,
        ends_at=ends_at,
        source=source,
        ignored_reason=ignored_reason(alert_name, labels, priority, config),
    )


def parse_alertmanager(payload: Any, config: Settings) -> Webhook:
    """AlertManager webhook payload version 4."""
    if not isinstance(payload, dict):
        raise InvalidPayload("", "the payload must be a JSON object")
    if payload.get("version") != "4":
        raise InvalidPayload("version", f"must be \"4\" (AlertManager webhook version 4), got {payload.get('version')!r}")
    raw_alerts = payload.get("alerts")
    if not isinstance(raw_alerts, list):
        raise InvalidPayload("alerts", "required, must be a list")
    truncated = payload.get("truncatedAlerts", 0)
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise InvalidPayload("truncatedAlerts", "must be a non-negative integer")
    alerts = []
    for index, raw in enumerate(raw_alerts):
        path = f"alerts[{index}]"
        if not isinstance(raw, dict):
            raise InvalidPayload(path, "must be an object")
        labels = _string_map(raw.get("labels", _MISSING), f"{path}.labels", required=True)
        annotations = _string_map(raw.get("annotations", _MISSING), f"{path}.annotations")
        alert_name = _alert_name(labels, f"{path}.labels.alertname")
        _optional_str(raw.get("generatorURL", _MISSING), f"{path}.generatorURL")
        alerts.append(
            _build(
                labels=labels,
                annotations=annotations,
                status=_status(raw.get("status"), f"{path}.status"),
                fingerprint=_fingerprint(raw.get("fingerprint", _MISSING), labels, f"{path}.fingerprint"),
                alert_name=alert_name,
                priority=priority_of(labels, config),
                summary=annotations.get("summary") or annotations.get("message", ""),
                description=annotations.get("description", ""),
                starts_at=parse_time(raw.get("startsAt", _MISSING), f"{path}.startsAt"),
                ends_at=parse_time(raw.get("endsAt", _MISSING), f"{path}.endsAt"),
                source="alertmanager",
                config=config,
            )
        )
    for name in ("groupLabels", "commonLabels", "commonAnnotations"):
        _string_map(payload.get(name, _MISSING), name)
    _optional_str(payload.get("externalURL", _MISSING), "externalURL")
    group_status = payload.get("status", _MISSING)
    if group_status is not _MISSING:
        _status(group_status, "status")
    return Webhook(
        receiver=_optional_str(payload.get("receiver", _MISSING), "receiver"),
        group_key=_optional_str(payload.get("groupKey", _MISSING), "groupKey"),
        status=_optional_str(group_status, "status"),
        truncated_alerts=truncated,
        alerts=alerts,
    )


def parse_report(data: Any, config: Settings) -> Alert:
    """The data of an ``incident.report`` CloudEvent (schema in the README)."""
    if not isinstance(data, dict):
        raise InvalidPayload("data", "must be a JSON object")
    data = {k: v for k, v in data.items() if v is not None}
    labels = _string_map(data.get("labels", _MISSING), "labels")
    annotations = _string_map(data.get("annotations", _MISSING), "annotations")
    name = data.get("alert_name", labels.get("alertname"))
    if not isinstance(name, str):
        raise InvalidPayload("alert_name", "required, must be a string")
    labels = {**labels, "alertname": _clean(name.strip())}
    alert_name = _alert_name(labels, "alert_name")
    priority = data.get("priority")
    if priority is None:
        priority = priority_of(labels, config)
    elif not isinstance(priority, str) or priority.upper() not in PRIORITIES:
        raise InvalidPayload("priority", f"must be one of {', '.join(PRIORITIES)}")
    summary = _optional_str(data.get("summary", _MISSING), "summary") or annotations.get("summary", "")
    description = _optional_str(data.get("description", _MISSING), "description") or annotations.get("description", "")
    return _build(
        labels=labels,
        annotations=annotations,
        status=_status(data.get("status", "firing"), "status"),
        fingerprint=_fingerprint(data.get("fingerprint", _MISSING), labels, "fingerprint"),
        alert_name=alert_name,
        priority=priority.upper(),
        summary=summary,
        description=description,
        starts_at=parse_time(data.get("starts_at", _MISSING), "starts_at"),
        ends_at=parse_time(data.get("ends_at", _MISSING), "ends_at"),
        source="cloudevent",
        config=config,
    )
