"""The database helpers."""

import uuid

import pg8000.dbapi
import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess
from shared import db, ignored_alerts, ingest, migrate, outbox, timeline
from shared.correlation import store
from tests.conftest import TEST_TOKEN, _server_url, _with_database, needs_own_backend, proxied_database


@pytest.mark.parametrize("statement", [
    ingest.UPSERT_FIRING, ingest.AFTER_REMEDIATION, ingest.RESOLVE_MEMBERS, ingest.RESOLVE_WHEN_ALL_RESOLVED, ignored_alerts.COUNT,
    ignored_alerts.FOLD_EXTRA, ignored_alerts.LOCK_EXTRA,
    store.LOCK_KEYS, store.HOLD, store.CANDIDATES, store.TAKE_OVER, store.INSERT_MEMBERS, store.MOVE_MEMBERS, store.RESOLVE_MERGED,
    store.RAISE_PRIORITY,
    timeline.INSERT_TIMELINE, timeline.INSERT_TIMELINE_AND_EVENTS, timeline.ADD_ENTRY, outbox._INSERT,
])
def test_cached_paramstyle_rewrite_matches_pg8000(statement):
    compiled = str(statement.compile(dialect=sa.dialects.postgresql.pg8000.dialect()))
    original = pg8000.dbapi.convert_paramstyle.original
    args = tuple(range(compiled.count("%s")))
    assert pg8000.dbapi.convert_paramstyle("format", compiled, args) == original("format", compiled, args)


@needs_own_backend
def test_idle_pooled_connection_is_pinged_and_replaced_when_dead(database_url, monkeypatch):
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        killer = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
        with killer.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        killer.dispose()
        monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()


def test_a_connection_reset_on_the_first_read_of_an_answer_is_the_drivers_network_error(database_url):
    """A connection the server reset fails on the first read of the answer:
    it is the driver's error (SQLAlchemy's, transient, the connection
    dropped), not a bare ConnectionResetError that a request answers 500."""

    class ResetOnRead:
        def __init__(self, inner):
            self.inner = inner

        def read(self, size=-1):
            raise ConnectionResetError(104, "Connection reset by peer")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            driver = conn.connection.dbapi_connection
            driver._sock = ResetOnRead(driver._sock)
            with pytest.raises(sa.exc.DBAPIError) as caught:
                conn.execute(sa.text("SELECT 1"))
        assert isinstance(caught.value.orig, pg8000.dbapi.InterfaceError) and db.is_transient(caught.value)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("sqlstate, transient", [("40P01", True), ("40001", True), ("57P01", True), ("08006", True), ("23505", False), ("22P02", False),
                                                 # a lock_timeout, a statement_timeout, an idle_in_transaction_session_timeout
                                                 ("55P03", True), ("57014", True), ("25P03", True), ("55000", False)])
def test_transient_errors_are_told_apart(sqlstate, transient):
    err = sa.exc.DBAPIError("x", {}, Exception({"C": sqlstate, "M": "m"}))
    assert db.is_transient(err) is transient


@pytest.mark.parametrize("severity", ["FATAL", "PANIC"])
def test_an_error_that_ends_the_session_is_transient_whatever_its_code(severity):
    # 55000 is "object not in prerequisite state" for a statement, but as a
    # FATAL at connect it is the database refusing connections.
    err = sa.exc.DBAPIError(None, None, Exception({"S": severity, "V": severity, "C": "55000", "M": "m"}))
    assert db.is_transient(err)


