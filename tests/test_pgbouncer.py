"""The functions through a real PgBouncer in transaction pooling mode with a
server pool smaller than the function's own pool and threads (always run;
``TEST_THROUGH_PGBOUNCER=1`` runs the whole suite through one as well).

In transaction pooling every transaction may get another server
connection: whatever outlived a transaction (a named prepared statement, a
session setting, a session advisory lock) would fail here or be left
behind on a server connection that someone else gets next."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
import requests
import sqlalchemy as sa

from loopback import pgbouncer
from loopback.pgbouncer import PgBouncer
from loopback.processes import FunctionProcess, wait_until
from shared import db, migrate
from tests.conftest import TEST_TOKEN, _server_url, _with_database
from tests.factories import raw_alert, webhook
from tests.test_db_bounds import assert_prompt_503, bounded_intake, incidents_locked, post_webhook

pytestmark = pytest.mark.skipif(pgbouncer.binary() is None, reason="pgbouncer is not installed (scripts/ensure-system-packages.sh)")

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture
def bouncer():
    proxy = PgBouncer(_server_url(), pool_size=2).start()
    yield proxy
    proxy.stop()


def _webhook(run: str, i: int) -> dict:
    labels = {"alertname": "Bounced", "severity": "critical", "run": run, "i": str(i)}
    return {"version": "4", "status": "firing", "receiver": "t", "groupKey": "{}",
            "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "through PgBouncer"},
                        "startsAt": "2026-11-28T10:00:00Z"}]}


def test_intake_and_query_work_through_transaction_pooling_with_two_server_connections(clean_db, database_url, base_env, bouncer):
    url = bouncer.url(urlsplit(database_url).path.strip("/"))
    # Eight request threads and a pool of 4 + 4 per function, two server connections.
    env = {**base_env, "DATABASE_URL": url, "DB_POOL_SIZE": "4", "DB_MAX_OVERFLOW": "4"}
    intake = FunctionProcess("intake", env, threads=8).start()
    query = FunctionProcess("query", env, threads=8).start()
    run, statuses, errors = uuid.uuid4().hex[:8], [], []

    def client(n: int) -> None:
        http = requests.Session()
        try:
            for i in range(10):
                response = http.post(intake.url + "/webhook/alert", json=_webhook(run, n * 100 + i), headers=AUTH, timeout=30)
                statuses.append(response.status_code)
                # A read right after the write, maybe on another server connection.
                incident_id = response.json()["results"][0]["incident_id"]
                got = http.get(f"{query.url}/incidents/{incident_id}", headers=AUTH, timeout=30)
                statuses.append(got.status_code)
                if got.status_code == 200:
                    patched = http.patch(f"{query.url}/incidents/{incident_id}", json={"status": "investigating"}, headers=AUTH, timeout=30)
                    statuses.append(patched.status_code)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    with clean_db.connect() as conn:
        counts = conn.execute(sa.text("SELECT count(*), count(*) FILTER (WHERE status = 'investigating') FROM incidents "
                                      "WHERE labels->>'run' = :r"), {"r": run}).one()
    assert tuple(counts) == (80, 80)
    log = bouncer.log()
    assert "prepared statement" not in log and "ERROR" not in log, log[-2000:]
    for process in (intake, query):
        assert "Traceback" not in process.logs(), process.logs()[-3000:]
    intake.stop(), query.stop()


def test_migrations_run_through_transaction_pooling_and_leave_no_lock_behind(bouncer):
    name = f"ir_bounce_{uuid.uuid4().hex[:8]}"
    admin = _with_database(_server_url(), "postgres")
    db.run_outside_transaction(admin, f'CREATE DATABASE "{name}"')
    try:
        url = bouncer.url(name)
        migrate.upgrade(url)
        migrate.upgrade(url)  # a second replica's run: nothing to do, and it is not blocked
        direct = db.create_engine_for(_with_database(_server_url(), name), pool_size=1, max_overflow=0)
        try:
            with direct.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
                held = conn.execute(sa.text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                                            "WHERE l.locktype = 'advisory' AND d.datname = :n"), {"n": name}).scalar()
                assert held == 0
        finally:
            direct.dispose()
    finally:
        db.run_outside_transaction(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_bounds_hold_through_pgbouncer_and_no_server_connection_keeps_them(clean_db, database_url, base_env, bouncer):
    """The intake's lock_timeout (SET LOCAL, in its BEGIN's message) works
    through transaction pooling, and ends with the transaction: the server
    connections another client gets next carry none of it."""
    url = bouncer.url(urlsplit(database_url).path.strip("/"))
    intake = bounded_intake({**base_env, "DATABASE_URL": url})
    payload = webhook([raw_alert("Bounced", run=uuid.uuid4().hex)])
    with incidents_locked(clean_db):
        response, took = post_webhook(intake.url, payload)
    assert_prompt_503(response, took, "lock_timeout")
    response, _ = post_webhook(intake.url, payload)
    assert response.status_code == 200 and response.json()["results"][0]["action"] == "created"
    intake.stop()
    # Both server connections at once (two open transactions of a client
    # without bounds): neither carries the intake's settings.
    plain = db.create_engine_for(url, pool_size=2, max_overflow=0)
    try:
        with plain.connect() as one, plain.connect() as two:
            seen = [(c.execute(sa.text("SELECT pg_backend_pid()")).scalar(), c.execute(sa.text("SHOW lock_timeout")).scalar(),
                     c.execute(sa.text("SHOW statement_timeout")).scalar()) for c in (one, two)]
            one.rollback(), two.rollback()
    finally:
        plain.dispose()
    assert seen[0][0] != seen[1][0] and [values for _, *values in seen] == [["0", "0"], ["0", "0"]], seen
    assert "ERROR" not in bouncer.log(), bouncer.log()[-2000:]


def test_a_transaction_left_idle_behind_pgbouncer_is_named_as_the_idle_bound_and_only_its_connection_replaced(database_url, bouncer, caplog):
    """The server ends the idle session; PgBouncer then closes its client
    with a FATAL of its own (08P01, "server conn crashed?"), not the
    server's 25P03, and says the same of any server connection lost. The
    transaction sat idle at least its idle bound, so the server presumably
    ended it for that: named so (a 503 naming the bound), and only that
    connection is replaced. It is an inference, and the log line and the
    503's message say so, with the idle time measured."""
    caplog.set_level(logging.WARNING)
    url = bouncer.url(urlsplit(database_url).path.strip("/"))
    engine = db.create_engine_for(url, pool_size=2, max_overflow=0, bounds=db.Bounds(0, 0, 0.3))
    try:
        with engine.connect() as idle, engine.connect() as other:
            idle.execute(sa.text("SELECT 1"))
            other.execute(sa.text("SELECT 1"))
            other.commit()
            wait_until(lambda: "server conn crashed" in bouncer.log(), 10, message="the server to end the idle session")
            with pytest.raises(sa.exc.DBAPIError) as caught:
                idle.execute(sa.text("SELECT 1"))
            assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("08P01", db.IDLE_TIMEOUT)
            assert db.is_transient(caught.value) and caught.value.connection_invalidated
            assert re.fullmatch(r"idle_in_transaction_session_timeout \(presumed: 08P01 server conn crashed\? "
                                r"after \d+\.\d s idle in transaction, idle bound 0\.3 s\)", db.bound_described(caught.value))
            kept = other.connection.dbapi_connection
        with engine.connect() as one, engine.connect() as two:
            assert one.execute(sa.text("SELECT 1")).scalar() == two.execute(sa.text("SELECT 1")).scalar() == 1
            assert kept in (one.connection.dbapi_connection, two.connection.dbapi_connection)  # not the whole pool
    finally:
        engine.dispose()
    (line,) = [r.getMessage() for r in caplog.records if "server had already closed" in r.getMessage()]
    assert re.search(r"\(08P01 server conn crashed\? after \d+\.\d s idle in transaction \(idle bound 0\.3 s\): "
                     r"presumed idle_in_transaction_session_timeout\)$", line), line


