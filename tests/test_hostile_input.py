"""Hostile and malformed input over real HTTP against the real functions:
every one is a 4xx naming the problem, never a 5xx, and none of them leaves
a pooled database connection in a state that fails the requests after it."""

import base64
import json
import re

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_structured
from cloudevents.http import CloudEvent

from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook
from loopback.processes import FunctionProcess

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
JSON = {"Content-Type": "application/json"}
REPORT = "io.incidentresponse.incident.report"
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
SMALL_DEEP = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB PATCH limit, still past the parser's stack


@pytest.fixture(scope="module")
def query(base_env, broker):
    # A small pool makes a poisoned connection come back quickly.
    proc = FunctionProcess("query", {**base_env, "K_SINK": broker.url + "/default/default", "DB_POOL_SIZE": "2",
                                     "DB_MAX_OVERFLOW": "0"}, threads=4).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def intake(base_env, broker):
    proc = FunctionProcess("intake", {**base_env, "K_SINK": broker.url + "/default/default", "DB_POOL_SIZE": "2",
                                      "DB_MAX_OVERFLOW": "0"}, threads=4).start()
    yield proc
    proc.stop()


@pytest.fixture
def incident_id(clean_db):
    with clean_db.begin() as conn:
        return svc.record_alerts(conn, [alert("Hostile")], "/t", "t").outcomes[0].incident_id


def cursor_of(created_at: str, incident_id: str, raw: str | None = None) -> str:
    text = raw if raw is not None else json.dumps([created_at, incident_id])
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def assert_4xx(response, *words):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if words and response.headers.get("Content-Type", "").startswith("application/json"):
        message = response.json()["message"]
        for word in words:
            assert word in message, message


def assert_still_serving(query, times=12):
    """A poisoned pooled connection fails about every other request after it."""
    statuses = [requests.get(query.url + "/incidents", params={"limit": "5"}, headers=AUTH, timeout=10).status_code
                for _ in range(times)]
    assert statuses == [200] * times, statuses


# --------------------------------------------------------------------------- query API

@pytest.mark.parametrize(
    "params, words",
    [
        ({"since": "9999-12-31T23:59:59-05:00"}, ("since",)),
        ({"until": "0001-01-01T00:00:00+05:00"}, ("until",)),
        ({"since": "0001-01-01T00:00:00+14:00"}, ("since",)),
        ({"limit": "\u00b2"}, ("limit",)),
        ({"limit": "\u0661\u0662"}, ("limit",)),  # Arabic-Indic 12: int() would accept it
        ({"limit": "\uff11\uff12"}, ("limit",)),  # fullwidth 12
        ({"cursor": cursor_of("2026-01-01T00:00:00", "a\x00b")}, ("cursor",)),
        ({"cursor": cursor_of("", "", raw='["2026-01-01T00:00:00", "\\ud800"]')}, ("cursor",)),
        ({"cursor": cursor_of("", "", raw='["2026-01-01T00:00:00\\u0000", "00000000-0000-4000-8000-000000000000"]')}, ("cursor",)),
        ({"cursor": cursor_of("9999-12-31T23:59:59-05:00", "00000000-0000-4000-8000-000000000000")}, ("cursor",)),
        ({"cursor": cursor_of("2026-01-01T00:00:00", "not-an-incident-id")}, ("cursor",)),
        ({"cursor": cursor_of("", "", raw="[1, 2, 3]")}, ("cursor",)),
    ],
)
def test_bad_list_parameters_are_400_and_the_pool_stays_healthy(query, clean_db, params, words):
    assert_4xx(requests.get(query.url + "/incidents", params=params, headers=AUTH, timeout=10), *words)
    assert_still_serving(query)


