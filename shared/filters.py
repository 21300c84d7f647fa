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
from datetime import datetime, timedelta, timezone
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
        return parse_time_param(raw, self.name, in_query=True) if raw is not None else None


FILTERS: tuple[Filter, ...] = (
    Filter("status", "statuses", Kind.ENUM, "open, investigating, resolved, closed (any case); repeat or separate with commas",
           lambda t, v: t.c.status.in_(v), allowed=STATUSES, normalise=str.lower, widget=Widget("Status")),
    Filter("priority", "priorities", Kind.ENUM, "P0, P1, P2 (any case); repeat or separate with commas",
           lambda t, v: t.c.priority.in_(v), allowed=PRIORITIES, normalise=str.upper, widget=Widget("Priority")),
    Filter("since", "since", Kind.TIME, "RFC 3339; created at or after (naive means UTC)",
           lambda t, v: t.c.created_at >= v, widget=Widget("Since", "2026-11-27T00:00:00Z")),
    Filter("until", "until", Kind.TIME, "RFC 3339; created before (naive means UTC); not before since when both are given (equal: an empty page)",
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


# The list has one time range, since and until, ordered by time_range.
if [(f.name, f.field) for f in FILTERS if f.kind is Kind.TIME] != [("since", "since"), ("until", "until")]:
    raise RuntimeError("FILTERS: the time filters must be the one pair since, until (parse reads them with time_range)")


def parse(args: MultiDict) -> IncidentFilter:
    since, until = time_range(args)
    return IncidentFilter(**{f.field: f.parse(args) for f in FILTERS if f.kind is not Kind.TIME}, since=since, until=until)


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


# The distinct values one repeatable parameter may name. Each becomes a bind
# parameter of the statement (twice for fingerprint), and the wire protocol
# counts them in 16 bits: 100,000 alert names fit in a URL the server takes
# and failed half-way into the driver with a 500.
MAX_VALUES = 1000


def repeated(args: MultiDict, name: str, strip: bool = False, normalise: Callable[[str], str] = str) -> list[str]:
    """Repeatable and comma-separated: ``?status=open&status=investigating``
    and ``?status=open,investigating`` mean the same. Free-text values are
    exact (not stripped); enum values may carry spaces around commas. Values
    are ``normalise``d, then one named twice counts once; more than
    MAX_VALUES distinct ones are refused."""
    result: dict[str, None] = {}
    for raw in args.getlist(name):
        parts = [part.strip() if strip else part for part in raw.split(",")]
        if not all(parts):
            raise BadRequest(f"{name}: empty value in {raw[:60]!r}", parameter=name)
        result.update(dict.fromkeys(normalise(part) for part in parts))
        if len(result) > MAX_VALUES:
            raise BadRequest(f"{name}: more than {MAX_VALUES} values", parameter=name)
    return list(result)


def enum_values(args: MultiDict, name: str, allowed: tuple[str, ...], normalise=str) -> tuple[str, ...]:
    """The distinct allowed values, in ``normalise``'s case: open,Open,OPEN is
    one value (and one of the MAX_VALUES)."""
    values = tuple(repeated(args, name, strip=True, normalise=normalise))
    bad = [v for v in values if v not in allowed]
    if bad:
        raise BadRequest(f"{name}: unknown value {bad[0]!r}; allowed: {', '.join(allowed)}", parameter=name, allowed=list(allowed))
    return values


def single(args: MultiDict, name: str) -> str | None:
    values = args.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name}: give it once", parameter=name)
    return values[0] if values else None


# What RFC 3339 (section 5.6 and its notes) allows that fromisoformat does
# not read as meant: a lower-case "t" or "z", a space for the "T", a leap
# second (60), more fraction digits than the microseconds a datetime holds,
# and, in a query string sent unencoded, the "+" of an offset arriving as a
# space. The groups: date, separator, time to the minute, seconds, fraction
# digits, the offset (or anything else, for fromisoformat to refuse).
_RFC3339_PARTS = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})([Tt ])([0-9]{2}:[0-9]{2})(?::([0-9]{2})(?:\.([0-9]+))?)?(.*)")
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, order=True)
class Instant:
    """A time as written: to the microsecond, and the fraction's digits past
    the microsecond (without trailing zeros) that a datetime cannot hold, so
    two bounds compare as the client wrote them."""

    at: datetime  # naive UTC, the fraction cut to microseconds
    beyond: str = ""  # the fraction's digits past the sixth

    def stored(self) -> datetime:
        """The first microsecond (what PostgreSQL stores) not before this
        instant: created_at >= since and created_at < until mean the same
        for it as for the time written."""
        return self.at + _MICROSECOND if self.beyond else self.at


