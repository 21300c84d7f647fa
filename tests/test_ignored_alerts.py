"""The counts of ignored alerts are bounded: at most IGNORED_ALERTS_MAX_NAMES
alert names are counted apart (rows of ignored_alerts, series of
alerts_ignored_total), everything else under alertname="__other__", and no
ignored alert goes uncounted."""

from __future__ import annotations

import dataclasses
import logging
import threading

import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from functions.query.metrics import DatabaseCollector
from loopback.processes import FunctionProcess, wait_until
from shared import incidents as svc
from shared import retention
from shared.config import load_settings
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook
from tests.holding import waits_for_a_lock

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
    record(clean_db, config, ignored("Old", 2) + ignored("Folded"))
    assert counted(clean_db) == {("Old", REASON): 2, (OTHER, REASON): 1}
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


SEVERITY = "severity none is in IGNORED_SEVERITIES"  # sorts after REASON


def fold_held_after_its_lock(engine, config, intake_alerts, until) -> dict[str, str]:
    """Run the sweep's fold, hold it just after it locked the rows it folds,
    count ``intake_alerts`` meanwhile in another session, and let the fold
    go on once ``until()`` is true: the interleaving is certain, not likely.
    The first line of each side's error ({} when neither failed)."""
    locked, go_on = threading.Event(), threading.Event()
    errors: dict[str, str] = {}

    def hold_the_fold(conn, cursor, statement, parameters, context, executemany):
        if (threading.current_thread().name == "fold" and "ignored_alerts" in statement
                and "FOR UPDATE" in statement and "SKIP LOCKED" not in statement):
            locked.set()
            go_on.wait(20)

    def run(name, work):
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a deadlock, reported to the test
            errors[name] = str(exc).splitlines()[0]

    fold = threading.Thread(target=run, args=("fold", lambda: retention.run(engine, config)), name="fold")
    intake = threading.Thread(target=run, args=("intake", lambda: record(engine, config, intake_alerts)), name="intake")
    sa.event.listen(engine, "after_cursor_execute", hold_the_fold)
    try:
        fold.start()
        assert locked.wait(20), errors
        intake.start()
        wait_until(until, 20, message="the intake at the point under test")
    finally:
        go_on.set()
        fold.join(30)
        intake.join(30)
        sa.event.remove(engine, "after_cursor_execute", hold_the_fold)
    assert not fold.is_alive() and not intake.is_alive()
    return errors


def test_the_sweeps_fold_and_an_intake_counting_new_names_as_other_do_not_deadlock(clean_db):
    """The fold folds B (reason REASON) into __other__, which has no row of
    that reason yet. Between the fold's lock and its write, an intake counts
    C (REASON) and D (SEVERITY) as __other__: it inserts (__other__, REASON)
    and waits for (__other__, SEVERITY), which the fold holds. Had the fold
    then inserted (__other__, REASON) itself, each would wait for the other."""
    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO ignored_alerts (alert_name, reason, count) VALUES ('A', :r, 5), ('B', :r, 1), (:other, :s, 1)"),
            {"r": REASON, "s": SEVERITY, "other": OTHER})
    errors = fold_held_after_its_lock(clean_db, settings(IGNORED_ALERTS_MAX_NAMES="1"),
                                      ignored("C") + ignored("D", reason=SEVERITY), lambda: waits_for_a_lock(clean_db))
    assert errors == {}
    # B folded into __other__, C and D counted there: nothing lost.
    assert counted(clean_db) == {("A", REASON): 5, (OTHER, REASON): 2, (OTHER, SEVERITY): 2}


def test_the_fold_writes_only_the_rows_it_locked(clean_db):
    """B is past the bound when the fold locks its rows; before the fold
    writes, an intake commits ten more of B under another reason, so that A
    is now the smaller name. The fold folds what it locked (B's first row),
    not A, whose rows it never locked; B's new row waits for the next sweep."""
    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO ignored_alerts (alert_name, reason, count) VALUES ('A', :r, 5), ('B', :r, 1), (:other, :s, 1)"),
            {"r": REASON, "s": SEVERITY, "other": OTHER})
    intake_done = lambda: counted(clean_db).get(("B", SEVERITY)) == 10  # noqa: E731
    errors = fold_held_after_its_lock(clean_db, settings(IGNORED_ALERTS_MAX_NAMES="1"), ignored("B", 10, reason=SEVERITY), intake_done)
    assert errors == {}
    assert counted(clean_db) == {("A", REASON): 5, ("B", SEVERITY): 10, (OTHER, REASON): 1, (OTHER, SEVERITY): 1}


def test_a_fold_that_meets_a_held_lock_gives_way_and_the_next_sweep_folds(clean_db, caplog):
    """An intake transaction holds an OTHER row longer than the fold's
    lock_timeout: the sweep goes on without an error and folds next time."""
    caplog.set_level(logging.INFO, logger="retention")
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO ignored_alerts (alert_name, reason, count) VALUES ('A', :r, 5), ('B', :r, 1), (:other, :r, 1)"),
                     {"r": REASON, "other": OTHER})
    config = settings(IGNORED_ALERTS_MAX_NAMES="1")
    with clean_db.connect() as intake, intake.begin():
        intake.execute(sa.text("SELECT 1 FROM ignored_alerts WHERE alert_name = :other FOR UPDATE"), {"other": OTHER})
        report = retention.run(clean_db, config)
    assert "ignored_past_bound" not in report.pruned
    assert "next sweep" in caplog.text
    assert counted(clean_db) == {("A", REASON): 5, ("B", REASON): 1, (OTHER, REASON): 1}
    assert retention.run(clean_db, config).pruned["ignored_past_bound"] == 1
    assert counted(clean_db) == {("A", REASON): 5, (OTHER, REASON): 2}
