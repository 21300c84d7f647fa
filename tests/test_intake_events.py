"""The intake's CloudEvents: reports in, incident events out through the
outbox, and nothing lost when the Broker is down."""

import json
import threading
import time

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http

from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook
from loopback.servers import RecordingServer
from loopback.processes import FunctionProcess, free_port, wait_until

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
REPORT = "io.incidentresponse.incident.report"


@pytest.fixture(scope="module")
def broker_port():
    return free_port()


@pytest.fixture(scope="module")
def intake(base_env, broker_port):
    proc = FunctionProcess("intake", {**base_env, "K_SINK": f"http://127.0.0.1:{broker_port}/default/default", "PUBLISH_TIMEOUT_SECONDS": "2"}).start()
    yield proc
    proc.stop()


@pytest.fixture
def broker(broker_port):
    server = RecordingServer(port=broker_port).start()
    yield server
    server.stop()


def report_event(**data):
    return CloudEvent({"type": REPORT, "source": "/self-healing-automaton", "id": data.pop("id", "r-1")}, data)


def send(intake, event, structured=False, headers=None):
    h, body = (to_structured if structured else to_binary)(event)
    return requests.post(intake.url + "/", data=body, headers={**h, **AUTH, **(headers or {})}, timeout=10)


def incidents(engine):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM incidents ORDER BY created_at")).mappings().all()


def outbox(engine):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM event_outbox ORDER BY created_at")).mappings().all()


@pytest.mark.parametrize("structured", [False, True])
def test_report_in_either_mode_opens_incident(intake, broker, clean_db, structured):
    event = report_event(alert_name="KafkaConsumerLagHigh", priority="P1", summary="Kafka lag >15000", labels={"service": "email"})
    response = send(intake, event, structured=structured)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    (row,) = incidents(clean_db)
    assert result == {"fingerprint": row["fingerprint"], "incident_id": row["id"], "action": "created"}
    assert (row["alert_name"], row["priority"], row["source"]) == ("KafkaConsumerLagHigh", "P1", "cloudevent")
    assert row["labels"] == {"service": "email", "alertname": "KafkaConsumerLagHigh"}


def test_report_with_fingerprint_deduplicates_and_can_resolve(intake, broker, clean_db):
    base = {"alert_name": "AutomatonHeal", "priority": "P0", "fingerprint": "heal-42"}
    send(intake, report_event(id="a", **base))
    assert send(intake, report_event(id="b", **base)).json()["results"][0]["action"] == "refreshed"
    assert send(intake, report_event(id="c", status="resolved", **base)).json()["results"][0]["action"] == "resolved"
    (row,) = incidents(clean_db)
    assert row["status"] == "resolved"


def test_broker_delivery_is_acknowledged_with_202_and_no_body(intake, broker, clean_db):
    response = send(intake, report_event(alert_name="ViaBroker", priority="P0"), headers={"Prefer": "reply"})
    assert response.status_code == 202 and response.content == b""
    assert len(incidents(clean_db)) == 1


@pytest.mark.parametrize(
    "event, status",
    [
        (CloudEvent({"type": "com.example.other", "source": "/x", "id": "1"}, {"a": 1}), 400),
        (report_event(priority="P0"), 400),
        (report_event(alert_name="X", priority="P5"), 400),
        (report_event(alert_name="X", labels=["not", "a", "map"]), 400),
    ],
)
def test_bad_reports_are_400(intake, broker, clean_db, event, status):
    assert send(intake, event).status_code == status
    assert incidents(clean_db) == []


def test_not_a_cloudevent_is_400(intake):
    response = requests.post(intake.url + "/", data=b"{}", headers={"Content-Type": "application/json", **AUTH}, timeout=5)
    assert response.status_code == 400 and "CloudEvent" in response.json()["message"]


def test_report_needs_the_token_by_default(intake, clean_db):
    h, body = to_binary(report_event(alert_name="NoToken", priority="P0"))
    assert requests.post(intake.url + "/", data=body, headers=h, timeout=5).status_code == 401


def test_new_and_resolved_incidents_are_published_in_binary_mode(intake, broker, clean_db):
    firing = requests.post(intake.url + "/webhook/alert", json=webhook([raw_alert("Pub", service="email")]), headers=AUTH, timeout=10)
    incident_id = firing.json()["results"][0]["incident_id"]
    requests.post(intake.url + "/webhook/alert", json=webhook([raw_alert("Pub", service="email", status="resolved")]), headers=AUTH, timeout=10)
    try:
        wait_until(lambda: len(broker.received()) == 2, 10, message="two events at the broker")
    except AssertionError:
        print(intake.logs()[-4000:], broker.received(), outbox(clean_db))
        raise
    opened, resolved = sorted(broker.received(), key=lambda r: r.headers["ce-type"].endswith("resolved"))
    for rec, kind in ((opened, "opened"), (resolved, "resolved")):
        assert rec.path == "/default/default"
        assert rec.headers["ce-specversion"] == "1.0"
        assert rec.headers["ce-type"] == f"io.incidentresponse.incident.{kind}"
        assert rec.headers["ce-id"] == f"{incident_id}.{kind}.0"
        assert rec.headers["ce-priority"] == "p0" and rec.headers["ce-alertname"] == "Pub"
        event = from_http(rec.headers, rec.body)
        assert event.data["incident_id"] == incident_id
    wait_until(lambda: all(r["published_at"] for r in outbox(clean_db)), 5, message="outbox rows marked published")


