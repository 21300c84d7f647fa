"""The outbox publisher in-process against the real PostgreSQL and a
loopback Broker: oldest first, only 2xx marks published, a Broker that is
down stops the drain, leased rows are skipped, ids and limits are honoured."""

from __future__ import annotations

import logging

import pytest
import requests
import sqlalchemy as sa

from shared import incidents as svc
from shared import deadline, outbox
from tests.factories import alert
from loopback.servers import RecordingServer
from loopback.processes import free_port
from loopback.trickle import HEADERS_THEN_BODY, STATUS_LINE, OneAnswer, Trickler, run_bounded


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
    # Without a sink nothing is tried, so nothing is counted against the event.
    assert outbox.publish_pending(clean_db, "") == outbox.PublishReport() and outbox.pending_count(clean_db) == 1
    assert [r.attempts for r in rows(clean_db).values() if r.published_at is None] == [0]


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
    http = deadline.bounded(CountingSession())
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
        assert outbox.publish_pending(clean_db, broker.url, http=deadline.bounded(FlakySession())).published == [event_id]
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


def events_at(engine, n, priority="p2"):
    """``n`` bare outbox events, oldest first (one transaction each)."""
    ids = []
    for i in range(n):
        with engine.begin() as conn:
            outbox.enqueue(conn, [{"id": f"ev-{i}", "type": "t", "source": "/s", "subject": f"inc-{i}",
                                   "extensions": {"priority": priority}, "data": {"i": i}}])
        ids.append(f"ev-{i}")
    return ids


def make_due(engine, event_id, attempts=None):
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET next_attempt_at = NULL, attempts = COALESCE(:a, attempts) WHERE id = :i"),
                     {"i": event_id, "a": attempts})


def test_any_2xx_publishes_and_anything_else_is_a_refusal_with_the_start_of_its_body(clean_db):
    ids = events_at(clean_db, 3)
    with Broker((200, {}, b""), (299, {}, b""), (300, {}, b"m" * 500)) as broker:
        report = outbox.publish_pending(clean_db, broker.url)
    assert report.published == ids[:2]
    assert report.failed == {ids[2]: "BrokerAnswered: broker answered 300: " + "m" * 200}


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_a_refusal_never_followed_into_a_publish(clean_db, status):
    # Followed, a 302 made the POST a GET whose 200 marked the event
    # published, though no Broker ever took it.
    ids = pending(clean_db, "Redirected")
    with Broker((status, {"Location": "/sign-in"}, b""), (200, {}, b"<html>Sign in</html>")) as broker:
        report = outbox.publish_pending(clean_db, broker.url)
        assert [(r.method, r.path) for r in broker.server.received()] == [("POST", "/ns/default")]
    assert report.published == [] and list(report.failed) == ids
    assert outbox.pending_count(clean_db) == len(ids)


def test_the_back_off_doubles_from_two_seconds_up_to_five_minutes(clean_db):
    (event_id,) = events_at(clean_db, 1)

    def wait_after_failure(attempts_before):
        make_due(clean_db, event_id, attempts_before)
        with Broker((503, {}, b"busy")) as broker:
            outbox.publish_pending(clean_db, broker.url, max_attempts=100)
        with clean_db.connect() as conn:
            return conn.execute(sa.text("SELECT extract(epoch FROM next_attempt_at - timezone('utc', now())) FROM event_outbox")).scalar()

    assert 1.0 < wait_after_failure(0) <= 2.0
    assert 15.0 < wait_after_failure(3) <= 16.0
    assert 299.0 < wait_after_failure(20) <= 300.0


