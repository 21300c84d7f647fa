"""Group commit: concurrent webhooks share transactions, each answered from
its own slice, and one bad webhook fails nobody else."""

import threading
import time

import sqlalchemy as sa

from functions.intake.batching import GroupCommit
from shared import incidents as svc
from tests.factories import alert


def writer(engine, calls):
    def write(alerts):
        calls.append(len(alerts))
        time.sleep(0.05)  # a transaction in flight, so others queue behind it
        with engine.begin() as conn:
            return svc.record_alerts(conn, alerts, "/t", "alertmanager")
    return write


def test_concurrent_submissions_share_transactions_and_get_their_own_outcomes(clean_db):
    calls = []
    batcher = GroupCommit(writer(clean_db, calls))
    results, barrier = {}, threading.Barrier(10)

    def go(i):
        barrier.wait()
        results[i] = batcher.submit([alert(f"Group{i}"), alert(f"Group{i}", instance="b")])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(calls) == 20 and len(calls) < 10
    for result in results.values():
        assert [o.action for o in result.outcomes] == ["created", "created"]
        assert len(result.event_ids) == 2
        assert all(e.split(".")[0] in {o.incident_id for o in result.outcomes} for e in result.event_ids)
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar() == 20


def test_a_lone_submission_is_written_at_once(clean_db):
    calls = []
    batcher = GroupCommit(writer(clean_db, calls))
    assert batcher.submit([alert("Alone")]).outcomes[0].action == "created"
    assert calls == [1]


def test_a_failing_webhook_fails_only_itself(clean_db):
    def write(alerts):
        if any(a.alert_name == "Poison" for a in alerts):
            raise ValueError("cannot store this one")
        with clean_db.begin() as conn:
            return svc.record_alerts(conn, alerts, "/t", "alertmanager")

    batcher = GroupCommit(write)
    batcher._flushing = True  # hold the queue so all three land in one batch
    outcomes = {}

    def go(name):
        try:
            outcomes[name] = batcher.submit([alert(name)]).outcomes[0].action
        except ValueError as exc:
            outcomes[name] = str(exc)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("Good1", "Poison", "Good2")]
    for t in threads:
        t.start()
    time.sleep(0.2)
    batcher._flushing = False
    batcher._drain()
    for t in threads:
        t.join()
    assert outcomes == {"Good1": "created", "Poison": "cannot store this one", "Good2": "created"}