def test_a_database_that_refuses_connections_is_answered_503_not_500(base_env):
    """ALTER DATABASE … ALLOW_CONNECTIONS false (maintenance, a failover
    drill) makes every new connection end in a FATAL 55000: the query API
    answers 503 with Retry-After, as for a database that is down, and /health
    fails so the instance takes no traffic."""
    server = _server_url()
    name = f"ir_refusing_{uuid.uuid4().hex[:8]}"
    admin = _with_database(server, "postgres")
    db.run_outside_transaction(admin, f'CREATE DATABASE "{name}"')
    query = None
    try:
        url = _with_database(server, name)
        migrate.upgrade(url)
        query = FunctionProcess("query", {**base_env, "DATABASE_URL": url}).start()
        auth = {"Authorization": f"Bearer {TEST_TOKEN}"}
        assert requests.get(query.url + "/incidents", headers=auth, timeout=10).status_code == 200
        db.run_outside_transaction(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        db.run_outside_transaction(admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        answers = [requests.get(query.url + "/incidents", headers=auth, timeout=10) for _ in range(3)]
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert all(a.headers.get("Retry-After") for a in answers)
        assert requests.get(query.url + "/health", timeout=10).status_code == 503
    finally:
        if query is not None:
            query.stop()
        db.run_outside_transaction(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        db.run_outside_transaction(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def counted(database_url):
    """The database through a TCP proxy that counts round trips on the wire
    (loopback/servers.py): the URL, and a function that answers how many
    round trips there were since it was last asked."""
    with proxied_database(database_url) as (proxy, url):
        seen = [0]

        def since():
            now = proxy.round_trips
            seen[0], taken = now, now - seen[0]
            return taken

        yield url, since


def test_a_statement_with_parameters_is_one_round_trip_with_the_same_answers(counted):
    url, round_trips = counted
    engine = db.create_engine_for(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            round_trips()
            rows = conn.execute(sa.text("SELECT CAST(:a AS int) + 1 AS n, CAST(:b AS text) AS t, CAST(:c AS text) IS NULL AS isnull, now() IS NOT NULL AS ts"),
                                {"a": 41, "b": "ünï", "c": None}).mappings().all()
            assert [dict(r) for r in rows] == [{"n": 42, "t": "ünï", "isnull": True, "ts": True}]
            assert round_trips() == 1
            conn.execute(sa.text("CREATE TEMP TABLE rt (n int)"))
            round_trips()
            result = conn.execute(sa.text("INSERT INTO rt SELECT generate_series(1, :n)"), {"n": 5})
            assert result.rowcount == 5 and round_trips() == 1
            assert conn.execute(sa.text("SELECT count(*) FROM rt WHERE n > :m"), {"m": 2}).scalar() == 3
            conn.rollback()
    finally:
        engine.dispose()


def test_an_error_in_a_one_round_trip_statement_leaves_the_connection_usable(database_url):
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            for bad in ("SELECT CAST(:a AS int) / 0", "SELECT nosuchcolumn FROM pg_class WHERE relname = :a", "SELEC :a"):
                with pytest.raises(sa.exc.DBAPIError) as err:
                    conn.execute(sa.text(bad), {"a": "1"})
                # pg8000 hands over the server's error fields: its SQLSTATE, read to the end.
                fields = err.value.orig.args[0]
                assert isinstance(fields, dict) and len(fields.get("C", "")) == 5, fields
                conn.rollback()
            # The same connection, in step with the server.
            assert conn.execute(sa.text("SELECT pg_backend_pid() = :p"), {"p": pid}).scalar() is True
    finally:
        engine.dispose()


def test_begin_travels_with_the_first_statement_and_the_transaction_is_real(counted):
    url, round_trips = counted
    engine = db.create_engine_for(url, pool_size=3, max_overflow=0)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS begin_rt (n int)"))
            conn.commit()
            with engine.begin() as warm:  # the pool's second connection, opened before counting
                warm.execute(sa.text("SELECT 1"))
            round_trips()
            with engine.begin() as tx:
                tx.execute(sa.text("INSERT INTO begin_rt VALUES (:n)"), {"n": 1})
            assert round_trips() == 2  # BEGIN + INSERT, then COMMIT
            with engine.begin():
                pass
            assert round_trips() == 0  # nothing ran: nothing to begin or commit
            # Rolled back means it was inside a transaction (autocommit would have kept it).
            with engine.connect() as other:
                other.execute(sa.text("INSERT INTO begin_rt VALUES (:n)"), {"n": 2})
                first = other.execute(sa.text("SELECT now()")).scalar()
                assert other.execute(sa.text("SELECT pg_sleep(0.01), now()")).one()[1] == first
                other.rollback()
            assert sorted(conn.execute(sa.text("SELECT n FROM begin_rt")).scalars()) == [1]
            conn.execute(sa.text("DROP TABLE begin_rt"))
            conn.commit()
    finally:
        engine.dispose()


def test_a_later_statement_travels_with_the_next_one_and_takes_effect(counted):
    url, round_trips = counted
    engine = db.create_engine_for(url, pool_size=2, max_overflow=0)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS later_rt (n int)"))
        round_trips()
        with engine.begin() as tx:
            db.later(tx, sa.text("INSERT INTO later_rt VALUES (:n)"), {"n": 1})
            db.later(tx, sa.text("INSERT INTO later_rt VALUES (:n)"), {"n": 2})
            assert round_trips() == 0  # nothing sent yet
            # The next statement sees what was put aside before it, in order.
            assert tx.execute(sa.text("SELECT array_agg(n ORDER BY n) FROM later_rt WHERE n < :m"), {"m": 10}).scalar() == [1, 2]
            assert round_trips() == 1  # BEGIN, both inserts and the SELECT in one write
            db.later(tx, sa.text("INSERT INTO later_rt VALUES (:n)"), {"n": 3})
        assert round_trips() == 1  # the last insert went with the COMMIT
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.text("SELECT n FROM later_rt")).scalars()) == [1, 2, 3]
            conn.execute(sa.text("DROP TABLE later_rt"))
            conn.commit()
    finally:
        engine.dispose()


def test_a_failing_later_statement_fails_the_next_one_and_a_rollback_drops_what_is_unsent(database_url):
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            conn.commit()
            db.later(conn, sa.text("SELECT CAST(:a AS int) / 0"), {"a": 1})
            with pytest.raises(sa.exc.DBAPIError) as err:
                conn.execute(sa.text("SELECT CAST(:a AS int)"), {"a": 2})
            assert db._sqlstate(err.value.orig) == "22012"  # division by zero: the later statement's own error
            conn.rollback()
            # The same connection, in step with the server.
            assert conn.execute(sa.text("SELECT pg_backend_pid() = :p"), {"p": pid}).scalar() is True
            conn.commit()
            db.later(conn, sa.text("SELECT CAST(:a AS int) / 0"), {"a": 1})
            with pytest.raises(sa.exc.DBAPIError):
                conn.commit()  # the COMMIT carries it, and fails with it
            conn.rollback()
            db.later(conn, sa.text("SELECT CAST(:a AS int) / 0"), {"a": 1})
            conn.rollback()  # never sent: nothing fails
            assert conn.execute(sa.text("SELECT CAST(:a AS int) + 1"), {"a": 1}).scalar() == 2
            conn.rollback()
    finally:
        engine.dispose()


def test_later_needs_a_transaction(database_url):
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            with pytest.raises(RuntimeError):
                db.later(conn, sa.text("SELECT CAST(:a AS int)"), {"a": 1})
            assert conn.execute(sa.text("SELECT CAST(:a AS int) + 1"), {"a": 1}).scalar() == 2
    finally:
        engine.dispose()


def test_later_statements_keep_to_their_savepoint(database_url):
    """Put aside before a SAVEPOINT: sent before it, so its failure is its
    own and not the savepoint block's. Put aside inside one that is rolled
    back: dropped with it, unsent, and the transaction goes on."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("CREATE TEMP TABLE later_sp (n int UNIQUE)"))
            db.later(conn, sa.text("INSERT INTO later_sp VALUES (:n)"), {"n": 1})
            nested = conn.begin_nested()
            db.later(conn, sa.text("SELECT CAST(:a AS int) / 0"), {"a": 1})
            nested.rollback()
            assert conn.execute(sa.text("SELECT array_agg(n) FROM later_sp")).scalar() == [1]

            db.later(conn, sa.text("INSERT INTO later_sp VALUES (:n)"), {"n": 1})  # a duplicate
            with pytest.raises(sa.exc.IntegrityError):
                conn.begin_nested()  # its SAVEPOINT is never sent: the insert failed first
            conn.rollback()
    finally:
        engine.dispose()