@pytest.mark.parametrize("raw_query", ["cursor=%ED%A0%80", "alert_name=%ED%A0%80", "service=%ED%A0%80%00", "cursor=%00"])
def test_percent_encoded_surrogates_and_nul_never_reach_the_driver(query, clean_db, raw_query):
    response = requests.get(query.url + "/incidents?" + raw_query, headers=AUTH, timeout=10)
    assert response.status_code < 500, response.text
    assert_still_serving(query)


@pytest.mark.parametrize(
    "body, words",
    [
        (SMALL_DEEP, ("nested",)),
        (b'{"status": "resolved", "note": ' + SMALL_DEEP + b"}", ("nested",)),
        (json.dumps({"status": "resolved", "note": "a\x00b"}).encode(), ("note",)),
        (b'{"status": "resolved", "note": "lone \\ud800 surrogate"}', ("note",)),
        (b'{"status": "resolved", "note": "\\udc00"}', ("note",)),
    ],
)
def test_bad_patch_bodies_are_400_and_the_pool_stays_healthy(query, incident_id, body, words):
    response = requests.patch(query.url + f"/incidents/{incident_id}", data=body, headers={**AUTH, **JSON}, timeout=30)
    assert_4xx(response, *words)
    assert_still_serving(query)


# --------------------------------------------------------------------------- the board

@pytest.fixture
def board(query):
    session = requests.Session()
    response = session.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, allow_redirects=False, timeout=10)
    assert response.status_code == 303
    return session


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


