"""A page's follow-ups (PagerDuty's acknowledge and resolve) whatever order
the events reach escalation in: over real HTTP to the served function, with
a loopback PagerDuty that holds the trigger's answer until the test lets it
go, so the follow-up certainly arrives while the page is in flight."""

import dataclasses
import threading

import pytest
import sqlalchemy as sa

from shared import acknowledge, events, lifecycle, reconcile
from shared import incidents as svc
from loopback.processes import FunctionProcess, wait_until
from tests.test_escalation import ROUTING_KEY, SLACK_PATH, deliver, open_incident, record_remediation
from tests.test_reconcile import complete, publish

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


def waits_for(engine, blocker, message):
    """Until a backend waits on a lock ``blocker`` (a connection of this
    test) holds: the delivery got to its claim. Other backends' waits in the
    database are not this test's."""
    pid = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    with engine.connect() as conn:
        wait_until(lambda: conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": pid}).scalar(),
            HOLD_LIMIT, message=message)


def failed_remediation(engine, row):
    """Remediation recorded a failure for the incident's generation; the event it replies with."""
    record_remediation(engine, row, "failed", "blocked by cooldown")
    return {"remediation": {"outcome": "failed", "reason": "blocked by cooldown"}}


def transition(engine, incident_id, status, actor="test"):
    with engine.begin() as conn:
        svc.transition(conn, incident_id, status, actor, "/test")
        return svc.get_incident(conn, incident_id)


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


def acknowledged_while_paging(escalation, pagerduty, clean_db, row, page) -> None:
    """alice acknowledges while ``page()``'s trigger is held at PagerDuty:
    her event waits (409) for the page, then acknowledges it."""
    answer = HeldAnswer()
    pagerduty.script.append(answer)
    paging = in_background(page)
    try:
        assert answer.held.wait(HOLD_LIMIT), "the trigger never reached PagerDuty"
        with clean_db.begin() as conn:
            taken, _, _ = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
        assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 409
    finally:
        answer.released.set()
    assert paging().status_code == 202
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "acknowledge"]


def test_acknowledged_while_the_trigger_is_in_flight_waits_for_it_and_the_page_is_acknowledged(escalation, pagerduty, clean_db):
    row = open_incident(clean_db, "AcknowledgedWhilePaging")
    acknowledged_while_paging(escalation, pagerduty, clean_db, row, lambda: deliver(escalation, events.INCIDENT_OPENED, row))


def acknowledged_while_the_page_is_refused(escalation, pagerduty, clean_db, row) -> dict:
    """PagerDuty refuses the opening's page (the Broker will retry it);
    alice acknowledges meanwhile, and her event finds nothing paged yet.
    The incident as she left it."""
    pagerduty.script.append(PD_DOWN)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 502
    with clean_db.begin() as conn:
        taken, _, _ = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    return taken


def stuck_steps(clean_db, settings_obj) -> list:
    """The steps the sweep gives up on within three passes (two re-sends, no waiting)."""
    config = dataclasses.replace(settings_obj, reconcile_grace_seconds=60, reconcile_backoff_seconds=0,
                                 reconcile_max_reemits=2, event_source="/test")
    return [s for _ in range(3) for s in reconcile.run(clean_db, config).stuck]


def test_acknowledged_while_the_page_keeps_failing_is_sent_once_the_page_gets_through(escalation, pagerduty, clean_db):
    """PagerDuty is down when the incident opens (the Broker will retry the
    opening); a person acknowledges meanwhile, and that event finds nothing
    paged. When the opening gets through, the page is acknowledged too."""
    row = open_incident(clean_db, "AcknowledgedWhilePagerDutyDown")
    taken = acknowledged_while_the_page_is_refused(escalation, pagerduty, clean_db, row)
    assert actions(pagerduty) == ["trigger"]  # the one refused
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202  # the Broker's retry
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge"]
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge"]


