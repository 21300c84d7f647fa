"""The outbox publisher in-process against the real PostgreSQL and a
loopback Broker: oldest first, only 2xx marks published, a Broker that is
down stops the drain, leased rows are skipped, ids and limits are honoured."""

from __future__ import annotations

import logging

import requests
import sqlalchemy as sa

from shared import incidents as svc
from shared import outbox
from tests.factories import alert
from loopback.servers import RecordingServer
from loopback.processes import free_port


def pending(engine, *names) -> list[str]:
    ids = []
    for name in names:  # one transaction each: created_at orders them
        with engine.begin() as conn:
            ids += svc.record_alerts(conn, [alert(name)], "/test", "test").event_ids
    return ids


def rows(engine):
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.text("SELECT * FROM event_outbox")).all()}


class Broker:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.server = RecordingServer(lambda req: self.answers.pop(0) if self.answers else (202, {}, b""))

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()

    @property
    def url(self):
        return self.server.url + "/ns/default"

    def ids(self):
        return [r.headers["ce-id"] for r in self.server.received()]


def test_pending_events_are_sent_oldest_first_as_binary_cloudevents_and_marked(clean_db):
    ids = pending(clean_db, "OutA", "OutB", "OutC")
    assert outbox.pending_count(clean_db) == 3
    with Broker() as broker:
        report = outbox.publish_pending(clean_db, broker.url)
        assert broker.ids() == ids and report.published == ids and report.failed == {}
        first = broker.server.received()[0]
        assert first.path == "/ns/default" and first.headers["ce-specversion"] == "1.0"
        assert first.headers["ce-type"].endswith(".incident.opened") and first.headers["ce-time"].endswith("Z")
        assert first.headers["ce-subject"] and first.headers["content-type"] == "application/json"
        assert first.json()["incident_id"] == first.headers["ce-subject"]
        assert outbox.publish_pending(clean_db, broker.url).published == []
    stored = rows(clean_db)
    # attempts counts failed attempts only: a send that succeeds adds none.
    assert all(r.published_at is not None and r.claimed_until is None and r.attempts == 0 and r.last_error is None
               and r.next_attempt_at is None for r in stored.values())
    assert outbox.pending_count(clean_db) == 0


def test_only_the_named_ids_and_at_most_the_limit(clean_db):
    ids = pending(clean_db, "OutA", "OutB", "OutC")
    with Broker() as broker:
        assert outbox.publish_pending(clean_db, broker.url, ids=[ids[2]]).published == [ids[2]]
        assert outbox.publish_pending(clean_db, broker.url, ids=[]).published == []
        assert outbox.publish_pending(clean_db, broker.url, limit=1).published == [ids[0]]
        assert broker.ids() == [ids[2], ids[0]]
    assert outbox.publish_pending(clean_db, "").published == [] and outbox.pending_count(clean_db) == 1


def test_a_refusal_is_recorded_and_retried_later(clean_db):
    ids = pending(clean_db, "OutA", "OutB")
    with Broker((500, {}, b"broker trouble")) as broker:
        report = outbox.publish_pending(clean_db, broker.url)
        assert report.published == [ids[1]] and list(report.failed) == [ids[0]]
        assert report.failed[ids[0]] == "BrokerAnswered: broker answered 500: broker trouble"
        failed = rows(clean_db)[ids[0]]
        assert (failed.published_at, failed.attempts, failed.last_error, failed.claimed_until) == (None, 1, report.failed[ids[0]], None)
        assert failed.next_attempt_at is not None and failed.parked_at is None
        # Backing off, it is not due yet.
        assert outbox.publish_pending(clean_db, broker.url).published == []
        with clean_db.begin() as conn:  # whatever back-off applies, the next sweep is due now
            conn.execute(sa.text("UPDATE event_outbox SET next_attempt_at = NULL WHERE id = :i"), {"i": ids[0]})
        assert outbox.publish_pending(clean_db, broker.url).published == [ids[0]]
    retried = rows(clean_db)[ids[0]]
    assert (retried.attempts, retried.last_error, retried.next_attempt_at) == (1, None, None) and retried.published_at is not None