def test_the_eighth_failed_attempt_parks_the_event_by_default(clean_db, caplog):
    (event_id,) = events_at(clean_db, 1)
    make_due(clean_db, event_id, 6)
    with Broker((400, {}, b"no"), (400, {}, b"no")) as broker:
        first = outbox.publish_pending(clean_db, broker.url)
        assert first.parked == [] and outbox.parked_count(clean_db) == 0 and outbox.pending_count(clean_db) == 1
        make_due(clean_db, event_id)
        with caplog.at_level(logging.WARNING, logger="outbox"):
            second = outbox.publish_pending(clean_db, broker.url)
    assert second.parked == [event_id] and list(second.failed) == [event_id]
    assert outbox.parked_count(clean_db) == 1 and outbox.pending_count(clean_db) == 0
    (row,) = rows(clean_db).values()
    assert (row.attempts, row.next_attempt_at, row.published_at) == (8, None, None) and row.parked_at is not None
    (parked,) = [r for r in caplog.records if r.getMessage() == "Outbox event parked: not retried until re-driven"]
    assert (parked.levelno, parked.event_id, parked.incident_id, parked.attempts) == (logging.ERROR, event_id, "inc-0", 8)
    summary = [r for r in caplog.records if r.getMessage() == "Events not published; they are retried later"][-1]
    assert (summary.failed, summary.parked, summary.first_error) == (1, 1, "BrokerAnswered: broker answered 400: no")


def test_an_error_is_stored_at_most_500_characters_long(clean_db):
    (event_id,) = events_at(clean_db, 1)
    # A sink that cannot even be parsed (a setting to fix, not counted
    # against the event) and whose error quotes its long path.
    report = outbox.publish_pending(clean_db, "http://127.0.0.1:99999/" + "p" * 600)
    assert report.failed == {} and report.broker_unreachable
    assert len(report.broker_error) == 500 and rows(clean_db)[event_id].last_error == report.broker_error


class DroppingSession(requests.Session):
    """The connection drops (twice: the retry too) when one of ``lost`` is sent."""

    def __init__(self, *lost):
        super().__init__()
        self.lost = set(lost)

    def post(self, *args, **kwargs):
        if kwargs["headers"]["ce-id"] in self.lost:
            raise requests.ConnectionError(f"connection reset by peer while sending {kwargs['headers']['ce-id']}")
        return super().post(*args, **kwargs)


def test_a_dropped_connection_while_the_broker_takes_other_events_counts_against_the_event(clean_db):
    ids = events_at(clean_db, 4)
    with Broker() as broker:
        report = outbox.publish_pending(clean_db, broker.url, http=deadline.bounded(DroppingSession(ids[0], ids[2])))
    # The first drop alone could be an outage; the next event went through, so
    # it was not; and a drop does not stop the events after it.
    assert report.published == [ids[1], ids[3]] and sorted(report.failed) == [ids[0], ids[2]]
    assert not report.broker_unreachable and report.broker_error is None
    stored = rows(clean_db)
    assert [stored[i].attempts for i in ids] == [1, 0, 1, 0]
    assert stored[ids[0]].next_attempt_at is not None and stored[ids[0]].claimed_until is None


def test_a_lone_event_the_broker_cannot_take_stays_due_and_the_outage_is_reported(clean_db, caplog):
    (event_id,) = events_at(clean_db, 1)
    with caplog.at_level(logging.WARNING, logger="outbox"):
        report = outbox.publish_pending(clean_db, f"http://127.0.0.1:{free_port()}/ns/default", timeout=1)
    assert report.broker_unreachable and report.failed == {} and report.broker_error.startswith("ConnectionError: ")
    (row,) = rows(clean_db).values()
    assert (row.attempts, row.claimed_until, row.next_attempt_at, row.last_error) == (0, None, None, report.broker_error)
    assert [r.first_error for r in caplog.records if r.getMessage().startswith("Broker unreachable")] == [report.broker_error]


def test_batches_respect_the_batch_size_and_the_limit(clean_db):
    ids = events_at(clean_db, 5)
    with Broker() as broker:
        assert outbox.publish_pending(clean_db, broker.url, batch_size=2, limit=3).published == ids[:3]
        assert outbox.publish_pending(clean_db, broker.url, batch_size=1).published == ids[3:]
        assert broker.ids() == ids