@pytest.mark.parametrize("note", ["a\x00b", "x" * 4001])
def test_a_bad_board_note_is_4xx_and_changes_nothing(query, board, incident_id, clean_db, note):
    page = board.get(query.url + f"/ui/incidents/{incident_id}", timeout=10)
    form = {"csrf": csrf_of(page.text), "status": "investigating", "note": note}
    body = "&".join(f"{k}={requests.utils.quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in form.items())
    response = board.post(query.url + f"/ui/incidents/{incident_id}/status", data=body, allow_redirects=False, timeout=10,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_4xx(response)
    assert "note" in response.text
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM incidents WHERE id = :id"), {"id": incident_id}).scalar() == "open"
    assert_still_serving(query)


@pytest.mark.parametrize("path", ["/ui/incidents/{id}/status", "/ui/logout", "/ui/maintenance", "/ui/incidents/{id}/silences",
                                  "/ui/dead-letters/1/redeliver"])
def test_a_csrf_field_that_is_not_ascii_is_refused_not_a_500(query, board, incident_id, clean_db, path):
    # compare_digest raised TypeError on a str that is not ASCII.
    response = board.post(query.url + path.format(id=incident_id), data={"csrf": "\u00e9", "status": "resolved"},
                          allow_redirects=False, timeout=10)
    assert response.status_code in (303, 403), (response.status_code, response.text[:300])
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM incidents WHERE id = :id"), {"id": incident_id}).scalar() == "open"


@pytest.mark.parametrize("next_url", ["/ui\r\nSet-Cookie: evil=1", "/ui\nLocation: https://evil.example", "/ui\r", "/ui\x00"])
def test_control_characters_in_next_never_reach_a_header(query, next_url):
    login = requests.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": next_url}, allow_redirects=False, timeout=10)
    assert login.status_code == 303 and login.headers["Location"] == "/ui"
    assert "evil" not in login.headers.get("Set-Cookie", "")
    form = requests.get(query.url + "/ui/login", params={"next": next_url}, timeout=10)
    assert form.status_code == 200 and 'value="/ui"' in form.text


# --------------------------------------------------------------------------- the intake

def test_deeply_nested_webhook_is_400(intake, clean_db):
    for body in (DEEP, DEEP_OBJECT):
        response = requests.post(intake.url + "/webhook/alert", data=body, headers={**AUTH, **JSON}, timeout=30)
        assert_4xx(response, "nested")


def test_overflowing_alert_times_are_rejected_not_500(intake, clean_db):
    payload = webhook([
        {**raw_alert("Overflow"), "startsAt": "9999-12-31T23:59:59-05:00"},
        {**raw_alert("OverflowEnd", status="resolved"), "endsAt": "9999-12-31T23:00:00-02:00"},
    ])
    response = requests.post(intake.url + "/webhook/alert", json=payload, headers=AUTH, timeout=10)
    assert_4xx(response, "startsAt")
    assert [r["field"] for r in response.json()["rejected"]] == ["alerts[0].startsAt", "alerts[1].endsAt"]


def structured(attributes: dict, data=None) -> bytes:
    return json.dumps({"specversion": "1.0", "datacontenttype": "application/json", "data": data or {"alert_name": "X", "priority": "P1"},
                       **attributes}).encode()


@pytest.mark.parametrize(
    "body, words",
    [
        (structured({"type": REPORT, "source": "a\x00b", "id": "1"}), ("source",)),
        (structured({"type": REPORT, "source": "/ok", "id": "\x00"}), ("id",)),
        (structured({"type": REPORT + "\x00", "source": "/ok", "id": "1"}), ("type",)),
        (structured({"type": REPORT, "source": "/ok", "id": "1"}).replace(b'"/ok"', b'"\\ud800"'), ("source",)),
        (structured({"type": REPORT, "source": "/ok", "id": "1"}).replace(b'"id": "1"', b'"id": "\\udfff"'), ("id",)),
        (structured({"type": REPORT, "source": "/ok", "id": "1"}).replace(b'"type": "io', b'"type": "\\ud800io'), ("type",)),
        (structured({"type": REPORT, "source": "/ok", "id": "1"}).replace(b'{"alert_name": "X", "priority": "P1"}', DEEP), ()),
    ],
)
def test_hostile_cloudevent_attributes_are_400_and_the_pool_stays_healthy(intake, query, clean_db, body, words):
    response = requests.post(intake.url + "/", data=body, headers={**AUTH, "Content-Type": "application/cloudevents+json"}, timeout=30)
    assert_4xx(response, *words)
    good = CloudEvent({"type": REPORT, "source": "/after", "id": "after"}, {"alert_name": "AfterHostile", "priority": "P1"})
    headers, data = to_structured(good)
    statuses = [requests.post(intake.url + "/", data=data, headers={**headers, **AUTH}, timeout=10).status_code for _ in range(8)]
    assert statuses == [200] * 8, statuses


def test_deeply_nested_binary_cloudevent_is_400(intake, clean_db):
    headers = {"ce-specversion": "1.0", "ce-type": REPORT, "ce-source": "/deep", "ce-id": "deep", **JSON, **AUTH}
    assert_4xx(requests.post(intake.url + "/", data=DEEP, headers=headers, timeout=30))


# --------------------------------------------------------------------------- every other function

@pytest.fixture(scope="module")
def deadletter(base_env):
    proc = FunctionProcess("deadletter", dict(base_env), threads=2).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("deep", [DEEP, SMALL_DEEP], ids=["over-the-bound", "within-the-bound"])
def test_deep_nesting_in_a_dead_letter_is_kept_as_its_text_never_a_500(deadletter, clean_db, deep):
    """The SDK let the RecursionError through (a 500); then it was a 400,
    the letter lost. The sink keeps data nested past what the parser reads
    as its JSON text, noted (shared.dead_letters.MAX_ITEMS, functions/deadletter/shallow.py)."""
    body = structured({"type": "io.incidentresponse.incident.opened", "source": "/deep", "id": "deep"}, data=[1])
    body = body.replace(b'"data": [1]', b'"data": ' + deep)
    response = requests.post(deadletter.url + "/", data=body, headers={"Content-Type": "application/cloudevents+json"}, timeout=30)
    assert response.status_code == 202, response.text
    with clean_db.connect() as conn:
        data, attributes = conn.execute(sa.text("SELECT data, attributes FROM dead_letters WHERE event_id = 'deep'")).one()
    assert data == deep.decode() and attributes["_cleaned"][0].startswith("data: ")
