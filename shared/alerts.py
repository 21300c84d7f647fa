"""The alert model every source produces, and the rules all sources share.

Each source parses its own payload (``functions/intake/sources/``); what
does not depend on the sender lives here: the :class:`Alert` model, the
per-alert validation of a group (:func:`parse_group`), fingerprints, times,
priorities, the bounded alert name and the one-line summary. Parsing never
touches the database.

A group is validated alert by alert: AlertManager and Grafana never retry a
``4xx``, so one malformed alert must not cost the others. A bad alert becomes
a :class:`Rejected` entry naming the field; envelopes are read liberally
(nulls, absent optional fields, extra fields, numbers where strings are
expected). :class:`InvalidPayload` (``400``) is raised only when nothing in
the payload can ever be stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from shared.config import Settings
from shared.domain import PRIORITIES, service_of
from shared.errors import BadRequest

ALERT_NAME_MAX = 100  # the seed's alert_name String(100)
# A longer name (legal in Prometheus) is cut to ALERT_NAME_MAX with this
# marker; the full name stays in labels["alertname"] and in the fingerprint.
TRUNCATION_MARKER = "\u2026"
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
        return service_of(self.labels)


@dataclass(frozen=True)
class Rejected:
    """An alert of a group that can never be stored, and why."""

    index: int
    field: str
    problem: str
    alert_name: str | None = None
    fingerprint: str | None = None

    @property
    def reason(self) -> str:
        return f"{self.field}: {self.problem}"

    def as_dict(self) -> dict:
        result = {"index": self.index, "fingerprint": self.fingerprint, "incident_id": None, "action": "rejected",
                  "reason": self.reason, "field": self.field}
        if self.alert_name:
            result["alert_name"] = self.alert_name
        return result


@dataclass(frozen=True)
class Parsed:
    """What a source made of one payload: its alerts and rejections in
    payload order, and the envelope fields it had to ignore (``warnings``)."""

    items: list[Alert | Rejected]
    receiver: str = ""
    group_key: str = ""
    status: str = ""
    truncated_alerts: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def alerts(self) -> list[Alert]:
        return [item for item in self.items if isinstance(item, Alert)]

    @property
    def rejected(self) -> list[Rejected]:
        return [item for item in self.items if isinstance(item, Rejected)]


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """AlertManager's fingerprint of a label set (FNV-1a 64 over sorted pairs)."""
    value = _FNV64_OFFSET
    for name in sorted(labels):
        for chunk in (name, labels[name]):
            for byte in chunk.encode("utf-8"):
                value = ((value ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
            value = ((value ^ _LABEL_SEPARATOR) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def clean(text: str) -> str:
    """Make any string storable without losing the alert: PostgreSQL cannot
    hold NUL, and a lone UTF-16 surrogate (legal in JSON escapes) is not UTF-8."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def scalar_text(value: Any) -> str | None:
    """A JSON scalar as the text AlertManager would have sent; None for
    anything that is not a scalar. Other senders put numbers and booleans
    where AlertManager puts strings."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return None


def string_map(value: Any, path: str, required: bool = False, compound_as_json: bool = False) -> dict[str, str]:
    """Labels or annotations. A null value drops the entry (Prometheus treats
    an empty label as absent); a compound annotation is kept as JSON text."""
    if value is MISSING or value is None:
        if required:
            raise InvalidPayload(path, "required")
        return {}
    if not isinstance(value, dict):
        raise InvalidPayload(path, "must be an object of strings")
    result = {}
    for key, item in value.items():
        if item is None:
            continue
        text = scalar_text(item)
        if text is None:
            if not compound_as_json:
                raise InvalidPayload(f"{path}.{clean(key)[:100]}", "must be a string")
            text = clean(json.dumps(item, ensure_ascii=False))
        result[clean(key)] = text
    return result


MISSING = object()


def optional_str(value: Any, path: str) -> str:
    """Absent or null is empty; numbers are taken as their text."""
    if value is MISSING or value is None:
        return ""
    text = scalar_text(value)
    if text is None:
        raise InvalidPayload(path, "must be a string")
    return text


# RFC 3339 allows second 60 (a leap second); datetime cannot hold it, so it
# is read as the last instant of the second before.
_LEAP_SECOND = re.compile(r"^(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:)60(?:[.,]\d+)?")


def parse_time(value: Any, path: str) -> datetime | None:
    """RFC 3339 to naive UTC; absent, null, empty and AlertManager's zero
    time mean "not set"."""
    if value is MISSING or value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidPayload(path, "must be an RFC 3339 time string")
    if value.startswith(("0001-01-01", "0000-")):
        # Go's zero time; a relay that writes it in a zone west of UTC puts it
        # in year 0 ("0000-12-31T19:03:58-04:56", New York's local mean
        # time), which Python cannot hold.
        return None
    try:
        parsed = datetime.fromisoformat(_LEAP_SECOND.sub(r"\g<1>59.999999", value.replace("z", "Z"), count=1))
    except ValueError:
        raise InvalidPayload(path, f"not an RFC 3339 time: {clean(value[:40])!r}") from None
    if parsed.tzinfo is not None:
        try:
            parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
        except OverflowError:
            raise InvalidPayload(path, f"out of range once converted to UTC: {clean(value[:40])!r}") from None
    return parsed


def version_text(value: Any) -> Any:
    """A payload's ``version`` as the string its producer writes; a relay
    that re-marshals the group may write "4" as 4, or as 4.0 (JavaScript and
    Go's interface{} read every JSON number as a float)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


# Legacy Grafana alerting's one-rule notification has no "alerts" list and
# carries at least one of these; both webhook sources tell it apart by this
# one rule (it is stored on /webhook/grafana, pointed there from /webhook/alert).
LEGACY_GRAFANA_FIELDS = frozenset({"ruleName", "ruleId", "evalMatches"})


def is_legacy_grafana(payload: dict) -> bool:
    return "alerts" not in payload and not LEGACY_GRAFANA_FIELDS.isdisjoint(payload)


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


def bounded_alert_name(name: str) -> str:
    """The name as the incidents table stores it (and events and pages show
    it): at most ALERT_NAME_MAX characters, a cut one ending in the marker."""
    if len(name) <= ALERT_NAME_MAX:
        return name
    return name[: ALERT_NAME_MAX - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def alert_name_of(labels: Mapping[str, str], path: str) -> str:
    name = labels.get("alertname", "")
    if not name:
        raise InvalidPayload(path, "required")
    return bounded_alert_name(name)


def fingerprint_of(value: Any, labels: Mapping[str, str], path: str) -> str:
    if value is MISSING or value is None or value == "":
        return label_fingerprint(labels)
    text = scalar_text(value)
    if text is None:
        raise InvalidPayload(path, "must be a string")
    if len(text) > FINGERPRINT_MAX:
        raise InvalidPayload(path, f"longer than {FINGERPRINT_MAX} characters")
    return text


def status_of(value: Any, path: str) -> str:
    normalised = value.strip().lower() if isinstance(value, str) else value
    if normalised not in ("firing", "resolved"):
        raise InvalidPayload(path, "must be 'firing' or 'resolved'" + ("" if value is not None else " (required)"))
    return normalised


def build(
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


def non_negative_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return None


SUMMARY_ANNOTATIONS = ("summary", "message", "title")


def summary_from(annotations: dict[str, str]) -> str:
    """What the alert says in one line. Rule sets write ``summary`` (kube-
    prometheus), ``message`` (older mixins) or ``title`` (Grafana), some only a
    ``description``: its first non-empty line beats an empty summary."""
    for name in SUMMARY_ANNOTATIONS:
        if annotations.get(name, "").strip():
            return annotations[name]
    return next((line.strip() for line in annotations.get("description", "").splitlines() if line.strip()), "")


def rejected_entry(raw: Any, index: int, error: InvalidPayload) -> Rejected:
    """What can still be said about a rejected alert, for the sender's logs."""
    labels = raw.get("labels") if isinstance(raw, dict) else None
    name = labels.get("alertname") if isinstance(labels, dict) else None
    fingerprint = raw.get("fingerprint") if isinstance(raw, dict) else None
    return Rejected(
        index=index,
        field=error.field,
        problem=error.problem,
        alert_name=bounded_alert_name(clean(name)) if isinstance(name, str) else None,
        fingerprint=clean(fingerprint)[:FINGERPRINT_MAX] if isinstance(fingerprint, str) and fingerprint else None,
    )


def envelope_text(payload: dict, name: str, warnings: list[str]) -> str:
    try:
        return optional_str(payload.get(name, MISSING), name)
    except InvalidPayload as exc:
        warnings.append(f"{exc.message}; ignored")
        return ""


def parse_group(raw_alerts: Any, parse_one: Callable[[Any, str], Alert]) -> list[Alert | Rejected]:
    """Every alert of a group through ``parse_one(raw, path)``, a bad one
    becoming a :class:`Rejected` entry. Raises :class:`InvalidPayload` only
    when there is no list, or when every alert is rejected
    (``details["rejected"]`` then lists them)."""
    if not isinstance(raw_alerts, list):
        raise InvalidPayload("alerts", "required, must be a list")
    items: list[Alert | Rejected] = []
    for index, raw in enumerate(raw_alerts):
        try:
            items.append(parse_one(raw, f"alerts[{index}]"))
        except InvalidPayload as exc:
            items.append(rejected_entry(raw, index, exc))
    if items and not any(isinstance(item, Alert) for item in items):
        first = items[0]
        error = InvalidPayload(first.field, first.problem)
        error.details["rejected"] = [item.as_dict() for item in items[:100]]
        raise error
    return items


def group_envelope(payload: dict, items: list[Alert | Rejected]) -> Parsed:
    """The envelope fields AlertManager-shaped groups share (AlertManager's
    own, Grafana's), read liberally: a bad one is a warning, never a refusal."""
    warnings: list[str] = []
    truncated = 0
    if payload.get("truncatedAlerts") is not None:
        truncated = non_negative_int(payload["truncatedAlerts"])
        if truncated is None:
            warnings.append("truncatedAlerts: not a non-negative integer; ignored")
            truncated = 0
    status = envelope_text(payload, "status", warnings)
    if status and status.lower() not in ("firing", "resolved"):
        warnings.append("status: must be 'firing' or 'resolved'; ignored")
    return Parsed(
        items=items,
        receiver=envelope_text(payload, "receiver", warnings),
        group_key=envelope_text(payload, "groupKey", warnings),
        status=status,
        truncated_alerts=truncated,
        warnings=warnings,
    )
