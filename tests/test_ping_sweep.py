"""The PingSource's ``outbox-sweep`` event must sweep: events committed to the
outbox but never published reach a loopback Broker, once, and are marked
published. (An acknowledgement alone proves nothing.)"""

from __future__ import annotations

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert
from loopback.servers import RecordingServer
from loopback.processes import FunctionProcess, wait_until

PING = {"type": "dev.knative.sources.ping", "source": "/apis/v1/namespaces/production/pingsources/outbox-sweep"}


@pytest.fixture(scope="module")
def sink():
    server = RecordingServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def intake(base_env, sink):
    proc = FunctionProcess("intake", {**base_env, "K_SINK": sink.url + "/production/default", "PUBLISH_TIMEOUT_SECONDS": "2"}, threads=2).start()
    yield proc
    proc.stop()


def pending_events(engine, names) -> list[str]:
    """Commit incidents (and their outbox rows) without publishing them, as
    when a process died between the commit and the post."""
    with engine.begin() as conn:
        return svc.record_alerts(conn, [alert(n) for n in names], "/test", "test").event_ids


def unpublished(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM event_outbox WHERE published_at IS NULL")).scalar()


def ping(intake, event_id, prefer_reply):
    headers, body = to_binary(CloudEvent({**PING, "id": event_id}, {}))
    if prefer_reply:
        headers["Prefer"] = "reply"
    return requests.post(intake.url + "/", data=body, headers={**headers, "Authorization": f"Bearer {TEST_TOKEN}"}, timeout=30)


@pytest.mark.parametrize("prefer_reply", [True, False])
def test_the_ping_publishes_every_pending_event(intake, sink, clean_db, prefer_reply):
    sink.requests.clear()
    ids = pending_events(clean_db, ["SweepA", "SweepB", "SweepC"])
    assert len(ids) == 3 and unpublished(clean_db) == 3 and sink.requests == []
    response = ping(intake, f"ping-{prefer_reply}", prefer_reply)
    assert response.status_code == (202 if prefer_reply else 200), response.text
    if not prefer_reply:
        assert response.json() == {"published": 3, "failed": 0, "parked": 0, "pending": 0}
    wait_until(lambda: unpublished(clean_db) == 0, 10, message="the outbox to be empty")
    assert sorted(r.headers["ce-id"] for r in sink.received()) == sorted(ids)


def test_a_second_ping_sends_nothing_again(intake, sink, clean_db):
    sink.requests.clear()
    pending_events(clean_db, ["SweepOnce"])
    ping(intake, "ping-1", True)
    wait_until(lambda: unpublished(clean_db) == 0, 10, message="the first sweep")
    assert ping(intake, "ping-2", False).json()["published"] == 0
    assert len(sink.received()) == 1
