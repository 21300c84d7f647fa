"""The schema Alembic builds, read back from PostgreSQL's own catalogue."""

import threading
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from loopback.processes import wait_until
from shared import db, migrate, schema


@pytest.fixture
def scratch_url(database_url):
    """An empty database of its own: the round trip must not disturb the session's."""
    name = f"ir_mig_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(database_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    db.run_outside_transaction(admin, f'CREATE DATABASE "{name}"')
    yield urlunsplit(parts._replace(path="/" + name))
    db.run_outside_transaction(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _columns(conn, table):
    rows = conn.execute(
        sa.text(
            "SELECT column_name, data_type, udt_name, character_maximum_length, is_nullable "
            "FROM information_schema.columns WHERE table_name = :t"
        ),
        {"t": table},
    ).mappings()
    return {r["column_name"]: dict(r) for r in rows}


def _enum(conn, name):
    return conn.execute(
        sa.text(
            "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
            "WHERE t.typname = :n ORDER BY e.enumsortorder"
        ),
        {"n": name},
    ).scalars().all()


def _indexes(conn, table):
    rows = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"), {"t": table})
    return {name: definition for name, definition in rows}


def _tables(conn):
    return set(conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())


def assert_seed_schema(conn):
    columns = _columns(conn, "incidents")
    expected = {
        "id": ("character varying", 36),
        "alert_name": ("character varying", 100),
        "priority": ("USER-DEFINED", None),
        "status": ("USER-DEFINED", None),
        "created_at": ("timestamp without time zone", None),
        "updated_at": ("timestamp without time zone", None),
        "resolved_at": ("timestamp without time zone", None),
        "summary": ("text", None),
        "description": ("text", None),
        "diagnostics": ("json", None),
        "remediation_actions": ("json", None),
    }
    for name, (data_type, length) in expected.items():
        assert columns[name]["data_type"] == data_type, name
        assert columns[name]["character_maximum_length"] == length, name
    assert columns["alert_name"]["is_nullable"] == "NO"
    assert columns["priority"]["udt_name"] == "incident_priority"
    assert columns["status"]["udt_name"] == "incident_status"
    assert _enum(conn, "incident_priority") == ["P0", "P1", "P2"]
    assert _enum(conn, "incident_status") == ["open", "investigating", "resolved", "closed"]
    indexes = _indexes(conn, "incidents")
    assert "(status)" in indexes["idx_incidents_status"]
    assert "(priority)" in indexes["idx_incidents_priority"]
    assert "(created_at)" in indexes["idx_incidents_created_at"]
    assert "PRIMARY KEY" in conn.execute(
        sa.text("SELECT constraint_type FROM information_schema.table_constraints WHERE table_name='incidents' AND constraint_type='PRIMARY KEY'")
    ).scalar()


def test_upgrade_downgrade_upgrade_round_trip(scratch_url):
    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)
    try:
        migrate.upgrade(scratch_url, "0001")
        with engine.connect() as conn:
            assert_seed_schema(conn)
            assert set(_columns(conn, "incidents")) == {
                "id", "alert_name", "priority", "status", "created_at", "updated_at", "resolved_at",
                "summary", "description", "diagnostics", "remediation_actions",
            }
        migrate.upgrade(scratch_url)
        with engine.connect() as conn:
            assert_seed_schema(conn)
            assert {"incident_timeline", "event_outbox"} <= _tables(conn)
        migrate.downgrade(scratch_url, "base")
        with engine.connect() as conn:
            assert _tables(conn) == {"alembic_version"}
            assert _enum(conn, "incident_status") == []
            assert _enum(conn, "incident_source") == []
        migrate.upgrade(scratch_url)
        with engine.connect() as conn:
            assert_seed_schema(conn)
    finally:
        engine.dispose()


def test_head_adds_dedup_index_over_active_incidents_only(engine):
    with engine.connect() as conn:
        columns = _columns(conn, "incidents")
        for name, udt in [("fingerprint", "varchar"), ("labels", "jsonb"), ("annotations", "jsonb"),
                          ("source", "varchar"), ("starts_at", "timestamp")]:
            assert columns[name]["udt_name"] == udt
        assert columns["source"]["character_maximum_length"] == 40
        definition = _indexes(conn, "incidents")["uq_incidents_active_fingerprint"]
        assert definition.startswith("CREATE UNIQUE INDEX")
        assert "'open'" in definition and "'investigating'" in definition
        assert "'resolved'" not in definition
        assert _enum(conn, "incident_source") == []
        timeline = _columns(conn, "incident_timeline")
        assert timeline["details"]["udt_name"] == "jsonb"
        assert "idx_incident_timeline_incident_at" in _indexes(conn, "incident_timeline")


def test_server_fills_created_and_updated_at(clean_db):
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO incidents (id, alert_name, priority, status) VALUES ('x', 'A', 'P1', 'open')"))
        row = conn.execute(sa.text("SELECT created_at, updated_at FROM incidents WHERE id = 'x'")).one()
    assert row.created_at is not None and row.updated_at is not None


