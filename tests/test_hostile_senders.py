"""What other senders and hostile ones post to every function, over real
HTTP: a CloudEvent the SDK cannot read, JSON no parser limit was set for,
numbers out of every range. Each is a 4xx naming the problem (the Broker
drops a 400 for good instead of retrying it into the dead-letter sink), never
a 500 with a traceback."""

from __future__ import annotations

import json
import random
import socket
import string
import uuid
from urllib.parse import urlsplit

import pytest
import requests

from loopback.processes import functions_running
from shared import events
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
JSON = {"Content-Type": "application/json"}
STRUCTURED = {"Content-Type": "application/cloudevents+json"}
# The event type each function's Trigger delivers to it.
EVENT_TYPES = {
    "intake": events.INCIDENT_REPORT,
    "diagnostics": events.INCIDENT_OPENED,
    "remediation": events.INCIDENT_DIAGNOSED,
    "escalation": events.INCIDENT_OPENED,
}
HUGE_INTEGER = "9" * 5000  # json.loads refuses more than 4300 digits with a bare ValueError


@pytest.fixture(scope="module")
def functions(base_env, broker):
    env = {**base_env, "K_SINK": broker.url + "/default/default", "REMEDIATION_MODE": "off"}
    with functions_running((*EVENT_TYPES, "query", "deadletter"), env) as started:
        yield started


@pytest.fixture
def incident_id(clean_db):
    with clean_db.begin() as conn:
        return svc.record_alerts(conn, [alert("HostileSender", priority="P0")], "/t", "t").outcomes[0].incident_id


def assert_4xx(response, *words):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    message = response.json()["message"]
    for word in words:
        assert word in message, message


def good_data(name: str, incident_id: str) -> dict:
    return {"alert_name": "HostileSender", "priority": "P1"} if name == "intake" else {"incident_id": incident_id}


def structured_event(name: str, incident_id: str, **attributes) -> dict:
    return {"specversion": "1.0", "type": EVENT_TYPES[name], "source": "/hostile", "id": str(uuid.uuid4()),
            "datacontenttype": "application/json", "data": good_data(name, incident_id), **attributes}


# --------------------------------------------------------------------------- CloudEvents the SDK lets through

@pytest.mark.parametrize("name", list(EVENT_TYPES))
@pytest.mark.parametrize(
    "case, words",
    [
        ("null id", ("id",)),
        ("not UTF-8", ()),
        ("huge integer", ("digits",)),
    ],
)
def test_a_structured_event_the_sdk_cannot_read_is_400(functions, incident_id, name, case, words):
    event = structured_event(name, incident_id)
    if case == "null id":
        body = json.dumps({**event, "id": None}).encode()
    elif case == "not UTF-8":
        body = b"\xff\xfe{"
    else:
        body = json.dumps(event)[:-1].encode() + b', "x": ' + HUGE_INTEGER.encode() + b"}"
    response = requests.post(functions[name].url + "/", data=body, headers={**AUTH, **STRUCTURED}, timeout=30)
    assert_4xx(response, "CloudEvent", *words)
    assert "Traceback" not in functions[name].logs()


@pytest.mark.parametrize("name", list(EVENT_TYPES))
@pytest.mark.parametrize("attribute", ["id", "source"])
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_an_empty_required_attribute_is_400(functions, incident_id, name, attribute, mode):
    """CloudEvents 1.0: id and source are non-empty strings (an event with
    an empty id cannot be told from another of the same source); the SDK
    takes both empty."""
    event = structured_event(name, incident_id, **{attribute: ""})
    if mode == "structured":
        response = requests.post(functions[name].url + "/", data=json.dumps(event), headers={**AUTH, **STRUCTURED}, timeout=30)
    else:
        headers = {f"ce-{k}": v for k, v in event.items() if k not in ("data", "datacontenttype")}
        response = requests.post(functions[name].url + "/", data=json.dumps(event["data"]), headers={**AUTH, **JSON, **headers},
                                 timeout=30)
    assert_4xx(response, attribute, "empty")


def test_an_infinite_root_generation_is_400(functions, incident_id):
    # Python's json reads 1e400 as float('inf'), which int() refuses with OverflowError.
    body = '{"incident_id": "%s", "root_generation": 1e400}' % incident_id
    headers = {"ce-specversion": "1.0", "ce-type": events.INCIDENT_OPENED, "ce-source": "/hostile", "ce-id": "inf", **JSON}
    response = requests.post(functions["escalation"].url + "/", data=body, headers=headers, timeout=30)
    assert_4xx(response, "root_generation")


# --------------------------------------------------------------------------- JSON bodies

