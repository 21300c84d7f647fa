"""Dead letters and parked outbox events over real HTTP: recorded by the
dead-letter function (hostile input included), listed and re-driven
through the query API and the board, and counted in /metrics."""

import base64
import json
import re

import pytest
import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert
from loopback.processes import FunctionProcess, wait_until
from loopback.trickle import HEADERS_THEN_BODY, STATUS_LINE, OneAnswer, Trickler, run_bounded

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
ESCALATION = "http://escalation.default.svc.cluster.local"


@pytest.fixture(scope="module")
def functions(base_env, broker):
    deadletter = FunctionProcess("deadletter", dict(base_env)).start()
    query = FunctionProcess("query", {**base_env, "K_SINK": broker.url + "/default/incidents"}).start()
    yield deadletter, query
    deadletter.stop()
    query.stop()


@pytest.fixture
def world(functions, broker, clean_db):
    broker.requests.clear()
    broker.responder = lambda r: (202, {}, b"")
    return functions


def dead_letter(deadletter, event_id="ev-1", event_type="io.incidentresponse.incident.opened", data=None, subject=None,
                dest=ESCALATION, code="502", error=b"pagerduty: 500", **extra_headers):
    headers = {"ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/incident-response", "ce-type": event_type,
               "ce-priority": "p0", "ce-alertname": "DiskFull", "ce-knativeerrordest": dest, "ce-knativeerrorcode": code,
               "ce-knativeerrordata": base64.b64encode(error).decode(), "Content-Type": "application/json", **extra_headers}
    if subject:
        headers["ce-subject"] = subject
    body = json.dumps(data if data is not None else {"incident_id": subject, "alert_name": "DiskFull"}).encode()
    return requests.post(deadletter.url + "/", data=body, headers=headers, timeout=10)


def seed(engine, name="DiskFull"):
    with engine.begin() as conn:
        return svc.record_alerts(conn, [alert(name)], "/test", "test").outcomes[0].incident_id


def api(query, method, path, **kwargs):
    return requests.request(method, query.url + path, headers={**AUTH, **kwargs.pop("headers", {})}, timeout=30, **kwargs)


def test_a_dead_letter_is_recorded_listed_redelivered_once_and_recorded_with_its_actor(world, broker, clean_db):
    deadletter, query = world
    incident_id = seed(clean_db)
    assert dead_letter(deadletter, f"{incident_id}.opened.0", subject=incident_id).status_code == 202
    assert dead_letter(deadletter, f"{incident_id}.opened.0", subject=incident_id).status_code == 202  # handed over twice

    (letter,) = api(query, "GET", "/dead-letters").json()
    assert (letter["event_id"], letter["incident_id"], letter["code"], letter["error"]) == (
        f"{incident_id}.opened.0", incident_id, "502", "pagerduty: 500")
    assert letter["destination"] == ESCALATION and letter["redelivered"] is False
    assert letter["attributes"]["priority"] == "p0"
    with clean_db.connect() as conn:
        (note,) = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "dead_letter"]
    assert note["details"]["dead_letter_id"] == letter["id"] and "not verified" in note["details"]["label"]

    first = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "alice"})
    assert first.status_code == 200, first.text
    assert first.json()["sent"] is True and first.json()["redelivered_by"] == "api:alice"
    (sent,) = broker.received()
    assert sent.path == "/default/incidents" and sent.headers["content-type"].startswith("application/cloudevents+json")
    event = sent.json()
    assert {k: event[k] for k in ("id", "type", "source", "subject", "priority", "alertname")} == {
        "id": f"{incident_id}.opened.0", "type": "io.incidentresponse.incident.opened", "source": "/incident-response",
        "subject": incident_id, "priority": "p0", "alertname": "DiskFull"}
    assert event["data"] == {"incident_id": incident_id, "alert_name": "DiskFull"}
    assert not any(k.startswith("knativeerror") for k in event)

    again = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")
    assert again.status_code == 200 and again.json()["sent"] is False and again.json()["redelivery_count"] == 1
    assert len(broker.received()) == 1
    forced = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver?force=true", headers={"X-Actor": "bob"})
    assert forced.json()["sent"] is True and forced.json()["redelivery_count"] == 2 and forced.json()["redelivered_by"] == "api:bob"
    assert len(broker.received()) == 2
    assert [d["id"] for d in api(query, "GET", "/dead-letters", params={"redelivered": "yes"}).json()] == [letter["id"]]
    assert api(query, "GET", "/dead-letters", params={"redelivered": "no"}).json() == []
    with clean_db.connect() as conn:
        actors = [t["actor"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "dead_letter_redelivered"]
    assert actors == ["api:alice", "api:bob"]

    # Dead-lettered again after the redelivery: it needs a person again.
    dead_letter(deadletter, f"{incident_id}.opened.0", subject=incident_id, code="503")
    (back,) = api(query, "GET", "/dead-letters", params={"redelivered": "no"}).json()
    assert back["redelivery_status"] == "dead_again" and back["code"] == "503"


def test_a_broker_that_refuses_the_redelivery_is_a_502_and_recorded(world, broker, clean_db):
    deadletter, query = world
    dead_letter(deadletter, "ev-refused", data={"x": 1})
    (letter,) = api(query, "GET", "/dead-letters").json()
    broker.responder = lambda r: (500, {}, b"broker down")
    response = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")
    assert response.status_code == 502 and "500" in response.json()["message"]
    assert response.json()["dead_letter"]["redelivery_status"] == "failed"
    broker.responder = lambda r: (202, {}, b"")
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").json()["sent"] is True


def test_a_broker_that_redirects_the_redelivery_is_a_502_not_a_redelivery(world, broker, clean_db):
    # Followed, the 302 made the POST a GET, and the sign-in page's 200
    # marked the letter redelivered though no Broker took it.
    deadletter, query = world
    dead_letter(deadletter, "ev-redirected", data={"x": 1})
    (letter,) = api(query, "GET", "/dead-letters").json()
    broker.responder = lambda r: (302, {"Location": "/sign-in"}, b"") if r.method == "POST" else (200, {}, b"<html>Sign in</html>")
    response = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")
    assert response.status_code == 502 and "302" in response.json()["message"], response.text
    assert response.json()["dead_letter"]["redelivery_status"] == "failed"
    assert [r.method for r in broker.received()] == ["POST"]


def test_filters_and_keyset_pages(world, clean_db):
    deadletter, query = world
    incident_id = seed(clean_db)
    for n in range(5):
        dead_letter(deadletter, f"ev-{n}", event_type="io.incidentresponse.incident.resolved" if n % 2 else
                    "io.incidentresponse.incident.opened", subject=incident_id if n == 0 else None)
    dead_letter(deadletter, "ev-other-dest", dest="http://diagnostics")
    opened = api(query, "GET", "/dead-letters", params={"event_type": "io.incidentresponse.incident.opened"}).json()
    assert sorted(d["event_id"] for d in opened) == ["ev-0", "ev-2", "ev-4", "ev-other-dest"]
    assert [d["event_id"] for d in api(query, "GET", "/dead-letters", params={"incident_id": incident_id}).json()] == ["ev-0"]
    assert [d["event_id"] for d in api(query, "GET", "/dead-letters", params={"destination": "http://diagnostics"}).json()] == ["ev-other-dest"]
    assert api(query, "GET", "/dead-letters", params={"since": "2999-01-01T00:00:00Z"}).json() == []

    seen, url = [], query.url + "/dead-letters?limit=4"
    while url:
        page = requests.get(url, headers=AUTH, timeout=10)
        seen += [d["id"] for d in page.json()]
        match = re.search(r'<([^>]+)>; rel="next"', page.headers.get("Link", ""))
        url = match.group(1) if match else None
    assert len(seen) == 6 and seen == sorted(seen, reverse=True)
    for bad in ({"limit": "0"}, {"redelivered": "maybe"}, {"incident_id": "nope"}, {"cursor": "x"}, {"bogus": "1"},
                {"event_type": "a\x00b"}, {"since": "yesterday"}):
        assert api(query, "GET", "/dead-letters", params=bad).status_code == 400, bad
    assert api(query, "POST", "/dead-letters/abc/redeliver").status_code == 400
    assert api(query, "POST", "/dead-letters/99999999999999999999/redeliver").status_code == 400
    assert api(query, "POST", "/dead-letters/424242/redeliver").status_code == 404
    assert requests.get(query.url + "/dead-letters", timeout=10).status_code == 401


def test_hostile_dead_letters_are_stored_safely_or_refused_never_a_500(world, broker, clean_db):
    deadletter, query = world
    incident_id = seed(clean_db)
    cases = [
        dead_letter(deadletter, "nul", data={"incident_id": incident_id, "text": "a\x00b\ud800c"}),
        dead_letter(deadletter, "bad-base64", error=b"", **{"ce-knativeerrordata": "%%%not base64"}),
        dead_letter(deadletter, "x" * 5000, subject=incident_id, dest="http://" + "d" * 6000, code="1234567890123"),
        requests.post(deadletter.url + "/", data=b"\xff\xfe\x00binary", timeout=10, headers={
            "ce-specversion": "1.0", "ce-id": "bin", "ce-source": "/s", "ce-type": "t", "Content-Type": "application/octet-stream"}),
        requests.post(deadletter.url + "/", timeout=10, headers={"Content-Type": "application/cloudevents+json"}, data=json.dumps({
            "specversion": "1.0", "id": "structured\u0000\ud800", "source": "/s\u0000", "type": "io.incidentresponse.incident.opened",
            "subject": incident_id, "knativeerrordata": "!!", "data": {"incident_id": incident_id}})),
    ]
    assert [c.status_code for c in cases] == [202] * 5, [c.text for c in cases]
    refused = [
        requests.post(deadletter.url + "/", data=b"{}", headers={"Content-Type": "application/json"}, timeout=10),
        requests.post(deadletter.url + "/", data=b"[" * 100000, timeout=10, headers={"Content-Type": "application/cloudevents+json"}),
        requests.post(deadletter.url + "/", data=b"x" * (3 * 1024 * 1024), timeout=30, headers={"Content-Type": "application/json"}),
    ]
    assert [r.status_code for r in refused] == [400, 400, 413]
    letters = {d["event_id"][:20]: d for d in api(query, "GET", "/dead-letters", params={"limit": 50}).json()}
    assert len(letters) == 5
    assert letters["bad-base64"]["error"] == "%%%not base64"
    long = letters["x" * 20]
    assert len(long["event_id"]) <= 200 and len(long["destination"]) <= 500 and len(long["code"]) <= 10
    assert long["attributes"]["id"] == "x" * 5000  # the original, for the redelivery
    with clean_db.connect() as conn:
        notes = [t["details"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "dead_letter"]
    assert notes and all(len(json.dumps(n)) < 1500 and "not verified" in n["label"] for n in notes)

    binary = letters["bin"]
    assert api(query, "POST", f"/dead-letters/{binary['id']}/redeliver").status_code == 200
    assert base64.b64decode(broker.received()[-1].json()["data_base64"]) == b"\xff\xfe\x00binary"
    nul = letters["nul"]
    assert api(query, "POST", f"/dead-letters/{nul['id']}/redeliver").status_code == 200
    assert broker.received()[-1].json()["data"] == {"incident_id": incident_id, "text": "a\x00b\ud800c"}
    assert requests.get(query.url + "/health", timeout=10).status_code == 200


def post_structured(deadletter, document: str):
    """A structured-mode letter as raw JSON text: json.dumps cannot write 1e400."""
    return requests.post(deadletter.url + "/", data=document.encode(), timeout=10,
                         headers={"Content-Type": "application/cloudevents+json"})


def strict_json(body: bytes):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(body, parse_constant=refuse)


# An extension attribute PostgreSQL cannot store as it came (jsonb refuses
# NaN and Infinity, NUL and lone surrogates; Python reads 1e400 as Infinity
# and a 5000-digit integer not at all): the JSON text sent, what is stored
# and re-sent instead.
UNSTORABLE_EXTENSIONS = {
    "nan": ("NaN", "NaN"),
    "infinity": ("Infinity", "Infinity"),
    "minus-infinity": ("-Infinity", "-Infinity"),
    "1e400": ("1e400", "1e400"),
    "5000-digits": ("9" * 5000, "9" * 5000),
    "nul-in-object": ('{"a": "x\\u0000"}', {"a": "x\ufffd"}),
    "nul-in-array": ('["x\\u0000", 1.5]', ["x\ufffd", 1.5]),
    "surrogate-in-object": ('{"a": "x\\ud800"}', {"a": "x?"}),
    "nul-in-key": ('{"k\\u0000": 1, "k\\ufffd": 2}', {"k\ufffd": 1, "k\ufffd~2": 2}),
    "nested": ('{"a": [{"b": NaN}]}', {"a": [{"b": "NaN"}]}),
}


@pytest.mark.parametrize("sent, stored", UNSTORABLE_EXTENSIONS.values(), ids=UNSTORABLE_EXTENSIONS.keys())
def test_an_attribute_postgresql_cannot_store_is_kept_cleaned_noted_and_redelivered(world, broker, sent, stored):
    # It was a 500 (invalid input syntax for type json): the Broker retried,
    # then dropped the letter, the last copy of a page.
    deadletter, query = world
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "odd", "source": "/s", '
                                         '"type": "io.incidentresponse.incident.opened", "custom": ' + sent + ', '
                                         '"knativeerrordest": "http://escalation", "data": {"n": 1}}')
    assert answer.status_code == 202, answer.text
    assert post_structured(deadletter, '{"specversion": "1.0", "id": "odd", "source": "/s", '
                                       '"type": "io.incidentresponse.incident.opened", "custom": ' + sent + ', '
                                       '"knativeerrordest": "http://escalation", "data": {"n": 1}}').status_code == 202
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["attributes"]["custom"] == stored and "_cleaned" not in letter["attributes"]
    assert letter["cleaned"] and all(note.startswith("custom") for note in letter["cleaned"]), letter["cleaned"]

    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    event = strict_json(broker.received()[-1].body)
    assert event["custom"] == stored and event["data"] == {"n": 1}
    assert not any(k.startswith("_") or k.startswith("knativeerror") for k in event)


def test_structured_data_with_numbers_no_json_parser_keeps_is_stored_as_text_and_noted(world, broker):
    deadletter, query = world
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "odd-data", "source": "/s", "type": "t", '
                                         '"datacontenttype": "application/json", '
                                         '"data": {"x": NaN, "y": 1e400, "z": ' + "7" * 5000 + ', "w": 2.5}}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    # In the order they come in the letter (they were listed last first).
    assert letter["cleaned"] == ["data.x: the number NaN kept as a string",
                                 "data.y: the number 1e400 kept as a string",
                                 f"data.z: the number {'7' * 39}… kept as a string"]
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    assert strict_json(broker.received()[-1].body)["data"] == {"x": "NaN", "y": "1e400", "z": "7" * 5000, "w": 2.5}


def test_error_attributes_that_are_not_strings_are_kept_as_their_json_text(world):
    # A structured event may send any JSON value where Knative sends a
    # string; base64-decoding an object was a TypeError, a 500.
    deadletter, query = world
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": {"n": 1}, "source": "/s", "type": "t", '
                                         '"knativeerrordest": ["http://x"], "knativeerrorcode": 502, '
                                         '"knativeerrordata": {"why": "down"}}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert (letter["event_id"], letter["destination"], letter["code"], letter["error"]) == (
        '{"n": 1}', '["http://x"]', "502", '{"why": "down"}')


