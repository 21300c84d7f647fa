"""The incident list filters, declared once.

Each :class:`Filter` says what the query API accepts (``?status=open``), how
a value parses, the SQL condition it adds, how the OpenAPI document describes
it and which widget the board's filter form shows. ``GET /incidents``, the
board at ``/ui``, ``openapi.yaml`` (checked by tests/test_filters.py) and
:func:`conditions` all read :data:`FILTERS`, so adding a filter is one entry
here plus its tests.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, make_dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import sqlalchemy as sa
from werkzeug.datastructures import MultiDict

from shared.domain import PRIORITIES, SERVICE_LABELS, STATUSES, service_sql
from shared.errors import BadRequest
from shared.models import incident_members


class Kind(enum.Enum):
    ENUM = "enum"  # one of fixed values; repeatable, comma-separated
    TEXT = "text"  # exact free text; repeatable, comma-separated
    TIME = "time"  # one RFC 3339 bound of a time range


@dataclass(frozen=True)
class Widget:
    """The board form's field; a filter without one is API-only."""

    label: str
    placeholder: str = ""


@dataclass(frozen=True)
class Filter:
    name: str  # the query parameter
    field: str  # the attribute of IncidentFilter
    kind: Kind
    description: str  # OpenAPI
    # (incidents table, parsed value) -> SQL condition; only called when the value is given.
    condition: Callable[[sa.Table, Any], sa.ColumnElement]
    allowed: tuple[str, ...] = ()  # ENUM only
    normalise: Callable[[str], str] | None = None  # ENUM only: the case the values are stored in
    widget: Widget | None = None

    def parse(self, args: MultiDict) -> Any:
        """The value of this filter in ``args`` (its empty value when absent);
        BadRequest names the parameter."""
        if self.kind is Kind.ENUM:
            return enum_values(args, self.name, self.allowed, self.normalise or str)
        if self.kind is Kind.TEXT:
            return tuple(repeated(args, self.name))
        raw = single(args, self.name)
        return parse_time_param(raw, self.name) if raw is not None else None


FILTERS: tuple[Filter, ...] = (
    Filter("status", "statuses", Kind.ENUM, "open, investigating, resolved, closed (any case); repeat or separate with commas",
           lambda t, v: t.c.status.in_(v), allowed=STATUSES, normalise=str.lower, widget=Widget("Status")),
    Filter("priority", "priorities", Kind.ENUM, "P0, P1, P2 (any case); repeat or separate with commas",
           lambda t, v: t.c.priority.in_(v), allowed=PRIORITIES, normalise=str.upper, widget=Widget("Priority")),
    Filter("since", "since", Kind.TIME, "RFC 3339; created at or after (naive means UTC)",
           lambda t, v: t.c.created_at >= v, widget=Widget("Since", "2026-11-27T00:00:00Z")),
    Filter("until", "until", Kind.TIME, "RFC 3339; created before (naive means UTC)",
           lambda t, v: t.c.created_at < v),
    Filter("alert_name", "alert_names", Kind.TEXT, "the alert's name (alertname label)",
           lambda t, v: t.c.alert_name.in_(v), widget=Widget("Alert")),
    # The same rule every message uses (shared.domain.service_of), so
    # ?service= finds exactly what Slack and PagerDuty show.
    Filter("service", "services", Kind.TEXT, f"the alert's service: its first non-empty label of {', '.join(SERVICE_LABELS)}",
           lambda t, v: service_sql(t.c.labels).in_(v), widget=Widget("Service")),
    # An alert that joined an incident is found through its membership.
    Filter("fingerprint", "fingerprints", Kind.TEXT, "an alert's fingerprint: the incidents it is a member of (root or joined)",
           lambda t, v: sa.or_(t.c.fingerprint.in_(v), t.c.id.in_(
               sa.select(incident_members.c.incident_id).where(incident_members.c.fingerprint.in_(v))))),
)
BY_NAME = {f.name: f for f in FILTERS}
BOARD_FILTERS = tuple(f for f in FILTERS if f.widget is not None)