def test_broker_down_then_sweep_publishes_each_missing_event_exactly_once(intake, broker_port, clean_db):
    response = requests.post(intake.url + "/webhook/alert", json=webhook([raw_alert("Lost", service="x")]), headers=AUTH, timeout=10)
    assert response.status_code == 200
    wait_until(lambda: outbox(clean_db) and outbox(clean_db)[0]["last_error"], 10, message="a failed publish attempt")
    (pending,) = outbox(clean_db)
    assert pending["published_at"] is None and "Connection" in pending["last_error"]
    # An unreachable Broker says nothing about the event: not counted, not delayed.
    assert pending["attempts"] == 0 and pending["next_attempt_at"] is None and pending["parked_at"] is None

    broker = RecordingServer(port=broker_port).start()
    try:
        sweeps = [requests.post(intake.url + "/outbox/sweep", headers=AUTH, timeout=10) for _ in range(2)]
        sweeps += [None]
        # A concurrent PingSource sweep at the same moment must not double-send.
        threads = [threading.Thread(target=lambda: requests.post(intake.url + "/outbox/sweep", headers=AUTH, timeout=10)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sweeps[0].json() == {"published": 1, "failed": 0, "parked": 0, "pending": 0}
        assert sweeps[1].json()["published"] == 0
        assert len(broker.received()) == 1
        assert broker.received()[0].headers["ce-id"] == pending["id"]
    finally:
        broker.stop()


def test_ping_source_event_runs_the_sweep(intake, broker, clean_db):
    ping = CloudEvent({"type": "dev.knative.sources.ping", "source": "/apis/v1/namespaces/default/pingsources/outbox-sweep", "id": "p1"}, {})
    response = send(intake, ping, headers={"Prefer": "reply"})
    assert response.status_code == 202


def test_two_intake_processes_receiving_the_same_burst_make_one_incident_per_fingerprint(intake, base_env, broker, clean_db):
    second = FunctionProcess("intake", dict(base_env)).start()
    try:
        payload = json.dumps(webhook([raw_alert("Burst", pod=f"p{i}") for i in range(50)]))
        barrier = threading.Barrier(8)
        statuses = []

        def hit(url):
            barrier.wait()
            statuses.append(requests.post(url + "/webhook/alert", data=payload, headers={**AUTH, "Content-Type": "application/json"}, timeout=30).status_code)

        threads = [threading.Thread(target=hit, args=(url,)) for url in [intake.url, second.url] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * 8
        rows = incidents(clean_db)
        assert len(rows) == 50 and len({r["fingerprint"] for r in rows}) == 50
        assert sum(r["repeat_count"] for r in rows) == 50 * 7
    finally:
        second.stop()


def test_publishing_holds_no_transaction_open_while_it_waits_for_the_broker(intake, broker_port, clean_db):
    """A Broker that answers slowly must not keep outbox rows locked in an
    open transaction: the rows are leased, and a second sweep skips them."""
    from shared import outbox as outbox_module

    slow = RecordingServer(lambda r: (time.sleep(1.0), (202, {}, b""))[1], port=broker_port).start()
    try:
        response = requests.post(intake.url + "/webhook/alert", json=webhook([raw_alert("Slow")]), headers=AUTH, timeout=10)
        assert response.status_code == 200
        wait_until(lambda: slow.received(), 5, message="the first publish to reach the slow broker")
        with clean_db.connect() as conn:
            open_transactions = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction' AND application_name = 'incident-response'")).scalar()
            leased = conn.execute(sa.text("SELECT count(*) FROM event_outbox WHERE claimed_until IS NOT NULL")).scalar()
        assert open_transactions == 0 and leased == 1
        assert outbox_module.publish_pending(clean_db, slow.url + "/default/default").published == []
        wait_until(lambda: all(r["published_at"] for r in outbox(clean_db)), 5, message="the event published")
        assert [r["claimed_until"] for r in outbox(clean_db)] == [None]
        assert len(slow.received()) == 1
    finally:
        slow.stop()


def test_a_report_with_a_long_alert_name_is_bounded_like_a_webhook(intake, broker, clean_db):
    long_name = "ReportedByAnAutomatonWithAnUnreasonablyLongAlertName" * 4
    response = send(intake, report_event(alert_name=long_name, priority="P1"))
    assert response.status_code == 200, response.text
    (row,) = incidents(clean_db)
    assert row["alert_name"] == long_name[:99] + "\u2026" and row["labels"]["alertname"] == long_name