def test_binary_data_that_is_not_strict_json_is_kept_and_redelivered_byte_for_byte(world, broker):
    # The SDK refused the 5000-digit integer (a 400: the letter lost), and the
    # NaN went out again as JSON no Broker reads.
    deadletter, query = world
    body = b'{"x": NaN, "n": ' + b"9" * 5000 + b"}"
    answer = requests.post(deadletter.url + "/", data=body, timeout=10, headers={
        "ce-specversion": "1.0", "ce-id": "binary-odd", "ce-source": "/s", "ce-type": "t", "Content-Type": "application/json"})
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["cleaned"] == []  # the data column keeps the bytes as they came
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    event = strict_json(broker.received()[-1].body)
    assert "data" not in event and base64.b64decode(event["data_base64"]) == body


def test_a_dead_letter_handed_over_twice_without_a_destination_is_recorded_once(world, clean_db):
    # The destination was in the unique key and NULLs are distinct: two rows.
    deadletter, query = world
    incident_id = seed(clean_db)
    for code in ("502", "503"):
        assert dead_letter(deadletter, "no-dest", subject=incident_id, dest=None, code=code).status_code == 202
    dead_letter(deadletter, "no-dest", subject=incident_id, dest=ESCALATION)
    letters = api(query, "GET", "/dead-letters").json()
    assert [(d["destination"], d["code"]) for d in letters] == [(ESCALATION, "502"), (None, "503")], letters  # newest first
    with clean_db.connect() as conn:
        notes = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "dead_letter"]
    assert len(notes) == 2


def deep_array(elements: int, depth: int) -> str:
    return "[" * depth + ",".join(["0"] * elements) + "]" * depth


