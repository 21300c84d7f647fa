"""The data-access API against real PostgreSQL."""

import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from shared import clock
from shared import incidents as svc
from shared.errors import Conflict, InvalidTransition, NotFound
from tests.factories import alert
from tests.holding import against_a_resolve

SOURCE = "/test"


def record(engine, *alerts):
    with engine.begin() as conn:
        return svc.record_alerts(conn, list(alerts), SOURCE, "alertmanager")


def test_firing_alert_opens_incident_with_timeline_and_outbox_event(clean_db):
    result = record(clean_db, alert("TestIncident", service="email"))
    (outcome,) = result.outcomes
    assert outcome.action == "created"
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, outcome.incident_id)
        timeline = svc.get_timeline(conn, outcome.incident_id)
        events = conn.execute(sa.text("SELECT id, type, extensions, data FROM event_outbox")).mappings().all()
    assert (row["alert_name"], row["priority"], row["status"]) == ("TestIncident", "P0", "open")
    assert row["labels"]["service"] == "email" and row["source"] == "alertmanager"
    assert row["diagnostics"] == {} and row["remediation_actions"] == []
    assert [t["kind"] for t in timeline] == ["opened"]
    (event,) = events
    assert event["type"] == "io.incidentresponse.incident.opened"
    assert event["extensions"] == {"priority": "p0", "alertname": "TestIncident"}
    assert event["data"]["incident_id"] == outcome.incident_id
    assert result.event_ids == [event["id"]]


def test_repeat_of_active_fingerprint_refreshes_instead_of_opening(clean_db):
    first = record(clean_db, alert()).outcomes[0]
    second = record(clean_db, alert()).outcomes[0]
    assert second.action == "refreshed" and second.incident_id == first.incident_id
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar() == 1
        row = svc.get_incident(conn, first.incident_id)
        assert row["repeat_count"] == 1 and row["updated_at"] >= row["created_at"]
        assert [t["kind"] for t in svc.get_timeline(conn, first.incident_id)] == ["opened", "repeated"]
        assert conn.execute(sa.text("SELECT count(*) FROM event_outbox")).scalar() == 1


def test_resolved_alert_resolves_then_a_later_firing_opens_a_new_incident(clean_db):
    first = record(clean_db, alert()).outcomes[0]
    ends = datetime(2026, 11, 27, 22, 0, 0)
    resolved_alert = alert(status="resolved")
    resolved_alert = resolved_alert.__class__(**{**resolved_alert.__dict__, "ends_at": ends})
    resolved = record(clean_db, resolved_alert).outcomes[0]
    assert resolved.action == "resolved" and resolved.incident_id == first.incident_id
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, first.incident_id)
    assert row["status"] == "resolved" and row["resolved_at"] == ends
    # Past the flap window (FLAP_WINDOW_SECONDS): a new outage, not flapping
    # (within it, see tests/test_noise_control.py).
    clock.advance(601)
    try:
        again = record(clean_db, alert()).outcomes[0]
    finally:
        clock.set_now(None)
    assert again.action == "created" and again.incident_id != first.incident_id


def test_resolved_without_open_incident_changes_nothing(clean_db):
    (outcome,) = record(clean_db, alert(status="resolved")).outcomes
    assert outcome.action == "ignored" and outcome.incident_id is None
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar() == 0


def test_batch_with_duplicates_reports_each_alert_once_in_order(clean_db):
    a, b = alert("A"), alert("B")
    result = record(clean_db, a, b, a)
    assert [o.action for o in result.outcomes] == ["created", "created", "created"]
    assert result.outcomes[0].incident_id == result.outcomes[2].incident_id
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar() == 2


def test_twenty_threads_opening_one_fingerprint_make_one_incident(clean_db):
    barrier = threading.Barrier(20)
    outcomes, errors = [], []

    def worker():
        try:
            barrier.wait()
            outcomes.extend(record(clean_db, alert("Storm", service="email")).outcomes)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(o.action for o in outcomes) == ["created"] + ["refreshed"] * 19
    assert len({o.incident_id for o in outcomes}) == 1
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar() == 1
        assert conn.execute(sa.text("SELECT repeat_count FROM incidents")).scalar() == 19


