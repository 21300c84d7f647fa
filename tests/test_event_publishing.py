"""Publishing through the outbox, over real HTTP from a real intake process:
any alert name publishes and round-trips, a failing event is parked and
blocks nothing, a publisher that dies holds its events one short lease, and
a storm is drained at once, P0 first."""

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from shared import eventio, events, outbox
from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook
from loopback.servers import RecordingServer
from loopback.processes import FunctionProcess, free_port, wait_until

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
NAMES = ["ДискЗаполнен", "DiskFull€", "Überlast – Kafka", "line\nbreak", 'with space "quoted" 100%', "Euro € 😀", "100%25"]


@pytest.fixture(scope="module")
def sink_port():
    return free_port()


@pytest.fixture(scope="module")
def intake(base_env, sink_port):
    env = {**base_env, "K_SINK": f"http://127.0.0.1:{sink_port}/default/default", "PUBLISH_TIMEOUT_SECONDS": "2",
           "OUTBOX_MAX_ATTEMPTS": "3"}
    proc = FunctionProcess("intake", env).start()
    yield proc
    proc.stop()


@pytest.fixture
def sink(sink_port):
    server = RecordingServer(port=sink_port).start()
    yield server
    server.stop()


def post_webhook(intake, alerts, timeout=30):
    response = requests.post(intake.url + "/webhook/alert", data=json.dumps(webhook(alerts)),
                             headers={**AUTH, "Content-Type": "application/json"}, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def outbox_rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM event_outbox ORDER BY created_at, id")).mappings().all()


def sweep(intake):
    return requests.post(intake.url + "/outbox/sweep", headers=AUTH, timeout=60).json()


# --------------------------------------------------------------------------- encoding


def test_header_values_are_percent_encoded_as_the_binding_says():
    # The binding's own example (§3.1.3.2), and what must be encoded.
    assert eventio.encode_header_value("Euro € 😀") == "Euro%20%E2%82%AC%20%F0%9F%98%80"
    assert eventio.encode_header_value('a "b" 100%\n') == "a%20%22b%22%20100%25%0A"
    assert eventio.encode_header_value("io.incidentresponse.incident.opened") == "io.incidentresponse.incident.opened"
    for name in NAMES:
        assert eventio.decode_header_value(eventio.encode_header_value(name)) == name
    # Decoding accepts lower case, unnecessary escapes and the old quoted form; refuses bad UTF-8.
    assert eventio.decode_header_value("%c3%9Cber%41") == "ÜberA"
    assert eventio.decode_header_value('"a \\"b\\""') == 'a "b"'
    with pytest.raises(ValueError):
        eventio.decode_header_value("%C0%A0")


def test_any_alert_name_is_published_encoded_and_round_trips(intake, sink, clean_db):
    result = post_webhook(intake, [raw_alert(name, service="s") for name in NAMES])
    ids = {r["incident_id"] for r in result["results"]}
    got = wait_until(lambda: len(sink.received()) == len(NAMES) and sink.received(), 15, message="every event at the sink")
    received = {}
    for rec in got:
        for name, value in rec.headers.items():
            if name.startswith("ce-"):
                assert all(0x21 <= ord(c) <= 0x7E and c not in '"' for c in value), (name, value)
        event = eventio.parse_event(rec.headers, rec.body)
        received[event["alertname"]] = event
    assert set(received) == set(NAMES)
    assert {e.data["incident_id"] for e in received.values()} == ids
    assert all(e.data["alert_name"] == name for name, e in received.items())
    wait_until(lambda: all(r["published_at"] for r in outbox_rows(clean_db)), 5, message="rows marked published")


def test_opened_event_times_carry_a_utc_offset(intake, sink, clean_db):
    post_webhook(intake, [raw_alert("Times")])
    (row,) = outbox_rows(clean_db)
    for name in ("starts_at", "created_at"):
        value = row["data"][name]
        assert value.endswith("Z") and datetime.fromisoformat(value.replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert row["data"]["starts_at"].startswith("2026-11-27T21:54:18.167506")


# --------------------------------------------------------------------------- parking


def test_a_failing_event_is_parked_after_the_attempt_limit_and_blocks_nothing(intake, sink, clean_db):
    sink.responder = lambda r: (400, {}, b"refused") if eventio.decode_header_value(r.headers.get("ce-alertname", "")).startswith("Poison") else (202, {}, b"")
    poison = post_webhook(intake, [raw_alert(f"Poison {i}", severity="critical") for i in range(60)])
    good = post_webhook(intake, [raw_alert(f"Good {i}", severity="warning") for i in range(5)])
    good_ids = {f"{r['incident_id']}.opened.0" for r in good["results"]}
    # The newer, lower-priority events are not held up by the failing P0s.
    wait_until(lambda: good_ids <= {r.headers["ce-id"] for r in sink.received()}, 15, message="the good events")

    def all_parked():
        sweep(intake)
        rows = [r for r in outbox_rows(clean_db) if r["subject"] in {x["incident_id"] for x in poison["results"]}]
        return all(r["parked_at"] for r in rows) and rows

    rows = wait_until(all_parked, 40, interval=0.5, message="the failing events parked")
    assert len(rows) == 60
    assert all(r["attempts"] == 3 and r["published_at"] is None and r["next_attempt_at"] is None for r in rows)
    assert all("400" in r["last_error"] for r in rows)
    assert outbox.parked_count(clean_db) == 60 and outbox.pending_count(clean_db) == 0
    attempts = [r for r in sink.received() if r.headers["ce-id"] == rows[0]["id"]]
    assert len(attempts) == 3
    assert "Outbox event parked" in intake.logs() and rows[0]["id"] in intake.logs()
    assert sweep(intake) == {"published": 0, "failed": 0, "parked": 0, "pending": 0}

    # A re-drive resets the row; it is then sent like any new event.
    sink.responder = lambda r: (202, {}, b"")
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET parked_at = NULL, next_attempt_at = NULL, attempts = 0 WHERE id = :id"),
                     {"id": rows[0]["id"]})
    assert sweep(intake)["published"] == 1


def test_failed_attempts_back_off_so_due_rows_go_first(clean_db, sink):
    from shared import db

    sink.responder = lambda r: (503, {}, b"busy")
    with clean_db.begin() as conn:
        outbox.enqueue(conn, [{"id": f"e{i}", "type": events.INCIDENT_OPENED, "source": "/t", "subject": None,
                               "extensions": {"priority": "p0" if i % 2 else "p2", "alertname": "X"}, "data": {}} for i in range(4)])
    report = outbox.publish_pending(clean_db, sink.url, timeout=2, max_attempts=5)
    assert len(report.failed) == 4 and not report.parked
    # P0 first, then oldest.
    assert [r.headers["ce-id"] for r in sink.received()] == ["e1", "e3", "e0", "e2"]
    rows = outbox_rows(clean_db)
    assert all(r["attempts"] == 1 and r["next_attempt_at"] is not None for r in rows)
    # Backing off: not due, so a second run right away tries nothing.
    assert outbox.publish_pending(clean_db, sink.url, timeout=2).failed == {}
    db.dispose_engine()


# --------------------------------------------------------------------------- leases


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def test_a_publisher_that_dies_after_leasing_delays_its_events_by_one_short_lease(base_env, clean_db):
    hanging_port, live_port = free_port(), free_port()
    hanging = RecordingServer(lambda r: (time.sleep(20), (202, {}, b""))[1], port=hanging_port).start()
    live = RecordingServer(port=live_port).start()
    doomed = FunctionProcess("intake", {**base_env, "K_SINK": f"{hanging.url}/default/default", "PUBLISH_TIMEOUT_SECONDS": "2"}).start()
    survivor = FunctionProcess("intake", {**base_env, "K_SINK": f"{live.url}/default/default", "PUBLISH_TIMEOUT_SECONDS": "2"}).start()
    try:
        result = post_webhook(doomed, [raw_alert("Leased", severity="critical")])
        event_id = f"{result['results'][0]['incident_id']}.opened.0"
        wait_until(lambda: hanging.received(), 5, interval=0.01, message="the doomed publisher to send")
        for pid in _children(doomed.process.pid) + [doomed.process.pid]:
            os.kill(pid, signal.SIGKILL)
        doomed.process.wait()
        (row,) = outbox_rows(clean_db)
        assert row["published_at"] is None and row["claimed_until"] is not None
        with clean_db.connect() as conn:
            lease_left = conn.execute(sa.text("SELECT extract(epoch FROM claimed_until - timezone('utc', now())) "
                                              "FROM event_outbox")).scalar()
        assert 0 < lease_left <= outbox.lease_seconds(2.0)
        assert sweep(survivor)["published"] == 0  # still leased: skipped, not waited for
        started = time.monotonic()
        wait_until(lambda: sweep(survivor)["published"] == 1, outbox.lease_seconds(2.0) + 5, interval=0.5,
                   message="the sweep to send the abandoned event")
        assert time.monotonic() - started <= float(lease_left) + 2
        assert [r.headers["ce-id"] for r in live.received()] == [event_id]
    finally:
        survivor.stop()
        doomed.stop()
        hanging.stop()
        live.stop()


def test_the_lease_is_short_for_the_default_timeout():
    assert outbox.lease_seconds(5.0) < 30


# --------------------------------------------------------------------------- storms


def test_a_10000_alert_webhook_is_published_at_once_p0_first_without_a_sweep(intake, sink, clean_db):
    alerts = [{"status": "firing", "labels": {"alertname": "Storm", "i": str(i), "severity": "critical" if i % 10 == 0 else "warning"}}
              for i in range(10_000)]
    started = time.monotonic()
    post_webhook(intake, alerts, timeout=120)
    committed = time.monotonic()
    wait_until(lambda: len(sink.received()) >= 10_000, 120, interval=0.5, message="every storm event at the sink")
    drained = time.monotonic()
    print(f"\nstorm: 10,000 alerts committed in {committed - started:.1f}s, published in {drained - committed:.1f}s")
    got = sink.received()
    assert len({r.headers["ce-id"] for r in got}) == 10_000
    first = [r.headers["ce-priority"] for r in got[:1000]]
    assert first.count("p0") >= 950, first.count("p0")
    assert all(r["published_at"] for r in outbox_rows(clean_db))
