"""Noise control on an injected clock, against the real PostgreSQL: flapping,
maintenance windows, the pipeline heartbeat. Nothing sleeps: the tests set
shared.clock and run the sweep themselves."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from functions.escalation.handler import taken_by_a_person
from shared import clock, maintenance, noise
from shared import incidents as svc
from shared.config import load_settings
from shared.errors import BadRequest, Conflict
from loopback.processes import wait_until
from tests.factories import alert
from tests.holding import waits_for_a_lock

T0 = datetime(2026, 11, 28, 3, 0, 0)


@pytest.fixture
def at():
    clock.set_now(T0)
    yield clock
    clock.set_now(None)


def settings(database_url, **env):
    return load_settings({"DATABASE_URL": database_url, **env})


def record(engine, config, *alerts, actor="alertmanager"):
    with engine.begin() as conn:
        return svc.record_alerts(conn, list(alerts), "/t", actor, 0, config=config)


def sweep(engine, config):
    def store(conn, alerts, actor):
        return svc.record_alerts(conn, alerts, "/t", actor, 0, config=config)
    return noise.sweep(engine, config, store)


def rows(engine, sql, **params):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


def opened_events(engine):
    return [r["id"] for r in rows(engine, "SELECT id FROM event_outbox WHERE type LIKE '%.opened' ORDER BY created_at")]


def incidents_of(engine, fingerprint):
    return rows(engine, "SELECT id, status, generation, resolved_by FROM incidents WHERE fingerprint = :f ORDER BY created_at",
                f=fingerprint)


def timeline_kinds(engine, incident_id):
    with engine.connect() as conn:
        return [t["kind"] for t in svc.get_timeline(conn, incident_id)]


def flips(engine, config, a, count, every_seconds=60):
    """The alert fires, then changes state ``count`` times."""
    outcomes = [record(engine, config, a).outcomes[0]]
    for n in range(count):
        clock.advance(every_seconds)
        status = "resolved" if n % 2 == 0 else "firing"
        outcomes.append(record(engine, config, replace(a, status=status)).outcomes[0])
    return outcomes


# ------------------------------------------------------------------ flapping


def test_six_flips_in_ten_minutes_flag_one_incident_that_is_paged_once(database_url, clean_db, at):
    config = settings(database_url, FLAP_THRESHOLD="2")
    a = alert("Flappy", service="email")
    outcomes = flips(clean_db, config, a, 6)
    (incident,) = incidents_of(clean_db, a.fingerprint)
    assert incident["status"] == "open" and incident["generation"] == 0
    assert len(opened_events(clean_db)) == 1  # P0 pages on open: one page
    kinds = timeline_kinds(clean_db, incident["id"])
    assert kinds.count("flapping") == 1 and kinds.count("flap") >= 4
    assert [o.action for o in outcomes].count("flapping") == 2  # the resolutions after the flag are withheld
    assert rows(clean_db, "SELECT count(*) AS n FROM event_outbox WHERE type LIKE '%.resolved'")[0]["n"] == 1


def test_with_the_defaults_six_flips_in_ten_minutes_page_once(database_url, clean_db, at):
    config = settings(database_url)
    assert (config.flap_threshold, config.flap_window_seconds, config.flap_quiet_seconds) == (2, 600, 600)
    a = alert("Flappy", service="email")
    record(clean_db, config, a)
    for n in range(6):
        clock.advance(100)
        record(clean_db, config, replace(a, status="resolved" if n % 2 == 0 else "firing"))
    (incident,) = incidents_of(clean_db, a.fingerprint)
    assert incident["status"] == "open" and "flapping" in timeline_kinds(clean_db, incident["id"])
    assert len(opened_events(clean_db)) == 1
    # ... and a dozen more flips change nothing either: no page, no new generation for remediation.
    for n in range(12):
        clock.advance(30)
        record(clean_db, config, replace(a, status="resolved" if n % 2 == 0 else "firing"))
    assert len(opened_events(clean_db)) == 1
    assert [i["generation"] for i in incidents_of(clean_db, a.fingerprint)] == [0]


def test_a_fix_that_does_not_hold_is_paged_at_once_not_taken_for_flapping(database_url, clean_db, at):
    config = settings(database_url)
    a = alert("EmailServiceDown", service="email")
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [a], "/t", "alertmanager", 1800, config=config).outcomes[0].incident_id
        svc.transition(conn, incident_id, "investigating", "remediation", "/t")
        svc.transition(conn, incident_id, "resolved", "remediation", "/t", resolved_by="remediation")
    clock.advance(60)
    record(clean_db, config, replace(a, status="resolved"))
    clock.advance(60)
    again = replace(a, starts_at=T0 + timedelta(minutes=2))
    with clean_db.begin() as conn:
        outcome = svc.record_alerts(conn, [again], "/t", "alertmanager", 1800, config=config).outcomes[0]
    assert (outcome.action, outcome.incident_id) == ("reopened", incident_id)
    assert f"{incident_id}.opened.1" in opened_events(clean_db)
    assert "flapping" not in timeline_kinds(clean_db, incident_id)


def test_flips_spread_wider_than_the_window_are_not_flapping(database_url, clean_db, at):
    config = settings(database_url, FLAP_THRESHOLD="3", FLAP_WINDOW_SECONDS="600")
    a = alert("Slow")
    flips(clean_db, config, a, 6, every_seconds=400)
    assert all("flapping" not in timeline_kinds(clean_db, i["id"]) for i in incidents_of(clean_db, a.fingerprint))
    assert len(incidents_of(clean_db, a.fingerprint)) == 4


def test_the_flag_clears_after_a_quiet_period_and_a_resolved_alert_then_resolves_its_incident(database_url, clean_db, at):
    config = settings(database_url, FLAP_THRESHOLD="2", FLAP_QUIET_SECONDS="900")
    a = alert("Flappy")
    flips(clean_db, config, a, 5)  # ends resolved, withheld
    (incident,) = incidents_of(clean_db, a.fingerprint)
    assert incident["status"] == "open"
    clock.advance(899)
    assert sweep(clean_db, config) == []
    assert incidents_of(clean_db, a.fingerprint)[0]["status"] == "open"
    clock.advance(2)
    event_ids = sweep(clean_db, config)
    assert event_ids == [f"{incident['id']}.resolved.0"]
    assert incidents_of(clean_db, a.fingerprint)[0]["status"] == "resolved"
    assert timeline_kinds(clean_db, incident["id"])[-2:] == ["flapping_cleared", "resolved"]
    # Settled: the next firing is an ordinary new incident again.
    clock.advance(60)
    assert record(clean_db, config, a).outcomes[0].action == "created"


# ------------------------------------------------------------------ maintenance windows


def window(engine, matchers, start, end, reason="node upgrade", actor="api:alice"):
    with engine.begin() as conn:
        return maintenance.create(conn, matchers, start, end, reason, actor)


def test_a_window_suppresses_then_releases_a_still_firing_alert_within_one_sweep(database_url, clean_db, at):
    config = settings(database_url)
    w = window(clean_db, ['service="email"', 'severity=~"crit.*"'], T0, T0 + timedelta(minutes=30))
    a = alert("EmailDown", service="email", severity="critical")
    other = alert("WebDown", service="web", severity="critical")
    outcomes = record(clean_db, config, a, other).outcomes
    assert [o.action for o in outcomes] == ["suppressed", "created"]
    assert w["id"] in outcomes[0].reason
    clock.advance(60)
    assert record(clean_db, config, a).outcomes[0].action == "suppressed"
    (held,) = rows(clean_db, "SELECT fingerprint, status, count, released_at FROM suppressed_alerts")
    assert (held["fingerprint"], held["status"], held["count"], held["released_at"]) == (a.fingerprint, "firing", 2, None)
    assert incidents_of(clean_db, a.fingerprint) == []
    assert sweep(clean_db, config) == []  # the window still runs
    clock.set_now(T0 + timedelta(minutes=30))
    event_ids = sweep(clean_db, config)
    (incident,) = incidents_of(clean_db, a.fingerprint)
    assert event_ids == [f"{incident['id']}.opened.0"] and incident["status"] == "open"
    (held,) = rows(clean_db, "SELECT released_at, incident_id FROM suppressed_alerts")
    assert held == {"released_at": T0 + timedelta(minutes=30), "incident_id": incident["id"]}
    assert sweep(clean_db, config) == []  # released once


def test_a_held_alert_that_resolved_during_the_window_opens_nothing(database_url, clean_db, at):
    config = settings(database_url)
    window(clean_db, ['alertname="Blip"'], T0, T0 + timedelta(minutes=10))
    a = alert("Blip")
    assert record(clean_db, config, a).outcomes[0].action == "suppressed"
    record(clean_db, config, replace(a, status="resolved"))
    clock.advance(600)
    assert sweep(clean_db, config) == []
    assert incidents_of(clean_db, a.fingerprint) == []
    assert rows(clean_db, "SELECT status, released_at IS NOT NULL AS released FROM suppressed_alerts") == [
        {"status": "resolved", "released": True}]



def test_a_batch_that_fires_and_resolves_an_alert_and_a_resolve_of_two_do_not_deadlock(database_url, clean_db, at):
    """One batch fires and resolves B and resolves A and C; another resolves
    A and B. The first waits (here for C's held row, which the window
    release sweep locks while it replays): had it locked B's rows before
    A's on the way, the second would hold A and wait for B."""
    config = settings(database_url)
    a, b, c = (alert("LockRun", priority="P2", service=s) for s in ("a", "b", "c"))
    record(clean_db, config, a, b)
    with clean_db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO suppressed_alerts (fingerprint, alert_name, status, alert, first_suppressed_at, last_seen_at) "
            "VALUES (:f, :n, 'firing', CAST(:a AS jsonb), timezone('utc', now()), timezone('utc', now()))"),
            {"f": c.fingerprint, "n": c.alert_name, "a": json.dumps(maintenance.alert_to_json(c))})
    resolved = {x.labels["service"]: replace(x, status="resolved") for x in (a, b, c)}
    errors = {}

    def run(name, alerts):
        try:
            record(clean_db, config, *alerts)
        except Exception as exc:  # noqa: BLE001 - a deadlock, reported below
            errors[name] = exc

    with clean_db.connect() as sweeping, sweeping.begin():
        sweeping.execute(sa.text("SELECT 1 FROM suppressed_alerts WHERE fingerprint = :f FOR UPDATE"), {"f": c.fingerprint})
        first = threading.Thread(target=run, args=("first", [b, resolved["b"], resolved["a"], resolved["c"]]))
        first.start()
        wait_until(lambda: waits_for_a_lock(clean_db), 20, message="the first batch waiting for C's held row")
        second = threading.Thread(target=run, args=("second", [resolved["a"], resolved["b"]]))
        second.start()
        second.join(10)
    first.join(30)
    second.join(30)
    assert not errors, {k: str(v).splitlines()[0] for k, v in errors.items()}
    assert {i["status"] for fp in (a.fingerprint, b.fingerprint) for i in incidents_of(clean_db, fp)} == {"resolved"}

