"""The database helpers."""

import pg8000.dbapi
import pytest
import sqlalchemy as sa

from shared import db, ingest, outbox, timeline
from shared.correlation import store


@pytest.mark.parametrize("statement", [
    ingest.UPSERT_FIRING, ingest.AFTER_REMEDIATION, ingest.RESOLVE_MEMBERS, ingest.RESOLVE_WHEN_ALL_RESOLVED, ingest.COUNT_IGNORED,
    store.LOCK_KEYS, store.CANDIDATES, store.ACTIVE_ROOTS, store.INSERT_MEMBERS, store.MOVE_MEMBERS, store.RESOLVE_MERGED,
    store.RAISE_PRIORITY,
    timeline.INSERT_TIMELINE, timeline.INSERT_TIMELINE_AND_EVENTS, timeline.ADD_ENTRY, outbox._INSERT,
])
def test_cached_paramstyle_rewrite_matches_pg8000(statement):
    compiled = str(statement.compile(dialect=sa.dialects.postgresql.pg8000.dialect()))
    original = pg8000.dbapi.convert_paramstyle.original
    args = tuple(range(compiled.count("%s")))
    assert pg8000.dbapi.convert_paramstyle("format", compiled, args) == original("format", compiled, args)


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


@pytest.mark.parametrize("sqlstate, transient", [("40P01", True), ("40001", True), ("57P01", True), ("08006", True), ("23505", False), ("22P02", False)])
def test_transient_errors_are_told_apart(sqlstate, transient):
    err = sa.exc.DBAPIError("x", {}, Exception({"C": sqlstate, "M": "m"}))
    assert db.is_transient(err) is transient
