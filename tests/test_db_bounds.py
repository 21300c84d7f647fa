"""How long a request waits on the database (shared/db.py Bounds): a lock
held elsewhere (a migration's ACCESS EXCLUSIVE, another replica's stuck
transaction) or a runaway statement gets a prompt 503 with Retry-After, so
AlertManager and the Broker retry, instead of a request that waits for as
long as the client's socket timeout (or Knative's request timeout); nothing
of it is committed, and the bounds end with each transaction, pooled or
behind PgBouncer.

Each test holds the lock from a connection of its own and sets the bound
small through the function's environment; nothing sleeps but the bound."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess, wait_until
from shared import db
from tests.conftest import TEST_TOKEN, needs_own_backend, proxied_database
from tests.factories import raw_alert, webhook

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
# Small, so a test waits for it; far below DB_TIMEOUT_SECONDS (10), the
# client's socket timeout, which answered such a request before (after 10 s).
LOCK_TIMEOUT = 0.3
# What a prompt answer is: the bound, a batch or two queued behind it, and a loaded machine.
PROMPT = 4.0


@contextmanager
def incidents_locked(engine):
    """``incidents`` locked ACCESS EXCLUSIVE, as a migration altering it
    locks it, by a transaction of another connection until the block ends."""
    with engine.connect() as conn:
        conn.execute(sa.text("LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            conn.rollback()


def post_webhook(url: str, payload: dict) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.post(url + "/webhook/alert", json=payload, headers=AUTH, timeout=60)
    return response, time.monotonic() - started


def assert_prompt_503(response: requests.Response, took: float, bound: str) -> None:
    assert took < PROMPT, f"answered {response.status_code} after {took:.1f} s"
    assert response.status_code == 503, response.text
    assert response.headers.get("Retry-After") == "5"
    assert response.json()["bound"] == bound, response.text


def _incidents_named(engine, name: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM incidents WHERE alert_name = :n"), {"n": name}).scalar()


def bounded_intake(env: dict) -> FunctionProcess:
    intake = FunctionProcess("intake", {**env, "DB_LOCK_TIMEOUT_SECONDS": str(LOCK_TIMEOUT)}).start()
    # The routes are built (and the pool opened) before the table is locked.
    assert post_webhook(intake.url, webhook([raw_alert("Warm", run=uuid.uuid4().hex)]))[0].status_code == 200
    return intake


def test_the_intake_answers_503_promptly_while_incidents_is_locked_and_takes_the_same_webhook_after(base_env, clean_db):
    intake = bounded_intake(base_env)
    # Several webhooks at once: the group commit writes them in shared
    # transactions, and every request of a batch that met the bound gets it.
    payloads = [webhook([raw_alert("Locked", run=str(i))]) for i in range(6)]
    answers: list = [None] * len(payloads)

    def send(i: int) -> None:
        answers[i] = post_webhook(intake.url, payloads[i])

    with incidents_locked(clean_db):
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for response, took in answers:
        assert_prompt_503(response, took, "lock_timeout")
    assert "database lock_timeout reached, rolled back" in intake.logs()
    assert _incidents_named(clean_db, "Locked") == 0  # nothing of a 503 was committed

    for payload in payloads:  # AlertManager's retry, once the lock is gone
        response, _ = post_webhook(intake.url, payload)
        assert response.status_code == 200, response.text
        assert [r["action"] for r in response.json()["results"]] == ["created"]
    assert _incidents_named(clean_db, "Locked") == len(payloads)
    assert "Traceback" not in intake.logs()
    intake.stop()


def test_a_runaway_statement_is_cut_by_the_statement_timeout_with_a_503(base_env, clean_db):
    # No lock_timeout (0 leaves the server's, none): the lock wait runs until
    # the statement's own bound, as a slow statement would.
    env = {**base_env, "DB_LOCK_TIMEOUT_SECONDS": "0", "DB_STATEMENT_TIMEOUT_SECONDS": "0.5"}
    query = FunctionProcess("query", env, threads=2).start()
    assert requests.get(query.url + "/incidents", headers=AUTH, timeout=30).status_code == 200
    with incidents_locked(clean_db):
        started = time.monotonic()
        response = requests.get(query.url + "/incidents", headers=AUTH, timeout=60)
        assert_prompt_503(response, time.monotonic() - started, "statement_timeout")
    assert "Database statement_timeout reached; rolled back, answered 503" in query.logs()
    assert requests.get(query.url + "/incidents", headers=AUTH, timeout=30).status_code == 200
    query.stop()


def test_a_query_endpoint_answers_503_promptly_while_incidents_is_locked(base_env, clean_db):
    query = FunctionProcess("query", {**base_env, "DB_LOCK_TIMEOUT_SECONDS": str(LOCK_TIMEOUT)}, threads=2).start()
    assert requests.get(query.url + "/incidents", headers=AUTH, timeout=30).status_code == 200
    with incidents_locked(clean_db):
        started = time.monotonic()
        response = requests.get(query.url + "/incidents", headers=AUTH, timeout=60)
        assert_prompt_503(response, time.monotonic() - started, "lock_timeout")
    assert "Database lock_timeout reached; rolled back, answered 503" in query.logs()
    assert requests.get(query.url + "/incidents", headers=AUTH, timeout=30).status_code == 200
    query.stop()


@needs_own_backend
def test_the_bounds_end_with_the_transaction_on_the_pooled_connection(database_url):
    bounds = db.Bounds(LOCK_TIMEOUT, 2.0, 5.0)
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=bounds)
    try:
        with engine.begin() as tx:
            pid = tx.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            inside = [tx.execute(sa.text(f"SHOW {name}")).scalar()
                      for name in ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")]
        assert inside == ["300ms", "2s", "5s"]
        # The same connection back from the pool, outside any transaction.
        with engine.connect() as conn:
            outside = conn.execution_options(isolation_level="AUTOCOMMIT")
            assert outside.execute(sa.text("SELECT pg_backend_pid()")).scalar() == pid
            assert outside.execute(sa.text("SHOW lock_timeout")).scalar() == "0"
            assert outside.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
            assert outside.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar() == "0"
        # The sweep's bounds replace the engine's for the transactions begun inside the block only.
        with db.bounded(db.Bounds(1.0, 9.0)), engine.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "9s"
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "2s"
    finally:
        engine.dispose()


def test_the_bounds_cost_no_round_trip(database_url):
    """They travel in the BEGIN's message, which travels with the first
    statement: a transaction of one statement is still two round trips."""
    with proxied_database(database_url) as (proxy, url):
        engine = db.create_engine_for(url, pool_size=1, max_overflow=0, bounds=db.Bounds(LOCK_TIMEOUT, 2.0, 5.0))
        try:
            with engine.begin() as tx:
                tx.execute(sa.text("SELECT 1"))
            before = proxy.round_trips
            with engine.begin() as tx:
                assert tx.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar() == "300ms"
            assert proxy.round_trips - before == 2  # BEGIN + SET LOCALs + SELECT, then COMMIT
        finally:
            engine.dispose()


def test_an_engine_without_bounds_has_none(database_url):
    """The migrations' engine (migrations/env.py), and every one made
    without ``bounds``, keeps the server's settings, even inside bounded()."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        with db.bounded(db.Bounds(1.0, 9.0)), engine.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
    finally:
        engine.dispose()


