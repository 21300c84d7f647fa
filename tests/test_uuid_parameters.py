"""Every endpoint that takes an id which is a UUID answers a bad one with
400 and a JSON error naming the parameter, never a 404 for an id read as
some other incident, nor a 500. Only the canonical form is an id: Python's
uuid.UUID also reads " 2345678-…", "1_345678-…" and "+2345678-…" (int()'s
whitespace, underscores and sign) as ids of other incidents."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests
import yaml

from loopback.processes import FunctionProcess
from shared.errors import BadRequest
from shared.http import parse_uuid
from tests.conftest import TEST_TOKEN

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
Z = str(uuid.uuid4())

BAD = [
    "not-a-uuid",
    "1_345678-1234-1234-1234-123456789abc",
    "+2345678-1234-1234-1234-123456789abc",
    "%202345678-1234-1234-1234-123456789abc",
    "urn:uuid:12345678-1234-1234-1234-123456789abc",
    "%00",
]

SPEC = Path(__file__).resolve().parent.parent / "functions" / "query" / "openapi.yaml"
PATHS = yaml.safe_load(SPEC.read_text())["paths"]


def named_by_the_spec(method: str, path: str) -> str:
    """The name functions/query/openapi.yaml gives the parameter where
    ``path`` puts {bad}: a query parameter's key, or the path parameter of
    the operation's template at that segment."""
    path, _, query = path.partition("?")
    if "{bad}" in query:
        return query.split("=")[0]
    segments = path.strip("/").split("/")
    for template, operations in PATHS.items():
        parts = template.strip("/").split("/")
        if method.lower() in operations and len(parts) == len(segments) and all(
                p == s or p.startswith("{") for p, s in zip(parts, segments, strict=True)):
            return parts[segments.index("{bad}")].strip("{}")
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


# (method, path with {bad} where the bad id goes, request body); the
# parameter a 400 names is the one the OpenAPI document names there.
ENDPOINTS = [
    ("GET", "/incidents/{bad}", None),
    ("PATCH", "/incidents/{bad}", {"status": "resolved"}),
    ("POST", "/incidents/{bad}/acknowledge", None),
    ("GET", "/incidents/{bad}/silences", None),
    ("POST", "/incidents/{bad}/silences", {"duration_minutes": 10}),
    ("DELETE", "/incidents/{bad}/silences/" + "a" * 36, None),
    ("GET", "/incidents/{bad}/proposals", None),
    ("GET", "/incidents/{bad}/proposals/" + Z, None),
    ("GET", f"/incidents/{Z}/proposals/{{bad}}", None),
    ("POST", f"/incidents/{Z}/proposals/{{bad}}/approve", None),
    ("POST", f"/incidents/{Z}/proposals/{{bad}}/reject", None),
    ("GET", "/maintenance-windows/{bad}", None),
    ("POST", "/maintenance-windows/{bad}/end", None),
    ("DELETE", "/maintenance-windows/{bad}", None),
    ("GET", "/dead-letters?incident_id={bad}", None),
    ("GET", "/outbox/parked?incident_id={bad}", None),
]
ENDPOINTS = [(method, path, named_by_the_spec(method, path), body) for method, path, body in ENDPOINTS]


@pytest.fixture(scope="module")
def query(base_env):
    proc = FunctionProcess("query", {**base_env, "ALERTMANAGER_URL": "http://127.0.0.1:9"}).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("method, path, parameter, body", ENDPOINTS, ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS])
def test_a_bad_uuid_is_a_400_naming_the_parameter(query, clean_db, method, path, parameter, body, bad):
    r = requests.request(method, query.url + path.format(bad=bad), headers=AUTH, json=body, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = r.json()
    assert error["error"] == "bad_request" and error["parameter"] == parameter, error
    # A query string's NUL is refused before any parameter is read, naming it too.
    said = "contains a NUL character" if bad == "%00" and "?" in path else "not a UUID"
    assert error["message"].startswith(f"{parameter}: {said}"), error


@pytest.mark.parametrize("raw", ["12345678-1234-1234-1234-123456789ABC", "12345678-1234-1234-1234-123456789abc"])
def test_the_canonical_form_in_either_case_is_an_id(raw):
    assert parse_uuid(raw, "id") == "12345678-1234-1234-1234-123456789abc"


@pytest.mark.parametrize("raw", [None, 5, "", "x" * 10000, "12345678-1234-1234-1234-123456789abc\n", "１２345678-1234-1234-1234-123456789abc",
                                 "12345678123412341234123456789abc", "{12345678-1234-1234-1234-123456789abc}", "\ud800"])
def test_anything_else_is_a_bad_request_naming_the_field(raw):
    with pytest.raises(BadRequest) as caught:
        parse_uuid(raw, "data.proposal_id", detail="field")
    assert caught.value.body()["field"] == "data.proposal_id"
    assert caught.value.message.startswith("data.proposal_id: not a UUID") and len(caught.value.message) < 150


@pytest.mark.parametrize("data, subject, field", [
    ({"incident_id": "1_345678-1234-1234-1234-123456789abc"}, None, "data.incident_id"),
    ({"incident_id": 5}, None, "data.incident_id"),
    # A falsy value of another type is refused, not passed over for the subject.
    ({"incident_id": 0}, "12345678-1234-1234-1234-123456789abc", "data.incident_id"),
    ({"incident_id": False}, "12345678-1234-1234-1234-123456789abc", "data.incident_id"),
    ({"incident_id": ""}, "12345678-1234-1234-1234-123456789abc", "data.incident_id"),
    ({}, "not-a-uuid", "subject"),
    ({"incident_id": "12345678-1234-1234-1234-123456789abc"}, "not-a-uuid", "subject"),
    (None, None, "subject"),
])
def test_an_event_naming_no_incident_is_a_bad_request_naming_where_it_looked(data, subject, field):
    from cloudevents.http import CloudEvent

    from shared import eventio

    attributes = {"type": "x", "source": "/test", **({"subject": subject} if subject else {})}
    with pytest.raises(BadRequest) as caught:
        eventio.incident_id_of(CloudEvent(attributes, data))
    assert caught.value.body()["field"] == field and caught.value.message.startswith(f"{field}: not a UUID")


def test_a_subject_naming_another_incident_than_the_data_is_a_bad_request():
    from cloudevents.http import CloudEvent

    from shared import eventio

    event = CloudEvent({"type": "x", "source": "/t", "subject": "12345678-1234-1234-1234-123456789abc"},
                       {"incident_id": "87654321-4321-4321-4321-cba987654321"})
    with pytest.raises(BadRequest) as caught:
        eventio.incident_id_of(event)
    assert caught.value.body()["field"] == "subject" and "different incidents" in caught.value.message
    # The same incident in both, in either case, is that incident.
    same = CloudEvent({"type": "x", "source": "/t", "subject": "12345678-1234-1234-1234-123456789ABC"},
                      {"incident_id": "12345678-1234-1234-1234-123456789abc"})
    assert eventio.incident_id_of(same) == "12345678-1234-1234-1234-123456789abc"


def test_an_event_names_its_incident_in_either_case():
    from cloudevents.http import CloudEvent

    from shared import eventio

    upper = "12345678-1234-1234-1234-123456789ABC"
    assert eventio.incident_id_of(CloudEvent({"type": "x", "source": "/t"}, {"incident_id": upper})) == upper.lower()
    assert eventio.incident_id_of(CloudEvent({"type": "x", "source": "/t", "subject": upper}, {})) == upper.lower()