def test_an_outage_stops_at_the_first_batch(clean_db):
    ids = events_at(clean_db, 5)
    http = deadline.bounded(CountingSession())
    report = outbox.publish_pending(clean_db, f"http://127.0.0.1:{free_port()}/ns/default", timeout=1, http=http, batch_size=2)
    assert report.broker_unreachable and http.posted == [ids[0], ids[0], ids[1], ids[1]]


def test_nothing_is_sent_after_the_deadline(clean_db):
    import time

    ids = events_at(clean_db, 2)
    with Broker() as broker:
        assert outbox.publish_pending(clean_db, broker.url, deadline=time.monotonic() - 0.001).published == []
        assert broker.ids() == []
        assert outbox.publish_pending(clean_db, broker.url, deadline=time.monotonic() + 30).published == ids


def test_the_lease_is_three_seconds_plus_three_sends():
    assert (outbox.lease_seconds(5.0), outbox.lease_seconds(1.0), outbox.lease_seconds(0.0)) == (18.0, 6.0, 3.0)


def test_a_batch_whose_lease_runs_short_hands_its_other_rows_back(clean_db):
    import time

    ids = events_at(clean_db, 30)
    # A slow Broker: with a 0.3 s timeout the lease is 3.9 s, and a batch
    # stops sending once fewer than two timeouts and a second are left.
    slow = Broker()
    slow.server.responder = lambda req: (time.sleep(0.1), (202, {}, b""))[1]
    with slow:
        report = outbox.publish_pending(clean_db, slow.url, timeout=0.3, limit=30)
    sent = len(report.published)
    assert 1 <= sent < 30 and report.published == ids[:sent] and report.failed == {}
    stored = rows(clean_db)
    # Handed back untried: unleased, nothing counted, due for the next publisher.
    assert all(stored[i].claimed_until is None and stored[i].attempts == 0 and stored[i].published_at is None for i in ids[sent:])
    assert outbox.pending_count(clean_db) == 30 - sent


def test_a_refusal_shows_the_broker_is_up_so_a_dropped_connection_after_it_is_the_events_own(clean_db):
    ids = events_at(clean_db, 2)
    with Broker((500, {}, b"no")) as broker:
        report = outbox.publish_pending(clean_db, broker.url, http=deadline.bounded(DroppingSession(ids[1])))
    assert sorted(report.failed) == ids and not report.broker_unreachable
    assert [rows(clean_db)[i].attempts for i in ids] == [1, 1]


def test_an_event_without_a_priority_is_not_a_p0(clean_db):
    with clean_db.begin() as conn:
        outbox.enqueue(conn, [{"id": "plain", "type": "t", "source": "/s", "subject": None, "extensions": {}, "data": {}}])
    with clean_db.begin() as conn:
        outbox.enqueue(conn, [{"id": "urgent", "type": "t", "source": "/s", "subject": None, "extensions": {"priority": "p0"}, "data": {}}])
    with Broker() as broker:
        assert outbox.publish_pending(clean_db, broker.url).published == ["urgent", "plain"]


def test_an_outage_is_reported_and_stored_by_its_first_error(clean_db):
    ids = events_at(clean_db, 3)
    with Broker() as broker:
        report = outbox.publish_pending(clean_db, broker.url, http=deadline.bounded(DroppingSession(*ids)))
    first = "ConnectionError: connection reset by peer while sending ev-0"
    assert report.broker_unreachable and report.broker_error == first
    stored = rows(clean_db)
    assert [stored[i].last_error for i in ids] == [first, first, None]


