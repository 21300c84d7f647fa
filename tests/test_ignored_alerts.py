"""The counts of ignored alerts are bounded: at most IGNORED_ALERTS_MAX_NAMES
alert names are counted apart (rows of ignored_alerts, series of
alerts_ignored_total), everything else under alertname="__other__", and no
ignored alert goes uncounted."""

from __future__ import annotations

import dataclasses

import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from functions.query.metrics import DatabaseCollector
from loopback.processes import FunctionProcess
from shared import incidents as svc
from shared import retention
from shared.config import load_settings
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}

REASON = "priority P2 is below MIN_INCIDENT_PRIORITY P1"
OTHER = "__other__"


def settings(**env):
    return load_settings({"DATABASE_URL": "postgresql+pg8000://u@h/db", **env})


def ignored(name: str, n: int = 1, reason: str = REASON):
    return [dataclasses.replace(alert(name, priority="P2", pod=f"p{i}"), ignored_reason=reason) for i in range(n)]


def record(engine, config, alerts):
    with engine.begin() as conn:
        svc.record_alerts(conn, alerts, "/test", "test", config=config)


def counted(engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        return {(n, r): c for n, r, c in conn.execute(sa.text("SELECT alert_name, reason, count FROM ignored_alerts"))}


def test_names_past_the_bound_are_counted_as_other_and_none_is_lost(clean_db):
    config = settings(IGNORED_ALERTS_MAX_NAMES="3")
    record(clean_db, config, [a for i in range(10) for a in ignored(f"Noise{i}")] + ignored("Loud", 5))
    rows = counted(clean_db)
    names = {n for n, _ in rows} - {OTHER}
    assert len(names) == 3 and "Loud" in names, rows  # the batch's biggest name takes a place
    assert sum(rows.values()) == 15
    assert rows[(OTHER, REASON)] == 15 - sum(c for (n, _), c in rows.items() if n != OTHER)


def test_a_name_counted_apart_keeps_its_row_and_new_names_go_to_other(clean_db):
    config = settings(IGNORED_ALERTS_MAX_NAMES="2")
    record(clean_db, config, ignored("A") + ignored("B"))
    before = counted(clean_db)
    record(clean_db, config, ignored("A", 3) + ignored("C", 2) + ignored("D", 1, reason="severity none is in IGNORED_SEVERITIES"))
    after = counted(clean_db)
    assert after == {("A", REASON): 4, ("B", REASON): 1, (OTHER, REASON): 2, (OTHER, "severity none is in IGNORED_SEVERITIES"): 1}
    # Counters only ever grow: no series of the first read went down.
    assert all(after[key] >= value for key, value in before.items())


def test_many_distinct_names_over_many_batches_stay_bounded(clean_db):
    config = settings(IGNORED_ALERTS_MAX_NAMES="50")
    for batch in range(20):
        record(clean_db, config, [a for i in range(50) for a in ignored(f"Attack{batch}-{i}")])
    rows = counted(clean_db)
    assert len({n for n, _ in rows}) == 51 and sum(rows.values()) == 1000


def test_metrics_expose_the_bounded_series(clean_db):
    config = settings(IGNORED_ALERTS_MAX_NAMES="1")
    record(clean_db, config, ignored("Kept", 2) + ignored("Folded"))
    with clean_db.connect() as conn:
        family = next(DatabaseCollector()._intake(conn))
    assert family.name == "alerts_ignored" and "IGNORED_ALERTS_MAX_NAMES" in family.documentation
    assert {(s.labels["alertname"], s.value) for s in family.samples if s.name == "alerts_ignored_total"} == {("Kept", 2), (OTHER, 1)}


def test_retention_frees_the_place_of_a_name_no_longer_ignored_and_keeps_other(clean_db):
    config = settings(IGNORED_ALERTS_MAX_NAMES="1", RETENTION_IGNORED_DAYS="1")
    record(clean_db, config, ignored("Old") + ignored("Folded"))
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE ignored_alerts SET last_seen_at = last_seen_at - interval '2 days'"))
    retention.run(clean_db, config)
    assert counted(clean_db) == {(OTHER, REASON): 1}
    record(clean_db, config, ignored("New"))
    assert counted(clean_db) == {(OTHER, REASON): 1, ("New", REASON): 1}


def test_the_sweep_folds_names_past_the_bound_smallest_first(clean_db):
    """Two intake transactions can each take the last free place; the sweep
    puts the table back within the bound without losing a count."""
    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO ignored_alerts (alert_name, reason, count) VALUES "
            "('Big', :r, 9), ('Mid', :r, 5), ('Small', :r, 2), ('Small', 'other reason', 1), (:other, :r, 4)"),
            {"r": REASON, "other": OTHER})
    retention.run(clean_db, settings(IGNORED_ALERTS_MAX_NAMES="2"))
    assert counted(clean_db) == {("Big", REASON): 9, ("Mid", REASON): 5, (OTHER, REASON): 6, (OTHER, "other reason"): 1}


def test_a_webhook_of_many_distinct_ignored_names_adds_a_bounded_number_of_series(base_env, clean_db):
    """Over HTTP, as AlertManager and Prometheus see it: the intake with its
    setting from the environment, /metrics of the query function."""
    env = {**base_env, "IGNORED_ALERTS_MAX_NAMES": "5", "METRICS_PUBLIC": "true"}
    intake, query = FunctionProcess("intake", env).start(), FunctionProcess("query", env).start()
    try:
        payload = webhook([raw_alert(f"Spray{i}", severity="info") for i in range(200)])
        response = requests.post(intake.url + "/webhook/alert", json=payload, headers=AUTH, timeout=30)
        assert response.status_code == 200 and response.json()["counts"] == {"ignored": 200}, response.text[:300]
        metrics = requests.get(query.url + "/metrics", timeout=30).text
    finally:
        intake.stop()
        query.stop()
    (family,) = [f for f in text_string_to_metric_families(metrics) if f.name == "alerts_ignored"]
    series = {s.labels["alertname"]: s.value for s in family.samples if s.name == "alerts_ignored_total"}
    assert len(series) == 6 and series[OTHER] == 195 and sum(series.values()) == 200, series