def test_a_wide_deeply_nested_attribute_is_cleaned_in_memory_near_its_size():
    # 150,000 elements nested 900 deep: a path string built for every element
    # up front took the sink to 481 MB for a 294 KiB letter (a 2 MiB one
    # extrapolates to 2.7 GB: killed, restarted, killed, the letter lost).
    import tracemalloc

    from shared import dead_letters

    text = deep_array(150_000, 900)
    value = json.loads(text)
    tracemalloc.start()
    try:
        cleaned = dead_letters.clean_attributes({"id": "x", "custom": value, "bad": float("nan")}, [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(text), f"{peak / 2**20:.0f} MiB to clean {len(text) / 2**10:.0f} KiB"
    deep, nan = cleaned["_cleaned"]
    assert deep.startswith("custom[0][0]") and deep.endswith(": nested deeper than 64 levels: kept as its JSON text")
    assert nan == "bad: the number NaN kept as a string"


def nested_letter(size: int, where: str = "ext") -> bytes:
    """The reviewer's letter: arrays 60 deep, side by side, up to ``size`` bytes."""
    head = '{"specversion": "1.0", "id": "nested", "source": "/s", "type": "t", "' + where + '": ['
    unit = "[" * 60 + "]" * 60
    return (head + ",".join([unit] * ((size - len(head) - 2) // (len(unit) + 1))) + "]}").encode()


@pytest.mark.parametrize("where", ["ext", "data"])
def test_a_letter_of_a_million_arrays_is_read_in_memory_near_its_size(where):
    # Built whole, in each of the sink's copies, a 2 MiB letter of 17,000
    # arrays 60 deep peaked the served sink at 262 MB (its limit is 192Mi
    # for four letters at once) and took 5 s.
    import tracemalloc

    from functions.deadletter.handler import attributes_of, parse_structured
    from shared import dead_letters

    body = nested_letter(1024 * 1024, where)
    tracemalloc.start()
    try:
        parsed = parse_structured(body)
        dead_letters.clean_attributes(attributes_of(parsed.event), list(parsed.notes))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(body), f"{peak / 2**20:.0f} MiB to read a {len(body) / 2**20:.1f} MiB letter"
    assert parsed.notes == (f"{where}: over 50000 arrays, objects and elements: kept as its JSON text",)


def test_a_letter_over_the_bound_is_kept_whole_as_text_and_redelivered_as_its_bytes(world, broker, clean_db):
    deadletter, query = world
    incident_id = seed(clean_db)
    data = "[" + ",".join(["[[1]]"] * 60_000) + "]"
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "large", "source": "/s", "type": '
                                         '"io.incidentresponse.incident.opened", "subject": "' + incident_id + '", '
                                         '"datacontenttype": "application/json", "tags": ["a", "b"], "data": ' + data + '}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["cleaned"] == ["data: over 50000 arrays, objects and elements: kept as its JSON text"]
    assert letter["attributes"]["tags"] == ["a", "b"] and letter["incident_id"] == incident_id  # built: within the bound
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    event = strict_json(broker.received()[-1].body)
    assert "data" not in event and base64.b64decode(event["data_base64"]).decode() == data


def test_a_member_nested_deeper_than_python_parses_is_kept_as_its_text_not_refused(world, broker):
    # The whole letter was a 400 ("nested too deeply"): the Broker dropped it.
    deadletter, query = world
    nested = "[" * 20_000 + "]" * 20_000
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "deeper", "source": "/s", "type": "t", '
                                         '"custom": ' + nested + ', "data": {"n": 1}}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["attributes"]["custom"] == nested
    assert letter["cleaned"] == ["custom: nested deeper than the parser reads: kept as its JSON text"]
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    assert strict_json(broker.received()[-1].body)["data"] == {"n": 1}


def unclosed_string_letter(size: int, commas: int = 50_001) -> str:
    """Over the bound by its commas, then a string that never closes, full of
    escaped quotes: a regex matching whole strings, retried by finditer at
    each following character, took 12 s at 100 KiB and hours at 2 MiB."""
    head = '{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "data": [' + "," * commas + '"'
    return head + '\\"' * ((size - len(head) - 2) // 2) + "]}"


def test_the_scan_of_a_large_letter_visits_each_character_once():
    from functions.deadletter import shallow

    text = '{"a": [1, {"b": "x]\\"}"}, [[]], "{"], "c": 2}'
    start = text.index("[")
    spans = list(shallow.scan(text, start))
    # Each step starts where the last ended: linear, whatever the letter.
    assert [s for s, _ in spans] == [start] + [e for _, e in spans[:-1]]
    assert text[start:spans[-1][1]] == '[1, {"b": "x]\\"}"}, [[]], "{"]'
    hostile = unclosed_string_letter(2 * 1024 * 1024)
    start, steps = hostile.index("["), []
    with pytest.raises(ValueError, match="Unterminated string"):
        for span in shallow.scan(hostile, start):
            steps.append(span)
    assert steps == [(start, start + 1)]  # the string read once, refused where it began


def test_a_large_letter_with_a_string_that_never_closes_is_refused_at_once_as_a_small_one_is():
    from functions.deadletter.handler import read_document
    from shared.errors import BadRequest

    for body in (unclosed_string_letter(2 * 1024 * 1024), unclosed_string_letter(300, commas=3)):
        with pytest.raises(BadRequest, match="the body is not JSON"):
            read_document(body.encode())


MALFORMED = {
    "mismatched-bracket": "[1, 2}",
    "mismatched-nested": "[{\"a\": 1]]",
    "unclosed-string": '["abc]',
    "closes-nothing": "[1]]",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_data_is_refused_the_same_over_the_bound_as_within_it(data):
    # Over the bound, data kept as its JSON text was never checked: [1,2}
    # counted as balanced and the letter was stored while the small one was a 400.
    from functions.deadletter.handler import read_document
    from shared.errors import BadRequest

    for elements in (1, 50_001):
        body = ('{"specversion": "1.0", "id": "x", "source": "s", "type": "t", "data": ['
                + "0," * elements + data + "]}")
        with pytest.raises(BadRequest, match="the body is not JSON"):
            read_document(body.encode())


def test_a_letter_over_the_bound_links_the_incident_its_data_names(world, clean_db):
    deadletter, query = world
    incident_id = seed(clean_db)
    data = '{"rows": [' + ",".join(["[1]"] * 60_000) + '], "incident_id": "' + incident_id + '"}'
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "large-linked", "source": "/s", "type": '
                                         '"io.incidentresponse.incident.opened", "data": ' + data + '}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["cleaned"] == ["data: over 50000 arrays, objects and elements: kept as its JSON text"]
    assert letter["incident_id"] == incident_id


def test_the_cleaned_notes_are_the_first_twenty_in_the_letters_order_and_a_count_of_the_rest():
    from shared import dead_letters

    cleaned = dead_letters.clean_attributes({"a": [float("nan")] * 30, "b": "x\x00"}, [])
    assert cleaned["_cleaned"] == [f"a[{i}]: the number NaN kept as a string" for i in range(20)] + ["… and 11 more"]


def test_an_attribute_nested_too_deeply_for_readers_is_stored_as_its_json_text_and_the_list_still_reads(world):
    # Stored as it came (~965 deep), it made GET /dead-letters and the board
    # answer 400 "nested too deeply" to everyone, for every page holding it.
    deadletter, query = world
    nested = "[" * 965 + '"x"' + "]" * 965
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "deep", "source": "/s", "type": "t", '
                                         '"custom": ' + nested + ', "shallow": [[1]]}')
    assert answer.status_code == 202, answer.text
    listed = api(query, "GET", "/dead-letters")
    assert listed.status_code == 200, listed.text
    (letter,) = listed.json()
    assert letter["attributes"]["shallow"] == [[1]]
    kept = letter["attributes"]["custom"]
    for _ in range(64):  # counting the attributes, 64 levels kept as they came
        (kept,) = kept
    assert json.loads(kept) == json.loads(nested[64:-64])
    (note,) = letter["cleaned"]
    assert note.startswith("custom[0][0]") and note.endswith(": nested deeper than 64 levels: kept as its JSON text")
    session = requests.Session()
    assert session.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, timeout=10).ok
    assert session.get(query.url + "/ui/backlog", timeout=10).status_code == 200


def test_a_structured_letter_with_ce_headers_too_is_read_as_structured(world, clean_db):
    # The media type decides (HTTP binding 3.1): read as binary because ce-*
    # headers came along, its incident was lost and a 5000-digit integer in
    # its data was a 400.
    deadletter, query = world
    incident_id = seed(clean_db)
    document = ('{"specversion": "1.0", "id": "both", "source": "/s", "type": "io.incidentresponse.incident.opened", '
                '"data": {"incident_id": "' + incident_id + '", "n": ' + "9" * 5000 + '}}')
    answer = requests.post(deadletter.url + "/", data=document.encode(), timeout=10, headers={
        "Content-Type": "application/cloudevents+json; charset=utf-8",
        "ce-specversion": "1.0", "ce-id": "header-id", "ce-source": "/h", "ce-type": "h"})
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert (letter["event_id"], letter["event_type"], letter["incident_id"]) == (
        "both", "io.incidentresponse.incident.opened", incident_id)
    assert letter["cleaned"] == [f"data.n: the number {'9' * 39}… kept as a string"]


def test_a_binary_letter_labelled_structured_is_still_kept_from_its_headers(world):
    # Its body is no event (no id, source, type): read as the media type
    # says it was a 400, and the ce-* headers named the event all along.
    deadletter, query = world
    answer = requests.post(deadletter.url + "/", data=b'{"n": 1}', timeout=10, headers={
        "Content-Type": "application/cloudevents+json",
        "ce-specversion": "1.0", "ce-id": "mislabelled", "ce-source": "/h", "ce-type": "h"})
    assert answer.status_code == 202, answer.text
    assert [d["event_id"] for d in api(query, "GET", "/dead-letters").json()] == ["mislabelled"]


def test_a_batch_of_events_is_refused():
    from flask import Flask

    from functions.deadletter.handler import is_structured
    from shared.errors import BadRequest

    with Flask(__name__).test_request_context("/", method="POST", content_type="application/cloudevents-batch+json"):
        from flask import request

        with pytest.raises(BadRequest, match="batched"):
            is_structured(request, request.headers)


DATA_BASE64 = {
    "5000-digits": b'{"n": ' + b"5" * 5000 + b"}",
    "1e400": b'{"v": 1e400}',
    "octet-stream": bytes(range(256)),
    "json": b'{ "incident_id" : "x",  "v": 1.50 }',
}


@pytest.mark.parametrize("data", DATA_BASE64.values(), ids=DATA_BASE64.keys())
def test_structured_data_base64_is_kept_as_its_bytes_and_redelivered_unchanged(world, broker, data):
    # Decoded as JSON, a 5000-digit integer was a 400 (the letter lost),
    # 1e400 became Infinity, and octet-stream bytes were written out again.
    deadletter, query = world
    encoded = base64.b64encode(data).decode()
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "b64", "source": "/s", "type": "t", '
                                         '"datacontenttype": "application/json", "data_base64": "' + encoded + '"}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["cleaned"] == []
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    event = strict_json(broker.received()[-1].body)
    assert "data" not in event and event["data_base64"] == encoded


NOT_BASE64 = {
    # Unpadded: a 400, the letter lost.
    "unpadded": '"aGk"',
    # Read without validation as "hi": the rest dropped, nothing said.
    "stray-characters": '"aGk=!!"',
    "not-a-string": "5",
}


@pytest.mark.parametrize("sent", NOT_BASE64.values(), ids=NOT_BASE64.keys())
def test_data_base64_that_is_not_base64_is_kept_noted_and_its_redelivery_refused_saying_why(world, broker, sent):
    # It was sent again as it came, or a number as "5": an event the
    # Broker (strict, padded base64) refuses, recorded as a failed redelivery.
    deadletter, query = world
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "not-b64", "source": "/s", "type": "t", '
                                         '"data_base64": ' + sent + '}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["cleaned"] == ["data_base64: not valid base64, kept as the text that came"]
    refused = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")
    assert refused.status_code == 409 and "data_base64 is not valid base64" in refused.json()["message"], refused.text
    assert broker.received() == []
    (still,) = api(query, "GET", "/dead-letters").json()
    assert still["redelivery_status"] is None and still["redelivery_count"] == 0


def test_line_wrapped_data_base64_is_decoded_as_the_broker_reads_it(world, broker):
    # Go's base64 skips line breaks: the Broker takes it; it was kept as text.
    deadletter, query = world
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "wrapped", "source": "/s", "type": "t", '
                                         '"data_base64": "aGVsbG8g\\r\\nd29ybGQ="}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["cleaned"] == []
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    event = strict_json(broker.received()[-1].body)
    assert base64.b64decode(event["data_base64"], validate=True) == b"hello world"


def test_data_dropped_for_data_base64_is_noted(world, broker):
    deadletter, query = world
    answer = post_structured(deadletter, '{"specversion": "1.0", "id": "both-data", "source": "/s", "type": "t", '
                                         '"data": {"a": 1}, "data_base64": "aGk="}')
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["cleaned"] == ["data: dropped, the event had data_base64 too (a CloudEvent carries one of them)"]
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    assert strict_json(broker.received()[-1].body)["data_base64"] == "aGk="


def test_a_media_type_that_only_begins_like_cloudevents_is_binary_mode(world, broker):
    # startswith("application/cloudevents") read application/cloudeventsfoo
    # as structured mode: the event in the body taken for the letter, the
    # ce-* headers that named it ignored.
    deadletter, query = world
    body = b'{"specversion": "1.0", "id": "from-body", "source": "/b", "type": "b", "data": {"n": 1}}'
    answer = requests.post(deadletter.url + "/", data=body, timeout=10, headers={
        "Content-Type": "application/cloudeventsfoo", "ce-specversion": "1.0", "ce-id": "from-headers",
        "ce-source": "/h", "ce-type": "h"})
    assert answer.status_code == 202, answer.text
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert (letter["event_id"], letter["attributes"]["datacontenttype"]) == ("from-headers", "application/cloudeventsfoo")
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    assert base64.b64decode(strict_json(broker.received()[-1].body)["data_base64"]) == body


# The previous release's statement (shared/dead_letters.py before the
# lookup): during a rolling update it runs beside this release's sink.
PREVIOUS_RELEASE_UPSERT = sa.text(
    "INSERT INTO dead_letters (event_id, event_source, event_type, error_destination, error_code, error_data, "
    "attributes, data, incident_id) "
    "VALUES (:id, :src, 't', :dest, :code, NULL, '{}', '', NULL) "
    "ON CONFLICT ON CONSTRAINT uq_dead_letters_event DO UPDATE SET "
    "error_code = EXCLUDED.error_code, error_data = EXCLUDED.error_data, "
    "redelivery_status = CASE WHEN dead_letters.redelivered_at IS NOT NULL THEN 'dead_again' "
    "ELSE dead_letters.redelivery_status END "
    "RETURNING id")


@pytest.mark.parametrize("dest", [None, ESCALATION])
def test_the_previous_release_and_this_one_store_the_same_letter_side_by_side(world, clean_db, dest):
    # A unique index the previous release's ON CONFLICT does not name turned
    # its repeat of a letter without destination into a unique violation: a
    # 500, the Broker retried, then dropped the letter.
    deadletter, query = world
    assert dead_letter(deadletter, "rolling", dest=dest, code="502").status_code == 202
    with clean_db.begin() as conn:
        conn.execute(PREVIOUS_RELEASE_UPSERT, {"id": "rolling", "src": "/incident-response", "dest": dest, "code": "503"})
    assert dead_letter(deadletter, "rolling", dest=dest, code="504").status_code == 202
    letters = api(query, "GET", "/dead-letters").json()
    # Without a destination the previous release adds a second row (NULLs are
    # distinct to its key): nothing is lost, and this release updates the
    # oldest, which comes back to the top of the list.
    assert [d["code"] for d in letters] == (["504", "503"] if dest is None else ["504"])


def test_copies_of_a_letter_without_destination_arriving_together_are_one_row(world):
    deadletter, query = world

    def hand_over(i):
        return dead_letter(deadletter, "together", dest=None, code=str(500 + i % 4)).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(hand_over, range(24))) == {202}
    assert len(api(query, "GET", "/dead-letters").json()) == 1


def test_forged_dead_letters_cannot_flood_an_incident_timeline(world, clean_db):
    deadletter, _ = world
    incident_id = seed(clean_db)
    for n in range(30):
        assert dead_letter(deadletter, f"forged-{n}", subject=incident_id, error=b"<script>" + b"A" * 5000).status_code == 202
    dead_letter(deadletter, "foreign-type", event_type="com.example.whatever", subject=incident_id)
    with clean_db.connect() as conn:
        notes = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "dead_letter"]
        stored = conn.execute(sa.text("SELECT count(*) FROM dead_letters")).scalar()
    assert len(notes) == 20 and stored == 31
    assert all(len(n["details"]["error"]) <= 300 and n["actor"] == "deadletter" for n in notes)


def park(engine, event_id, subject, error="UnicodeEncodeError: 'latin-1' codec can't encode"):
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO event_outbox (id, type, source, subject, extensions, data, attempts, last_error, parked_at) VALUES "
            "(:id, 'io.incidentresponse.incident.opened', '/incident-response', :s, CAST(:ext AS jsonb), CAST(:data AS jsonb), "
            "8, :err, timezone('utc', now()))"
        ), {"id": event_id, "s": subject, "ext": json.dumps({"priority": "p0", "alertname": "Disk"}),
            "data": json.dumps({"incident_id": subject}), "err": error})


def test_a_parked_outbox_event_is_listed_and_re_driven_once(world, broker, clean_db):
    _, query = world
    incident_id = seed(clean_db)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET published_at = timezone('utc', now())"))
    park(clean_db, f"{incident_id}.opened.9", incident_id)
    park(clean_db, "other.opened.0", None)
    listed = api(query, "GET", "/outbox/parked").json()
    assert {e["id"] for e in listed} == {f"{incident_id}.opened.9", "other.opened.0"}
    assert all(e["state"] == "parked" and e["attempts"] == 8 for e in listed)
    assert [e["id"] for e in api(query, "GET", "/outbox/parked", params={"incident_id": incident_id}).json()] == [f"{incident_id}.opened.9"]
    page = api(query, "GET", "/outbox/parked", params={"limit": 1})
    assert len(page.json()) == 1 and 'rel="next"' in page.headers["Link"]

    response = api(query, "POST", f"/outbox/parked/{incident_id}.opened.9/redeliver", headers={"X-Actor": "carol"})
    assert response.status_code == 200 and response.json()["requeued"] is True
    assert response.json()["attempts"] == 0 and response.json()["last_error"].startswith("UnicodeEncodeError")
    wait_until(lambda: [r for r in broker.received() if r.headers.get("ce-id") == f"{incident_id}.opened.9"], 10,
               message="the re-driven event published")
    with clean_db.connect() as conn:
        row = wait_until(lambda: conn.execute(sa.text("SELECT published_at, parked_at FROM event_outbox WHERE id = :i"),
                                              {"i": f"{incident_id}.opened.9"}).one().published_at is not None, 10,
                         message="the row marked published")
        assert row
        (note,) = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "outbox_redriven"]
    assert note["actor"] == "api:carol"
    again = api(query, "POST", f"/outbox/parked/{incident_id}.opened.9/redeliver")
    assert again.status_code == 200 and again.json()["requeued"] is False and again.json()["state"] == "published"
    assert api(query, "GET", "/outbox/parked").json()[0]["id"] == "other.opened.0"
    assert api(query, "POST", "/outbox/parked/nope/redeliver").status_code == 404