def test_a_drain_leases_one_batch_of_fifty_for_three_sends_of_the_default_timeout(clean_db):
    """While the first send of a drain is held, exactly one batch is leased
    (another publisher can take the rest at once), for 3 s plus three
    sends of the default 5 s timeout; released, the drain goes on."""
    import threading

    with clean_db.begin() as conn:
        started = conn.execute(sa.text(f"SELECT {outbox.UTC_NOW}")).scalar()
        outbox.enqueue(conn, [{"id": f"b-{i:02d}", "type": "t", "source": "/s", "subject": None, "extensions": {}, "data": {}}
                              for i in range(60)])
    held, release = threading.Event(), threading.Event()

    def answer(_request):
        if not held.is_set():
            held.set()
            assert release.wait(10), "the test never released the first send"
        return 202, {}, b""

    server = RecordingServer(answer).start()
    reports = []
    drain = threading.Thread(target=lambda: reports.append(outbox.publish_pending(clean_db, server.url + "/ns/default")), daemon=True)
    try:
        drain.start()
        assert held.wait(10), "nothing was sent"
        with clean_db.connect() as conn:
            leased = conn.execute(sa.text(f"SELECT count(*), max(claimed_until) - CAST(:started AS timestamp), {outbox.UTC_NOW} - "
                                          "CAST(:started AS timestamp) FROM event_outbox WHERE claimed_until IS NOT NULL"),
                                  {"started": started}).one()
        count, lease_from_start, elapsed = leased[0], leased[1].total_seconds(), leased[2].total_seconds()
        assert count == outbox.BATCH_SIZE == 50
        # Leased at some moment between the start and now, for 18 s.
        assert outbox.lease_seconds(5.0) == 18.0
        assert 18.0 <= lease_from_start <= 18.0 + elapsed, (lease_from_start, elapsed)
    finally:
        release.set()
        drain.join(30)
        server.stop()
    assert not drain.is_alive() and len(reports[0].published) == 60 and outbox.pending_count(clean_db) == 0


REFUSAL_HEADERS = STATUS_LINE.replace(b"200 OK", b"503 Service Unavailable")
REFUSAL_THEN_BODY = HEADERS_THEN_BODY.replace(b"200 OK", b"503 Service Unavailable")


@pytest.mark.parametrize("start", [REFUSAL_HEADERS, REFUSAL_THEN_BODY], ids=["headers", "body"])
def test_a_broker_that_trickles_its_answer_is_cut_at_the_timeout_and_the_event_stays_due(clean_db, start):
    # requests' timeout bounds each read: a byte every 0.2 s would hold the
    # drain (and every later event) for as long as the Broker likes.
    (event_id,) = pending(clean_db, "OutA")
    with Trickler(start) as broker:
        ended, report, took = run_bounded(lambda: outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=0.5), 6)
    assert ended, "the publish outlived its timeout"
    assert took < 2.5
    assert report.published == [] and not report.broker_unreachable
    assert report.failed[event_id].startswith("ReadTimeout: "), report.failed
    stored = rows(clean_db)[event_id]
    # A failed attempt, retried at the next sweep: the event stays in the outbox.
    assert stored.published_at is None and stored.attempts == 1 and stored.next_attempt_at is not None
    assert outbox.pending_count(clean_db) == 1


@pytest.mark.parametrize("start", [STATUS_LINE, HEADERS_THEN_BODY.replace(b"200 OK", b"202 Accepted")], ids=["headers", "body"])
def test_a_2xx_whose_answer_is_still_coming_at_the_timeout_is_a_publish(clean_db, start):
    # The Broker said 2xx: it has the event. Sending it again (and parking it
    # after eight such "failures") would publish it over and over.
    (event_id,) = pending(clean_db, "OutA")
    with Trickler(start) as broker:
        ended, report, took = run_bounded(lambda: outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=0.5), 6)
        sent = broker.requests
    assert ended and took < 2.5
    assert report.published == [event_id] and report.failed == {}, report.failed
    assert sent == 1
    stored = rows(clean_db)[event_id]
    assert stored.published_at is not None and stored.attempts == 0