LIFECYCLE = [
    ("open", "investigating", True),
    ("open", "resolved", True),
    ("open", "closed", False),
    ("open", "open", False),
    ("investigating", "resolved", True),
    ("investigating", "open", False),
    ("investigating", "closed", False),
    ("resolved", "closed", True),
    ("resolved", "investigating", True),
    ("resolved", "open", False),
    ("closed", "investigating", False),
    ("closed", "resolved", False),
    ("closed", "open", False),
]


def _incident_in(engine, status):
    incident_id = record(engine, alert("Life")).outcomes[0].incident_id
    path = {"open": [], "investigating": ["investigating"], "resolved": ["resolved"], "closed": ["resolved", "closed"]}
    with engine.begin() as conn:
        for step in path[status]:
            svc.transition(conn, incident_id, step, "tester", SOURCE)
    return incident_id


@pytest.mark.parametrize("current, target, allowed", LIFECYCLE)
def test_lifecycle_transition(clean_db, current, target, allowed):
    incident_id = _incident_in(clean_db, current)
    if allowed:
        with clean_db.begin() as conn:
            row, events = svc.transition(conn, incident_id, target, "alice", SOURCE, note="checked")
        assert row["status"] == target
        assert (row["resolved_at"] is not None) == (target in ("resolved", "closed"))
        # Resolving is announced, and so is a person taking an open incident.
        expected = {"resolved": "resolved", "investigating": "acknowledged" if current == "open" else None}.get(target)
        assert events == ([f"{incident_id}.{expected}.{row['generation']}"] if expected else [])
        with clean_db.connect() as conn:
            last = svc.get_timeline(conn, incident_id)[-1]
        assert last["actor"] == "alice" and last["details"]["note"] == "checked"
        assert last["details"]["to"] == target
    else:
        with pytest.raises(InvalidTransition) as err, clean_db.begin() as conn:
            svc.transition(conn, incident_id, target, "alice", SOURCE)
        assert err.value.details["current_status"] == current
        assert err.value.details["allowed"] == list(svc.TRANSITIONS[current])


def test_reopen_bumps_generation_so_the_next_resolve_is_a_new_event(clean_db):
    incident_id = _incident_in(clean_db, "resolved")
    with clean_db.begin() as conn:
        row, _ = svc.transition(conn, incident_id, "investigating", "bob", SOURCE)
        assert row["generation"] == 1 and row["resolved_at"] is None
        _, events = svc.transition(conn, incident_id, "resolved", "bob", SOURCE)
    assert events == [f"{incident_id}.resolved.1"]


def test_reopen_refused_while_another_incident_holds_the_fingerprint(clean_db):
    old = _incident_in(clean_db, "resolved")
    new = record(clean_db, alert("Life")).outcomes[0].incident_id
    with pytest.raises(Conflict) as err, clean_db.begin() as conn:
        svc.transition(conn, old, "investigating", "bob", SOURCE)
    assert err.value.details["active_incident_id"] == new


def test_transition_of_unknown_incident_is_not_found(clean_db):
    with pytest.raises(NotFound), clean_db.begin() as conn:
        svc.transition(conn, "00000000-0000-4000-8000-000000000000", "closed", "x", SOURCE)


def test_mark_investigating_is_conditional(clean_db):
    incident_id = record(clean_db, alert()).outcomes[0].incident_id
    with clean_db.begin() as conn:
        assert svc.mark_investigating(conn, incident_id, "diagnostics") is True
        assert svc.mark_investigating(conn, incident_id, "diagnostics") is False


def test_diagnostics_and_remediation_actions_are_stored(clean_db):
    incident_id = record(clean_db, alert()).outcomes[0].incident_id
    action = {"action": "scale_deployment", "target": "email-service", "from": 1, "to": 6, "success": True}
    with clean_db.begin() as conn:
        svc.store_diagnostics(conn, incident_id, {"pods": {"email-service": {"ready": "3/3"}}})
        svc.append_remediation_action(conn, incident_id, action)
        svc.append_remediation_action(conn, incident_id, {**action, "action": "rollout_restart"})
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, incident_id)
    assert row["diagnostics"]["pods"]["email-service"]["ready"] == "3/3"
    assert [a["action"] for a in row["remediation_actions"]] == ["scale_deployment", "rollout_restart"]