def test_a_connection_lost_behind_pgbouncer_before_the_idle_bound_is_not_named_as_it(database_url, bouncer):
    """The same FATAL for a server connection terminated while the
    transaction had sat idle less than its bound: transient, not named."""
    url = bouncer.url(urlsplit(database_url).path.strip("/"))
    engine = db.create_engine_for(url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 0, 60))
    direct = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            with direct.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            wait_until(lambda: "server conn crashed" in bouncer.log(), 10, message="PgBouncer to lose the server connection")
            with pytest.raises(sa.exc.DBAPIError) as caught:
                conn.execute(sa.text("SELECT 1"))
            assert db.sqlstate(caught.value) == "08P01" and db.bound_reached(caught.value) is None
            assert db.is_transient(caught.value)
    finally:
        engine.dispose(), direct.dispose()


def test_a_deadline_counts_the_wait_in_pgbouncers_queue(database_url):
    """A transaction's BEGIN may wait in PgBouncer's queue for a server
    connection; the server's clock of the transaction (now()) starts only
    after it. The deadline counts the wait all the same: of 3 s, after
    about 2 s in the queue, the next statement has what is left, not the
    3 s the server reckons from its start (which would let its 2.5 s run)."""
    bouncer = PgBouncer(_server_url(), pool_size=1).start()
    url = bouncer.url(urlsplit(database_url).path.strip("/"))
    holder = db.create_engine_for(url, pool_size=1, max_overflow=0)
    engine = db.create_engine_for(url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 30))
    try:
        with engine.connect() as conn:  # its client connection made before the wait
            conn.execute(sa.text("SELECT 1"))
        with holder.connect() as held:
            held.execute(sa.text("SELECT 1"))  # the only server connection, until it rolls back
            queued_at = time.monotonic()

            def release() -> None:
                wait_until(lambda: time.monotonic() - queued_at >= 2.0, 10, message="2 s in PgBouncer's queue")
                held.rollback()

            releaser = threading.Thread(target=release)
            releaser.start()
            try:
                with db.deadline(3.0), pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as tx:
                    tx.execute(sa.text("SELECT 1"))  # waits in the queue
                    tx.execute(sa.text("SELECT pg_sleep(2.5)"))
            finally:
                releaser.join(30)
        assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("57014", db.STATEMENT_TIMEOUT)
    finally:
        engine.dispose(), holder.dispose()
        bouncer.stop()