def test_a_2xx_whose_connection_drops_inside_the_body_is_a_publish(clean_db):
    (event_id,) = pending(clean_db, "OutA")
    with OneAnswer(b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\nok") as broker:
        report = outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=2.0)
    assert report.published == [event_id] and report.failed == {}, report.failed
    assert broker.requests == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\nok",  # dropped inside the body
    b"HTTP/1.1 202 Accepted\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",  # undecodable
    b"HTTP/1.1 202 Accepted\r\nContent-Type: text/plain; charset=idna\r\nContent-Length: 3\r\n\r\nok\xff",  # no charset to read
], ids=["chunked", "decoding", "idna"])
def test_a_2xx_whose_body_is_broken_is_a_publish_sent_once(clean_db, answer):
    ids = events_at(clean_db, 2)
    with OneAnswer(answer) as broker:
        report = outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=2.0)
    assert report.published == ids and report.failed == {} and not report.broker_unreachable, report
    assert broker.requests == 2
    assert [rows(clean_db)[i].attempts for i in ids] == [0, 0]


def test_a_refusal_in_a_host_name_charset_is_the_brokers_answer_with_its_words(clean_db):
    (event_id,) = pending(clean_db, "OutA")
    answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=idna\r\nContent-Length: 7\r\n\r\nbusy \xff!"
    with OneAnswer(answer) as broker:
        report = outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=2.0)
    assert report.failed == {event_id: "BrokerAnswered: broker answered 503: busy \ufffd!"} and not report.broker_unreachable


def test_a_redirect_whose_location_is_not_utf8_is_a_refusal_not_an_unusable_k_sink(clean_db, caplog):
    # requests decodes the Location even when it does not follow it: the
    # UnicodeDecodeError was taken for K_SINK's fault, and the drain stopped
    # on every run ("K_SINK is not a URL") for what the Broker answered.
    ids = events_at(clean_db, 2)
    redirect = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /\xff\xfe\r\nContent-Length: 0\r\n\r\n"
    with caplog.at_level(logging.WARNING, logger="outbox"), OneAnswer(redirect) as broker:
        report = outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=2.0)
    assert not report.broker_unreachable and not report.sink_unusable, report
    assert sorted(report.failed) == ids and all(e.startswith("BrokerAnswered: broker answered 307") for e in report.failed.values())
    assert broker.requests == 2
    assert not [r for r in caplog.records if "K_SINK" in r.getMessage()]


def test_a_refusal_whose_connection_drops_inside_the_body_is_one_failed_attempt_not_an_outage(clean_db):
    # A Broker that answered was reached: no second POST at once, and the
    # attempt counts against the event instead of reporting the Broker down.
    (event_id,) = pending(clean_db, "OutA")
    with OneAnswer(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\nno") as broker:
        report = outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=2.0)
    assert report.published == [] and not report.broker_unreachable
    assert report.failed[event_id].startswith("ChunkedEncodingError"), report.failed
    assert broker.requests == 1
    assert rows(clean_db)[event_id].attempts == 1


@pytest.mark.parametrize("sink", ["http://" + "b" * 64 + ".example/ns/default", "broker.example/ns/default"],
                         ids=["label-over-63", "no-scheme"])