def test_a_webhook_with_an_over_long_integer_is_400_naming_it(functions, clean_db):
    payload = json.dumps(webhook([raw_alert("HugeNumber")]))
    body = payload.replace('"alerts": [', '"padding": ' + HUGE_INTEGER + ', "alerts": [', 1).encode()
    assert b"padding" in body
    response = requests.post(functions["intake"].url + "/webhook/alert", data=body, headers={**AUTH, **JSON}, timeout=30)
    assert_4xx(response, "JSON", "digits")


def test_a_patch_with_an_over_long_integer_is_400_naming_it(functions, incident_id):
    body = b'{"status": "investigating", "note": ' + HUGE_INTEGER.encode() + b"}"
    response = requests.patch(functions["query"].url + f"/incidents/{incident_id}", data=body, headers={**AUTH, **JSON}, timeout=30)
    assert_4xx(response, "JSON", "digits")


# --------------------------------------------------------------------------- times from other senders

@pytest.mark.parametrize("field, value", [("endsAt", "0000-12-31T19:03:58-04:56"), ("startsAt", "0000-12-31T19:00:00-05:00")])
def test_go_zero_time_written_west_of_utc_means_not_set(functions, clean_db, field, value):
    """A relay that re-marshals AlertManager's zero endsAt in its local zone
    writes year 0, which Python cannot hold: the firing alert was rejected
    (400, never retried), not stored."""
    response = requests.post(functions["intake"].url + "/webhook/alert", headers={**AUTH, **JSON}, timeout=30,
                             data=json.dumps(webhook([{**raw_alert("ZeroTimeWest"), field: value}])))
    assert response.status_code == 200 and response.json()["counts"] == {"created": 1}, response.text
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, response.json()["results"][0]["incident_id"])
    assert row["status"] == "open"


# --------------------------------------------------------------------------- labels no Kubernetes object has

def incompressible(length: int) -> str:
    # PostgreSQL compresses a long index entry: a run of one letter fits.
    rng = random.Random(length)
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(length))


@pytest.mark.parametrize("name, labels", [
    ("KubeNodeNotReady", {"node": incompressible(5000)}),
    ("NodeFilesystemAlmostOutOfSpace", {"instance": incompressible(5000) + ":9100"}),
    ("KubeDeploymentReplicasMismatch", {"namespace": "production", "deployment": incompressible(5000)}),
    ("KubePodCrashLooping", {"namespace": "production", "pod": "api-1", "node": incompressible(5000)}),
])
def test_a_correlation_label_longer_than_any_kubernetes_name_is_stored_not_retried_forever(functions, clean_db, name, labels):
    """The shipped correlation rules make a key of the node or workload
    label; one over the GIN index's 2712 bytes failed the transaction
    (500), and AlertManager retried the alert forever without it ever
    opening an incident."""
    response = requests.post(functions["intake"].url + "/webhook/alert", headers={**AUTH, **JSON}, timeout=30,
                             data=json.dumps(webhook([raw_alert(name, **labels)])))
    assert response.status_code == 200 and response.json()["counts"] == {"created": 1}, response.text[:300]
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, response.json()["results"][0]["incident_id"])
    assert row["alert_name"] == name and row["labels"] == {"alertname": name, "severity": "critical", **labels}


# --------------------------------------------------------------------------- malformed HTTP framing

def raw_status(url: str, request: bytes) -> tuple[int | None, bytes]:
    """Send bytes as they are (no client library frames a body this badly),
    then half-close: the status code and the body of the answer (``None``
    when the server closed without one)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer:
        return None, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


BAD_CHUNKS = {
    "chunk size not hex": b"ZZ\r\nabc\r\n0\r\n\r\n",
    "stream ends before the last chunk": b"5\r\nabcde\r\n",
    "chunk without its terminator": b"3\r\nabcXY0\r\n\r\n",
}


@pytest.mark.parametrize("name, path", [("intake", "/webhook/alert"), ("intake", "/webhook/grafana"), ("query", "/incidents/{id}"),
                                        ("escalation", "/"), ("deadletter", "/")])
@pytest.mark.parametrize("chunks", list(BAD_CHUNKS), ids=list(BAD_CHUNKS))
def test_a_malformed_chunked_body_is_400_not_500(functions, incident_id, name, path, chunks):
    method = "PATCH" if name == "query" else "POST"
    head = (f"{method} {path.format(id=incident_id)} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TEST_TOKEN}\r\n"
            "Content-Type: application/json\r\nce-specversion: 1.0\r\nce-id: chunked\r\nce-source: /hostile\r\n"
            f"ce-type: {events.INCIDENT_OPENED}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    status, body = raw_status(functions[name].url, head + BAD_CHUNKS[chunks])
    if chunks == "stream ends before the last chunk":
        # The request never ended, so no handler ever saw it: the server may
        # close without an answer, which the sender retries; never a 5xx.
        assert status is None or 400 <= status < 500, (status, body[:300])
    else:
        assert status is not None and 400 <= status < 500, (status, body[:300])
    assert "Unhandled error" not in functions[name].logs()
