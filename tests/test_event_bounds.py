"""Events carry a bounded projection of the incident, so the largest
incident the intake accepts still reaches every consumer: diagnosed and
paged through the real functions and the local Broker."""

import json

import pytest
import requests
from cloudevents.http import CloudEvent

from shared import eventio, events
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook
from loopback.processes import wait_until
from tests.test_end_to_end import make_stack, outside, world  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


def worst_row(char: str) -> dict:
    """An incident at every bound, in the characters that cost most as JSON."""
    long = char * 100_000
    return {
        "id": "00000000-0000-0000-0000-000000000000", "alert_name": long, "priority": "P0", "status": "investigating",
        "summary": long, "description": long, "annotations": {f"a{i}": long for i in range(100)},
        "labels": {f"{i}{char * 200}": long for i in range(500)}, "fingerprint": long, "source": long,
        "starts_at": long, "created_at": long, "resolved_at": long, "generation": 7,
    }


@pytest.mark.parametrize("char", ["a", "\"", "Ж", "😀", "\n"])
def test_the_projection_is_bounded_whatever_the_incident(char):
    row = worst_row(char)
    extra = {"diagnostics": {f"k{i}": [{"deep": char * 50_000}] * 100 for i in range(100)}}
    event = events.incident_event(events.INCIDENT_DIAGNOSED, row, "/src", extra)
    size = len(json.dumps(event["data"]))
    assert size <= events.EVENT_DATA_MAX_BYTES < eventio.MAX_EVENT_BYTES // 2
    assert "description" not in event["data"] and "annotations" not in event["data"]
    assert len(event["data"]["labels"]) == events.LABELS_MAX and event["data"]["labels_omitted"] == 500 - events.LABELS_MAX
    cut = events.bounded_labels({char * 300 + "1": "a", char * 300 + "2": "b"})
    assert len(cut[0]) == 1 and cut[1] == 1
    headers, body = eventio.to_http(CloudEvent({"id": event["id"], "type": event["type"], "source": "/src",
                                                **event["extensions"]}, event["data"]))
    assert len(body) <= events.EVENT_DATA_MAX_BYTES and len(headers["ce-alertname"]) <= events.NAME_MAX_CHARS * 12


def test_well_known_labels_survive_when_labels_are_cut():
    labels = {f"z{i:03}": "v" for i in range(100)} | {"service": "email", "namespace": "production", "alertname": "A"}
    kept, omitted = events.bounded_labels(labels)
    assert {"service", "namespace", "alertname"} <= set(kept) and omitted == 103 - events.LABELS_MAX


@pytest.fixture(scope="module")
def stack(database_url, outside, prometheus, tmp_path_factory):  # noqa: F811
    s = make_stack(database_url, outside, prometheus, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


def test_a_p0_with_a_900_kb_description_is_diagnosed_and_paged(stack, world, clean_db):  # noqa: F811
    kube, pd, hook = world
    alert = raw_alert("HugeDescription", severity="critical", service="email", namespace="production")
    alert["annotations"] = {"summary": "Ж" * 20_000, "description": "Ж" * 450_000, "runbook": "x" * 20_000}
    body = json.dumps(webhook([alert]), ensure_ascii=False).encode()
    assert 900_000 < len(body) < 1024 * 1024
    response = requests.post(stack.url("intake") + "/webhook/alert", data=body,
                             headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    incident_id = response.json()["results"][0]["incident_id"]

    def kinds():
        with clean_db.connect() as conn:
            return [t["kind"] for t in svc.get_timeline(conn, incident_id)]

    wait_until(lambda: "diagnosed" in kinds(), 30, message="diagnostics")
    wait_until(lambda: [b for b in pd.bodies() if b["event_action"] == "trigger" and b["dedup_key"] == incident_id], 30,
               message="the page")
    assert "dead_letter" not in kinds()
    assert stack.broker.dead_lettered == []

    # Replies say what their data is (HTTP binding §3.1.1).
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, incident_id)
    opened = events.incident_event(events.INCIDENT_OPENED, row, "/test")
    attributes = {"id": opened["id"], "type": opened["type"], "source": "/test", "subject": incident_id, **opened["extensions"]}
    headers, data = eventio.to_http(CloudEvent(attributes, opened["data"]))
    reply = requests.post(stack.url("diagnostics") + "/", data=data, headers={**headers, "Prefer": "reply"}, timeout=30)
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/json"
    assert eventio.parse_event(reply.headers, reply.content)["datacontenttype"] == "application/json"