def test_a_k_sink_no_request_can_be_made_to_stops_the_drain_counts_nothing_and_says_so(clean_db, caplog, sink):
    # Not the events' fault and not mended by a retry: before, urllib3's
    # LocationParseError was counted against every event until each parked.
    ids = pending(clean_db, "OutA", "OutB", "OutC")
    http = deadline.bounded(CountingSession())
    with caplog.at_level(logging.WARNING, logger="outbox"):
        report = outbox.publish_pending(clean_db, sink, timeout=1, http=http)
    # At most one try (no scheme is refused before the session's post).
    assert http.posted in ([], [ids[0]])
    assert report.broker_unreachable and report.failed == {} and report.published == [] and report.parked == []
    assert report.broker_error.startswith(("InvalidURL: ", "InvalidSchema: ", "MissingSchema: ")), report.broker_error
    stored = rows(clean_db)
    assert [stored[i].attempts for i in ids] == [0, 0, 0] and outbox.pending_count(clean_db) == 3
    assert all(stored[i].claimed_until is None and stored[i].next_attempt_at is None for i in ids)
    assert stored[ids[0]].last_error == report.broker_error
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.getMessage() == "K_SINK is not a URL an event can be sent to; events stay in the outbox"
    # Said once, as what it is: no "Broker unreachable" warning after it.
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\nno",  # dropped inside the body
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",  # undecodable
], ids=["chunked", "decoding"])
def test_a_refusal_whose_body_is_broken_shows_the_broker_is_up_so_a_dropped_connection_after_it_is_the_events_own(clean_db, answer):
    # The Broker answered (its status line and headers): reached, as a
    # refusal with a whole body is. The next event's dropped connection is
    # that event's failure, not an outage that hands it back uncounted.
    ids = events_at(clean_db, 2)
    with OneAnswer(answer) as broker:
        report = outbox.publish_pending(clean_db, broker.url + "/ns/default", timeout=2.0,
                                        http=deadline.bounded(DroppingSession(ids[1])))
    assert sorted(report.failed) == ids and not report.broker_unreachable, report
    assert report.failed[ids[0]].startswith(("ChunkedEncodingError", "ContentDecodingError")), report.failed
    assert [rows(clean_db)[i].attempts for i in ids] == [1, 1]


class TlsBrokenInsideRefusalSession(CountingSession):
    """Each POST is answered 503, and TLS fails inside that answer's body:
    requests' SSLError (a ConnectionError) carrying the answer."""

    def post(self, *args, **kwargs):
        self.posted.append(kwargs["headers"].get("ce-id", "structured"))
        answer = requests.Response()
        answer.status_code = 503
        raise requests.exceptions.SSLError("decryption failed or bad record mac", response=answer)


def test_tls_failing_inside_a_refusal_is_the_brokers_answer_not_an_outage_and_not_sent_again_at_once(clean_db):
    # Caught as a ConnectionError first, it was "Broker not reached": posted
    # again at once (a stale kept-alive connection's retry), and after two
    # the drain stopped, reporting the Broker down, counting nothing.
    ids = events_at(clean_db, 3)
    http = deadline.bounded(TlsBrokenInsideRefusalSession())
    report = outbox.publish_pending(clean_db, "http://broker.invalid/ns/default", timeout=1.0, http=http)
    assert http.posted == ids  # once each
    assert sorted(report.failed) == ids and not report.broker_unreachable, report
    assert all(e.startswith("SSLError") for e in report.failed.values())
    assert [rows(clean_db)[i].attempts for i in ids] == [1, 1, 1]


def test_tls_failing_inside_a_refusal_to_a_redelivery_says_the_broker_answered():
    from shared import backlog

    http = deadline.bounded(TlsBrokenInsideRefusalSession())
    error = backlog.send(http, "http://broker.invalid/ns/default", b'{"id": "ev-1"}', 1.0)
    assert error == "SSLError: the Broker answered 503 and its answer could not be read", error


def test_an_unusable_proxy_url_is_named_as_the_proxy_setting_not_k_sink(clean_db, caplog):
    ids = pending(clean_db, "OutA")
    http = deadline.bounded(requests.Session())
    http.proxies = {"http": "http://"}
    with caplog.at_level(logging.WARNING, logger="outbox"):
        report = outbox.publish_pending(clean_db, "http://broker.example/ns/default", timeout=1, http=http)
    assert report.sink_unusable and report.failed == {} and rows(clean_db)[ids[0]].attempts == 0
    assert [r.getMessage() for r in caplog.records] == [
        "HTTP_PROXY/HTTPS_PROXY is not a URL an event can be sent to; events stay in the outbox"]
