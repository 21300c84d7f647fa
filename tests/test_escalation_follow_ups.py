"""A page's follow-ups (PagerDuty's acknowledge and resolve) whatever order
the events reach escalation in: over real HTTP to the served function, with
a loopback PagerDuty that holds the trigger's answer until the test lets it
go, so the follow-up certainly arrives while the page is in flight."""

import threading

import pytest
import sqlalchemy as sa

from shared import acknowledge, events
from shared import incidents as svc
from loopback.processes import FunctionProcess, wait_until
from tests.test_escalation import ROUTING_KEY, SLACK_PATH, deliver, open_incident

HOLD_LIMIT = 30.0
PD_DOWN = (503, {"Content-Type": "application/json"}, b'{"status":"error"}')


@pytest.fixture(scope="module")
def escalation(base_env, pd, slack_hook):
    # A timeout far above how long the test holds a trigger: the hold, not
    # the client, decides when the trigger's answer comes.
    proc = FunctionProcess("escalation", {
        **base_env, "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH, "NOTIFY_TIMEOUT_SECONDS": "40", "NOTIFY_MAX_ATTEMPTS": "1",
    }).start()
    yield proc
    proc.stop()


@pytest.fixture
def pagerduty(pd, slack_hook):
    pd.reset(), slack_hook.reset()
    yield pd
    assert pd.invalid == [], pd.invalid


class HeldAnswer:
    """A scripted PagerDuty answer that waits for ``release()``: ``held`` is
    set once the request is in, so the test knows the trigger is in flight."""

    def __init__(self):
        self.held, self.released = threading.Event(), threading.Event()

    def __call__(self, req):
        self.held.set()
        self.released.wait(HOLD_LIMIT)
        return 202, {"Content-Type": "application/json"}, b'{"status":"success","message":"Event processed"}'


def in_background(call):
    """Run ``call`` in a thread; the returned function joins it and gives its result."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", call()), daemon=True)
    thread.start()

    def joined():
        thread.join(HOLD_LIMIT + 30)
        assert not thread.is_alive(), "the delivery did not end"
        return result["value"]
    return joined


def actions(pd):
    return [b["event_action"] for b in pd.bodies()]


def claim_done(engine, key):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT completed_at IS NOT NULL FROM work_claims WHERE key = :k"), {"k": key}).scalar()


def resolve(engine, incident_id):
    with engine.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "alertmanager", "/test")
        return svc.get_incident(conn, incident_id)


def test_resolved_while_the_trigger_is_in_flight_waits_for_it_and_the_page_is_resolved(escalation, pagerduty, clean_db):
    row = open_incident(clean_db, "ResolvedWhilePaging")
    answer = HeldAnswer()
    pagerduty.script.append(answer)
    opened = in_background(lambda: deliver(escalation, events.INCIDENT_OPENED, row))
    try:
        assert answer.held.wait(HOLD_LIMIT), "the trigger never reached PagerDuty"
        resolved = resolve(clean_db, row["id"])
        # Not known yet whether there is a page to resolve: not done, retried.
        assert deliver(escalation, events.INCIDENT_RESOLVED, resolved).status_code == 409
    finally:
        answer.released.set()
    assert opened().status_code == 202
    # The trigger's own delivery saw the incident resolved and resolved the page.
    assert actions(pagerduty) == ["trigger", "resolve"]
    assert pagerduty.bodies()[1] == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": row["id"]}
    # The Broker's retry finds it done: nothing twice.
    assert deliver(escalation, events.INCIDENT_RESOLVED, resolved).status_code == 202
    assert actions(pagerduty) == ["trigger", "resolve"]
    assert claim_done(clean_db, f"notify:pagerduty:resolve:{row['id']}:0:resolved")
    assert claim_done(clean_db, f"escalated:{row['id']}:0:resolved")


def test_acknowledged_while_the_trigger_is_in_flight_waits_for_it_and_the_page_is_acknowledged(escalation, pagerduty, clean_db):
    row = open_incident(clean_db, "AcknowledgedWhilePaging")
    answer = HeldAnswer()
    pagerduty.script.append(answer)
    opened = in_background(lambda: deliver(escalation, events.INCIDENT_OPENED, row))
    try:
        assert answer.held.wait(HOLD_LIMIT), "the trigger never reached PagerDuty"
        with clean_db.begin() as conn:
            taken, _, _ = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
        assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 409
    finally:
        answer.released.set()
    assert opened().status_code == 202
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "acknowledge"]


def test_acknowledged_while_the_page_keeps_failing_is_sent_once_the_page_gets_through(escalation, pagerduty, clean_db):
    """PagerDuty is down when the incident opens (the Broker will retry the
    opening); a person acknowledges meanwhile, and that event finds nothing
    paged. When the opening gets through, the page is acknowledged too."""
    row = open_incident(clean_db, "AcknowledgedWhilePagerDutyDown")
    pagerduty.script.append(PD_DOWN)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 502
    with clean_db.begin() as conn:
        taken, _, _ = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger"]  # the one refused
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202  # the Broker's retry
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge"]
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge"]


def test_resolved_before_a_page_that_never_got_through_pages_no_one(escalation, pagerduty, clean_db):
    """The page fails until its event is dead-lettered; the incident resolves
    meanwhile. Re-driving the dead letter later neither pages nor resolves."""
    row = open_incident(clean_db, "ResolvedWhilePagerDutyDown")
    pagerduty.script.append(PD_DOWN)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 502
    resolved = resolve(clean_db, row["id"])
    assert deliver(escalation, events.INCIDENT_RESOLVED, resolved).status_code == 202
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202  # re-driven from the dead letters
    assert actions(pagerduty) == ["trigger"]  # only the refused one


def test_an_incident_resolved_before_its_trigger_is_claimed_pages_no_one(escalation, pagerduty, clean_db):
    """The opening read the incident while it was open; it is resolved before
    the trigger's claim is taken (held here by an uncommitted claim of the same
    key), and the resolution finds nothing paged and nothing in flight. The
    opening decides again once it holds the claim: no page."""
    row = open_incident(clean_db, "ResolvedBeforeTheClaim")
    with clean_db.connect() as blocker:
        held = blocker.begin()
        # No incident_id: its foreign key would lock the incident against being resolved.
        blocker.execute(sa.text("INSERT INTO work_claims (key) VALUES (:k)"), {"k": f"notify:pagerduty:trigger:{row['id']}:0:opened"})
        opened = in_background(lambda: deliver(escalation, events.INCIDENT_OPENED, row))
        with clean_db.connect() as conn:
            wait_until(lambda: conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE NOT l.granted AND a.datname = current_database()")).scalar(), HOLD_LIMIT,
                message="the opening waiting for its claim")
        resolved = resolve(clean_db, row["id"])
        assert deliver(escalation, events.INCIDENT_RESOLVED, resolved).status_code == 202
        held.rollback()
    assert opened().status_code == 202
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert actions(pagerduty) == []
    assert not claim_done(clean_db, f"notify:pagerduty:trigger:{row['id']}:0:opened")