def _hold_rows_sent(engine, config, *alerts) -> list[dict]:
    """The rows the batch's one held-alerts statement (maintenance.hold) sent."""
    sent: list[dict] = []

    def note(conn, cursor, statement, parameters, context, executemany):
        if "INSERT INTO suppressed_alerts" in statement:
            values = parameters.values() if isinstance(parameters, dict) else parameters
            sent.extend(row for v in values if isinstance(v, str) and v.startswith("[") for row in json.loads(v))

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        record(engine, config, *alerts)
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    return sent


def test_a_resolution_storm_sends_the_held_alerts_statement_only_each_fingerprint_and_status(database_url, clean_db, at):
    """Resolved alerts only mark held rows resolved (the held row keeps its
    alert), so the batch's writer does not serialise them whole: in a storm
    of resolutions that cost it milliseconds per hundred alerts, inside the
    group commit's transaction."""
    config = settings(database_url)
    window(clean_db, ['alertname="Storm"'], T0, T0 + timedelta(minutes=30))
    held = alert("Storm", service="held")
    assert record(clean_db, config, held).outcomes[0].action == "suppressed"
    clock.advance(60)
    resolved = [replace(held, status="resolved")] + [alert("Paged", status="resolved", service=f"s{n}") for n in range(20)]
    sent = _hold_rows_sent(clean_db, config, alert("Storm", service="firing"), *resolved)
    by_status = {}
    for row in sent:
        by_status.setdefault(row["status"], []).append(row)
    assert sorted(r["fingerprint"] for r in by_status["resolved"]) == sorted(a.fingerprint for a in resolved)
    assert all(set(r) == {"fingerprint", "alert_name", "status"} for r in by_status["resolved"]), by_status["resolved"][0]
    (firing,) = by_status["firing"]
    assert firing["alert"]["labels"]["service"] == "firing"
    # The held alert resolved and kept what it held; the others hold nothing.
    stored = rows(clean_db, "SELECT fingerprint, status, count, alert->'labels'->>'service' AS service FROM suppressed_alerts "
                            "ORDER BY fingerprint")
    assert {r["fingerprint"]: (r["status"], r["count"], r["service"]) for r in stored} == {
        held.fingerprint: ("resolved", 1, "held"), firing["fingerprint"]: ("firing", 1, "firing")}