def metrics(query):
    response = requests.get(query.url + "/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_the_backlog_dead_letters_and_stuck_incidents(world, broker, clean_db):
    deadletter, query = world
    seed(clean_db, "PendingOne")
    seed(clean_db, "PendingTwo")
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET created_at = created_at - interval '90 seconds'"))
    park(clean_db, "parked.opened.0", None)
    dead_letter(deadletter, "m-1")
    dead_letter(deadletter, "m-2")
    stuck_id = seed(clean_db, "Stuck")
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET published_at = timezone('utc', now()) - interval '1 hour' WHERE subject = :i"),
                     {"i": stuck_id})
        svc.add_timeline(conn, stuck_id, "stuck", {}, "reconcile", dedup_key=f"reconcile-stuck:diagnostics:{stuck_id}:0")
        for n in (1, 2, 3):
            conn.execute(sa.text("INSERT INTO event_outbox (id, type, source, created_at, published_at) VALUES "
                                 "(:id, 't', '/s', timezone('utc', now()) - interval '2 hours', timezone('utc', now()))"),
                         {"id": f"{stuck_id}.opened.0.r{n}"})
    values = metrics(query)
    assert values[("outbox_pending_events", ())] == 2
    assert 90 <= values[("outbox_oldest_pending_age_seconds", ())] < 150
    assert values[("outbox_parked_events", ())] == 1
    assert values[("dead_letters_total", ())] == 2 and values[("dead_letters_not_redriven", ())] == 2
    assert values[("incidents_stuck", (("step", "diagnostics"),))] == 1
    assert values[("incidents_stuck", (("step", "escalation:opened"),))] == 1  # a P0 never paged either
    assert values[("incidents_reconciling", (("step", "diagnostics"),))] == 0

    (letter, _) = api(query, "GET", "/dead-letters").json()
    api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")
    assert metrics(query)[("dead_letters_not_redriven", ())] == 1