def test_an_opening_the_sweep_reported_stuck_before_the_acknowledgement_is_acknowledged_once_it_pages(
        escalation, pagerduty, clean_db, settings_obj):
    """The opening never reached escalation (its service down); the sweep
    gave up on it and keeps re-sending it; alice takes the incident; then a
    re-send (or the step's dead letter, redelivered) gets through. The page
    was due before she took it: it is acknowledged with it, as a page
    PagerDuty refused before her acknowledgement is, and the sweep finds
    no acknowledge missing."""
    row = open_incident(clean_db, "NeverReachedEscalation")
    with clean_db.begin() as conn:
        publish(conn, f"{row['id']}.opened.0", 600)
    assert ("escalation:opened", row["id"], 0) in stuck_steps(clean_db, settings_obj)
    with clean_db.begin() as conn:
        taken, _, _ = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202  # the re-send, late
    assert actions(pagerduty) == ["trigger", "acknowledge"]
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "acknowledge"]
    with clean_db.connect() as conn:  # what the sweep reads too: it re-emits no acknowledge
        assert acknowledge.covers_page(conn, row["id"], 0)


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
        waits_for(clean_db, blocker, "the opening waiting for its claim")
        resolved = resolve(clean_db, row["id"])
        assert deliver(escalation, events.INCIDENT_RESOLVED, resolved).status_code == 202
        held.rollback()
    assert opened().status_code == 202
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert actions(pagerduty) == []
    assert not claim_done(clean_db, f"notify:pagerduty:trigger:{row['id']}:0:opened")


def test_a_failure_page_decided_after_the_acknowledgement_is_not_acknowledged(escalation, pagerduty, clean_db):
    """P1: no page at the opening. Diagnostics moves it to investigating,
    alice takes it (nothing paged: nothing to acknowledge), then remediation
    fails: the page that says a human must act is sent, and stays a page.
    The acknowledgement's redelivery does not silence it either."""
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    with clean_db.begin() as conn:
        lifecycle.mark_investigating(conn, row["id"], "diagnostics")
        taken, _, took = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
    assert took
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == []
    assert deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, taken, failed_remediation(clean_db, taken)).status_code == 202
    assert actions(pagerduty) == ["trigger"]
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger"]


def raise_to_p0(engine, incident_id):
    """A P0 member joined: the incident's priority is raised
    (shared.correlation.store.RAISE_PRIORITY) and announced as opened again."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET priority = 'P0' WHERE id = :i"), {"i": incident_id})
        return svc.get_incident(conn, incident_id)


def test_a_raise_to_p0_after_the_p1_was_acknowledged_is_a_page_that_stays_a_page(escalation, pagerduty, clean_db):
    """A P1 opening pages no one; alice takes it; then a P0 member raises
    it and PagerDuty is paged under the opening's key. Nobody was paged when
    she took it: the page is new news, not acknowledged on her behalf, nor
    by her acknowledgement's redelivery."""
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    with clean_db.begin() as conn:
        taken, _, took = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
    assert took
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == []
    raised = raise_to_p0(clean_db, row["id"])
    assert deliver(escalation, events.INCIDENT_OPENED, raised, {"raised_to": "P0"}).status_code == 202
    assert actions(pagerduty) == ["trigger"]
    assert claim_done(clean_db, f"notify:pagerduty:trigger:{row['id']}:0:opened")
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger"]


def test_a_failure_page_after_the_acknowledged_p0_opening_goes_to_the_same_pagerduty_alert(escalation, pagerduty, clean_db):
    """The limit docs/noise-control.md states: the P0 opening paged, alice
    took it, and remediation fails before her acknowledgement is delivered.
    The failure's trigger is not acknowledged on her behalf, but PagerDuty
    keeps one alert per incident (the same dedup_key), and the opening's
    page, which she answered, is acknowledged: the failure folds into it."""
    row = open_incident(clean_db, "EmailServiceDown", priority="P0")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    with clean_db.begin() as conn:
        taken, _, _ = acknowledge.acknowledge(conn, row["id"], "alice", "/test")
    assert deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, taken, failed_remediation(clean_db, taken)).status_code == 202
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge"]
    assert {b["dedup_key"] for b in pagerduty.bodies()} == {row["id"]}
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge"]


