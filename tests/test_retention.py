"""Retention (shared/retention.py): published outbox rows, completed claims
and old timeline entries go, oldest first, in bounded batches; what is still
work, still active or recent stays; incidents stay. And the sweep runs it."""

from __future__ import annotations

import dataclasses

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess
from shared import incidents as svc
from shared import retention
from shared.config import ConfigError, load_settings
from tests.conftest import TEST_TOKEN
from tests.factories import alert

DAY = "interval '1 day'"


def _aged(conn, sql: str, **params) -> None:
    conn.execute(sa.text(sql), params)


def seed(engine) -> dict:
    """Two incidents, one resolved 30 days ago and one open, each with
    outbox rows, claims and timeline entries of every age and state."""
    with engine.begin() as conn:
        result = svc.record_alerts(conn, [alert("Old", instance="a"), alert("Open", instance="b")], "/t", "test")
        old, active = (o.incident_id for o in result.outcomes)
        _aged(conn, "UPDATE incidents SET status = 'resolved', resolved_at = now() - 30 * interval '1 day', "
                    "created_at = now() - 31 * interval '1 day' WHERE id = :i", i=old)
        conn.execute(sa.text("DELETE FROM event_outbox"))
        for n in range(5):  # published 10 days ago: pruned
            _aged(conn, "INSERT INTO event_outbox (id, type, source, published_at) VALUES (:id, 't', '/s', now() - 10 * interval '1 day')",
                  id=f"old-published-{n}")
        _aged(conn, "INSERT INTO event_outbox (id, type, source, published_at) VALUES ('recent-published', 't', '/s', now())")
        _aged(conn, "INSERT INTO event_outbox (id, type, source, created_at) VALUES ('old-pending', 't', '/s', now() - 10 * interval '1 day')")
        _aged(conn, "INSERT INTO event_outbox (id, type, source, created_at, parked_at) VALUES "
                    "('old-parked', 't', '/s', now() - 10 * interval '1 day', now() - 10 * interval '1 day')")
        for key, incident, completed in (("done-old-resolved", old, "now() - 10 * interval '1 day'"),
                                         ("done-old-open", active, "now() - 10 * interval '1 day'"),
                                         ("done-recent-resolved", old, "now()"),
                                         ("unfinished-old-resolved", old, "NULL"),
                                         ("done-old-no-incident", None, "now() - 10 * interval '1 day'")):
            _aged(conn, f"INSERT INTO work_claims (key, incident_id, claimed_at, completed_at) "
                        f"VALUES (:k, :i, now() - 10 * interval '1 day', {completed})", k=key, i=incident)
        for fingerprint, released in (("released-40-days", "now() - 40 * interval '1 day'"), ("released-40-days-2", "now() - 40 * interval '1 day'"),
                                      ("released-today", "now()"), ("held-since-40-days", "NULL")):
            _aged(conn, f"INSERT INTO suppressed_alerts (fingerprint, alert_name, status, alert, first_suppressed_at, last_seen_at, released_at) "
                        f"VALUES (:f, 'Held', 'firing', '{{}}', now() - 41 * interval '1 day', now() - 40 * interval '1 day', {released})",
                  f=fingerprint)
        conn.execute(sa.text("DELETE FROM incident_timeline"))
        for incident, days, kind in ((old, 400, "old-of-resolved"), (old, 400, "old-of-resolved"), (old, 10, "recent-of-resolved"),
                                     (active, 400, "old-of-open")):
            _aged(conn, f"INSERT INTO incident_timeline (incident_id, at, kind) VALUES (:i, now() - {days} * interval '1 day', :k)",
                  i=incident, k=kind)
    return {"old": old, "active": active}


def remaining(engine) -> dict:
    with engine.connect() as conn:
        return {
            "outbox": sorted(conn.execute(sa.text("SELECT id FROM event_outbox")).scalars()),
            "claims": sorted(conn.execute(sa.text("SELECT key FROM work_claims")).scalars()),
            "timeline": sorted(conn.execute(sa.text("SELECT kind FROM incident_timeline")).scalars()),
            "suppressed": sorted(conn.execute(sa.text("SELECT fingerprint FROM suppressed_alerts")).scalars()),
            "incidents": conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar(),
        }


def test_old_rows_go_in_bounded_batches_and_work_active_and_recent_rows_stay(clean_db, settings_obj):
    seed(clean_db)
    config = dataclasses.replace(settings_obj, retention_batch=2, retention_max_batches=2)
    first = retention.run(clean_db, config)
    # Two batches of two at most per kind and sweep: one old published row is left.
    assert first.pruned == {"outbox": 4, "claims": 2, "timeline": 2, "suppressed": 2, "ignored": 0, "board_sessions": 0}
    assert len([i for i in remaining(clean_db)["outbox"] if i.startswith("old-published")]) == 1
    second = retention.run(clean_db, config)
    assert second.pruned == {"outbox": 1, "claims": 0, "timeline": 0, "suppressed": 0, "ignored": 0, "board_sessions": 0}
    assert remaining(clean_db) == {
        "outbox": ["old-parked", "old-pending", "recent-published"],
        "claims": ["done-old-open", "done-recent-resolved", "unfinished-old-resolved"],
        "timeline": ["old-of-open", "recent-of-resolved"],
        "suppressed": ["held-since-40-days", "released-today"],
        "incidents": 2,
    }


