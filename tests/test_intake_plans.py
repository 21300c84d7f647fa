"""The intake's write-cycle statements run as server-side functions
(migration 0018) whose one plan a server connection makes on its first call
and keeps: no parsing and no planning per transaction. That plan may be made
on nearly empty tables and is only made again when their statistics change,
so it must be an index plan whatever the tables held when it was made."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from shared import db, flapping, ignored_alerts, ingest, noise
from tests.test_correlation import explain

ROWS = 20_000


@pytest.fixture
def one_connection(clean_db, database_url):
    """One pooled connection, so that the second call runs on the server
    connection that made the plan (without PgBouncer)."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


def _upsert_params(fingerprint: str) -> dict:
    row = {"id": f"id-{fingerprint}", "alert_name": "A", "priority": "P2", "summary": "s", "description": "d",
           "fingerprint": fingerprint, "labels": {}, "annotations": {}, "source": "alertmanager", "starts_at": None,
           "seen": 1, "rank": 0, "provides": [], "seeks": []}
    return {"rows": json.dumps([row]), "window": 300, "actor": "t", "events": "[]", "sought": "[]", "lock_also": "[]"}


def _grow(engine) -> None:
    """Tables grown after the plan was made, with no ANALYZE: nothing tells
    the server connection its plan is stale."""
    with engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics, remediation_actions,
                                   fingerprint, labels, annotations, source)
            SELECT 'g' || g, 'Grown', 'P2', 'open', 's', 'd', '{}'::json, '[]'::json, 'gfp' || g, '{}'::jsonb, '{}'::jsonb,
                   'alertmanager'
            FROM generate_series(1, :n) g"""), {"n": ROWS})
        # History: incidents remediation resolved long ago (the reopen
        # window looks for recent ones among them, by fingerprint).
        conn.execute(sa.text("""
            INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics, remediation_actions,
                                   fingerprint, labels, annotations, source, resolved_at, resolved_by)
            SELECT 'h' || g, 'Hist', 'P2', 'resolved', 's', 'd', '{}'::json, '[]'::json, 'hfp' || g, '{}'::jsonb, '{}'::jsonb,
                   'alertmanager', timezone('utc', now()) - interval '30 days', 'remediation'
            FROM generate_series(1, :n) g"""), {"n": ROWS})
        conn.execute(sa.text("""
            INSERT INTO incident_members (incident_id, fingerprint, alert_name, is_root)
            SELECT 'g' || g, 'mfp' || g, 'Grown', false FROM generate_series(1, :n) g"""), {"n": ROWS})
        conn.execute(sa.text("""
            INSERT INTO alert_flaps (fingerprint, last_status, flips)
            SELECT 'gfp' || g, 'firing', '[]'::jsonb FROM generate_series(1, :n) g"""), {"n": ROWS})


def test_the_upsert_goes_through_its_function_with_one_generic_plan(one_connection):
    plan = explain(one_connection, ingest.UPSERT_FIRING, _upsert_params("fp-1"))
    assert "jsonb_to_recordset(p_rows)" in plan, plan  # the function's statement, not text sent by the client
    # A custom plan folds the window into a constant interval; the generic
    # plan, the one kept for the connection, keeps the function's parameter.
    assert "'00:05:00'::interval" not in plan, plan
    assert "make_interval(0, 0, 0, 0, 0, 0, ($" in plan, plan


def test_the_plans_made_on_empty_tables_stay_index_plans_as_they_grow(one_connection):
    explain(one_connection, ingest.UPSERT_FIRING, _upsert_params("fp-1"))
    explain(one_connection, noise._UNLESS_WINDOWED, {"now": "2026-01-01 00:00:00", "f": json.dumps(["fp-1"])})
    explain(one_connection, flapping._LOCK, _lock_params("fp-1"))
    _grow(one_connection)
    upsert = explain(one_connection, ingest.UPSERT_FIRING, _upsert_params("gfp7"))
    flaps = explain(one_connection, noise._UNLESS_WINDOWED, {"now": "2026-01-01 00:00:00", "f": json.dumps(["gfp7"])})
    locked = explain(one_connection, flapping._LOCK, _lock_params("gfp7"))
    for plan in (upsert, flaps, locked):
        assert "Seq Scan on incidents" not in plan, plan
        assert "Seq Scan on incident_members" not in plan, plan
        assert "Seq Scan on alert_flaps" not in plan, plan
    # Nor every resolved incident through an index on the status.
    assert "idx_incidents_status" not in upsert, upsert
    assert "idx_incidents_resolved_at" not in upsert, upsert
    assert "idx_incidents_fingerprint" in upsert or "uq_incidents_active_fingerprint" in upsert, upsert
    assert "idx_incident_members_fingerprint" in upsert, upsert
    assert "alert_flaps_pkey" in flaps, flaps
    assert "alert_flaps_pkey" in locked, locked


def _lock_params(fingerprint: str) -> dict:
    return {"alerts": json.dumps([{"fingerprint": fingerprint, "status": "resolved"}])}


def _count_params(name: str) -> dict:
    return {"rows": json.dumps([{"alert_name": name, "reason": "r", "n": 1}]), "other": ignored_alerts.OTHER, "max_names": 50}


def test_the_ignored_count_goes_through_its_procedure_with_one_generic_plan(one_connection):
    """Migration 0019: the count of ignored alerts (the Watchdog's, every
    repeat_interval) is planned once per server connection, not per call."""
    for _ in range(2):
        plan = explain(one_connection, ignored_alerts.COUNT, _count_params("Watchdog"))
    assert "jsonb_to_recordset(p_rows)" in plan, plan  # the procedure's statement, not text sent by the client
    # A custom plan folds the bound into a constant; the generic plan keeps the parameter.
    assert "(50 - count(*))" not in plan, plan
    assert "($3 - count(*))" in plan, plan


def test_the_ignored_count_planned_on_an_empty_table_stays_an_index_plan(one_connection):
    explain(one_connection, ignored_alerts.COUNT, _count_params("First"))
    with one_connection.begin() as conn:
        conn.execute(sa.text("INSERT INTO ignored_alerts (alert_name, reason, count) "
                             "SELECT 'Grown' || mod(g, 50), 'reason ' || g, 1 FROM generate_series(1, :n) g"), {"n": ROWS})
    plan = explain(one_connection, ignored_alerts.COUNT, _count_params("Grown7"))
    assert "Seq Scan on ignored_alerts" not in plan, plan
    assert "ignored_alerts_pkey" in plan, plan