def test_an_acknowledgement_that_races_a_failure_page_acknowledges_it(escalation, pagerduty, clean_db):
    """The failure page is in flight (its claim taken) when alice takes the
    incident: she answered that page, and it is acknowledged."""
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    with clean_db.begin() as conn:
        lifecycle.mark_investigating(conn, row["id"], "diagnostics")
        row = svc.get_incident(conn, row["id"])
    acknowledged_while_paging(escalation, pagerduty, clean_db, row,
                              lambda: deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, row, failed_remediation(clean_db, row)))


def test_an_acknowledgement_that_waited_on_the_incident_while_the_page_went_out_acknowledges_it(escalation, pagerduty, clean_db):
    """alice's acknowledgement began before the opening's page was claimed
    and waited on the incident's row (held by a plain UPDATE: the intake
    adding a member, diagnostics) while the page went out. Its timeline
    time is its transaction's start, earlier than the page's claim; but the
    page's sender saw no acknowledgement, so she took a page that was
    sent: it is acknowledged, and the sweep's reading agrees."""
    row = open_incident(clean_db, "AckWaitedWhileThePageWentOut", priority="P0")
    with clean_db.connect() as locker:
        locker.begin()
        locker.execute(sa.text("SELECT id FROM incidents WHERE id = :i FOR NO KEY UPDATE"), {"i": row["id"]})

        def take():
            with clean_db.begin() as conn:
                return acknowledge.acknowledge(conn, row["id"], "alice", "/test")
        acked = in_background(take)
        waits_for(clean_db, locker, "the acknowledgement never waited on the incident")
        # Nothing the opening's delivery does waits on that lock.
        assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
        assert actions(pagerduty) == ["trigger"]
        locker.rollback()
    taken, _, took = acked()
    assert took
    with clean_db.connect() as conn:
        assert acknowledge.covers_page(conn, row["id"], 0)
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "acknowledge"]


def test_a_reopened_incidents_acknowledgement_leaves_the_earlier_generations_page_alone(escalation, pagerduty, clean_db):
    """Generation 0 was paged and its page resolved; after the reopening
    nothing paged yet, so bob taking it acknowledges nothing at PagerDuty,
    and resolving it again resolves nothing there."""
    row = open_incident(clean_db, "EmailServiceDown", priority="P0")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    resolved = resolve(clean_db, row["id"])
    assert deliver(escalation, events.INCIDENT_RESOLVED, resolved).status_code == 202
    transition(clean_db, row["id"], "investigating", "carol")  # reopened: generation 1
    with clean_db.begin() as conn:
        taken, _, took = acknowledge.acknowledge(conn, row["id"], "bob", "/test")
    assert took and taken["generation"] == 1
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202
    assert actions(pagerduty) == ["trigger", "resolve"]
    resolved = resolve(clean_db, row["id"])
    assert deliver(escalation, events.INCIDENT_RESOLVED, resolved).status_code == 202
    assert actions(pagerduty) == ["trigger", "resolve"]


def test_a_resolve_held_up_until_a_reopening_does_not_resolve_the_next_generations_page(escalation, pagerduty, clean_db):
    """Generation 0's resolve waits for its claim (held here by an
    uncommitted claim of the same key); meanwhile the incident is reopened
    and generation 1's failure pages. Once it holds the claim the resolve is
    judged again: its generation is gone, so nothing is resolved."""
    row = open_incident(clean_db, "EmailServiceDown", priority="P0")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    resolved = resolve(clean_db, row["id"])
    with clean_db.connect() as blocker:
        held = blocker.begin()
        blocker.execute(sa.text("INSERT INTO work_claims (key) VALUES (:k)"), {"k": f"notify:pagerduty:resolve:{row['id']}:0:resolved"})
        resolving = in_background(lambda: deliver(escalation, events.INCIDENT_RESOLVED, resolved))
        waits_for(clean_db, blocker, "the resolve waiting for its claim")
        reopened = transition(clean_db, row["id"], "investigating", "carol")
        assert deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, reopened, failed_remediation(clean_db, reopened)).status_code == 202
        held.rollback()
    assert resolving().status_code == 202
    assert actions(pagerduty) == ["trigger", "trigger"]
    assert not claim_done(clean_db, f"notify:pagerduty:resolve:{row['id']}:0:resolved")