def test_a_resolution_whose_held_row_is_deleted_meanwhile_keeps_the_held_alert(database_url, clean_db, at):
    """The one way a resolution inserts a row: the held row it joined is
    deleted before its insert. The row then takes the held alert and its
    windows (the resolution sent neither)."""
    config = settings(database_url)
    w = window(clean_db, ['alertname="Gone"'], T0, T0 + timedelta(minutes=30))
    a = alert("Gone")
    assert record(clean_db, config, a).outcomes[0].action == "suppressed"
    clock.advance(60)
    errors: list[Exception] = []

    def resolve():
        try:
            with clean_db.begin() as conn:
                maintenance.hold(conn, [], T0 + timedelta(seconds=60), [replace(a, status="resolved")])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=resolve)
    with clean_db.connect() as deleting, deleting.begin():
        deleting.execute(sa.text("DELETE FROM suppressed_alerts WHERE fingerprint = :f"), {"f": a.fingerprint})
        worker.start()
        wait_until(lambda: errors or waits_for_a_lock(clean_db), 20, message="the resolution waiting for the deleted row")
    worker.join(30)
    assert errors == [], str(errors[0]).splitlines()[0]
    (row,) = rows(clean_db, "SELECT status, alert->>'status' AS alert_status, window_ids, released_at FROM suppressed_alerts")
    assert row == {"status": "resolved", "alert_status": "firing", "window_ids": [w["id"]], "released_at": None}