def test_the_board_lists_and_redelivers_with_a_csrf_protected_form(world, broker, clean_db):
    deadletter, query = world
    incident_id = seed(clean_db)
    dead_letter(deadletter, "board-1", subject=incident_id, error=b"<b>escaped</b>")
    park(clean_db, "board.parked.0", None)
    session = requests.Session()
    assert session.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, timeout=10).ok
    index = session.get(query.url + "/ui", timeout=10).text
    assert 'href="/ui/backlog"' in index
    page = session.get(query.url + "/ui/backlog", timeout=10)
    assert page.status_code == 200 and "board-1" in page.text and "board.parked.0" in page.text
    assert "<b>escaped</b>" not in page.text and "&lt;b&gt;escaped&lt;/b&gt;" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    (letter,) = api(query, "GET", "/dead-letters").json()

    forged = session.post(query.url + f"/ui/dead-letters/{letter['id']}/redeliver", data={"csrf": "wrong"}, timeout=10)
    assert forged.status_code == 403 and broker.received() == []
    done = session.post(query.url + f"/ui/dead-letters/{letter['id']}/redeliver", data={"csrf": csrf}, timeout=10)
    assert done.status_code == 200 and "sent to the Broker again" in done.text
    assert [r.json()["id"] for r in broker.received()] == ["board-1"]
    assert api(query, "GET", "/dead-letters").json()[0]["redelivered_by"] == "board"
    requeued = session.post(query.url + "/ui/outbox/parked/board.parked.0/redeliver", data={"csrf": csrf}, timeout=10)
    assert "queued for the Broker again" in requeued.text
    anonymous = requests.post(query.url + f"/ui/dead-letters/{letter['id']}/redeliver", data={"csrf": csrf},
                              allow_redirects=False, timeout=10)
    assert anonymous.status_code == 303 and anonymous.headers["Location"] == "/ui/login"


def test_the_board_says_which_letters_were_stored_cleaned(world):
    deadletter, query = world
    post_structured(deadletter, '{"specversion": "1.0", "id": "board-nan", "source": "/s", "type": "t", "custom": NaN}')
    dead_letter(deadletter, "board-plain")
    session = requests.Session()
    assert session.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, timeout=10).ok
    page = session.get(query.url + "/ui/backlog", timeout=10).text
    assert page.count("stored cleaned") == 1 and "custom: the number NaN kept as a string" in page


def test_a_dead_letter_keeps_its_percent_encoded_attributes_decoded_and_redelivers_them_exactly(world, broker, clean_db):
    deadletter, query = world
    assert dead_letter(deadletter, "ev-encoded", **{"ce-alertname": "%D0%94%D0%B8%D1%81%D0%BA%20100%25"}).status_code == 202
    (letter,) = api(query, "GET", "/dead-letters").json()
    assert letter["attributes"]["alertname"] == "Диск 100%"

    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").status_code == 200
    (sent,) = broker.requests
    assert json.loads(sent.body)["alertname"] == "Диск 100%"


def test_a_redelivery_holds_no_transaction_while_the_broker_answers_and_is_sent_once(world, broker, clean_db):
    """Two operators press Redeliver while the Broker is slow: one send, the
    other is told it is under way; no database transaction waits on the Broker."""
    import threading

    deadletter, query = world
    release = threading.Event()
    broker.responder = lambda r: (release.wait(10), (202, {}, b""))[1]
    assert dead_letter(deadletter, "ev-slow").status_code == 202
    (letter,) = api(query, "GET", "/dead-letters").json()
    first = {}
    sender = threading.Thread(target=lambda: first.update(r=api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")))
    sender.start()
    try:
        wait_until(lambda: broker.requests, 10, message="the redelivery to reach the Broker")
        with clean_db.connect() as conn:
            waiting = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%' AND application_name = 'incident-response'")).scalar()
        assert waiting == 0
        second = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")
        assert second.status_code == 409 and "under way" in second.json()["message"]
    finally:
        release.set()
        sender.join(15)
    assert first["r"].status_code == 200 and first["r"].json()["sent"] is True
    assert len(broker.requests) == 1
    (after,) = api(query, "GET", "/dead-letters").json()
    assert after["redelivery_status"] == "sent" and after["redelivery_count"] == 1


def test_a_letter_dead_lettered_again_while_its_redelivery_is_sent_stays_for_a_person_and_is_sent_once(world, broker, clean_db):
    """The Broker takes the redelivered event, its subscriber refuses it for
    good (a 4xx) and the Broker dead-letters it again at once, before the
    redelivery's request has ended. That repeat released the claim (a second
    operator sent it again) and the redelivery then wrote "sent" over it:
    shown delivered, counted done, hidden from the board's default view."""
    import threading

    deadletter, query = world
    assert dead_letter(deadletter, "ev-refused-again", code="502").status_code == 202
    (letter,) = api(query, "GET", "/dead-letters").json()
    repeated, release = threading.Event(), threading.Event()

    def broker_then_subscriber(request):
        if not repeated.is_set():  # the first send only: the subscriber refuses it, dead-lettered again
            assert dead_letter(deadletter, "ev-refused-again", code="400", error=b"unknown field").status_code == 202
            repeated.set()
            release.wait(10)
        return 202, {}, b""

    broker.responder = broker_then_subscriber
    alice = {}
    sender = threading.Thread(target=lambda: alice.update(r=api(
        query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "alice"})))
    sender.start()
    try:
        assert repeated.wait(10), "the redelivery never reached the Broker"
        bob = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "bob"})
        assert bob.status_code == 409 and "under way" in bob.json()["message"], bob.text
    finally:
        release.set()
        sender.join(15)
    assert alice["r"].status_code == 200 and alice["r"].json()["sent"] is True
    assert alice["r"].json()["redelivery_status"] == "dead_again"
    assert len(broker.received()) == 1
    (after,) = api(query, "GET", "/dead-letters", params={"redelivered": "no"}).json()
    assert (after["redelivery_status"], after["code"], after["error"], after["redelivery_count"]) == (
        "dead_again", "400", "unknown field", 1)
    assert metrics(query)[("dead_letters_not_redriven", ())] == 1