def test_a_follow_up_that_fails_after_the_page_does_not_fail_the_pages_event(escalation, pagerduty, clean_db):
    """PagerDuty refuses the opening's page; alice acknowledges meanwhile.
    The opening's retry pages, then its catch-up acknowledge is refused: the
    page went out, so the opening is done (202); the acknowledge is left to
    its own delivery, which sends it."""
    row = open_incident(clean_db, "AcknowledgeRefusedAfterThePage")
    taken = acknowledged_while_the_page_is_refused(escalation, pagerduty, clean_db, row)
    pagerduty.script.extend([(202, {"Content-Type": "application/json"}, b'{"status":"success"}'), PD_DOWN])
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge"]
    assert claim_done(clean_db, f"escalated:{row['id']}:0:opened")
    assert not claim_done(clean_db, f"notify:pagerduty:acknowledge:{row['id']}:0:acknowledged")
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, taken).status_code == 202  # the sweep's re-emission
    assert actions(pagerduty) == ["trigger", "trigger", "acknowledge", "acknowledge"]
    assert claim_done(clean_db, f"notify:pagerduty:acknowledge:{row['id']}:0:acknowledged")


def test_a_database_failure_in_the_catch_up_after_the_page_leaves_the_paging_event_done(base_env, pd, clean_db):
    """The page is sent and recorded; then the catch-up follow-up cannot read
    the incident (its member table is locked past the lock timeout). The
    page went out: the event is done (its escalated claim recorded), and the
    follow-up is left to its own delivery and the sweep."""
    pd.reset()
    row = open_incident(clean_db, "EmailServiceDown", priority="P0")
    with clean_db.connect() as locker:
        def accept_then_lock_the_members(_):
            locker.begin()
            locker.execute(sa.text("LOCK TABLE incident_members IN ACCESS EXCLUSIVE MODE"))
            return 202, {"Content-Type": "application/json"}, b'{"status":"success","message":"Event processed"}'

        pd.script.append(accept_then_lock_the_members)
        proc = FunctionProcess("escalation", {
            **base_env, "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
            "NOTIFY_MAX_ATTEMPTS": "1", "DB_LOCK_TIMEOUT_SECONDS": "0.5"}).start()
        try:
            assert deliver(proc, events.INCIDENT_OPENED, row).status_code == 202
        finally:
            locker.rollback()
            proc.stop()
    assert actions(pd) == ["trigger"]
    assert claim_done(clean_db, f"notify:pagerduty:trigger:{row['id']}:0:opened")
    assert claim_done(clean_db, f"escalated:{row['id']}:0:opened")



def _remediation_failed(engine, row, root):
    with engine.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result",
                         {"outcome": "failed", "reason": "a human must act", "actions": [], "playbook": "p",
                          "generation": 0, "root_generation": root}, "remediation")
    complete(engine, f"remediation:{row['id']}:0.root{root}", row["id"])


def test_a_failure_of_a_new_root_after_the_acknowledgement_still_pages_though_an_older_one_was_stuck(
        escalation, pagerduty, clean_db, settings_obj):
    """Only a page the sweep found stuck before the acknowledgement (an
    opening, a root's opening, of this generation and root) counts as
    decided before it: a later root's failure is news, and stays a page."""
    row = open_incident(clean_db, "P1FailsTwice", priority="P1")
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET root_generation = 1 WHERE id = :i"), {"i": row["id"]})
    _remediation_failed(clean_db, row, 1)  # root 1's failure never reaches escalation (PagerDuty down, say)
    assert ("escalation:remediation_failed", row["id"], 0) in stuck_steps(clean_db, settings_obj)
    with clean_db.begin() as conn:
        acknowledge.acknowledge(conn, row["id"], "alice", "/test")
    with clean_db.begin() as conn:  # then another alert takes over as root, and its remediation fails
        conn.execute(sa.text("UPDATE incidents SET root_generation = 2 WHERE id = :i"), {"i": row["id"]})
        now = svc.get_incident(conn, row["id"])
    _remediation_failed(clean_db, now, 2)
    assert deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, now,
                   {"remediation": {"outcome": "failed", "reason": "a human must act", "playbook": "p"}}).status_code == 202
    assert actions(pagerduty) == ["trigger"]  # not acknowledged on alice's behalf