def _insert_sources(engine, sources):
    with engine.begin() as conn:
        for index, source in enumerate(sources):
            conn.execute(
                sa.text("INSERT INTO incidents (id, alert_name, priority, status, fingerprint, source) "
                        "VALUES (:id, 'A', 'P1', 'resolved', :fp, :source)"),
                {"id": f"id-{source}-{index}", "fp": f"fp-{index}", "source": source},
            )


def _sources(engine):
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, source::text FROM incidents")).all())


def test_source_becomes_text_and_back_without_losing_rows(scratch_url):
    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)
    try:
        migrate.upgrade(scratch_url, "0008")
        _insert_sources(engine, ["alertmanager", "cloudevent", "api"])
        before = _sources(engine)
        migrate.upgrade(scratch_url, "0009")
        with engine.connect() as conn:
            assert _columns(conn, "incidents")["source"]["udt_name"] == "varchar"
            assert _enum(conn, "incident_source") == []
        assert _sources(engine) == before
        _insert_sources(engine, ["grafana"])
        with pytest.raises(RuntimeError, match="'grafana' \\(1 rows\\)"):
            migrate.downgrade(scratch_url, "0008")
        assert _sources(engine)["id-grafana-0"] == "grafana"
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM incidents WHERE source = 'grafana'"))
        migrate.downgrade(scratch_url, "0008")
        with engine.connect() as conn:
            assert _columns(conn, "incidents")["source"]["udt_name"] == "incident_source"
            assert _enum(conn, "incident_source") == ["alertmanager", "cloudevent", "api"]
            conn.execute(sa.text("INSERT INTO incidents (id, alert_name, priority, status) VALUES ('d', 'A', 'P1', 'open')"))
            assert conn.execute(sa.text("SELECT source::text FROM incidents WHERE id = 'd'")).scalar() == "alertmanager"
            conn.rollback()
        assert _sources(engine) == before
        migrate.upgrade(scratch_url)
        assert _sources(engine) == before
    finally:
        engine.dispose()


def test_stored_node_roots_take_the_node_rank_and_back(scratch_url):
    from shared.correlation.plan import RANK_NODE

    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)

    def ranks():
        with engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT fingerprint, rank FROM incident_members ORDER BY fingerprint")).all())

    try:
        migrate.upgrade(scratch_url, "0014")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO incidents (id, alert_name, priority, status, fingerprint) "
                                 "VALUES ('i', 'KubeNodeNotReady', 'P1', 'open', 'node')"))
            conn.execute(sa.text(
                "INSERT INTO incident_members (incident_id, fingerprint, alert_name, priority, status, is_root, rank, provides, seeks) "
                "VALUES ('i', 'node', 'KubeNodeNotReady', 'P1', 'firing', true, 30, '{node:n1}', '{node:n1}'), "
                "       ('i', 'pod', 'KubePodNotReady', 'P1', 'firing', false, 0, '{}', '{node:n1}'), "
                "       ('i', 'labels', 'TargetDown', 'P1', 'firing', false, 30, '{labels:r:x}', '{labels:r:x}')"))
        migrate.upgrade(scratch_url, "0015")
        assert ranks() == {"labels": 30, "node": RANK_NODE, "pod": 0}
        migrate.downgrade(scratch_url, "0014")
        assert ranks() == {"labels": 30, "node": 30, "pod": 0}
    finally:
        engine.dispose()


def _function_body(conn, name):
    return conn.execute(sa.text("SELECT prosrc FROM pg_proc WHERE proname = :n"), {"n": name}).scalar()


def _revision_module(revision):
    import importlib.util

    (path,) = (migrate.PROJECT_ROOT / "migrations" / "versions").glob(f"{revision}_*.py")
    spec = importlib.util.spec_from_file_location(f"revision_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flapping_lock_step_upgrades_and_downgrades_to_the_previous_body(scratch_url):
    """0020 replaces a function body and adds flaps_lock; its downgrade puts
    0018's body back (the previous release calls it) and drops flaps_lock."""
    def body(statement):
        return statement.split("$fn$")[1]

    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)
    try:
        migrate.upgrade(scratch_url, "0020")
        with engine.connect() as conn:
            assert _function_body(conn, "noise_flaps_unless_windowed") == body(_revision_module("0020").NOISE_FLAPS_UNLESS_WINDOWED)
            assert _function_body(conn, "flaps_lock") == body(_revision_module("0020").FLAPS_LOCK)
        migrate.downgrade(scratch_url, "0019")
        with engine.connect() as conn:
            assert _function_body(conn, "noise_flaps_unless_windowed") == body(_revision_module("0018").NOISE_FLAPS_UNLESS_WINDOWED)
            assert _function_body(conn, "flaps_lock") is None
    finally:
        engine.dispose()


def _lock_waits(engine) -> int:
    """Lock requests waiting in this database (other databases of the server are not this test's)."""
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM pg_locks WHERE NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")).scalar()


def _revision(engine) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def _reader(engine, release) -> threading.Thread:
    """pg_dump's hold: ACCESS SHARE on incidents, until ``release()`` says so
    (at most 30 s)."""
    locked = threading.Event()

    def hold() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("LOCK TABLE incidents IN ACCESS SHARE MODE"))
            locked.set()
            try:
                release()
            finally:
                conn.rollback()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(30)
    return thread