@needs_own_backend
def test_a_transaction_left_idle_is_ended_by_the_server_named_and_only_its_connection_replaced(database_url, engine):
    """A request stuck mid-transaction frees what it locked: the server ends
    the session after the idle bound. Its FATAL (25P03), sent before the
    socket closed, is what the stuck request's next statement raises (not a
    bare network error): transient, named as the idle bound (the 503 and the
    log say so), and only that connection is replaced, not the whole pool."""
    bounded_engine = db.create_engine_for(database_url, pool_size=2, max_overflow=0, bounds=db.Bounds(0, 0, LOCK_TIMEOUT))
    try:
        with bounded_engine.connect() as first, bounded_engine.connect() as second:
            pooled = {c.execute(sa.text("SELECT pg_backend_pid()")).scalar() for c in (first, second)}
        with bounded_engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()

            def gone() -> bool:
                with engine.connect() as look:
                    return not look.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar()

            wait_until(gone, 10, message="the server to end the idle transaction's session")
            with pytest.raises(sa.exc.DBAPIError) as caught:
                conn.execute(sa.text("SELECT 1"))
            assert db.sqlstate(caught.value) == "25P03"
            assert db.bound_reached(caught.value) == db.IDLE_TIMEOUT
            assert db.is_transient(caught.value) and caught.value.connection_invalidated
        with bounded_engine.connect() as first, bounded_engine.connect() as second:
            now = {c.execute(sa.text("SELECT pg_backend_pid()")).scalar() for c in (first, second)}
        assert pid not in now and now & (pooled - {pid}) == pooled - {pid}, (pooled, pid, now)
    finally:
        bounded_engine.dispose()


