"""Noise control's lookups by fingerprint stay index lookups however big
their tables grow: alert_flaps keeps a row for every fingerprint the intake
ever saw, and each intake transaction locks the rows of its batch's few
alerts.

The plan is checked with the statistics a grown table has (20,000 rows,
ANALYZE), where a hash join over a whole-table scan is what the planner
picks for `IN (SELECT jsonb_array_elements_text(...))`."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from shared import flapping
from tests.test_correlation import explain

ROWS = 20_000


@pytest.fixture
def grown(clean_db):
    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO alert_flaps (fingerprint, last_status, flips) "
            "SELECT 'fp-' || g, 'firing', '[]'::jsonb FROM generate_series(1, :n) AS g"), {"n": ROWS})
    with clean_db.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "ANALYZE alert_flaps")
    return clean_db


def test_a_batch_locks_its_own_flapping_rows_by_index_not_the_whole_table(grown):
    """The lock step and the read of flaps_lock (migration 0020), as the
    server runs them inside the function."""
    alerts = [{"fingerprint": fp, "status": "resolved"} for fp in ("fp-7", "fp-70", "fp-new")]
    found = explain(grown, flapping._LOCK, {"alerts": json.dumps(alerts)})
    assert "Insert on alert_flaps" in found, found
    assert "Seq Scan on alert_flaps" not in found, found
    assert "alert_flaps_pkey" in found, found