def test_a_migration_behind_a_long_reader_steps_back_instead_of_queueing_every_request(scratch_url):
    """pg_dump holds ACCESS SHARE on every table for the whole dump; a
    migration waiting behind it for ACCESS EXCLUSIVE would queue every
    request for the table behind itself. It waits lock_timeout, rolls back
    whole and tries again; after its last attempt it fails, nothing applied."""
    engine = db.create_engine_for(scratch_url, pool_size=2, max_overflow=0)
    finished = threading.Event()
    try:
        migrate.upgrade(scratch_url, "0001")
        reader = _reader(engine, lambda: finished.wait(30))
        try:
            with pytest.raises(sa.exc.DBAPIError) as caught:
                migrate.upgrade(scratch_url, lock_timeout_seconds=0.2, lock_attempts=2, lock_retry_seconds=0.1)
        finally:
            finished.set()
            reader.join(30)
        assert db.sqlstate(caught.value) == "55P03"
        assert _revision(engine) == "0001"
    finally:
        engine.dispose()


def test_a_migration_that_stepped_back_applies_once_the_reader_is_done(scratch_url):
    engine = db.create_engine_for(scratch_url, pool_size=3, max_overflow=0)
    try:
        migrate.upgrade(scratch_url, "0001")

        stepped_back = threading.Event()

        def once_the_migration_stepped_back() -> None:
            wait_until(lambda: _lock_waits(engine) > 0, 30, message="the migration to wait for its lock")
            wait_until(lambda: _lock_waits(engine) == 0, 30, message="the migration to step back")
            stepped_back.set()

        reader = _reader(engine, once_the_migration_stepped_back)
        migrate.upgrade(scratch_url, lock_timeout_seconds=0.3, lock_attempts=100, lock_retry_seconds=0.2)
        reader.join(30)
        assert stepped_back.is_set()  # it let the reader's queue go, then applied
        assert _revision(engine) == schema.HEAD_REVISION
    finally:
        engine.dispose()


@pytest.mark.parametrize("settings, named", [
    ({"lock_timeout_seconds": "nan"}, "MIGRATION_LOCK_TIMEOUT_SECONDS"),
    ({"lock_timeout_seconds": "-1"}, "MIGRATION_LOCK_TIMEOUT_SECONDS"),
    ({"lock_timeout_seconds": "inf"}, "MIGRATION_LOCK_TIMEOUT_SECONDS"),
    ({"lock_timeout_seconds": "3000000"}, "MIGRATION_LOCK_TIMEOUT_SECONDS"),
    ({"lock_attempts": "abc"}, "MIGRATION_LOCK_ATTEMPTS"),
    ({"lock_attempts": "0"}, "MIGRATION_LOCK_ATTEMPTS"),
])
def test_a_migration_setting_out_of_range_stops_before_anything_runs_naming_it(scratch_url, settings, named):
    with pytest.raises(ValueError, match=f"^{named}: "):
        migrate.upgrade(scratch_url, **settings)
    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT to_regclass('alembic_version')")).scalar() is None
    finally:
        engine.dispose()


def test_claims_are_indexed_by_incident_and_the_downgrade_drops_it(scratch_url):
    """0025: escalation and the sweep look claims up by incident."""
    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)
    try:
        migrate.upgrade(scratch_url, "0025")
        with engine.connect() as conn:
            assert "idx_work_claims_incident" in _indexes(conn, "work_claims")
        migrate.downgrade(scratch_url, "0022")
        with engine.connect() as conn:
            assert "idx_work_claims_incident" not in _indexes(conn, "work_claims")
    finally:
        engine.dispose()


def test_letters_being_redelivered_are_indexed_by_their_claim_and_the_downgrade_drops_it(scratch_url):
    """0027: the sweep's release of stale redelivery claims reads the
    letters ``sending`` alone, oldest claim first."""
    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)
    try:
        migrate.upgrade(scratch_url, "0027")
        with engine.connect() as conn:
            definition = _indexes(conn, "dead_letters")["idx_dead_letters_sending"]
        assert "(redelivered_at) WHERE" in definition and "'sending'" in definition, definition
        migrate.downgrade(scratch_url, "0025")
        with engine.connect() as conn:
            assert "idx_dead_letters_sending" not in _indexes(conn, "dead_letters")
    finally:
        engine.dispose()


def test_proposals_name_their_root_nullable_for_the_previous_release_and_the_downgrade_drops_it(scratch_url):
    """0028: a proposal names the root it was planned on; the previous
    release, inserting without the column during a rollout, leaves it NULL."""
    engine = db.create_engine_for(scratch_url, pool_size=1, max_overflow=0)
    try:
        migrate.upgrade(scratch_url, "0028")
        with engine.connect() as conn:
            column = _columns(conn, "remediation_proposals")["root_generation"]
            assert column["data_type"] == "integer" and column["is_nullable"] == "YES"
        migrate.downgrade(scratch_url, "0027")
        with engine.connect() as conn:
            assert "root_generation" not in _columns(conn, "remediation_proposals")
    finally:
        engine.dispose()