def _ended(engine, pid: int) -> bool:
    with engine.connect() as look:
        return not look.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar()


def _discards_logged(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("sqlalchemy", "shared")) and r.levelno >= logging.WARNING]


@needs_own_backend
@pytest.mark.parametrize("ended_by", ["idle bound", "pg_terminate_backend", "idle bound, found by the pool's rollback"])
def test_a_connection_the_server_ended_is_discarded_with_one_warning_line_not_a_traceback(database_url, engine, caplog, ended_by):
    """Discarding the dead connection, SQLAlchemy's close (or rollback) meets
    the socket the server shut and logged that at ERROR with a full
    traceback, under a request already answered 503: one WARNING line
    naming why the server ended the session instead."""
    caplog.set_level(logging.WARNING)
    bounded_engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 0, LOCK_TIMEOUT))

    def wait_for_the_end_of(pid: int) -> None:
        def gone() -> bool:
            with engine.connect() as look:
                return not look.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar()

        wait_until(gone, 10, message="the server to end the session")

    try:
        if ended_by.endswith("rollback"):
            raw = bounded_engine.raw_connection()  # returned to the pool unrolled back: its reset rolls back
            cursor = raw.cursor()
            cursor.execute("SELECT pg_backend_pid()")
            wait_for_the_end_of(cursor.fetchone()[0])
            raw.close()
        else:
            with bounded_engine.connect() as conn:
                pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
                if ended_by == "pg_terminate_backend":
                    with engine.connect() as other:
                        other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                wait_for_the_end_of(pid)
                with pytest.raises(sa.exc.DBAPIError) as caught:
                    conn.execute(sa.text("SELECT 1"))
                assert db.is_transient(caught.value) and caught.value.connection_invalidated
        with bounded_engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        bounded_engine.dispose()
    logged = _discards_logged(caplog)
    assert [(r.levelname, r.exc_info) for r in logged] == [("WARNING", None)], caplog.text
    line = logged[0].getMessage()
    assert "\n" not in line, line
    expected = "57P01: terminating connection" if ended_by == "pg_terminate_backend" else "25P03 idle_in_transaction_session_timeout: "
    assert "server had already closed" in line and expected in line, line


def test_a_close_that_fails_any_other_way_is_still_an_error_with_its_traceback(database_url, caplog):
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 0, LOCK_TIMEOUT))
    try:
        pool_logger = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
        try:
            raise RuntimeError("a close that went wrong here")
        except RuntimeError:
            pool_logger.error("Exception closing connection %r", object(), exc_info=True)
    finally:
        engine.dispose()
    (record,) = [r for r in caplog.records if r.name == "sqlalchemy.pool.impl.QueuePool"]
    assert record.levelname == "ERROR" and record.exc_info and record.exc_info[0] is RuntimeError


@needs_own_backend
def test_a_reset_failing_on_a_healthy_connection_while_another_ones_end_propagates_is_logged_in_full(database_url, engine, caplog):
    """Connection B's reset fails for a reason of its own (a bug, here a
    reset listener that raises) while the FATAL that ended connection A's
    session propagates through B's block: B's failure is no session the
    server ended, and is logged with its traceback; A's discard is the one
    WARNING line."""
    caplog.set_level(logging.WARNING)
    bounded_engine = db.create_engine_for(database_url, pool_size=2, max_overflow=0, bounds=db.Bounds(0, 0, 0))

    @sa.event.listens_for(bounded_engine, "reset")
    def a_bug_in_the_reset(dbapi_connection, record, state):
        if getattr(dbapi_connection, "healthy_b", False):
            raise RuntimeError("a bug in the reset of a healthy connection")

    try:
        with pytest.raises(sa.exc.DBAPIError) as caught, bounded_engine.connect() as b:
            b.execute(sa.text("SELECT 1"))
            b.connection.dbapi_connection.healthy_b = True
            with bounded_engine.connect() as a:
                pid = a.execute(sa.text("SELECT pg_backend_pid()")).scalar()
                with engine.connect() as other:
                    other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                wait_until(lambda: _ended(engine, pid), 10, message="the server to end A's session")
                a.execute(sa.text("SELECT 1"))
        assert db.sqlstate(caught.value) == "57P01"
    finally:
        bounded_engine.dispose()
    logged = _discards_logged(caplog)
    assert [r.getMessage() for r in logged if "server had already closed" in r.getMessage()] == [
        "Discarded a database connection the server had already closed (57P01: terminating connection due to administrator command)"
    ], caplog.text
    (reset,) = [r for r in logged if r.exc_info and r.exc_info[0] is RuntimeError]
    assert reset.levelname == "ERROR" and reset.getMessage().startswith("Exception during reset"), caplog.text