def test_timeline_dedup_key_claims_once(clean_db):
    incident_id = record(clean_db, alert()).outcomes[0].incident_id
    with clean_db.begin() as conn:
        assert svc.add_timeline(conn, incident_id, "notification", {"channel": "slack"}, dedup_key="k1") is True
        assert svc.add_timeline(conn, incident_id, "notification", {"channel": "slack"}, dedup_key="k1") is False


def test_list_filters_and_keyset_pages(clean_db):
    ids = []
    for i in range(7):
        priority = "P0" if i % 2 else "P1"
        ids.append(record(clean_db, alert(f"A{i}", priority=priority, service="email" if i < 3 else "billing")).outcomes[0].incident_id)
    with clean_db.begin() as conn:
        svc.transition(conn, ids[0], "investigating", "t", SOURCE)
    with clean_db.connect() as conn:
        everything, _ = svc.list_incidents(conn, svc.IncidentFilter(), limit=100)
        assert [r["id"] for r in everything] == list(reversed(ids))
        p0, _ = svc.list_incidents(conn, svc.IncidentFilter(priorities=("P0",)))
        assert {r["priority"] for r in p0} == {"P0"} and len(p0) == 3
        email, _ = svc.list_incidents(conn, svc.IncidentFilter(services=("email",)))
        assert len(email) == 3
        investigating, _ = svc.list_incidents(conn, svc.IncidentFilter(statuses=("investigating",)))
        assert [r["id"] for r in investigating] == [ids[0]]
        future, _ = svc.list_incidents(conn, svc.IncidentFilter(since=datetime.utcnow() + timedelta(hours=1)))
        assert future == []
        seen, cursor = [], None
        while True:
            page, cursor = svc.list_incidents(conn, svc.IncidentFilter(), limit=3, after=cursor)
            seen.extend(r["id"] for r in page)
            if cursor is None:
                break
        assert seen == list(reversed(ids))


def test_repeat_count_counts_every_copy_even_inside_one_batch(clean_db):
    first = record(clean_db, alert("Copies"), alert("Copies"), alert("Copies")).outcomes[0]
    record(clean_db, alert("Copies"), alert("Copies"))
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, first.incident_id)["repeat_count"] == 4


def test_resolve_by_fingerprint(clean_db):
    opened = record(clean_db, alert("ByFingerprint")).outcomes[0]
    with clean_db.begin() as conn:
        assert svc.resolve_by_fingerprint(conn, opened.fingerprint, SOURCE, "api", datetime(2026, 11, 27, 12, 0)) == opened.incident_id
        assert svc.resolve_by_fingerprint(conn, opened.fingerprint, SOURCE, "api") is None
        row = svc.get_incident(conn, opened.incident_id)
    assert (row["status"], row["resolved_at"], row["resolved_by"]) == ("resolved", datetime(2026, 11, 27, 12, 0), "alert")


def test_a_refresh_and_a_resolve_of_the_same_incidents_lock_them_in_one_order(clean_db):
    """Two replicas: one refreshes two open incidents (their alerts fire
    again), the other resolves both. The resolve locks incidents in id
    order; the refresh must too, whatever order its fingerprints sort in,
    or each holds the incident the other waits for (40P01, a 503 and a
    retry of both webhooks)."""

    # Two incidents whose fingerprints sort the opposite way to their ids.
    for attempt in range(40):
        first, second = alert("LockOrder", fingerprint=f"lo-{attempt}-a"), alert("LockOrder", fingerprint=f"lo-{attempt}-b")
        (one,), (two,) = record(clean_db, first).outcomes, record(clean_db, second).outcomes
        if one.incident_id > two.incident_id:
            break
    assert one.incident_id > two.incident_id
    lower, higher = two.incident_id, one.incident_id

    # A resolve of both locks in id order: the lower first.
    assert against_a_resolve(clean_db, lower, higher, lambda: record(clean_db, first, second)) == []
    with clean_db.connect() as conn:
        counts = conn.execute(sa.text("SELECT repeat_count FROM incidents WHERE id IN (:a, :b)"), {"a": lower, "b": higher}).scalars().all()
    assert counts == [1, 1]

