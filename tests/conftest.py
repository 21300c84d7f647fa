"""Test infrastructure: a private PostgreSQL database per test session.

The suite talks to a real PostgreSQL server (``TEST_DATABASE_URL``, else
``DATABASE_URL``, else the local server on 127.0.0.1:5432). It creates a
database with a random name, migrates it, and drops it at the end, so it
never shares state with ``make run`` or another run.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from shared import config as config_module
from shared import db as db_module
from shared.config import parse_database_url
from tests.ci_strict import pytest_runtest_makereport  # noqa: F401 - a hook: CI=true turns skips into failures

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TEST_TOKEN = "test-token-" + "0123456789abcdef"
# Personal tokens (shared/users.py) of the people the tests name.
PERSONAL_TOKENS = {name: f"irp_{name}-" + "0123456789abcdef" * 2 for name in ("alice", "bob", "carol")}


def api_users(*names: str) -> str:
    """An INCIDENT_API_USERS value listing these people's token hashes."""
    import hashlib

    return ",".join(f"{name}:sha256:{hashlib.sha256(PERSONAL_TOKENS[name].encode()).hexdigest()}" for name in names)


def _server_url() -> str:
    raw = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or (
        "postgresql+pg8000://postgres@127.0.0.1:5432/postgres"
    )
    return parse_database_url(raw)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


THROUGH_PGBOUNCER = os.environ.get("TEST_THROUGH_PGBOUNCER", "").lower() in ("1", "true", "yes")
# A test about one PostgreSQL backend (its pid, how long it sat idle) means
# nothing when a pooler hands out backends transaction by transaction.
needs_own_backend = pytest.mark.skipif(THROUGH_PGBOUNCER, reason="about one server backend; PgBouncer pools them per transaction")