def test_a_reset_failing_with_an_oserror_of_its_own_is_logged_in_full(database_url, caplog):
    """An OSError is not the other end's doing unless it is the connection's
    (a reset, a close): a file of ours missing is a bug, logged in full."""
    caplog.set_level(logging.WARNING)
    bounded_engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 0, 0))

    @sa.event.listens_for(bounded_engine, "reset")
    def a_bug_in_the_reset(dbapi_connection, record, state):
        open("/nonexistent/a-file-of-ours")

    try:
        with bounded_engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        bounded_engine.dispose()
    logged = _discards_logged(caplog)
    assert not [r for r in logged if "server had already closed" in r.getMessage()], caplog.text
    (reset,) = [r for r in logged if r.exc_info and r.exc_info[0] is FileNotFoundError]
    assert reset.levelname == "ERROR" and reset.getMessage().startswith("Exception during reset"), caplog.text


def test_a_client_read_timeout_is_not_taken_for_a_session_the_server_ended(database_url, caplog):
    """DB_TIMEOUT_SECONDS, this client's socket timeout, ends a read that
    waited too long: pg8000 reports it as the same network error as a
    socket the server shut, but the server ended nothing (it may still be
    running the statement). The connection is discarded, transient (a 503),
    without the line that says the server closed it."""
    caplog.set_level(logging.WARNING)
    timed = db.create_engine_for(database_url, pool_size=1, max_overflow=0, timeout=0.3, bounds=db.Bounds(0, 0, 0))
    try:
        with pytest.raises(sa.exc.DBAPIError) as caught, timed.connect() as conn:
            conn.execute(sa.text("SELECT pg_sleep(3)"))
        assert db.is_transient(caught.value) and caught.value.connection_invalidated
        assert isinstance(caught.value.orig.__cause__, TimeoutError)
    finally:
        timed.dispose()
    assert not [r for r in _discards_logged(caplog) if "server had already closed" in r.getMessage()], caplog.text