class CountingSession(requests.Session):
    """Notes the event id of every POST, answered or not."""

    def __init__(self):
        super().__init__()
        self.posted: list[str] = []

    def post(self, *args, **kwargs):
        self.posted.append(kwargs["headers"]["ce-id"])
        return super().post(*args, **kwargs)


def test_a_broker_that_is_down_stops_the_drain_without_counting_attempts(clean_db, caplog):
    ids = pending(clean_db, "OutA", "OutB", "OutC")
    http = CountingSession()
    with caplog.at_level(logging.WARNING, logger="outbox"):
        report = outbox.publish_pending(clean_db, f"http://127.0.0.1:{free_port()}/ns/default", timeout=1, http=http)
    # Two events refused in a row (each tried twice: a stale keep-alive
    # connection gets one fresh attempt) stop the drain; the third is not tried.
    assert http.posted == [ids[0], ids[0], ids[1], ids[1]]
    assert report.broker_unreachable and report.published == [] and report.failed == {} and report.parked == []
    stored = rows(clean_db)
    # Nothing is counted against the events: they stay due, unleased.
    assert [stored[i].attempts for i in ids] == [0, 0, 0]
    assert all(stored[i].claimed_until is None and stored[i].next_attempt_at is None for i in ids)
    assert stored[ids[0]].last_error.startswith("ConnectionError: ") and stored[ids[1]].last_error == stored[ids[0]].last_error
    assert stored[ids[2]].last_error is None and outbox.pending_count(clean_db) == 3
    (record,) = [r for r in caplog.records if r.getMessage() == "Broker unreachable; events stay in the outbox"]
    assert record.first_error == stored[ids[0]].last_error


def test_leased_rows_are_skipped_by_another_publisher(clean_db):
    ids = pending(clean_db, "OutA", "OutB")
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET claimed_until = timezone('utc', now()) + interval '1 minute' WHERE id = :i"), {"i": ids[0]})
    with Broker() as broker:
        assert outbox.publish_pending(clean_db, broker.url).published == [ids[1]]
        with clean_db.begin() as conn:
            conn.execute(sa.text("UPDATE event_outbox SET claimed_until = timezone('utc', now()) - interval '1 second' WHERE id = :i"), {"i": ids[0]})
        # An expired lease (its publisher died) is taken over.
        assert outbox.publish_pending(clean_db, broker.url).published == [ids[0]]


def test_a_closed_keep_alive_connection_is_retried_once(clean_db):
    class FlakySession(requests.Session):
        calls = 0

        def post(self, *args, **kwargs):
            FlakySession.calls += 1
            if FlakySession.calls == 1:
                raise requests.ConnectionError("connection reset by peer")
            return super().post(*args, **kwargs)

    (event_id,) = pending(clean_db, "OutA")
    with Broker() as broker:
        assert outbox.publish_pending(clean_db, broker.url, http=FlakySession()).published == [event_id]
        assert broker.ids() == [event_id] and FlakySession.calls == 2


def test_enqueue_is_idempotent_per_event_id(clean_db):
    event = {"id": "e-1", "type": "t", "source": "/s", "subject": None, "extensions": {"priority": "p0"}, "data": {"k": 1}}
    with clean_db.begin() as conn:
        outbox.enqueue(conn, [event, event])
        outbox.enqueue(conn, [])
    (row,) = rows(clean_db).values()
    assert (row.id, row.type, row.subject, row.extensions, row.data) == ("e-1", "t", None, {"priority": "p0"}, {"k": 1})
    ce = outbox.to_cloudevent(row)
    assert ce["priority"] == "p0" and "subject" not in ce.get_attributes() and ce.get_data() == {"k": 1}