@pytest.fixture(scope="session")
def pgbouncer_for_session():
    """``TEST_THROUGH_PGBOUNCER=1``: the whole session (the tests, the
    migrations and every function process they start) reaches PostgreSQL
    through a PgBouncer in transaction pooling mode with a small server pool,
    as a scaled-out deployment does (docs/deploy.md)."""
    if not THROUGH_PGBOUNCER:
        yield None
        return
    from loopback.pgbouncer import PgBouncer

    bouncer = PgBouncer(_server_url(), pool_size=int(os.environ.get("TEST_PGBOUNCER_POOL_SIZE", "8"))).start()
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope="session")
def database_url(pgbouncer_for_session):
    server = _server_url()
    reused = os.environ.get("TEST_DATABASE_NAME")
    if reused:
        # Given, migrated and emptied test by test (clean_db): the mutation
        # run gives each of its workers one, so none of its thousands of short
        # sessions pays for creating and dropping a database.
        yield pgbouncer_for_session.url(reused) if pgbouncer_for_session else _with_database(server, reused)
        db_module.dispose_engine()
        return
    name = f"ir_test_{uuid.uuid4().hex[:10]}"
    admin = _with_database(server, "postgres")
    # A copy of an already migrated database is ready in a fraction of the
    # migrations' time: the mutation run starts thousands of short sessions.
    template = os.environ.get("TEST_DATABASE_TEMPLATE")
    db_module.run_outside_transaction(admin, f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    url = pgbouncer_for_session.url(name) if pgbouncer_for_session else _with_database(server, name)
    if not template:
        from shared import migrate  # alembic: half a second of start-up a copied database does without

        migrate.upgrade(url)
    yield url
    db_module.dispose_engine()
    db_module.run_outside_transaction(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def proxied_database(database_url: str):
    """A TCP proxy in front of PostgreSQL (``proxy.cut()`` takes the database
    away, ``restore()`` brings it back) and the database URL through it."""
    from loopback.servers import TcpProxy

    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    netloc = f"{parts.username}{':' + parts.password if parts.password else ''}@127.0.0.1:{proxy.port}"
    try:
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def broker():
    """A loopback Broker that records every event sent to it (the K_SINK of
    the functions a module starts); a module may define its own."""
    from loopback.servers import RecordingServer

    server = RecordingServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_env(database_url):
    """The environment every function process of the tests starts with."""
    return {
        "DATABASE_URL": database_url,
        "INCIDENT_API_TOKEN": TEST_TOKEN,
        "LOG_LEVEL": "INFO",
        "REMEDIATION_MODE": "dry-run",
    }


@pytest.fixture(scope="session", autouse=True)
def _settings_env(base_env):
    """In-process code (the service tests) reads the same settings."""
    saved = dict(os.environ)
    os.environ.update(base_env)
    for name in ("K_SINK", "PROMETHEUS_URL", "PAGERDUTY_ROUTING_KEY", "SLACK_WEBHOOK_URL", "KUBECONFIG"):
        os.environ.pop(name, None)
    config_module.reset_settings_cache()
    db_module.dispose_engine()
    yield
    os.environ.clear()
    os.environ.update(saved)
    config_module.reset_settings_cache()


@pytest.fixture(scope="session")
def engine(database_url):
    eng = db_module.create_engine_for(database_url, pool_size=5, max_overflow=20)
    yield eng
    eng.dispose()


def _wait_for_quiet_database(engine, timeout: float = 15.0) -> None:
    """Until no other session holds or awaits a lock on a table of this
    database: a function process of the previous test may still be finishing
    a write (a sweep, a late redelivery), and TRUNCATE would deadlock with it.
    A session whose open transaction touched no table is no obstacle."""
    query = sa.text(
        "SELECT DISTINCT a.application_name, a.state, left(a.query, 120) AS query "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'relation' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            busy = conn.execute(query).mappings().all()
        if not busy:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"other sessions of the test database still hold table locks after {timeout}s: {[dict(b) for b in busy]}")
        time.sleep(0.05)


@pytest.fixture
def clean_db(engine):
    """Each test that writes starts from empty tables. Function processes a
    test body started are stopped when it ends (the hook below); the ones
    fixtures keep are waited for, so TRUNCATE never races their writes. A
    module's running pipeline may still start a write after that wait (a
    late delivery, a sweep): a deadlock with it rolls the clean-up back, and
    it is tried again."""
    for attempt in range(5):
        _wait_for_quiet_database(engine)
        try:
            _empty_tables(engine)
            return engine
        except sa.exc.DBAPIError as exc:
            if not db_module.is_transient(exc) or attempt == 4:
                raise
            time.sleep(0.2)
    return engine


def _empty_tables(engine) -> None:
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")
        ).scalars().all()
        big = set(conn.execute(sa.text("SELECT relname FROM pg_stat_user_tables WHERE n_live_tup > 10000")).scalars())
    # DELETE takes milliseconds on the few rows a test leaves, TRUNCATE a few
    # tenths of a second (new files for every table), paid by every test that
    # writes; a big table (a benchmark's) is truncated. A foreign key that
    # does not cascade would need an order: then everything is truncated.
    try:
        with engine.begin() as conn:
            if big:
                conn.exec_driver_sql("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")
            else:
                for table in tables:
                    conn.exec_driver_sql(f'DELETE FROM "{table}"')
    except sa.exc.IntegrityError:
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    from loopback import processes

    processes.enter_test_body()
    try:
        return (yield)
    finally:
        leaked = processes.leave_test_body()
        if leaked:
            item.add_report_section("teardown", "processes", f"stopped function processes the test left running: {leaked}")


@pytest.fixture(scope="session")
def settings_obj(_settings_env):
    return config_module.load_settings()


@pytest.fixture(scope="session")
def prometheus():
    """One real Prometheus for the whole session (it is slow to warm up)."""
    from tests.prometheus import Prometheus

    server = Prometheus().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    """A loopback Kubernetes API per test module, with a kubeconfig for it."""
    from loopback.kube import FakeKubernetes

    server = FakeKubernetes().start()
    server.kubeconfig_path = server.kubeconfig(tmp_path_factory.mktemp("kube"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pd():
    """A loopback PagerDuty Events API v2 that checks every event it gets."""
    from loopback.notify import pagerduty

    receiver = pagerduty()
    receiver.server.start()
    yield receiver
    receiver.server.stop()


@pytest.fixture(scope="module")
def slack_hook():
    """A loopback Slack incoming webhook that checks every message it gets."""
    from loopback.notify import slack

    receiver = slack()
    receiver.server.start()
    yield receiver
    receiver.server.stop()


def pytest_terminal_summary(terminalreporter):
    artifacts = ROOT / "test-artifacts"
    if artifacts.exists() and any(artifacts.iterdir()):
        terminalreporter.write_line(f"test artefacts (board screenshots): {artifacts}")