def _read_instant(text: str, in_query: bool) -> tuple[datetime, str]:
    parts = _RFC3339_PARTS.fullmatch(text)
    if parts is None:
        return datetime.fromisoformat(text), ""
    date, _, minute, second, fraction, rest = parts.groups()
    if in_query:
        rest = rest.replace(" ", "+")
    rest = rest[:-1] + "Z" if rest.endswith("z") else rest
    if second == "60":
        # A leap second is the instant after :59 of its minute, as PostgreSQL
        # reads it: its fraction names no later instant and is dropped.
        return datetime.fromisoformat(f"{date}T{minute}:59{rest}") + timedelta(seconds=1), ""
    fraction = fraction or ""
    text = f"{date}T{minute}{':' + second if second else ''}{'.' + fraction[:6] if fraction else ''}{rest}"
    return datetime.fromisoformat(text), fraction[6:].rstrip("0")


def parse_instant(raw: str, name: str, in_query: bool) -> Instant:
    """RFC 3339 with or without a zone (naive means UTC). ``in_query``: read
    a space before the offset as the "+" a query string turned into it; a
    JSON body keeps its "+", so there a space is an error. BadRequest names
    the parameter (``in_query``) or the body field."""
    where = {"parameter": name} if in_query else {"field": name}
    if not raw.strip():
        raise BadRequest(f"{name}: empty; give an RFC 3339 time (for example 2026-11-27T10:00:00Z)", **where)
    try:
        value, beyond = _read_instant(raw.strip(), in_query)
    except ValueError:
        raise BadRequest(f"{name}: not an RFC 3339 time: {raw[:40]!r} (for example 2026-11-27T10:00:00Z)", **where) from None
    except OverflowError:
        raise BadRequest(f"{name}: {raw[:40]!r} is out of range", **where) from None
    instant = Instant(_naive_utc(value, raw, where), beyond)
    if beyond and instant.at == datetime.max:
        raise BadRequest(f"{name}: {raw[:40]!r} is out of range", **where)
    return instant


def parse_time_param(raw: str, name: str, *, in_query: bool) -> datetime:
    """RFC 3339 (see parse_instant) to naive UTC, to the stored microsecond."""
    return parse_instant(raw, name, in_query).stored()


def time_range(args: MultiDict, since_name: str = "since", until_name: str = "until") -> tuple[datetime | None, datetime | None]:
    """The ``since`` and ``until`` bounds of a query. An ``until`` before
    ``since`` (as written, before rounding to microseconds) is refused: the
    range would hold nothing, and is almost always the two swapped. An equal
    pair is an empty range, not an error: a poller asking for whole seconds
    asks it twice within one second."""
    since_raw, until_raw = single(args, since_name), single(args, until_name)
    since = parse_instant(since_raw, since_name, in_query=True) if since_raw is not None else None
    until = parse_instant(until_raw, until_name, in_query=True) if until_raw is not None else None
    if since is not None and until is not None and until < since:
        raise BadRequest(f"{until_name}: must not be before {since_name} ({until_raw[:40]!r} is before {since_raw[:40]!r})",
                         parameter=until_name)
    return (since.stored() if since is not None else None), (until.stored() if until is not None else None)


def _naive_utc(value: datetime, raw: str, where: dict) -> datetime:
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        name = next(iter(where.values()))
        raise BadRequest(f"{name}: {raw[:40]!r} is out of range once converted to UTC", **where) from None


if __name__ == "__main__":
    print(openapi_yaml(), end="")
