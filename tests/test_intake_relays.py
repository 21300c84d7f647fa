"""What relays and other producers do to an AlertManager-shaped webhook on
its way to the intake, over real HTTP: a JSON body labelled text/plain, a
compressed body, a body with no framing, a number where Grafana writes a
string, a leap second, and legacy Grafana's one-rule notification.

AlertManager and Grafana never retry a 4xx, so each of these is either
stored or refused with a 4xx that names what is wrong; never a 500."""

import gzip
import json
import socket
import zlib

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess
from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def intake(base_env):
    proc = FunctionProcess("intake", {**base_env, "MAX_BODY_BYTES": str(LIMIT)}).start()
    yield proc
    proc.stop()


def post(intake, body: bytes, path="/webhook/alert", **headers):
    return requests.post(intake.url + path, data=body, headers={"Content-Type": "application/json", **AUTH, **headers},
                         timeout=30)


def names(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT alert_name, status FROM incidents")).all())


def group(name: str) -> bytes:
    return json.dumps(webhook([raw_alert(name)])).encode()


# --------------------------------------------------------------------------- media type


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8", "TEXT/PLAIN"])
def test_a_json_body_labelled_text_plain_is_read(intake, clean_db, content_type):
    """Some relays and scripts forward the body and label it text/plain; a
    415 is never retried, so the group would be lost."""
    response = post(intake, group("PlainText"), **{"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert names(clean_db) == {"PlainText": "open"}


def test_text_plain_that_is_not_json_is_400_saying_so(intake, clean_db):
    response = post(intake, b"CPU high on db-1", **{"Content-Type": "text/plain"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["message"]
    assert names(clean_db) == {}


# --------------------------------------------------------------------------- content coding


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    "coding, encode",
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),  # what some servers and clients send as "deflate" (RFC 9110 says zlib)
        ("identity", lambda data: data),
        ("gzip, identity", gzip.compress),
    ],
)
def test_a_compressed_body_is_decompressed_and_stored(intake, clean_db, coding, encode):
    response = post(intake, encode(group("Compressed")), **{"Content-Encoding": coding})
    assert response.status_code == 200, response.text
    assert names(clean_db) == {"Compressed": "open"}


def test_a_body_compressed_twice_is_decompressed_twice(intake, clean_db):
    response = post(intake, gzip.compress(zlib.compress(group("Twice"))), **{"Content-Encoding": "deflate, gzip"})
    assert response.status_code == 200, response.text
    assert names(clean_db) == {"Twice": "open"}


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br"])
def test_a_content_coding_the_intake_cannot_read_is_415_naming_it(intake, clean_db, coding):
    """Before, the coding was not looked at: a body really so coded was
    a 400 "not UTF-8 text", and a plain body so labelled was stored."""
    response = post(intake, group("Coded"), **{"Content-Encoding": coding})
    assert response.status_code == 415, response.text
    assert repr(coding.split(",")[-1].strip()) in response.json()["message"]
    assert names(clean_db) == {}


@pytest.mark.parametrize("coding", ["UTF-8", "utf8", "text", "chunked"])
def test_a_content_encoding_that_is_not_a_compression_is_read_as_it_is(intake, clean_db, coding):
    """Senders put a charset or a transfer coding there (expressjs/body-parser
    #100, #108); such a group was stored before codings were read, and a 415
    is never retried."""
    response = post(intake, group("NotACoding"), **{"Content-Encoding": coding})
    assert response.status_code == 200, response.text
    assert names(clean_db) == {"NotACoding": "open"}


def test_a_body_of_thousands_of_empty_gzip_members_is_400_naming_the_cap(intake, clean_db):
    """Each member costs a decompressor; the body limit's worth of empty
    20-byte members was 3,000 of them here, 52,000 at the default limit."""
    empty = gzip.compress(b"")
    response = post(intake, empty * (LIMIT // len(empty)), **{"Content-Encoding": "gzip"})
    assert response.status_code == 400, response.text
    assert "gzip members" in response.json()["message"]


def test_a_gzip_of_nothing_is_400_saying_the_body_is_empty(intake, clean_db):
    response = post(intake, gzip.compress(b""), **{"Content-Encoding": "gzip"})
    assert response.status_code == 400, response.text
    assert response.json()["message"] == "the body is not valid JSON: it is empty"


@pytest.mark.parametrize("coding, broken", [("gzip", b"\x1f\x8b\x08\x00not gzip at all"), ("gzip", gzip.compress(b"{}")[:-6]),
                                            ("deflate", b"\x00\x01\x02 not deflate")])
def test_a_corrupt_compressed_body_is_400_naming_the_coding(intake, clean_db, coding, broken):
    response = post(intake, broken, **{"Content-Encoding": coding})
    assert response.status_code == 400, response.text
    assert coding in response.json()["message"]


def test_a_body_that_inflates_past_the_limit_is_413_without_inflating_it_all(intake, clean_db):
    """A few kilobytes of gzip may hold gigabytes: the limit bounds what is
    decompressed as it bounds what is read."""
    bomb = gzip.compress(b'{"alerts": [], "pad": "' + b" " * (40 * 1024 * 1024) + b'"}')
    assert len(bomb) < LIMIT
    response = post(intake, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413, response.text
    assert str(LIMIT) in response.json()["message"]


# --------------------------------------------------------------------------- framing


def test_a_body_without_framing_is_400_saying_it_arrived_empty(intake, clean_db):
    """HTTP/1.0 with neither Content-Length nor chunked coding: the request
    has no body (RFC 9112 6.3), and the answer must say that, not "JSON
    expected at line 1"."""
    body = group("Unframed")
    with socket.create_connection(("127.0.0.1", intake.port), timeout=10) as conn:
        conn.sendall(b"POST /webhook/alert HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer " + TEST_TOKEN.encode()
                     + b"\r\nContent-Type: application/json\r\n\r\n" + body)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400"), answer[:300]
    message = json.loads(payload)["message"]
    assert "empty" in message and "Content-Length" in message
    assert names(clean_db) == {}


# --------------------------------------------------------------------------- payload fields


def test_a_grafana_version_written_as_a_number_is_the_same_version(intake, clean_db):
    """As for AlertManager's "4": a relay that re-marshals the group writes 1."""
    payload = {**webhook([raw_alert("GrafanaNumeric")]), "version": 1}
    response = post(intake, json.dumps(payload).encode(), path="/webhook/grafana")
    assert response.status_code == 200, response.text
    assert names(clean_db) == {"GrafanaNumeric": "open"}


def test_a_leap_second_is_read_as_the_second_before(intake, clean_db):
    """RFC 3339 allows second 60; Python's datetime has no room for it."""
    alert = {**raw_alert("LeapSecond"), "startsAt": "2016-12-31T23:59:60.5Z"}
    response = post(intake, json.dumps(webhook([alert])).encode())
    assert response.status_code == 200, response.text
    with clean_db.connect() as conn:
        starts_at = conn.execute(sa.text("SELECT starts_at FROM incidents")).scalar_one()
    assert starts_at.isoformat() == "2016-12-31T23:59:59.999999"


# --------------------------------------------------------------------------- legacy Grafana alerting

def legacy(state: str) -> dict:
    """The notification legacy Grafana alerting (Grafana 4-10) posts, one per
    rule, in the shape of Grafana's documented example."""
    return {
        "dashboardId": 1,
        "evalMatches": [{"value": 100, "metric": "High value", "tags": None},
                        {"value": 200.5, "metric": "Higher Value", "tags": {"host": "db-1"}}] if state == "alerting" else [],
        "imageUrl": "https://grafana.example.test/render/panel.png",
        "message": "Disk latency over 200 ms",
        "orgId": 1,
        "panelId": 2,
        "ruleId": 7,
        "ruleName": "Disk latency",
        "ruleUrl": "https://grafana.example.test/d/abc/storage?tab=alert&viewPanel=2&orgId=1",
        "state": state,
        "tags": {"severity": "critical", "service": "storage"},
        "title": f"[{state.title()}] Disk latency",
    }


def test_legacy_grafana_alerting_opens_an_incident_and_ok_resolves_it(intake, clean_db):
    response = post(intake, json.dumps(legacy("alerting")).encode(), path="/webhook/grafana")
    assert response.status_code == 200, response.text
    (opened,) = response.json()["results"]
    assert opened["action"] == "created"
    with clean_db.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM incidents")).mappings().one()
    assert (row["alert_name"], row["priority"], row["source"]) == ("Disk latency", "P0", "grafana")
    assert row["summary"] == "Disk latency over 200 ms"
    assert row["labels"] == {"alertname": "Disk latency", "severity": "critical", "service": "storage",
                             "grafana_org_id": "1", "grafana_rule_id": "7"}
    assert row["annotations"]["generator_url"].startswith("https://grafana.example.test/d/abc/")
    assert row["annotations"]["image_url"] == "https://grafana.example.test/render/panel.png"
    assert json.loads(row["annotations"]["values"]) == {"High value": 100, "Higher Value": 200.5}

    resolved = post(intake, json.dumps(legacy("ok")).encode(), path="/webhook/grafana").json()["results"][0]
    assert resolved == {**opened, "action": "resolved"}
    assert names(clean_db) == {"Disk latency": "resolved"}


def test_legacy_grafana_no_data_opens_an_incident_that_ok_resolves(intake, clean_db):
    """The rule's data is gone: an incident. Grafana notifies no_data -> ok
    (it does not notify no_data -> pending -> ok; README says so)."""
    opened = post(intake, json.dumps(legacy("no_data")).encode(), path="/webhook/grafana")
    assert opened.status_code == 200, opened.text
    assert opened.json()["results"][0]["action"] == "created"
    assert names(clean_db) == {"Disk latency": "open"}
    resolved = post(intake, json.dumps(legacy("ok")).encode(), path="/webhook/grafana")
    assert resolved.json()["results"][0]["action"] == "resolved"
    assert names(clean_db) == {"Disk latency": "resolved"}


def test_legacy_grafana_alerting_then_no_data_then_ok_is_one_incident_resolved(intake, clean_db):
    """no_data after alerting is the same rule: it refreshes the open
    incident rather than opening a second, and the ok that follows resolves it."""
    actions = [post(intake, json.dumps(legacy(state)).encode(), path="/webhook/grafana").json()["results"][0]
               for state in ("alerting", "no_data", "ok")]
    assert [a["action"] for a in actions] == ["created", "refreshed", "resolved"]
    assert len({a["incident_id"] for a in actions}) == 1
    assert names(clean_db) == {"Disk latency": "resolved"}


@pytest.mark.parametrize(
    "change, field",
    [({"state": "paused"}, "state"), ({"state": None}, "state"), ({"ruleName": "", "title": "[Alerting] "}, "ruleName"),
     ({"ruleName": None, "title": None}, "ruleName"), ({"tags": ["a"]}, "tags"), ({"state": ["x"]}, "state"),
     ({"state": {}}, "state"), ({"state": "x" * 5000}, "state")],
)
def test_a_legacy_grafana_notification_that_can_never_be_stored_is_400_naming_the_field(intake, clean_db, change, field):
    response = post(intake, json.dumps({**legacy("alerting"), **change}).encode(), path="/webhook/grafana")
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert len(response.json()["message"]) < 200
    assert names(clean_db) == {}


def test_legacy_grafana_sent_to_the_alertmanager_route_is_told_the_right_route(intake, clean_db):
    response = post(intake, json.dumps(legacy("alerting")).encode())
    assert response.status_code == 400, response.text
    assert "/webhook/grafana" in response.json()["message"]


def test_a_blank_alertname_from_grafana_takes_the_groups_name(intake, clean_db):
    """Blank is as good as missing: an incident named "  " cannot be read on
    the board or in a page."""
    alert = raw_alert("x")
    alert["labels"]["alertname"] = "  "
    payload = {**webhook([alert]), "version": "1", "commonLabels": {"alertname": "FromTheGroup"}}
    response = post(intake, json.dumps(payload).encode(), path="/webhook/grafana")
    assert response.status_code == 200, response.text
    assert names(clean_db) == {"FromTheGroup": "open"}


# --------------------------------------------------------------------------- CloudEvents


def test_a_compressed_cloudevent_is_decompressed(intake, clean_db):
    headers = {"ce-specversion": "1.0", "ce-type": "io.incidentresponse.incident.report", "ce-source": "/relay",
               "ce-id": "gz-1", "Content-Encoding": "gzip"}
    body = gzip.compress(json.dumps({"alert_name": "CompressedReport", "priority": "P1"}).encode())
    response = post(intake, body, path="/events", **headers)
    assert response.status_code == 200, response.text
    assert names(clean_db) == {"CompressedReport": "open"}


# --------------------------------------------------------------------------- times that cannot be a resolution


def resolved_at(engine, name: str):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT resolved_at, timezone('utc', now()) AS now FROM incidents "
                                    "WHERE alert_name = :name"), {"name": name}).mappings().one()


def fire_then_resolve(intake, name: str, starts_at: str, ends_at: str) -> None:
    firing = {**raw_alert(name), "startsAt": starts_at}
    assert post(intake, json.dumps(webhook([firing])).encode()).json()["counts"] == {"created": 1}
    resolved = {**raw_alert(name, status="resolved"), "startsAt": starts_at, "endsAt": ends_at}
    assert post(intake, json.dumps(webhook([resolved])).encode()).json()["counts"] == {"resolved": 1}


def test_a_resolution_dated_in_the_far_future_is_resolved_now(intake, clean_db):
    """An endsAt of 9999 stored as it is would hold the incident inside the
    reopen window for ever and push the mean time to resolve out by millennia."""
    fire_then_resolve(intake, "EndsInFuture", "2026-11-27T22:00:00Z", "9999-12-31T23:59:59Z")
    row = resolved_at(clean_db, "EndsInFuture")
    assert row["resolved_at"] <= row["now"]


@pytest.mark.parametrize("ends_at", ["2026-11-27T23:30:00Z", "2026-11-27T21:00:00Z"])
def test_a_resolution_in_the_past_keeps_its_time_even_before_the_firings_start(intake, clean_db, ends_at):
    """AlertManager itself sends an endsAt before the firing's startsAt when
    a resolution is posted to its API with a startsAt of its own."""
    fire_then_resolve(intake, "EndsInPast", "2026-11-27T22:00:00Z", ends_at)
    assert resolved_at(clean_db, "EndsInPast")["resolved_at"].isoformat() == ends_at[:-1]