def _lock_waiters(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")).scalar()


@pytest.mark.parametrize("x_first", [True, False], ids=["x-sorts-first", "y-sorts-first"])
def test_holding_one_held_alert_and_resolving_another_against_the_opposite_batch_does_not_deadlock(
        database_url, clean_db, at, x_first):
    """Both alerts are held by a window. Batch A fires X and resolves Y,
    batch B fires Y and resolves X, at the same moment. Had the held alerts
    been written by two statements (the firing ones, then the resolved
    ones), A would lock X then wait for Y while B locked Y then waited for X:
    a deadlock, whatever the fingerprints' order. A third session (the
    sweep's release, which locks held rows too) holds X until both batches
    wait, so the interleaving is certain: A queues for X first, B takes Y
    and queues for X behind A, then X is let go."""
    config = settings(database_url)
    window(clean_db, ['alertname="OppositeOrder"'], T0, T0 + timedelta(minutes=30))
    x, y = (alert("OppositeOrder", fingerprint=fp) for fp in (("held-x", "held-y") if x_first else ("held-y", "held-x")))
    assert [o.action for o in record(clean_db, config, x, y).outcomes] == ["suppressed", "suppressed"]
    clock.advance(60)
    errors: dict[str, str] = {}

    def batch(name, *alerts):
        try:
            record(clean_db, config, *alerts)
        except Exception as exc:  # noqa: BLE001 - the deadlock, reported below
            errors[name] = str(exc).splitlines()[0]

    a = threading.Thread(target=batch, args=("A", x, replace(y, status="resolved")))
    b = threading.Thread(target=batch, args=("B", y, replace(x, status="resolved")))
    with clean_db.connect() as sweeping, sweeping.begin():
        sweeping.execute(sa.text("SELECT 1 FROM suppressed_alerts WHERE fingerprint = :f FOR UPDATE"), {"f": x.fingerprint})
        a.start()
        wait_until(lambda: _lock_waiters(clean_db) == 1, 20, message="batch A waiting for X")
        b.start()
        wait_until(lambda: _lock_waiters(clean_db) == 2, 20, message="batch B waiting too")
    a.join(30)
    b.join(30)
    assert not a.is_alive() and not b.is_alive()
    assert errors == {}
    # A committed before B: X was resolved by B, Y fired again in B.
    held = {r["fingerprint"]: (r["status"], r["count"]) for r in rows(clean_db, "SELECT fingerprint, status, count FROM suppressed_alerts")}
    assert held == {x.fingerprint: ("resolved", 2), y.fingerprint: ("firing", 2)}


def test_overlapping_windows_suppress_until_the_last_one_ends(database_url, clean_db, at):
    config = settings(database_url)
    window(clean_db, ['namespace="db"'], T0, T0 + timedelta(minutes=20))
    window(clean_db, ['alertname=~"Postgres.*"', 'team!="web"'], T0 + timedelta(minutes=10), T0 + timedelta(minutes=40))
    a = alert("PostgresDown", namespace="db")
    assert record(clean_db, config, a).outcomes[0].action == "suppressed"
    clock.set_now(T0 + timedelta(minutes=25))  # the first ended, the second holds it
    assert sweep(clean_db, config) == []
    assert record(clean_db, config, a).outcomes[0].action == "suppressed"
    clock.set_now(T0 + timedelta(minutes=40))
    assert len(sweep(clean_db, config)) == 1
    assert [i["status"] for i in incidents_of(clean_db, a.fingerprint)] == ["open"]


def test_an_expired_or_future_window_never_suppresses(database_url, clean_db, at):
    config = settings(database_url)
    window(clean_db, ['alertname="Late"'], T0 - timedelta(hours=2), T0 - timedelta(hours=1))
    window(clean_db, ['alertname="Late"'], T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    assert record(clean_db, config, alert("Late")).outcomes[0].action == "created"
    assert rows(clean_db, "SELECT * FROM suppressed_alerts") == []


def test_ending_and_deleting_windows_is_audited_and_releases_at_the_next_sweep(database_url, clean_db, at):
    config = settings(database_url)
    w = window(clean_db, ['service="email"'], T0, T0 + timedelta(hours=4))
    a = alert("EmailDown", service="email")
    record(clean_db, config, a)
    clock.advance(120)
    with clean_db.begin() as conn:
        ended = maintenance.end(conn, w["id"], "board:bob")
        assert ended["ends_at"] == T0 + timedelta(seconds=120) and ended["ended_by"] == "board:bob"
        assert maintenance.end(conn, w["id"], "board:bob") == ended  # harmless again
    assert len(sweep(clean_db, config)) == 1
    future = window(clean_db, ['service="web"'], T0 + timedelta(days=1), T0 + timedelta(days=2))
    with clean_db.begin() as conn, pytest.raises(Conflict):
        maintenance.end(conn, future["id"], "api")
    with clean_db.begin() as conn:
        maintenance.delete(conn, future["id"], "api:carol")
        assert [e["action"] for e in maintenance.audit_of(conn, w["id"])] == ["created", "ended"]
        assert [(e["action"], e["actor"]) for e in maintenance.audit_of(conn, future["id"])] == [
            ("created", "api:alice"), ("deleted", "api:carol")]


@pytest.mark.parametrize("text, labels, expected", [
    ('service="email"', {"service": "email"}, True),
    ('service="email"', {"service": "email2"}, False),
    ('service!="email"', {}, True),
    ('service=~"e.*"', {"service": "email"}, True),
    ('service=~"mail"', {"service": "email"}, False),  # anchored, like AlertManager
    ('service!~"web|api"', {"service": "email"}, True),
    ('service!~"web|api"', {"service": "api"}, False),
    ('summary="a \\"quoted\\" word"', {"summary": 'a "quoted" word'}, True),
    ("team=ops", {"team": "ops"}, True),
])
def test_matchers_follow_alertmanager(text, labels, expected):
    from shared import matchers

    assert matchers.parse(text).matches(labels) is expected


@pytest.mark.parametrize("bad", [[], ["service"], ['service=~"("'], ['x=~"(a)\\\\1"'], ['service=~".*"'], ['a!="b"']])
def test_matchers_that_mean_nothing_or_everything_are_refused(bad):
    from shared import matchers

    with pytest.raises(BadRequest):
        matchers.parse_all(bad)


# ------------------------------------------------------------------ heartbeat


def watchdog(**labels):
    return alert("Watchdog", priority="P2", severity="none", **labels)


def test_the_heartbeat_is_off_until_the_first_watchdog(database_url, clean_db, at):
    config = settings(database_url, HEARTBEAT_TIMEOUT_SECONDS="600")
    clock.advance(86400)
    assert sweep(clean_db, config) == []
    assert rows(clean_db, "SELECT * FROM incidents") == []


def test_a_silent_pipeline_opens_a_p0_and_the_returning_watchdog_resolves_it(database_url, clean_db, at):
    config = settings(database_url, HEARTBEAT_TIMEOUT_SECONDS="600")
    wd = replace(watchdog(prometheus="monitoring/k8s"), ignored_reason="alertname Watchdog is in IGNORED_ALERTNAMES")
    other = replace(watchdog(prometheus="monitoring/other", cluster="b"), ignored_reason="ignored")
    assert record(clean_db, config, wd, other).outcomes[0].action == "ignored"  # still opens nothing itself
    clock.advance(300)
    record(clean_db, config, other)
    clock.advance(300)
    assert sweep(clean_db, config) == []  # exactly at the timeout: not yet
    clock.advance(1)
    (event_id,) = sweep(clean_db, config)
    (incident,) = rows(clean_db, "SELECT id, priority, status, alert_name, summary, labels FROM incidents")
    assert event_id == f"{incident['id']}.opened.0"
    assert (incident["priority"], incident["status"], incident["alert_name"]) == ("P0", "open", "AlertingPipelineSilent")
    assert "alerting pipeline silent" in incident["summary"] and incident["labels"]["prometheus"] == "monitoring/k8s"
    clock.advance(60)
    assert sweep(clean_db, config) == []  # one incident, not one per sweep
    record(clean_db, config, wd)
    assert rows(clean_db, "SELECT status, resolved_by FROM incidents") == [{"status": "resolved", "resolved_by": "alert"}]
    assert rows(clean_db, "SELECT count(*) AS n FROM event_outbox WHERE type LIKE '%.resolved'")[0]["n"] == 1


def test_the_sweep_forgets_settled_fingerprints_but_not_flapping_or_firing_ones(database_url, clean_db, at):
    config = settings(database_url, FLAP_THRESHOLD="2", FLAP_WINDOW_SECONDS="600", FLAP_QUIET_SECONDS="3600")
    settled, firing, flappy = alert("Settled"), alert("StillFiring"), alert("Flappy")
    record(clean_db, config, settled, firing, flappy)
    clock.advance(10)
    record(clean_db, config, replace(settled, status="resolved"), replace(flappy, status="resolved"))
    clock.advance(10)
    record(clean_db, config, flappy)  # second flip: flapping
    clock.advance(601)
    sweep(clean_db, config)
    kept = {r["fingerprint"] for r in rows(clean_db, "SELECT fingerprint FROM alert_flaps")}
    assert kept == {firing.fingerprint, flappy.fingerprint}


def test_the_sweep_forgets_at_most_a_retention_batch_of_settled_fingerprints_and_the_next_sweep_the_rest(
        database_url, clean_db, at):
    """After a storm the settled rows are many: one sweep's transaction
    forgets RETENTION_BATCH of them, not all at once."""
    config = settings(database_url, FLAP_WINDOW_SECONDS="600", RETENTION_BATCH="2")
    settled = [alert("Settled", pod=f"p{i}") for i in range(3)]
    record(clean_db, config, *settled)
    clock.advance(10)
    record(clean_db, config, *(replace(a, status="resolved") for a in settled))
    clock.advance(601)
    sweep(clean_db, config)
    assert rows(clean_db, "SELECT count(*) AS n FROM alert_flaps")[0]["n"] == 1
    sweep(clean_db, config)
    assert rows(clean_db, "SELECT count(*) AS n FROM alert_flaps")[0]["n"] == 0


def test_an_alert_that_settles_firing_after_its_incident_was_reopened_silently_is_paged_once_more(database_url, clean_db, at):
    config = settings(database_url, FLAP_THRESHOLD="2", FLAP_QUIET_SECONDS="900")
    a = alert("Flappy")
    flips(clean_db, config, a, 4)  # fire, resolve (page resolved), fire (flag, silent reopen), resolve, fire
    (incident,) = incidents_of(clean_db, a.fingerprint)
    assert incident["status"] == "open" and len(opened_events(clean_db)) == 1
    clock.advance(901)
    # PagerDuty was told "resolved" before the flag: the still-firing alert must page again, once.
    assert sweep(clean_db, config) == [f"{incident['id']}.opened.1"]
    assert incidents_of(clean_db, a.fingerprint)[0]["generation"] == 1
    assert timeline_kinds(clean_db, incident["id"])[-2:] == ["flapping_cleared", "reopened"]
    clock.advance(60)
    assert sweep(clean_db, config) == []


def test_a_flapping_re_page_is_not_taken_for_a_person_reopening_the_incident(database_url, clean_db, at):
    """The re-page writes a reopened entry (no status moves): escalation must
    not read it as a reopen by hand and keep the new generation's untold
    opening from paging, logging that a person has it."""
    config = settings(database_url, FLAP_THRESHOLD="2", FLAP_QUIET_SECONDS="900")
    a = alert("Flappy")
    flips(clean_db, config, a, 4)
    clock.advance(901)
    (incident_id,) = [e.rsplit(".opened.", 1)[0] for e in sweep(clean_db, config)]
    with clean_db.connect() as conn:
        assert taken_by_a_person(conn, svc.get_incident(conn, incident_id)) is None


def test_an_incident_that_stayed_open_while_flapping_is_not_paged_again_when_it_settles_firing(database_url, clean_db, at):
    config = settings(database_url, FLAP_THRESHOLD="3", FLAP_QUIET_SECONDS="900")
    a = alert("Flappy")
    record(clean_db, config, a)
    clock.advance(60)
    record(clean_db, config, replace(a, status="resolved"))  # flip 1: resolves the first incident
    clock.advance(60)
    record(clean_db, config, a)  # flip 2: a second incident, paged
    clock.advance(60)
    record(clean_db, config, replace(a, status="resolved"))  # flip 3: flag; the second stays open
    clock.advance(60)
    record(clean_db, config, a)  # flip 4: refreshes it
    assert [i["status"] for i in incidents_of(clean_db, a.fingerprint)] == ["resolved", "open"]
    clock.advance(901)
    assert sweep(clean_db, config) == []  # its page was never resolved: nothing to say
    assert len(opened_events(clean_db)) == 2


def test_a_sweep_without_the_database_gives_up_at_once_and_stops_nothing_else(database_url, caplog):
    from loopback.processes import free_port
    from shared import db

    gone = db.create_engine_for(f"postgresql+pg8000://postgres@127.0.0.1:{free_port()}/nowhere", pool_size=1, max_overflow=0)
    try:
        with caplog.at_level("WARNING", logger="noise"):
            assert noise.sweep(gone, settings(database_url), lambda *a: pytest.fail("nothing to record")) == []
    finally:
        gone.dispose()
    assert [r.getMessage() for r in caplog.records if r.name == "noise"] == [
        "Noise-control sweep skipped: the database is unavailable"]


def test_an_alert_resolving_while_the_sweep_releases_it_waits_instead_of_deadlocking(database_url, clean_db):
    """The sweep locks a held alert, then replays it through the screen,
    which locks its flapping row; an intake batch resolving the same alert
    must take the two locks in the same order, or PostgreSQL aborts one."""

    config = settings(database_url)
    firing, resolved = alert("HeldDuringUpgrade", instance="a"), alert("HeldDuringUpgrade", status="resolved", instance="a")
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO alert_flaps (fingerprint, last_status) VALUES (:f, 'firing')"), {"f": firing.fingerprint})
        conn.execute(sa.text(
            "INSERT INTO suppressed_alerts (fingerprint, alert_name, status, alert, first_suppressed_at, last_seen_at) "
            "VALUES (:f, :n, 'firing', CAST(:a AS jsonb), timezone('utc', now()), timezone('utc', now()))"),
            {"f": firing.fingerprint, "n": firing.alert_name, "a": json.dumps(maintenance.alert_to_json(firing))})
    errors = []
    with clean_db.connect() as sweeping:
        with sweeping.begin():
            assert len(sweeping.execute(maintenance._HELD, {"batch": 500}).all()) == 1  # the sweep holds the alert

            def intake():
                try:
                    with clean_db.begin() as conn:
                        noise.screen(conn, [resolved], config)
                except Exception as exc:  # noqa: BLE001 - the assertion below names it
                    errors.append(exc)

            worker = threading.Thread(target=intake)
            worker.start()
            # The intake now waits on one of the sweep's locks.
            wait_until(lambda: rows(clean_db, "SELECT 1 AS x FROM pg_stat_activity WHERE datname = current_database() "
                                              "AND wait_event_type = 'Lock'"), 10, message="the intake waiting on a lock")
            try:
                noise.screen(sweeping, [firing], config)  # the replay's screen
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        worker.join(30)
    assert errors == []


def _statements_of(engine, config, *alerts) -> list[str]:
    seen: list[str] = []

    def note(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        record(engine, config, *alerts)
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    return seen


def test_a_firing_batch_with_no_window_reads_the_windows_and_locks_its_flapping_rows_in_one_statement(database_url, clean_db, at):
    config = settings(database_url)
    first = _statements_of(clean_db, config, alert("Quiet", fingerprint="quiet-1"))
    # The maintenance windows and the alert's flapping row together (the
    # lock step writes a new alert's first sighting, so there is nothing to
    # save), the upsert: two statements for a new alert.
    assert len(first) == 2, first
    # The function (migrations 0018, 0020) that reads the windows and locks the rows.
    assert "noise_flaps_unless_windowed(" in first[0], first
    # A repeat that changes nothing saves nothing either; a flip saves its row.
    clock.advance(60)
    assert len(_statements_of(clean_db, config, alert("Quiet", fingerprint="quiet-1"))) == 2
    clock.advance(60)
    flipped = _statements_of(clean_db, config, alert("Quiet", fingerprint="quiet-1", status="resolved"))
    assert any("flaps_save(" in s for s in flipped), flipped


def test_with_a_window_active_elsewhere_a_flapping_alert_is_still_flagged(database_url, clean_db, at):
    """The batch then takes the steps one by one (no flapping row locked
    before the windows are matched), and flapping works as without a window."""
    config = settings(database_url, FLAP_THRESHOLD="2")
    window(clean_db, ['service="web"'], T0, T0 + timedelta(hours=1))
    a = alert("Flappy", service="email")
    outcomes = flips(clean_db, config, a, 6)
    assert [o.action for o in outcomes].count("flapping") == 2
    assert [o.action for o in outcomes].count("suppressed") == 0


@pytest.mark.parametrize("last", ["firing", "resolved"])
def test_a_repeat_of_a_flapping_alert_keeps_its_last_flip_so_the_flag_stays_until_it_is_quiet(database_url, clean_db, at, last):
    config = settings(database_url, FLAP_THRESHOLD="2", FLAP_QUIET_SECONDS="600")
    a = alert("Flappy", service="email")
    flips(clean_db, config, a, 8 if last == "firing" else 9)  # one flip a minute, flagged early on
    (before,) = rows(clean_db, "SELECT last_flip_at, last_status FROM alert_flaps WHERE fingerprint = :f", f=a.fingerprint)
    assert before["last_status"] == last
    clock.advance(20)
    record(clean_db, config, replace(a, status=last))  # AlertManager re-sends the group: same status
    (after,) = rows(clean_db, "SELECT last_flip_at FROM alert_flaps WHERE fingerprint = :f", f=a.fingerprint)
    assert after["last_flip_at"] == before["last_flip_at"]
    clock.advance(300)  # quiet for 5 minutes of the 10 it needs, flagged for longer than 10
    sweep(clean_db, config)
    (swept,) = rows(clean_db, "SELECT flapping_since FROM alert_flaps WHERE fingerprint = :f", f=a.fingerprint)
    assert swept["flapping_since"] is not None


def test_the_sweep_clearing_a_held_flapping_alert_and_the_intake_resolving_it_do_not_deadlock(database_url, clean_db):
    from shared import flapping

    config = settings(database_url)
    resolved = alert("HeldFlappy", status="resolved", instance="a")
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO alert_flaps (fingerprint, last_status, flips, last_flip_at, flapping_since) "
                             "VALUES (:f, 'resolved', '[]', timezone('utc', now()) - interval '2 hours', "
                             "timezone('utc', now()) - interval '3 hours')"), {"f": resolved.fingerprint})
        conn.execute(sa.text(
            "INSERT INTO suppressed_alerts (fingerprint, alert_name, status, alert, first_suppressed_at, last_seen_at) "
            "VALUES (:f, :n, 'firing', CAST(:a AS jsonb), timezone('utc', now()), timezone('utc', now()))"),
            {"f": resolved.fingerprint, "n": resolved.alert_name, "a": json.dumps(maintenance.alert_to_json(replace(resolved, status="firing")))})
    errors = []

    def intake():
        try:
            with clean_db.begin() as conn:
                noise.screen(conn, [resolved], config)
        except Exception as exc:  # noqa: BLE001 - the deadlock, reported below
            errors.append(exc)

    with clean_db.connect() as sweeping, sweeping.begin():
        resolutions, _ = flapping.clear_quiet(sweeping, clock.now(), config.flap_quiet_seconds)
        assert [a.fingerprint for a in resolutions] == [resolved.fingerprint]
        worker = threading.Thread(target=intake)
        worker.start()
        wait_until(lambda: rows(clean_db, "SELECT 1 AS x FROM pg_stat_activity WHERE datname = current_database() "
                                          "AND wait_event_type = 'Lock'"), 10, message="the intake waiting on the sweep's lock")
        try:
            svc.record_alerts(sweeping, resolutions, "/t", flapping.ACTOR, 0, config=config)  # the sweep records them
        except Exception as exc:  # noqa: BLE001 - the deadlock, reported below
            errors.append(exc)
    worker.join(30)
    assert errors == []


def test_a_part_stopped_at_its_lock_bound_is_logged_as_such_and_the_other_parts_still_run(database_url, clean_db, at, caplog):
    """The sweep's transactions wait 1 s for a lock (DB_SWEEP_LOCK_TIMEOUT_SECONDS):
    one part meeting a lock a request or a migration holds is routine, not
    the database being away; the flapping and heartbeat parts still run."""
    from shared import db

    config = settings(database_url, HEARTBEAT_TIMEOUT_SECONDS="600")
    record(clean_db, config, replace(watchdog(prometheus="monitoring/k8s"), ignored_reason="ignored"))
    clock.advance(601)
    swept = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0.2, 5.0))
    try:
        with clean_db.connect() as locker:
            # What the maintenance part reads first: the held alerts.
            locker.execute(sa.text("LOCK TABLE suppressed_alerts IN ACCESS EXCLUSIVE MODE"))
            with caplog.at_level("WARNING", logger="noise"):
                (event_id,) = noise.sweep(swept, config, lambda conn, alerts, actor: svc.record_alerts(
                    conn, alerts, "/t", actor, 0, config=config))
            locker.rollback()
    finally:
        swept.dispose()
    assert event_id.endswith(".opened.0")  # the heartbeat part ran: the silent pipeline's P0
    messages = [(r.getMessage(), getattr(r, "part", None), r.levelname) for r in caplog.records if r.name == "noise"]
    assert messages == [("Noise-control sweep part stopped at its database lock_timeout; the next sweep retries",
                         "maintenance", "WARNING"),
                        ("Alerting pipeline silent: no Watchdog within HEARTBEAT_TIMEOUT_SECONDS", None, "ERROR")]