def test_a_timeout_is_named_as_a_bound_only_when_the_transaction_had_that_bound(database_url):
    """By SQLSTATE and the bounds the transaction began with, not by the
    server's (translatable) message."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 0.2))
    try:
        with pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as tx:
            tx.execute(sa.text("SELECT pg_sleep(2)"))
        assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("57014", db.STATEMENT_TIMEOUT)
        # The same SQLSTATE from a timeout the transaction set itself, not one of its bounds.
        with db.bounded(db.Bounds(0, 0)), pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as tx:
            tx.execute(sa.text("SET LOCAL statement_timeout = 100"))
            tx.execute(sa.text("SELECT pg_sleep(2)"))
        assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("57014", None)
        assert db.is_transient(caught.value)
    finally:
        engine.dispose()


def test_the_largest_bound_the_settings_take_is_one_the_server_takes(database_url):
    """A value past PostgreSQL's largest timeout made the server refuse every
    BEGIN (22023: a 500 on every request); the settings stop at it."""
    from shared.config import PG_MAX_TIMEOUT_SECONDS, ConfigError, load_settings

    settings_ = load_settings({"DATABASE_URL": database_url,
                               "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": str(PG_MAX_TIMEOUT_SECONDS)})
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.request_bounds(settings_))
    try:
        with engine.begin() as tx:
            assert tx.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar() == "2147483647ms"
    finally:
        engine.dispose()
    with pytest.raises(ConfigError):
        load_settings({"DATABASE_URL": database_url, "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": str(PG_MAX_TIMEOUT_SECONDS + 0.001)})


def test_the_sweep_has_its_own_bounds_not_a_requests(base_env, clean_db):
    """POST /outbox/sweep (the PingSource's) runs under DB_SWEEP_*: with no
    lock bound for requests at all, a sweep meeting a lock still stops at
    the sweep's, says so, and answers promptly."""
    env = {**base_env, "DB_LOCK_TIMEOUT_SECONDS": "0", "DB_STATEMENT_TIMEOUT_SECONDS": "0",
           "DB_SWEEP_LOCK_TIMEOUT_SECONDS": str(LOCK_TIMEOUT)}
    intake = FunctionProcess("intake", env).start()
    assert requests.post(intake.url + "/outbox/sweep", headers=AUTH, timeout=30).status_code == 200
    answer: dict = {}

    def sweep() -> None:
        started = time.monotonic()
        answer["response"] = requests.post(intake.url + "/outbox/sweep", headers=AUTH, timeout=60)
        answer["took"] = time.monotonic() - started

    with incidents_locked(clean_db):  # what reconciliation reads first
        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        sweeper.join(PROMPT)  # without its bounds it waits here until the lock goes
    sweeper.join(60)
    assert answer["took"] < PROMPT, f"answered after {answer['took']:.1f} s"
    assert answer["response"].status_code == 200, answer["response"].text
    assert "Reconciliation stopped at its database lock_timeout; the next sweep retries" in intake.logs()
    assert "Traceback" not in intake.logs()
    intake.stop()


def test_bounded_in_one_thread_leaves_another_threads_transaction_with_the_engines_bounds(database_url):
    """The sweep runs in one request thread while the others serve requests
    on the same engine: only the sweep's transactions take its bounds."""
    engine = db.create_engine_for(database_url, pool_size=2, max_overflow=0, bounds=db.Bounds(LOCK_TIMEOUT, 2.0, 5.0))
    inside_begun, other_done = threading.Event(), threading.Event()
    seen: dict = {}

    def sweep() -> None:
        with db.bounded(db.Bounds(1.0, 9.0)), engine.begin() as tx:
            seen["sweep"] = tx.execute(sa.text("SHOW statement_timeout")).scalar()
            inside_begun.set()
            other_done.wait(10)  # the other thread's transaction runs while this one is open
            seen["sweep, after"] = tx.execute(sa.text("SHOW statement_timeout")).scalar()

    def request() -> None:
        inside_begun.wait(10)
        with engine.begin() as tx:
            seen["request"] = tx.execute(sa.text("SHOW statement_timeout")).scalar()
        other_done.set()

    try:
        threads = [threading.Thread(target=sweep), threading.Thread(target=request)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert seen == {"sweep": "9s", "request": "2s", "sweep, after": "9s"}
    finally:
        engine.dispose()


def test_a_cloudevent_of_the_broker_answers_503_naming_the_bound_while_its_table_is_locked(base_env, clean_db):
    """A function the Broker calls (the dead-letter sink): the Broker retries a 503."""
    deadletter = FunctionProcess("deadletter", {**base_env, "DB_LOCK_TIMEOUT_SECONDS": str(LOCK_TIMEOUT)}).start()

    def letter(event_id: str) -> tuple[requests.Response, float]:
        headers = {"ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/incident-response",
                   "ce-type": "io.incidentresponse.incident.opened", "ce-knativeerrordest": "http://escalation/",
                   "ce-knativeerrorcode": "502", "Content-Type": "application/json"}
        started = time.monotonic()
        response = requests.post(deadletter.url + "/", data=b'{"alert_name": "DiskFull"}', headers=headers, timeout=60)
        return response, time.monotonic() - started

    assert letter("warm")[0].status_code == 202
    with clean_db.connect() as conn:
        conn.execute(sa.text("LOCK TABLE dead_letters IN ACCESS EXCLUSIVE MODE"))
        try:
            assert_prompt_503(*letter("while-locked"), "lock_timeout")
        finally:
            conn.rollback()
    assert "Database lock_timeout reached; rolled back, answered 503" in deadletter.logs()
    assert letter("while-locked")[0].status_code == 202  # the Broker's retry
    deadletter.stop()


def test_a_deadline_bounds_the_statements_of_a_transaction_together(database_url):
    """/metrics' ~15 statements must end within Prometheus's scrape timeout
    together, not 8 s each: under deadline() each statement gets what is
    left, in the same message (no round trip of its own)."""
    with proxied_database(database_url) as (proxy, url):
        engine = db.create_engine_for(url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 5.0))
        try:
            with db.deadline(1.0), pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as tx:
                before = proxy.round_trips
                tx.execute(sa.text("SELECT pg_sleep(0.6)"))  # each well inside the 5 s statement bound
                assert proxy.round_trips - before == 1
                tx.execute(sa.text("SELECT pg_sleep(0.6)"))
            assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("57014", db.STATEMENT_TIMEOUT)
            with engine.begin() as tx:  # outside the block: the transaction's own bound
                assert tx.execute(sa.text("SHOW statement_timeout")).scalar() == "5s"
        finally:
            engine.dispose()


def test_a_deadline_bounds_the_statements_later_put_aside_too(database_url):
    """Statements db.later() put aside travel ahead of the next statement (or
    the COMMIT), in the same write: they end within the deadline as well,
    together with the statements around them, not each with a bound of its
    own (two statements of 0.6 s, one put aside, overrun a deadline of 1 s)."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 5.0))
    try:
        with db.deadline(1.0), pytest.raises(sa.exc.DBAPIError) as ahead_of_a_statement, engine.begin() as tx:
            db.later(tx, sa.text("SELECT pg_sleep(0.6)"))
            tx.execute(sa.text("SELECT pg_sleep(0.6)"))
        assert (db.sqlstate(ahead_of_a_statement.value), db.bound_reached(ahead_of_a_statement.value)) == ("57014", db.STATEMENT_TIMEOUT)
        with db.deadline(1.0), pytest.raises(sa.exc.DBAPIError) as ahead_of_the_commit, engine.begin() as tx:
            tx.execute(sa.text("SELECT 1"))
            db.later(tx, sa.text("SELECT pg_sleep(3)"))
        assert (db.sqlstate(ahead_of_the_commit.value), db.bound_reached(ahead_of_the_commit.value)) == ("57014", db.STATEMENT_TIMEOUT)
        with engine.begin() as tx:  # the connection is in step and keeps its own bound
            assert tx.execute(sa.text("SHOW statement_timeout")).scalar() == "5s"
    finally:
        engine.dispose()


def test_a_deadline_bounds_a_statement_put_aside_that_is_the_transactions_only_one(database_url):
    """Put aside and never followed by a statement, it travels with the
    COMMIT (and the BEGIN): under the deadline still, not the transaction's
    own statement bound (5 s, which would let it run its 3 s)."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 5.0))
    try:
        with db.deadline(0.5), pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as tx:
            db.later(tx, sa.text("SELECT pg_sleep(3)"))
        assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("57014", db.STATEMENT_TIMEOUT)
    finally:
        engine.dispose()


def test_a_deadline_spent_is_a_statement_timeout_never_no_timeout(database_url):
    """What is left of a spent deadline is nothing: the next statement gets
    the smallest bound there is (a statement_timeout of 0 would be none)."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0, 5.0))
    try:
        with db.deadline(0.2), pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as tx:
            tx.execute(sa.text("SELECT 1"))
            spent_at = time.monotonic() + 0.2
            wait_until(lambda: time.monotonic() > spent_at, 5, message="the deadline to be spent")
            tx.execute(sa.text("SELECT pg_sleep(3)"))
        assert (db.sqlstate(caught.value), db.bound_reached(caught.value)) == ("57014", db.STATEMENT_TIMEOUT)
    finally:
        engine.dispose()


def test_metrics_answer_503_naming_the_bound_while_a_table_they_read_is_locked(base_env, clean_db):
    query = FunctionProcess("query", {**base_env, "DB_LOCK_TIMEOUT_SECONDS": str(LOCK_TIMEOUT)}, threads=2).start()
    assert requests.get(query.url + "/metrics", headers=AUTH, timeout=30).status_code == 200
    with incidents_locked(clean_db):
        started = time.monotonic()
        response = requests.get(query.url + "/metrics", headers=AUTH, timeout=60)
        assert_prompt_503(response, time.monotonic() - started, "lock_timeout")
    assert requests.get(query.url + "/metrics", headers=AUTH, timeout=30).status_code == 200
    query.stop()