_EMPTY = {Kind.ENUM: (), Kind.TEXT: (), Kind.TIME: None}
_TYPES = {Kind.ENUM: tuple[str, ...], Kind.TEXT: tuple[str, ...], Kind.TIME: datetime | None}
# What list_incidents filters by: one attribute per declared filter, empty
# (or None) meaning "any".
IncidentFilter = make_dataclass(
    "IncidentFilter", [(f.field, _TYPES[f.kind], field(default=_EMPTY[f.kind])) for f in FILTERS], frozen=True,
)
IncidentFilter.__module__ = __name__


def parse(args: MultiDict) -> IncidentFilter:
    return IncidentFilter(**{f.field: f.parse(args) for f in FILTERS})


def conditions(table: sa.Table, flt: IncidentFilter) -> list[sa.ColumnElement]:
    """The WHERE conditions of ``flt`` over the incidents table (AND)."""
    result = []
    for f in FILTERS:
        value = getattr(flt, f.field)
        if value:
            result.append(f.condition(table, value))
    return result


# --------------------------------------------------------------------------- OpenAPI

# Free text: anything but a comma (the separator) and NUL, never empty.
FILTER_TEXT_REF = "#/components/schemas/FilterText"


def _any_case(value: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in value)


def openapi_parameter(f: Filter) -> dict:
    """The query parameter of ``f`` as openapi.yaml must list it."""
    if f.kind is Kind.ENUM:
        one = "(" + "|".join((_any_case if f.normalise else re.escape)(v) for v in f.allowed) + ")"
        schema = {"type": "string", "pattern": f"^ *{one} *(, *{one} *)*$"}
    elif f.kind is Kind.TEXT:
        schema = {"$ref": FILTER_TEXT_REF}
    else:
        schema = {"type": "string", "format": "date-time"}
    return {"name": f.name, "in": "query", "description": f.description, "schema": schema}


def openapi_parameters() -> list[dict]:
    return [openapi_parameter(f) for f in FILTERS]


def openapi_yaml(indent: str = "        ") -> str:
    """The lines openapi.yaml lists under ``/incidents`` (``python -m shared.filters``)."""
    import yaml

    return "".join(f"{indent}- " + yaml.safe_dump(p, default_flow_style=True, sort_keys=False, width=1000)
                   for p in openapi_parameters())


# --------------------------------------------------------------------------- parsing query arguments


def repeated(args: MultiDict, name: str, strip: bool = False) -> list[str]:
    """Repeatable and comma-separated: ``?status=open&status=investigating``
    and ``?status=open,investigating`` mean the same. Free-text values are
    exact (not stripped); enum values may carry spaces around commas."""
    result = []
    for raw in args.getlist(name):
        parts = [part.strip() if strip else part for part in raw.split(",")]
        if not all(parts):
            raise BadRequest(f"{name}: empty value in {raw[:60]!r}", parameter=name)
        result.extend(parts)
    return result


def enum_values(args: MultiDict, name: str, allowed: tuple[str, ...], normalise=str) -> tuple[str, ...]:
    values = tuple(normalise(v) for v in repeated(args, name, strip=True))
    bad = [v for v in values if v not in allowed]
    if bad:
        raise BadRequest(f"{name}: unknown value {bad[0]!r}; allowed: {', '.join(allowed)}", parameter=name, allowed=list(allowed))
    return values


def single(args: MultiDict, name: str) -> str | None:
    values = args.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name}: give it once", parameter=name)
    return values[0] if values else None


def parse_time_param(raw: str, name: str) -> datetime:
    """RFC 3339 with or without a zone (naive means UTC) to naive UTC."""
    if not raw.strip():
        raise BadRequest(f"{name}: empty; give an RFC 3339 time (for example 2026-11-27T10:00:00Z)", parameter=name)
    try:
        value = datetime.fromisoformat(raw.strip().replace("z", "Z").replace(" ", "+") if "T" in raw else raw.strip())
    except ValueError:
        raise BadRequest(f"{name}: not an RFC 3339 time: {raw[:40]!r} (for example 2026-11-27T10:00:00Z)", parameter=name) from None
    return _naive_utc(value, name, raw)


def _naive_utc(value: datetime, name: str, raw: str) -> datetime:
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        raise BadRequest(f"{name}: {raw[:40]!r} is out of range once converted to UTC", parameter=name) from None


if __name__ == "__main__":
    print(openapi_yaml(), end="")