def _own_timeout_bouncer(**settings) -> PgBouncer:
    return PgBouncer(_server_url(), pool_size=2, settings={name: str(value) for name, value in settings.items()}).start()


def test_pgbouncers_own_idle_transaction_timeout_is_named_as_its_bound(database_url):
    """PgBouncer's own bounds end the client's connection with a FATAL
    08P01 whose fixed text names which (PgBouncer has no translations)."""
    bouncer = _own_timeout_bouncer(idle_transaction_timeout=1)
    engine = db.create_engine_for(bouncer.url(urlsplit(database_url).path.strip("/")), pool_size=1, max_overflow=0,
                                  bounds=db.Bounds(0, 0, 60))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            wait_until(lambda: "idle transaction timeout" in bouncer.log(), 10, message="PgBouncer's idle_transaction_timeout")
            with pytest.raises(sa.exc.DBAPIError) as caught:
                conn.execute(sa.text("SELECT 1"))
        assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("08P01", db.PGBOUNCER_IDLE_TRANSACTION_TIMEOUT)
        assert db.is_transient(caught.value) and caught.value.connection_invalidated
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
        bouncer.stop()


def test_pgbouncers_query_wait_timeout_is_named_as_its_bound(database_url):
    """A client that waits longer than PgBouncer's query_wait_timeout for a
    server connection (the only one is held by another transaction)."""
    bouncer = PgBouncer(_server_url(), pool_size=1, settings={"query_wait_timeout": "1"}).start()
    url = bouncer.url(urlsplit(database_url).path.strip("/"))
    holder = db.create_engine_for(url, pool_size=1, max_overflow=0)
    engine = db.create_engine_for(url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 0, 60))
    try:
        with holder.connect() as held:
            held.execute(sa.text("SELECT 1"))
            with pytest.raises(sa.exc.DBAPIError) as caught, engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            held.rollback()
        assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("08P01", db.PGBOUNCER_QUERY_WAIT_TIMEOUT)
        assert db.is_transient(caught.value)
    finally:
        engine.dispose(), holder.dispose()
        bouncer.stop()


def test_pgbouncers_query_timeout_answers_503_naming_it(database_url, clean_db, base_env):
    """A request waiting on a lock longer than PgBouncer's query_timeout
    (and shorter than its own lock bound): PgBouncer ends it, and the
    function answers 503 naming PgBouncer's bound, not 500."""
    bouncer = _own_timeout_bouncer(query_timeout=1)
    query = None
    try:
        url = bouncer.url(urlsplit(database_url).path.strip("/"))
        query = FunctionProcess("query", {**base_env, "DATABASE_URL": url, "DB_LOCK_TIMEOUT_SECONDS": "5"}, threads=2).start()
        assert requests.get(query.url + "/incidents", headers=AUTH, timeout=30).status_code == 200
        with incidents_locked(clean_db):
            response = requests.get(query.url + "/incidents", headers=AUTH, timeout=60)
        assert response.status_code == 503 and response.headers.get("Retry-After") == "5", response.text
        assert response.json()["bound"] == db.PGBOUNCER_QUERY_TIMEOUT, response.text
        assert requests.get(query.url + "/incidents", headers=AUTH, timeout=30).status_code == 200
        assert "Traceback" not in query.logs(), query.logs()[-3000:]
        assert f"Database {db.PGBOUNCER_QUERY_TIMEOUT} reached; rolled back, answered 503" in query.logs()
    finally:
        if query is not None:
            query.stop()
        bouncer.stop()