def test_the_opening_of_an_active_incidents_generation_and_root_stays(clean_db, settings_obj):
    # Reconciliation watches the steps after it, and re-sends a stuck
    # escalation, however long the incident stays active.
    with clean_db.begin() as conn:
        result = svc.record_alerts(conn, [alert("Active", instance="a"), alert("Ended", instance="b")], "/t", "test")
        active, ended = (o.incident_id for o in result.outcomes)
        _aged(conn, "UPDATE incidents SET generation = 1, root_generation = 2 WHERE id = :i", i=active)
        _aged(conn, "UPDATE incidents SET status = 'resolved', resolved_at = now() WHERE id = :i", i=ended)
        conn.execute(sa.text("DELETE FROM event_outbox"))
        for incident, suffix in ((active, "opened.1"), (active, "opened.1.root2"), (active, "opened.1.root1"),
                                 (active, "opened.0"), (active, "opened.1.r1"), (active, "diagnosed.1.root2"),
                                 (ended, "opened.0")):
            _aged(conn, "INSERT INTO event_outbox (id, type, source, subject, published_at) "
                        "VALUES (:id, 't', '/s', :i, now() - 10 * interval '1 day')", id=f"{incident}.{suffix}", i=incident)
    assert retention.run(clean_db, settings_obj).pruned["outbox"] == 5
    assert remaining(clean_db)["outbox"] == sorted([f"{active}.opened.1", f"{active}.opened.1.root2"])


def test_zero_keeps_a_kind_forever(clean_db, settings_obj):
    seed(clean_db)
    config = dataclasses.replace(settings_obj, retention_outbox_hours=0, retention_claims_hours=0, retention_timeline_days=0,
                                 retention_suppressed_days=0, retention_ignored_days=0)
    assert retention.run(clean_db, config).pruned == {"board_sessions": 0}  # a session past its end is no record
    left = remaining(clean_db)
    assert len(left["outbox"]) == 8 and len(left["claims"]) == 5 and len(left["timeline"]) == 4 and len(left["suppressed"]) == 4


def test_ended_board_sessions_go_in_bounded_batches_live_ones_stay(clean_db, settings_obj):
    """A personal session is a row (shared/board_sessions.py); one that
    expired, or sat idle past BOARD_IDLE_TIMEOUT_MINUTES, is deleted by the
    sweep too, not only by the next sign-in."""
    with clean_db.begin() as conn:
        for n, (expires, seen) in enumerate([("- interval '1 minute'", "")] * 5 + [("+ interval '1 hour'", "- interval '2 hours'"),
                                                                                   ("+ interval '1 hour'", "")]):
            conn.execute(sa.text(
                "INSERT INTO board_sessions (id_hash, user_name, token_stamp, created_at, expires_at, last_seen) VALUES "
                f"(:id, 'alice', 's', now() - interval '12 hours', timezone('utc', now()) {expires}, timezone('utc', now()) {seen})"),
                {"id": f"{n:064d}"})

    def left():
        with clean_db.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM board_sessions")).scalar()

    config = dataclasses.replace(settings_obj, retention_batch=2, retention_max_batches=2)
    assert retention.run(clean_db, config).pruned["board_sessions"] == 4 and left() == 3
    assert retention.run(clean_db, config).pruned["board_sessions"] == 1 and left() == 2
    # With an idle timeout of an hour, the one unused for two hours goes too.
    idle = dataclasses.replace(config, board_idle_timeout_minutes=60)
    assert retention.run(clean_db, idle).pruned["board_sessions"] == 1 and left() == 1


def test_claims_may_not_be_pruned_before_reconciliation_is_done_with_them():
    with pytest.raises(ConfigError, match="RETENTION_CLAIMS_HOURS"):
        load_settings({"DATABASE_URL": "postgresql://x@h/d", "RETENTION_CLAIMS_HOURS": "12", "RECONCILE_HORIZON_SECONDS": "86400"})
    assert load_settings({"DATABASE_URL": "postgresql://x@h/d", "RETENTION_CLAIMS_HOURS": "24"}).retention_claims_hours == 24


def test_the_sweep_prunes(clean_db, base_env):
    seed(clean_db)
    intake = FunctionProcess("intake", {**base_env, "RETENTION_BATCH": "2", "RETENTION_MAX_BATCHES": "100"}, threads=2).start()
    try:
        response = requests.post(intake.url + "/outbox/sweep", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=30)
        assert response.status_code == 200
    finally:
        intake.stop()
    left = remaining(clean_db)
    assert not [i for i in left["outbox"] if i.startswith("old-published")]
    assert "done-old-resolved" not in left["claims"] and "old-of-resolved" not in left["timeline"]
    assert left["suppressed"] == ["held-since-40-days", "released-today"]
    assert left["incidents"] == 2