def test_a_letter_dead_lettered_again_comes_back_to_the_top_and_gets_the_incident_it_names(world, clean_db):
    deadletter, query = world
    incident_id = seed(clean_db)
    dead_letter(deadletter, "ev-older", data={"x": 1})
    dead_letter(deadletter, "ev-newer", data={"x": 2})
    assert [d["event_id"] for d in api(query, "GET", "/dead-letters").json()] == ["ev-newer", "ev-older"]
    # The first copy named no incident (it did not exist yet, or was not named).
    dead_letter(deadletter, "ev-older", data={"incident_id": incident_id}, code="503")
    listed = api(query, "GET", "/dead-letters").json()
    assert [(d["event_id"], d["code"], d["incident_id"]) for d in listed] == [
        ("ev-older", "503", incident_id), ("ev-newer", "502", None)]
    assert listed[0]["received_at"] > listed[1]["received_at"]
    # A later copy naming another incident does not move the link.
    dead_letter(deadletter, "ev-older", data={"incident_id": seed(clean_db, "Other")})
    assert api(query, "GET", "/dead-letters").json()[0]["incident_id"] == incident_id


def test_a_repeat_of_a_letter_recorded_twice_goes_to_the_copy_that_was_redelivered(world, broker, clean_db):
    # It updated the oldest copy: the redelivered one kept showing "sent".
    deadletter, query = world
    dead_letter(deadletter, "twice", dest=None)
    with clean_db.begin() as conn:  # a previous release's repeat without destination: a second row
        conn.execute(PREVIOUS_RELEASE_UPSERT, {"id": "twice", "src": "/incident-response", "dest": None, "code": "503"})
    newer, older = api(query, "GET", "/dead-letters").json()
    assert api(query, "POST", f"/dead-letters/{newer['id']}/redeliver").json()["redelivery_status"] == "sent"
    dead_letter(deadletter, "twice", dest=None, code="400")
    assert [(d["id"], d["code"], d["redelivery_status"]) for d in api(query, "GET", "/dead-letters").json()] == [
        (newer["id"], "400", "dead_again"), (older["id"], "502", None)]


def test_a_repeat_of_a_letter_a_previous_release_stored_with_an_empty_destination_finds_it(world, clean_db):
    # That release stored '' where this one stores NULL: the lookup missed
    # the old row, and the repeat became a second letter.
    deadletter, query = world
    with clean_db.begin() as conn:
        conn.execute(PREVIOUS_RELEASE_UPSERT, {"id": "empty-dest", "src": "/incident-response", "dest": "", "code": "502"})
    assert dead_letter(deadletter, "empty-dest", dest="", code="503").status_code == 202
    assert [(d["event_id"], d["code"]) for d in api(query, "GET", "/dead-letters").json()] == [("empty-dest", "503")]


def test_the_repeat_lookup_uses_the_letters_unique_key(clean_db):
    with clean_db.begin() as conn:
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(conn.execute(sa.text(
            "EXPLAIN SELECT id FROM dead_letters WHERE event_source = 's' AND event_id = 'e' "
            "AND COALESCE(error_destination, '') = COALESCE(NULL, '') ORDER BY redelivered_at DESC NULLS LAST, id LIMIT 1"
        )).scalars())
    assert "uq_dead_letters_event" in plan and "Index Cond: (((event_source)::text = 's'::text) AND ((event_id)::text = 'e'::text))" in plan, plan


@pytest.mark.parametrize("start", [STATUS_LINE.replace(b"200 OK", b"503 Service Unavailable"),
                                   HEADERS_THEN_BODY.replace(b"200 OK", b"503 Service Unavailable")], ids=["headers", "body"])
def test_a_broker_that_trickles_its_answer_to_a_redelivery_is_cut_at_the_timeout(start):
    # requests' timeout bounds each read: a byte every 0.2 s would keep the
    # redelivery (and the engineer's request) open past its claim.
    from shared import backlog, deadline

    with Trickler(start) as broker:
        ended, error, took = run_bounded(lambda: backlog.send(deadline.bounded(requests.Session()), broker.url, b"{}", 0.5), 6)
    assert ended, "the redelivery outlived its timeout"
    assert took < 2.5 and error == "ReadTimeout: no whole answer within 0.5s", error


@pytest.mark.parametrize("start", [STATUS_LINE, HEADERS_THEN_BODY], ids=["headers", "body"])
def test_a_2xx_still_coming_at_the_timeout_is_a_redelivery(start):
    # The Broker said 2xx: it has the event; "failed" would have the
    # engineer send it again.
    from shared import backlog, deadline

    with Trickler(start) as broker:
        ended, error, took = run_bounded(lambda: backlog.send(deadline.bounded(requests.Session()), broker.url, b"{}", 0.5), 6)
        sent = broker.requests
    assert ended and took < 2.5
    assert error is None and sent == 1


@pytest.mark.parametrize("sink", ["http://" + "b" * 64 + ".example/default/incidents", "broker.example/default/incidents"],
                         ids=["label-over-63", "no-scheme"])
def test_a_k_sink_no_request_can_be_made_to_is_a_failed_redelivery_that_says_so(sink):
    # urllib3's LocationParseError is no requests error: it crashed the
    # redelivery (a 500, the letter's claim held until it went stale).
    from shared import backlog, deadline

    error = backlog.send(deadline.bounded(requests.Session()), sink, b"{}", 0.5)
    assert error is not None and error.endswith(": K_SINK is not a URL an event can be sent to"), error


@pytest.mark.parametrize("answer, said", [
    # requests decodes a Location it does not follow: the UnicodeDecodeError
    # was taken for the URL's ("K_SINK is not a URL").
    (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /\xff\xfe\r\nContent-Length: 0\r\n\r\n", "the Broker answered 307: "),
    # It answered: not "the Broker could not be reached".
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",
     "ContentDecodingError: the Broker answered 503 and its answer could not be read"),
    (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=idna\r\nContent-Length: 5\r\n\r\nbusy\xff",
     "the Broker answered 503: busy\ufffd"),
], ids=["redirect-not-utf8", "refusal-undecodable", "refusal-idna"])
def test_a_redelivery_says_what_the_broker_answered_whatever_broke_in_its_answer(answer, said):
    from shared import backlog, deadline

    with OneAnswer(answer) as broker:
        error = backlog.send(deadline.bounded(requests.Session()), broker.url + "/default/incidents", b"{}", 2.0)
        assert broker.requests == 1
    assert error == said, error


# --------------------------------------------------------------------------- a redelivery's claim
# The query's PUBLISH_TIMEOUT_SECONDS is the default 5: two tries and 10 s.
STALE_AFTER = 20


def claim_and_die(engine, letter_id, actor="api:alice"):
    """What a redelivery writes before it sends, and nothing after: the
    query process killed between its claim and its outcome. The claim's
    moment, which its sender would have kept."""
    from shared import dead_letters

    with engine.begin() as conn:
        claimed_at = dead_letters.claim_redelivery(conn, letter_id, actor, STALE_AFTER)
    assert claimed_at is not None
    return claimed_at


