"""The incident list filters are declared once (shared/filters.py); the API,
the OpenAPI document, the board and the SQL read that declaration, and these
tests fail when one of them disagrees with it."""

import dataclasses
import re
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from werkzeug.datastructures import MultiDict

from functions.query.api import LIST_PARAMETERS, parse_filters
from shared import filters
from shared.errors import BadRequest
from shared.filters import FILTERS, Filter, Kind
from shared.models import incidents_table as incidents

SPEC = Path(__file__).resolve().parent.parent / "functions" / "query" / "openapi.yaml"
PAGING = ("limit", "cursor")


def documented(spec: dict) -> list[dict]:
    return spec["paths"]["/incidents"]["get"]["parameters"]


def disagreements(spec: dict, declared: tuple[Filter, ...]) -> list[str]:
    """What openapi.yaml says about the list filters that the declaration does not."""
    in_spec = {p["name"]: p for p in documented(spec) if p["name"] not in PAGING}
    in_code = {f.name: filters.openapi_parameter(f) for f in declared}
    problems = [f"{name}: documented, not declared" for name in in_spec.keys() - in_code.keys()]
    problems += [f"{name}: declared, not documented" for name in in_code.keys() - in_spec.keys()]
    problems += [f"{name}: documented as {in_spec[name]}, declared as {in_code[name]}"
                 for name in in_spec.keys() & in_code.keys() if in_spec[name] != in_code[name]]
    return sorted(problems)


def test_the_openapi_document_lists_exactly_the_declared_filters():
    spec = yaml.safe_load(SPEC.read_text())
    assert disagreements(spec, FILTERS) == []
    assert [p["name"] for p in documented(spec)] == [f.name for f in FILTERS] + list(PAGING)


def test_a_filter_on_one_side_only_is_a_disagreement():
    spec = yaml.safe_load(SPEC.read_text())
    extra = Filter("namespace", "namespaces", Kind.TEXT, "the alert's namespace label",
                   lambda t, v: t.c.labels["namespace"].astext.in_(v))
    assert disagreements(spec, FILTERS + (extra,)) == ["namespace: declared, not documented"]
    assert disagreements(spec, FILTERS[1:]) == ["status: documented, not declared"]
    changed = (dataclasses.replace(FILTERS[0], allowed=FILTERS[0].allowed + ("snoozed",)),) + FILTERS[1:]
    assert len(disagreements(spec, changed)) == 1


def test_the_api_accepts_the_declared_filters_and_paging():
    assert LIST_PARAMETERS == tuple(f.name for f in FILTERS) + PAGING
    assert [f.name for f in dataclasses.fields(filters.IncidentFilter)] == [f.field for f in FILTERS]


@pytest.mark.parametrize("f", [f for f in FILTERS if f.kind is Kind.ENUM], ids=lambda f: f.name)
def test_the_documented_pattern_admits_what_the_api_accepts(f):
    pattern = re.compile(filters.openapi_parameter(f)["schema"]["pattern"])
    for value in f.allowed:
        for spelling in {value, value.lower(), value.upper()} if f.normalise else {value}:
            assert pattern.fullmatch(f"{spelling}, {f.allowed[0]}")
            assert getattr(filters.parse(MultiDict({f.name: spelling})), f.field) == (value,)
    assert not pattern.fullmatch("nonsense")
    with pytest.raises(BadRequest) as refused:
        parse_filters(MultiDict({f.name: "nonsense"}))
    assert refused.value.details["allowed"] == list(f.allowed)


def test_an_empty_filter_adds_no_condition_and_each_given_one_adds_one():
    assert filters.conditions(incidents, filters.IncidentFilter()) == []
    given = {f.field: (datetime(2026, 1, 1) if f.kind is Kind.TIME else ("x",)) for f in FILTERS}
    assert len(filters.conditions(incidents, filters.IncidentFilter(**given))) == len(FILTERS)


def test_enum_values_that_differ_only_in_case_are_one_value():
    assert filters.parse(MultiDict([("status", "open,Open"), ("status", "OPEN")])).statuses == ("open",)
    spellings = [f"{a}{b}{c}{d}" for a in "oO" for b in "pP" for c in "eE" for d in "nN"]
    assert filters.enum_values(MultiDict({"status": ",".join(spellings * 100)}), "status", ("open",), str.lower) == ("open",)


def test_a_time_range_is_compared_as_written_then_rounded_up_to_the_stored_microsecond():
    def bounds(since, until):
        return filters.time_range(MultiDict({"since": since, "until": until}))

    assert bounds("2026-11-27T10:00:00Z", "2026-11-27T10:00:00Z") == (datetime(2026, 11, 27, 10), datetime(2026, 11, 27, 10))
    assert bounds("2026-11-27T10:00:00Z", "2026-11-27T10:00:00.0000005Z") == (
        datetime(2026, 11, 27, 10), datetime(2026, 11, 27, 10, 0, 0, 1))
    assert bounds("2026-11-27T10:00:00.0000001Z", "2026-11-27T10:00:00.00000010Z")[0] == datetime(2026, 11, 27, 10, 0, 0, 1)
    for since, until in [("2026-11-27T10:00:00.0000005Z", "2026-11-27T10:00:00Z"),
                         ("2026-11-27T10:00:00.00000012Z", "2026-11-27T10:00:00.0000001Z"),
                         ("2026-11-27T10:00:01Z", "2026-11-27T10:00:00.9999999Z")]:
        with pytest.raises(BadRequest) as refused:
            bounds(since, until)
        assert refused.value.details["parameter"] == "until", (since, until)


def test_the_list_filters_order_their_range_as_time_range_does():
    with pytest.raises(BadRequest):
        filters.parse(MultiDict({"since": "2026-11-27T10:00:00.0000005Z", "until": "2026-11-27T10:00:00Z"}))
    flt = filters.parse(MultiDict({"since": "2026-11-27T10:00:00Z", "until": "2026-11-27T12:00:00+02:00"}))
    assert flt.since == flt.until == datetime(2026, 11, 27, 10)


@pytest.mark.parametrize("raw, expected", [
    ("2026-11-27T23:59:60Z", datetime(2026, 11, 28)),
    ("2026-11-27T23:59:60.5Z", datetime(2026, 11, 28)),
    ("2026-11-27T23:59:60.9999999Z", datetime(2026, 11, 28)),
    ("2026-11-28T00:59:60.5+01:00", datetime(2026, 11, 28)),
])
def test_a_leap_second_drops_its_fraction(raw, expected):
    assert filters.parse_time_param(raw, "since", in_query=True) == expected


def test_a_space_reads_as_the_plus_of_an_offset_only_in_a_query():
    raw = "2026-11-28T01:59:59 02:00"
    assert filters.parse_time_param(raw, "since", in_query=True) == datetime(2026, 11, 27, 23, 59, 59)
    with pytest.raises(BadRequest) as refused:
        filters.parse_time_param(raw, "ends_at", in_query=False)
    assert refused.value.details == {"field": "ends_at"}