def time_passes(engine, ids, interval="1 minute"):
    """As if ``interval`` had passed since these letters were stored and
    claimed: their moments move back that far."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE dead_letters SET received_at = received_at - interval '{interval}', "
                             f"redelivered_at = redelivered_at - interval '{interval}' WHERE id = ANY(:ids)"), {"ids": list(ids)})
        return conn.execute(sa.text("SELECT redelivered_at FROM dead_letters WHERE id = ANY(:ids) ORDER BY id"),
                            {"ids": list(ids)}).scalars().all()


def board_page(query, path="/ui/backlog"):
    session = requests.Session()
    assert session.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, timeout=10).ok
    return session.get(query.url + path, timeout=10).text


def test_a_claim_whose_sender_was_killed_shows_so_and_the_next_redelivery_releases_and_takes_it_over(world, broker, clean_db):
    """The query process was killed between the claim and the outcome: the
    letter showed "sending" as if it were being sent, on the API and the
    board (which showed nothing at all for a first redelivery)."""
    deadletter, query = world
    incident_id = seed(clean_db)
    dead_letter(deadletter, "ev-killed", subject=incident_id)
    (letter,) = api(query, "GET", "/dead-letters").json()
    claim_and_die(clean_db, letter["id"])

    (sending,) = api(query, "GET", "/dead-letters").json()
    claim = sending["redelivery_claim"]
    assert sending["redelivery_status"] == "sending" and claim["claimed_by"] == "api:alice"
    assert (claim["stale"], claim["stale_after_seconds"]) == (False, STALE_AFTER) and 0 <= claim["age_seconds"] < STALE_AFTER
    assert 'id="claim-{}">being sent now'.format(letter["id"]) in board_page(query)
    refused = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "bob"})
    assert refused.status_code == 409 and "under way" in refused.json()["message"]

    time_passes(clean_db, [letter["id"]])  # and no outcome ever comes
    (gone,) = api(query, "GET", "/dead-letters", params={"redelivered": "no"}).json()
    assert gone["redelivery_status"] == "sending" and gone["redelivery_claim"]["stale"] is True
    assert gone["redelivery_claim"]["age_seconds"] >= 60
    page = board_page(query)
    assert 'id="claim-{}">sender gone'.format(letter["id"]) in page and "claimed by api:alice" in page

    taken = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "bob"})
    assert taken.status_code == 200, taken.text
    body = taken.json()
    assert (body["sent"], body["redelivery_status"], body["redelivered_by"], body["redelivery_claim"]) == (
        True, "sent", "api:bob", None)
    assert body["redelivery_count"] == 2  # alice's attempt, whatever became of it, and bob's
    assert [r.json()["id"] for r in broker.received()] == ["ev-killed"]
    with clean_db.connect() as conn:
        told = [(t["actor"], t["details"]["outcome"], t["details"]["error"]) for t in svc.get_timeline(conn, incident_id)
                if t["kind"] == "dead_letter_redelivered"]
    assert told[0][:2] == ("api:alice", "failed") and "its sender is gone" in told[0][2]
    assert told[1] == ("api:bob", "sent", None)


def test_the_sweep_releases_claims_whose_senders_are_gone_and_only_those(world, broker, clean_db, base_env):
    deadletter, query = world
    incident_id = seed(clean_db)
    for event_id in ("ev-gone", "ev-gone-came-back", "ev-alive"):
        dead_letter(deadletter, event_id, subject=incident_id)
    ids = {d["event_id"]: d["id"] for d in api(query, "GET", "/dead-letters").json()}
    claim_and_die(clean_db, ids["ev-gone"])
    claim_and_die(clean_db, ids["ev-gone-came-back"])
    gone_claim, _ = time_passes(clean_db, [ids["ev-gone"], ids["ev-gone-came-back"]])
    alive = claim_and_die(clean_db, ids["ev-alive"], actor="api:carol")
    # The subscriber refused the event the gone sender had sent: it came back.
    dead_letter(deadletter, "ev-gone-came-back", subject=incident_id, code="400", error=b"unknown field")

    intake = FunctionProcess("intake", {**base_env, "K_SINK": broker.url + "/default/incidents"}).start()
    assert requests.post(intake.url + "/outbox/sweep", headers=AUTH, timeout=30).status_code == 200

    letters = {d["event_id"]: d for d in api(query, "GET", "/dead-letters").json()}
    gone, back, sending = letters["ev-gone"], letters["ev-gone-came-back"], letters["ev-alive"]
    assert (gone["redelivery_status"], gone["redelivery_count"]) == ("failed", 1) and gone["redelivery_claim"] is None
    assert "its sender is gone" in gone["redelivery_error"] and "whether the Broker got the event is not known" in gone["redelivery_error"]
    assert (back["redelivery_status"], back["code"]) == ("dead_again", "400") and back["redelivery_claim"] is None
    assert sending["redelivery_status"] == "sending" and sending["redelivery_claim"]["stale"] is False
    with clean_db.connect() as conn:
        assert sum(t["kind"] == "dead_letter_redelivered" for t in svc.get_timeline(conn, incident_id)) == 2
    # The sender that was alive records its outcome under its claim; one
    # thought gone that was only slow replaces the guess, counted once.
    from shared import dead_letters

    with clean_db.begin() as conn:
        assert dead_letters.mark_redelivered(conn, ids["ev-alive"], "api:carol", None, alive)["redelivery_status"] == "sent"
        late = dead_letters.mark_redelivered(conn, ids["ev-gone"], "api:alice", None, gone_claim)
    assert (late["redelivery_status"], late["redelivery_count"], late["redelivery_error"]) == ("sent", 1, None)


def test_a_redelivery_that_crashes_after_its_claim_records_a_failure_instead_of_sending(world, broker, clean_db, monkeypatch):
    """A SOCKS proxy in HTTP_PROXY: the bound refuses its connection with a
    TypeError, no requests error, which escaped the redelivery after its
    claim (a 500 and a letter "sending" until the claim went stale)."""
    from shared import backlog

    deadletter, query = world
    incident_id = seed(clean_db)
    dead_letter(deadletter, "ev-crash", subject=incident_id)
    (letter,) = api(query, "GET", "/dead-letters").json()
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:9")
    with pytest.raises(TypeError):
        backlog.redeliver(clean_db, broker.url + "/default/incidents", letter["id"], "api:alice", timeout=2.0)
    monkeypatch.delenv("HTTP_PROXY")

    (after,) = api(query, "GET", "/dead-letters").json()
    assert (after["redelivery_status"], after["redelivery_count"]) == ("failed", 1) and after["redelivery_claim"] is None
    assert after["redelivery_error"].startswith("TypeError: the redelivery failed before the Broker's answer was read")
    assert broker.received() == []
    assert api(query, "POST", f"/dead-letters/{letter['id']}/redeliver").json()["redelivery_status"] == "sent"


def test_a_redelivery_whose_recording_the_database_fails_still_records_its_outcome(world, broker, clean_db):
    """The outcome and the timeline entry are one transaction: the database
    failing it (here a trigger refusing the entry) left the letter
    "sending", its event sent, until the claim went stale."""
    deadletter, query = world
    incident_id = seed(clean_db)
    dead_letter(deadletter, "ev-unrecorded", subject=incident_id)
    (letter,) = api(query, "GET", "/dead-letters").json()
    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "CREATE FUNCTION refuse_redelivered() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.kind = 'dead_letter_redelivered' THEN RAISE EXCEPTION 'disk full' USING ERRCODE = '53100'; END IF; "
            "RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER refuse_redelivered BEFORE INSERT ON incident_timeline "
                             "FOR EACH ROW EXECUTE FUNCTION refuse_redelivered()"))
    try:
        response = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver")
    finally:
        with clean_db.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER refuse_redelivered ON incident_timeline"))
            conn.execute(sa.text("DROP FUNCTION refuse_redelivered()"))
    assert response.status_code == 200, response.text
    assert (response.json()["redelivery_status"], response.json()["redelivery_count"]) == ("sent", 1)
    assert [r.json()["id"] for r in broker.received()] == ["ev-unrecorded"]
    (after,) = api(query, "GET", "/dead-letters").json()
    assert (after["redelivery_status"], after["redelivery_claim"]) == ("sent", None)


def test_a_redelivery_that_outlived_its_claim_does_not_end_the_one_that_took_it_over(world, broker, clean_db):
    """Alice's redelivery held its claim past stale (it was slow to record);
    Bob took it over and is sending. Alice's outcome, written when she
    finally got to it, ended Bob's claim: the letter showed "sent" while
    Bob's send was under way, and Carol could send it alongside him."""
    import threading

    from shared import dead_letters

    deadletter, query = world
    dead_letter(deadletter, "ev-overtaken")
    (letter,) = api(query, "GET", "/dead-letters").json()
    claim_and_die(clean_db, letter["id"])
    (alice,) = time_passes(clean_db, [letter["id"]])  # her claim's moment, a minute ago
    release = threading.Event()
    broker.responder = lambda r: (release.wait(10), (202, {}, b""))[1]
    bob = {}
    sender = threading.Thread(target=lambda: bob.update(r=api(
        query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "bob"})))
    sender.start()
    try:
        wait_until(lambda: broker.requests, 10, message="Bob's redelivery to reach the Broker")
        with clean_db.begin() as conn:  # Alice's send ends: the Broker took it
            assert dead_letters.mark_redelivered(conn, letter["id"], "api:alice", None, alice) is None
        carol = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver?force=true", headers={"X-Actor": "carol"})
        assert carol.status_code == 409 and "under way" in carol.json()["message"], carol.text
    finally:
        release.set()
        sender.join(15)
    assert bob["r"].status_code == 200 and bob["r"].json()["redelivered_by"] == "api:bob"
    assert len(broker.requests) == 1
    (after,) = api(query, "GET", "/dead-letters").json()
    # Alice's attempt is counted once (released when Bob took over), Bob's once.
    assert (after["redelivery_status"], after["redelivery_count"], after["redelivered_by"]) == ("sent", 2, "api:bob")


def refuse_recording_outcomes(engine, actor="api:alice"):
    """The database refuses ``actor``'s outcome (disk full, SQLSTATE 53100):
    a trigger on the letter's update out of ``sending``. Dropped by the
    returned function."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF OLD.redelivery_status = 'sending' AND NEW.redelivery_status <> 'sending' "
            f"AND NEW.redelivered_by = '{actor}' THEN RAISE EXCEPTION 'disk full' USING ERRCODE = '53100'; END IF; "
            "RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER refuse_outcome BEFORE UPDATE ON dead_letters "
                             "FOR EACH ROW EXECUTE FUNCTION refuse_outcome()"))

    def drop():
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER refuse_outcome ON dead_letters"))
            conn.execute(sa.text("DROP FUNCTION refuse_outcome()"))
    return drop


def test_a_redelivery_the_broker_accepted_but_the_database_would_not_record_is_a_500_that_says_so(world, broker, clean_db):
    """Both recordings failed after the Broker took the event: the answer
    was a 503 with Retry-After (a retry sends it again once the claim is
    stale, and the sweep's release then says "whether the Broker got the
    event is not known"), and no log line said the Broker had it."""
    deadletter, query = world
    dead_letter(deadletter, "ev-accepted-unrecorded")
    (letter,) = api(query, "GET", "/dead-letters").json()
    drop = refuse_recording_outcomes(clean_db)
    try:
        response = api(query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "alice"})
    finally:
        drop()
    assert response.status_code == 500 and "Retry-After" not in response.headers, response.text
    body = response.json()
    assert (body["error"], body["dead_letter_id"], body["broker_accepted"], body["broker_error"]) == (
        "not_recorded", letter["id"], True, None)
    assert body["message"].startswith(f"the Broker accepted dead letter {letter['id']} and recording that failed")
    assert [r.json()["id"] for r in broker.received()] == ["ev-accepted-unrecorded"]
    said = [json.loads(line) for line in query.logs().splitlines()
            if f"The Broker accepted dead letter {letter['id']} and recording that failed" in line]
    assert said and said[0]["level"] == "ERROR" and said[0]["broker_accepted"] is True, said
    assert "disk full" in said[0]["exception"]
    (after,) = api(query, "GET", "/dead-letters").json()
    assert after["redelivery_status"] == "sending" and after["redelivery_claim"]["claimed_by"] == "api:alice"


def test_a_bug_while_recording_a_redelivery_and_the_failure_after_it_are_both_logged_with_their_tracebacks(
        world, broker, clean_db, monkeypatch, caplog):
    """Telling the incident raised (a bug, no database error): the warning
    named only the exception's type, and when recording the outcome alone
    failed too, that failure was not logged at all."""
    import logging

    from shared import backlog
    from shared.errors import NotRecorded

    def broken_tell(*args, **kwargs):
        raise KeyError("a bug in telling the incident")

    deadletter, query = world
    dead_letter(deadletter, "ev-bug")
    dead_letter(deadletter, "ev-bug-unrecorded")
    ids = {d["event_id"]: d["id"] for d in api(query, "GET", "/dead-letters").json()}
    sink = broker.url + "/default/incidents"
    monkeypatch.setattr(backlog, "_tell", broken_tell)
    caplog.set_level(logging.WARNING)

    record, sent, error = backlog.redeliver(clean_db, sink, ids["ev-bug"], "api:alice", timeout=2.0)
    assert (record["redelivery_status"], sent, error) == ("sent", True, None)  # the outcome alone
    (first,) = [r for r in caplog.records if r.message.startswith("Recording a dead letter's redelivery failed")]
    assert first.exc_info and isinstance(first.exc_info[1], KeyError)

    caplog.clear()
    monkeypatch.undo()  # now the database refuses both recordings
    drop = refuse_recording_outcomes(clean_db)
    try:
        with pytest.raises(NotRecorded) as raised:
            backlog.redeliver(clean_db, sink, ids["ev-bug-unrecorded"], "api:alice", timeout=2.0)
    finally:
        drop()
    assert raised.value.details["broker_accepted"] is True
    first, second = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert first.exc_info and isinstance(first.exc_info[1], sa.exc.DBAPIError)
    assert second.levelno == logging.ERROR and second.exc_info and isinstance(second.exc_info[1], sa.exc.DBAPIError)
    assert "53100" in str(second.exc_info[1]) or "disk full" in str(second.exc_info[1])
    assert second.message.startswith(f"The Broker accepted dead letter {ids['ev-bug-unrecorded']}")


def test_a_sender_the_sweep_thought_gone_says_its_outcome_replaces_the_release(world, broker, clean_db):
    """The sweep released a claim whose sender was only slow (an intake
    with a shorter PUBLISH_TIMEOUT_SECONDS, a send at the edge): the
    timeline showed "failed, sender gone" then "sent", unlinked, as if
    there had been two redeliveries."""
    import threading

    from shared import backlog, dead_letters

    deadletter, query = world
    incident_id = seed(clean_db)
    dead_letter(deadletter, "ev-slow", subject=incident_id)
    (letter,) = api(query, "GET", "/dead-letters").json()
    release = threading.Event()
    broker.responder = lambda r: (release.wait(10), (202, {}, b""))[1]
    alice = {}
    sender = threading.Thread(target=lambda: alice.update(r=api(
        query, "POST", f"/dead-letters/{letter['id']}/redeliver", headers={"X-Actor": "alice"})))
    sender.start()
    try:
        wait_until(lambda: broker.requests, 10, message="Alice's redelivery to reach the Broker")
        with clean_db.begin() as conn:  # a sweep that judges every claim stale
            backlog.told_released(conn, dead_letters.release_stale(conn, 0.0))
    finally:
        release.set()
        sender.join(15)
    assert alice["r"].status_code == 200, alice["r"].text
    assert (alice["r"].json()["redelivery_status"], alice["r"].json()["redelivery_count"]) == ("sent", 1)
    with clean_db.connect() as conn:
        released, outcome = [t["details"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "dead_letter_redelivered"]
    assert released["outcome"] == "failed" and "its sender is gone" in released["error"] and "replaces" not in released
    assert outcome["outcome"] == "sent" and outcome["claimed_at"] == released["claimed_at"]
    assert outcome["replaces"].startswith("replaces the earlier entry of this claim")


def test_recording_says_whether_the_claim_was_still_held(world, clean_db):
    from shared import dead_letters

    deadletter, _ = world
    dead_letter(deadletter, "ev-held")
    dead_letter(deadletter, "ev-released")
    with clean_db.connect() as conn:
        ids = dict(conn.execute(sa.text("SELECT event_id, id FROM dead_letters")).all())
    held = claim_and_die(clean_db, ids["ev-held"])
    claim_and_die(clean_db, ids["ev-released"])
    (released,) = time_passes(clean_db, [ids["ev-released"]])
    with clean_db.begin() as conn:
        assert [r["id"] for r in dead_letters.release_stale(conn, STALE_AFTER)] == [ids["ev-released"]]
        assert dead_letters.mark_redelivered(conn, ids["ev-held"], "api:alice", None, held)["was_sending"] is True
        late = dead_letters.mark_redelivered(conn, ids["ev-released"], "api:alice", None, released)
    assert (late["was_sending"], late["redelivery_status"], late["redelivery_count"]) == (False, "sent", 1)


def test_the_sweeps_release_of_stale_claims_reads_only_the_letters_being_sent(clean_db):
    """Migration 0027: without its partial index the release, every
    minute, read the whole table (dead letters are never deleted) for the
    few letters a redelivery holds."""
    from shared import dead_letters

    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO dead_letters (event_id, event_source, event_type, redelivery_status, redelivered_at, "
            "redelivery_count) SELECT 'ev-' || g, 's', 't', 'sent', timezone('utc', now()) - interval '1 hour', 1 "
            "FROM generate_series(1, 5000) g"))
        conn.execute(sa.text(
            "INSERT INTO dead_letters (event_id, event_source, event_type, redelivery_status, redelivered_at) "
            "VALUES ('claimed', 's', 't', 'sending', timezone('utc', now()) - interval '1 minute')"))
    with clean_db.connect() as conn:
        conn.execute(sa.text("ANALYZE dead_letters"))
        conn.commit()
    with clean_db.connect() as conn, conn.begin() as transaction:
        conn.exec_driver_sql("LOAD 'auto_explain'")
        for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_level = notice", "client_min_messages = notice"):
            conn.exec_driver_sql(f"SET LOCAL {setting}")
        notices = conn.connection.dbapi_connection.notices
        notices.clear()
        assert [r["event_type"] for r in dead_letters.release_stale(conn, STALE_AFTER)] == ["t"]
        conn.exec_driver_sql("SELECT 1")  # a plan reaches the client with the next exchange
        plan = "\n".join(n.get(b"M", b"").decode() for n in notices)
        transaction.rollback()
    assert "idx_dead_letters_sending" in plan and "Seq Scan on dead_letters" not in plan, plan
