"""The escalation handler in-process, against the real PostgreSQL and
loopback PagerDuty and Slack receivers: what each transition sends, once,
and what the Broker is told when a channel refuses. (Over real HTTP:
tests/test_escalation.py and tests/test_claims_overlap.py.)"""

from __future__ import annotations

import dataclasses
import re

import pytest
import sqlalchemy as sa
from cloudevents.http import CloudEvent

from functions.escalation.channels import Note
from functions.escalation.handler import ACCEPTED, EscalationHandler
from shared import events
from shared import incidents as svc
from shared.config import Secret, load_settings
from shared.errors import BadGateway, BadRequest
from tests.factories import alert
from loopback.servers import RecordingServer

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"


class Receiver:
    def __init__(self, ok=(202, {}, b'{"status":"success"}')):
        self.script: list = []
        self.ok = ok
        self.server = RecordingServer(lambda req: self.script.pop(0) if self.script else self.ok).start()

    def bodies(self):
        return [r.json() for r in self.server.received()]


@pytest.fixture(scope="module")
def receivers():
    pd, slack = Receiver(), Receiver((200, {}, b"ok"))
    yield pd, slack
    pd.server.stop(), slack.server.stop()


@pytest.fixture
def handler(receivers, database_url):
    pd, slack = receivers
    for r in receivers:
        r.server.requests.clear(), r.script.clear()
    config = load_settings({
        "DATABASE_URL": database_url, "PAGERDUTY_EVENTS_URL": pd.server.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack.server.url + "/services/T/B/X", "NOTIFY_TIMEOUT_SECONDS": "2", "NOTIFY_MAX_ATTEMPTS": "1",
    })
    return EscalationHandler(config)


def incident(engine, priority="P0", name="EscalateUnit"):
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, priority=priority, service="email")], "/t", "t").outcomes[0].incident_id
        return svc.get_incident(conn, incident_id)


def event(event_type, row, **data):
    spec = events.incident_event(event_type, row, "/test", data or None)
    return CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", "subject": row["id"], **spec["extensions"]}, spec["data"])


def resolve(engine, row):
    with engine.begin() as conn:
        return svc.transition(conn, row["id"], "resolved", "test", "/test")[0]


def reopen(engine, row):
    """resolved -> investigating: the lifecycle's new generation."""
    with engine.begin() as conn:
        return svc.transition(conn, row["id"], "investigating", "test", "/test")[0]


def record_remediation(engine, row, outcome, reason):
    """The result as remediation records it, for the incident's generation."""
    with engine.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result", {
            "outcome": outcome, "reason": reason, "actions": [], "playbook": None, "generation": row["generation"]}, "remediation")


def plan(handler, transition, row, sent=frozenset(), covered=False):
    """What each configured channel would send, in the handler's order."""
    note = Note(transition, row, None, frozenset(sent), covered=covered)
    return [(c.name, o.action) for c in handler.channels if c.configured() and (o := c.message(note)) is not None]


def sent(receivers):
    pd, slack = receivers
    return [b["event_action"] for b in pd.bodies()], len(slack.server.received())


def notifications(engine, incident_id):
    with engine.connect() as conn:
        return [t["details"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "notification"]


def test_the_plan_of_each_transition(handler, clean_db):
    row = incident(clean_db)
    p0, p1, p2 = ({**row, "priority": p} for p in ("P0", "P1", "P2"))
    assert plan(handler, "opened", p0) == [("pagerduty", "trigger"), ("slack", "message")]
    assert plan(handler, "opened", p1) == [("slack", "message")]
    assert plan(handler, "opened", p2) == []
    assert plan(handler, "opened", {**p0, "status": "resolved"}) == [("slack", "message")]
    assert plan(handler, "remediation_failed", p1) == [("pagerduty", "trigger"), ("slack", "message")]
    assert plan(handler, "remediation_failed", p2) == [("slack", "message")]
    # PagerDuty follows up only what it paged, in this generation.
    assert plan(handler, "resolved", p2, {"trigger", "trigger:0"}) == [("pagerduty", "resolve"), ("slack", "message")]
    assert plan(handler, "resolved", p2) == [("slack", "message")]
    assert plan(handler, "resolved", {**p2, "generation": 1}, {"trigger", "trigger:0"}) == [("slack", "message")]
    # ... and acknowledges only a page the acknowledgement covers.
    assert plan(handler, "acknowledged", p1, {"trigger", "trigger:0"}, covered=True) == [("pagerduty", "acknowledge"), ("slack", "message")]
    assert plan(handler, "acknowledged", p1, {"trigger", "trigger:0"}) == [("slack", "message")]
    assert plan(handler, "acknowledged", {**p1, "generation": 1}, {"trigger", "trigger:0"}, covered=True) == [("slack", "message")]
    assert plan(handler, "acknowledged", {**p1, "status": "resolved"}, {"trigger", "trigger:0"}, covered=True) == [("slack", "message")]
    assert plan(handler, "remediated", p0) == [("slack", "message")]
    assert set(ACCEPTED) >= {events.INCIDENT_OPENED, events.INCIDENT_RESOLVED, events.INCIDENT_REMEDIATION_FAILED}


def test_opened_p0_pages_and_announces_once(handler, receivers, clean_db):
    row = incident(clean_db)
    assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    assert receivers[0].bodies()[0]["routing_key"] == ROUTING_KEY and receivers[0].bodies()[0]["dedup_key"] == row["id"]
    assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    assert [(n["channel"], n["outcome"], n["status"], n["attempts"]) for n in notifications(clean_db, row["id"])] == [
        ("pagerduty", "sent", 202, 1), ("slack", "sent", 200, 1)]


def test_resolve_only_after_a_page_and_once(handler, receivers, clean_db):
    quiet = incident(clean_db, "P1", "Quiet")
    # The database decides: an incident that is still open was not resolved.
    assert handler.handle(event(events.INCIDENT_RESOLVED, quiet)).status_code == 202
    assert sent(receivers) == ([], 0)
    handler.handle(event(events.INCIDENT_RESOLVED, resolve(clean_db, quiet)))
    assert sent(receivers) == ([], 1)
    paged = incident(clean_db)
    handler.handle(event(events.INCIDENT_OPENED, paged))
    paged = resolve(clean_db, paged)
    handler.handle(event(events.INCIDENT_RESOLVED, paged))
    handler.handle(event(events.INCIDENT_RESOLVED, paged))
    assert sent(receivers) == (["trigger", "resolve"], 3)


def test_remediation_failed_pages_with_the_reason(handler, receivers, clean_db):
    row = incident(clean_db, "P1")
    # The reason is remediation's record, never the event's claim.
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row, remediation={"reason": "forged by the event"}))
    assert sent(receivers) == ([], 0)
    record_remediation(clean_db, row, "failed", "blocked by cooldown")
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row, remediation={"reason": "forged by the event"}))
    (trigger,) = receivers[0].bodies()
    assert trigger["payload"]["custom_details"]["reason"] == "blocked by cooldown"
    assert "forged" not in str(trigger)


def test_a_refused_page_is_a_502_and_the_retry_sends_it(handler, receivers, clean_db):
    pd, _ = receivers
    pd.script.append((500, {}, b"down"))
    row = incident(clean_db)
    with pytest.raises(BadGateway, match="^notification not accepted: pagerduty: HTTP 500: down$"):
        handler.handle(event(events.INCIDENT_OPENED, row))
    assert sent(receivers) == (["trigger"], 1)
    assert [(n["channel"], n["outcome"]) for n in notifications(clean_db, row["id"])] == [("pagerduty", "failed"), ("slack", "sent")]
    assert notifications(clean_db, row["id"])[0]["error"] == "HTTP 500: down"
    assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == (["trigger", "trigger"], 1)


@pytest.mark.parametrize("charset", ["idna", "punycode"])
def test_a_page_answered_2xx_in_a_host_name_charset_is_sent_once_and_the_redelivery_sends_nothing(handler, receivers, clean_db,
                                                                                                  charset):
    # requests' .text raised a bare UnicodeError after PagerDuty and Slack
    # had said yes: the handler released the claim and answered 500, and
    # every redelivery by the Broker paged again.
    pd, slack = receivers
    pd.script.append((202, {"Content-Type": f"text/plain; charset={charset}"}, b"queued \xff"))
    slack.script.append((200, {"Content-Type": f"text/plain; charset={charset}"}, b"ok"))
    row = incident(clean_db)
    assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert [(n["channel"], n["outcome"]) for n in notifications(clean_db, row["id"])] == [("pagerduty", "sent"), ("slack", "sent")]
    assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)


@pytest.mark.parametrize("setting, channel", [("PAGERDUTY_EVENTS_URL", "pagerduty"), ("SLACK_WEBHOOK_URL", "slack")])
def test_a_url_with_a_host_label_over_63_characters_is_a_502_on_the_timeline_and_the_claim_is_free(
        receivers, database_url, clean_db, setting, channel):
    # Not a crash (urllib3's LocationParseError is no requests error): the
    # notification failed, the Broker is told 502 and dead-letters the event,
    # and once the setting is fixed a redelivery sends it.
    for r in receivers:
        r.server.requests.clear(), r.script.clear()
    pd, slack = receivers
    good = {"PAGERDUTY_EVENTS_URL": pd.server.url + "/v2/enqueue", "SLACK_WEBHOOK_URL": slack.server.url + "/services/T/B/X"}
    env = {"DATABASE_URL": database_url, "PAGERDUTY_ROUTING_KEY": ROUTING_KEY, "NOTIFY_TIMEOUT_SECONDS": "2", "NOTIFY_MAX_ATTEMPTS": "3"}
    # Such a setting fails the start (shared.config); a URL no request can
    # be made to is still refused by the sender, whatever let it through.
    bad = "http://" + "a" * 64 + ".example/services/T/B/X"
    config = load_settings({**env, **good})
    broken = EscalationHandler(dataclasses.replace(config, **({"pagerduty_events_url": bad} if channel == "pagerduty"
                                                                else {"slack_webhook_url": Secret(bad)})))
    row = incident(clean_db)
    error = "InvalidURL: the configured URL cannot be used (check the channel's setting)"
    with pytest.raises(BadGateway, match=f"^notification not accepted: {channel}: {re.escape(error)}$"):
        broken.handle(event(events.INCIDENT_OPENED, row))
    (failed,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == channel]
    assert (failed["outcome"], failed["attempts"], failed["error"]) == ("failed", 1, error)
    assert EscalationHandler(load_settings({**env, **good})).handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)


def test_an_unknown_incident_is_acknowledged_and_nothing_is_sent(handler, receivers, clean_db):
    row = incident(clean_db)
    ghost = {**row, "id": "00000000-0000-4000-8000-000000000000"}
    assert handler.handle(event(events.INCIDENT_OPENED, ghost)).status_code == 202
    assert sent(receivers) == ([], 0)


def test_channels_that_are_off_send_nothing(database_url, receivers, clean_db):
    for r in receivers:
        r.server.requests.clear()
    off = EscalationHandler(load_settings({"DATABASE_URL": database_url}))
    row = incident(clean_db)
    assert off.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == ([], 0) and notifications(clean_db, row["id"]) == []


def test_each_generation_is_notified_again(handler, receivers, clean_db):
    row = incident(clean_db, "P1")
    handler.handle(event(events.INCIDENT_OPENED, row))
    # A generation the database never had is refused for good (400), not told.
    with pytest.raises(BadRequest, match="data.generation 1 is above the incident's generation 0"):
        handler.handle(event(events.INCIDENT_OPENED, {**row, "generation": 1}))
    assert sent(receivers) == ([], 1)
    reopened = reopen(clean_db, resolve(clean_db, row))
    assert reopened["generation"] == 1
    handler.handle(event(events.INCIDENT_OPENED, reopened))
    assert sent(receivers) == ([], 2)


def test_a_notification_being_sent_elsewhere_is_a_conflict_to_retry(handler, receivers, clean_db):
    from shared import claims
    from shared.errors import Conflict

    row = incident(clean_db)
    with clean_db.begin() as conn:
        claims.claim(conn, f"notify:pagerduty:trigger:{row['id']}:0:opened", row["id"], 300)
    with pytest.raises(Conflict, match="pagerduty notification for this transition is being sent elsewhere"):
        handler.handle(event(events.INCIDENT_OPENED, row))
    assert sent(receivers) == ([], 0)


def test_an_event_without_a_generation_counts_as_the_first(handler, receivers, clean_db):
    row = incident(clean_db, "P1")
    spec = events.incident_event(events.INCIDENT_OPENED, row, "/test")
    data = {k: v for k, v in spec["data"].items() if k != "generation"}
    handler.handle(CloudEvent({"id": "g", "type": spec["type"], "source": "/test", "subject": row["id"]}, data))
    handler.handle(event(events.INCIDENT_OPENED, row))
    assert sent(receivers) == ([], 1)


def test_a_proposal_awaiting_approval_pages_with_its_link_and_its_outcome_is_told_again(handler, receivers, clean_db):
    row = incident(clean_db, "P1")
    url = f"http://localhost:8080/ui/incidents/{row['id']}#proposal-p1"
    with clean_db.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result", {
            "outcome": "failed", "reason": f"awaiting approval: scale_deployment production/email. Approve or reject proposal p1 at {url}",
            "actions": [], "playbook": "p", "generation": row["generation"],
            "proposal": {"id": "p1", "url": url, "status": "pending"}}, "remediation")
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row))
    (trigger,) = receivers[0].bodies()
    assert {"href": url, "text": "Approve or reject the proposed remediation"} in trigger["links"]
    assert url in str(receivers[1].bodies()[0])
    # The approved proposal ran and was not verified: a second outcome of
    # the same generation, told again (and no link to a decided proposal).
    with clean_db.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result", {
            "outcome": "failed", "reason": "not verified: the alert is still firing", "actions": [], "playbook": "p",
            "generation": row["generation"], "approved_proposal": "p1", "proposal": {"id": "p1", "url": url, "status": "approved"}},
            "remediation")
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row))
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row))  # a redelivery: once
    assert sent(receivers) == (["trigger", "trigger"], 2)
    second = receivers[0].bodies()[1]
    assert second["payload"]["custom_details"]["reason"] == "not verified: the alert is still firing"
    assert [link["text"] for link in second["links"]] == ["Incident"]
    with clean_db.connect() as conn:
        keys = conn.execute(sa.text("SELECT key FROM work_claims WHERE key LIKE 'escalated:%' AND completed_at IS NOT NULL")).scalars().all()
    # Reconciliation watches the plain key of the latest outcome.
    assert sorted(keys) == sorted(f"escalated:{row['id']}:0:{t}" for t in ("remediation_failed", "remediation_failed.p1"))
def test_a_claim_goes_stale_one_database_timeout_after_the_sends_worst_case(handler):
    from functions.escalation.delivery import worst_case_seconds
    from functions.escalation.handler import claim_stale_seconds

    config = handler.config
    worst = worst_case_seconds(config.notify_timeout_seconds, config.notify_max_attempts)
    assert claim_stale_seconds(config) == worst + config.db_timeout_seconds == handler.stale_seconds


def acknowledge(engine, row, actor):
    """A person takes the open incident (open -> investigating)."""
    with engine.begin() as conn:
        return svc.transition(conn, row["id"], "investigating", actor, "/test")[0]


def test_an_acknowledgement_is_told_with_who_took_the_incident(handler, receivers, clean_db):
    row = incident(clean_db)
    handler.handle(event(events.INCIDENT_OPENED, row))
    # Nobody took it yet: the event does not match the incident.
    assert handler.handle(event(events.INCIDENT_ACKNOWLEDGED, row)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    taken = acknowledge(clean_db, row, "alice@example.org")
    assert handler.handle(event(events.INCIDENT_ACKNOWLEDGED, taken)).status_code == 202
    assert sent(receivers) == (["trigger", "acknowledge"], 2)
    assert "alice@example.org" in str(receivers[1].bodies()[-1])


def test_the_latest_remediation_result_of_the_generation_decides(handler, receivers, clean_db):
    row = incident(clean_db, "P1")
    record_remediation(clean_db, row, "failed", "blocked by cooldown")
    # A failure is no remediation.
    handler.handle(event(events.INCIDENT_REMEDIATED, row))
    assert sent(receivers) == ([], 0)
    record_remediation(clean_db, row, "remediated", "restarted the pod")
    # The later success overrides the earlier failure: nothing to page.
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row))
    assert sent(receivers) == ([], 0)
    handler.handle(event(events.INCIDENT_REMEDIATED, row))
    assert sent(receivers) == ([], 1)
    assert "restarted the pod" in str(receivers[1].bodies()[-1])


def test_a_result_of_an_earlier_generation_does_not_count(handler, receivers, clean_db):
    row = incident(clean_db, "P1")
    record_remediation(clean_db, row, "failed", "blocked by cooldown")
    reopened = reopen(clean_db, resolve(clean_db, row))
    receivers[1].server.requests.clear()
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, reopened))
    assert sent(receivers) == ([], 0)


def test_a_later_entry_of_the_same_generation_does_not_hide_the_result(handler, receivers, clean_db):
    row = incident(clean_db, "P1")
    record_remediation(clean_db, row, "failed", "blocked by cooldown")
    with clean_db.begin() as conn:  # as the reconciliation notes a step it gave up re-emitting
        svc.add_timeline(conn, row["id"], "stuck", {"step": "remediation", "generation": row["generation"], "reemissions": 3}, "reconcile")
    handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row))
    assert sent(receivers) == (["trigger"], 1)
    assert receivers[0].bodies()[0]["payload"]["custom_details"]["reason"] == "blocked by cooldown"


@pytest.fixture
def failing_records(clean_db):
    """Makes PostgreSQL refuse the next ``times`` notification entries with
    the SQLSTATE ``code``; ``attempts()`` counts the inserts tried."""
    import sqlalchemy as sa

    def fail(code: str, times: int):
        with clean_db.begin() as conn:
            conn.exec_driver_sql("DROP SEQUENCE IF EXISTS notification_record_attempts")
            conn.exec_driver_sql("CREATE SEQUENCE notification_record_attempts")
            conn.exec_driver_sql(f"""
                CREATE OR REPLACE FUNCTION refuse_notification_entries() RETURNS trigger AS $$
                BEGIN
                    IF NEW.kind = 'notification' AND nextval('notification_record_attempts') <= {int(times)} THEN
                        RAISE EXCEPTION 'refused by the test' USING ERRCODE = '{code}';
                    END IF;
                    RETURN NEW;
                END $$ LANGUAGE plpgsql""")
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS refuse_notification_entries ON incident_timeline")
            conn.exec_driver_sql("CREATE TRIGGER refuse_notification_entries BEFORE INSERT ON incident_timeline "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse_notification_entries()")

    def attempts() -> int:
        with clean_db.connect() as conn:
            value, called = conn.execute(sa.text("SELECT last_value, is_called FROM notification_record_attempts")).one()
            return value if called else 0

    fail.attempts = attempts
    yield fail
    with clean_db.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS refuse_notification_entries ON incident_timeline")
        conn.exec_driver_sql("DROP FUNCTION IF EXISTS refuse_notification_entries()")
        conn.exec_driver_sql("DROP SEQUENCE IF EXISTS notification_record_attempts")


def quick_handler(database_url, receivers, **env):
    pd, slack = receivers
    return EscalationHandler(load_settings({
        "DATABASE_URL": database_url, "PAGERDUTY_EVENTS_URL": pd.server.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack.server.url + "/services/T/B/X", "NOTIFY_TIMEOUT_SECONDS": "2", "NOTIFY_MAX_ATTEMPTS": "1", **env}))


def test_a_database_blip_while_recording_is_retried_and_the_message_is_sent_once(handler, receivers, failing_records, clean_db):
    row = incident(clean_db, "P1")
    failing_records("40001", times=2)  # serialization failures: transient
    assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert failing_records.attempts() == 3
    assert [n["outcome"] for n in notifications(clean_db, row["id"])] == ["sent"]
    handler.handle(event(events.INCIDENT_OPENED, row))
    assert sent(receivers) == ([], 1)


@pytest.mark.timeout(30)
def test_an_outcome_that_cannot_be_recorded_is_a_503_and_frees_the_claim(database_url, receivers, failing_records, clean_db, caplog):
    import logging

    from shared.errors import ServiceUnavailable

    for r in receivers:
        r.server.requests.clear()
    quick = quick_handler(database_url, receivers, DB_TIMEOUT_SECONDS="0.6")
    chat, page = incident(clean_db, "P1", "ChatOnly"), incident(clean_db, "P0", "Paged")
    failing_records("40001", times=1000)  # the database keeps failing: give up after its timeout
    with caplog.at_level(logging.ERROR, logger="escalation"), pytest.raises(ServiceUnavailable, match="could not be recorded"):
        quick.handle(event(events.INCIDENT_OPENED, chat))
    retries = failing_records.attempts()
    assert 2 <= retries <= 10
    with caplog.at_level(logging.ERROR, logger="escalation"), pytest.raises(ServiceUnavailable):
        quick.handle(event(events.INCIDENT_OPENED, page))
    # A chat message sent but not recorded is posted again by the retry; a
    # PagerDuty trigger is deduplicated by PagerDuty itself.
    records = [r for r in caplog.records if r.getMessage() == "Notification outcome not recorded"]
    assert [(r.channel, r.duplicate_risk) for r in records] == [("slack", True), ("pagerduty", False)]
    failing_records("40001", times=0)
    # The claims were given back at once: the retry sends again, no waiting for staleness.
    assert quick.handle(event(events.INCIDENT_OPENED, chat)).status_code == 202
    assert sent(receivers) == (["trigger"], 2)


def test_a_permanent_error_while_recording_is_not_retried(database_url, receivers, failing_records, clean_db):
    from shared.errors import ServiceUnavailable

    quick = quick_handler(database_url, receivers, DB_TIMEOUT_SECONDS="5")
    row = incident(clean_db, "P1")
    failing_records("23514", times=1000)  # a check violation: the same insert fails every time
    with pytest.raises(ServiceUnavailable):
        quick.handle(event(events.INCIDENT_OPENED, row))
    assert failing_records.attempts() == 1


def test_diagnostics_taking_the_incident_is_no_acknowledgement(handler, receivers, clean_db):
    from shared import lifecycle

    row = incident(clean_db)
    with clean_db.begin() as conn:  # what diagnostics does when it starts looking
        assert lifecycle.mark_investigating(conn, row["id"], "diagnostics")
    assert handler.handle(event(events.INCIDENT_ACKNOWLEDGED, {**row, "status": "investigating"})).status_code == 202
    assert sent(receivers) == ([], 0)


def test_every_refused_attempt_is_on_the_timeline_and_logged_without_its_error(handler, receivers, clean_db, caplog):
    import logging

    pd, _ = receivers
    pd.script += [(500, {}, b"down"), (500, {}, b"still down")]
    row = incident(clean_db)
    with caplog.at_level(logging.INFO, logger="escalation"):
        for _ in range(2):
            with pytest.raises(BadGateway):
                handler.handle(event(events.INCIDENT_OPENED, row))
        assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert [(n["channel"], n["outcome"]) for n in notifications(clean_db, row["id"])] == [
        ("pagerduty", "failed"), ("slack", "sent"), ("pagerduty", "failed"), ("pagerduty", "sent")]
    failed = [r for r in caplog.records if r.getMessage() == "Notification failed"]
    assert [(r.channel, r.action, r.transition, r.status, r.attempts) for r in failed] == [("pagerduty", "trigger", "opened", 500, 1)] * 2
    # The failure's text is on the timeline (scrubbed), not repeated in the log line.
    assert not any(hasattr(r, "error") for r in failed)


def test_the_channels_own_headers_go_out_with_the_request(database_url, receivers, clean_db):
    from functions.escalation.channels.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, verify

    hook = Receiver((204, {}, b""))
    try:
        signed = quick_handler(database_url, receivers, OUTGOING_WEBHOOK_URL=hook.server.url + "/hooks", OUTGOING_WEBHOOK_SECRET="s3cret-for-signing")
        row = incident(clean_db, "P2")
        assert signed.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
        (request,) = hook.server.received()
        assert verify("s3cret-for-signing", request.headers[SIGNATURE_HEADER.lower()], request.body)
        assert request.headers[DELIVERY_HEADER.lower()] == request.json()["id"]
    finally:
        hook.server.stop()


def test_an_incident_reopened_and_taken_again_names_the_latest_person(handler, receivers, clean_db):
    row = acknowledge(clean_db, incident(clean_db, "P1", "TakenTwice"), "alice@example.org")
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "remediation", "/test", resolved_by="remediation")
        # The alert fires again soon after remediation resolved it: open again, next generation.
        again = svc.record_alerts(conn, [alert("TakenTwice", priority="P1", service="email")], "/t", "t", reopen_window_seconds=1800)
        assert again.outcomes[0].action == "reopened"
    again = acknowledge(clean_db, {**row}, "bob@example.org")
    assert again["generation"] == 1
    handler.handle(event(events.INCIDENT_ACKNOWLEDGED, again))
    (message,) = receivers[1].bodies()
    assert "bob@example.org" in str(message) and "alice@example.org" not in str(message)


def test_each_channel_that_is_off_is_named_once_at_start(handler, database_url, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="escalation"):
        EscalationHandler(handler.config)
    off = sorted(r.getMessage() for r in caplog.records if r.name == "escalation")
    assert off == ["Microsoft Teams is off: TEAMS_WEBHOOK_URL is not set", "The outgoing webhook is off: OUTGOING_WEBHOOK_URL is not set"]


@pytest.mark.timeout(30)
def test_a_claim_that_cannot_be_given_back_is_left_to_go_stale(database_url, receivers, failing_records, clean_db, caplog):
    import logging

    from shared.errors import ServiceUnavailable

    quick = quick_handler(database_url, receivers, DB_TIMEOUT_SECONDS="0.3")
    row = incident(clean_db, "P1")
    failing_records("40001", times=1000)
    with clean_db.begin() as conn:  # the database refuses giving the claim back too
        conn.exec_driver_sql("""
            CREATE OR REPLACE FUNCTION refuse_claim_release() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'refused by the test' USING ERRCODE = '57P01'; END $$ LANGUAGE plpgsql""")
        conn.exec_driver_sql("CREATE TRIGGER refuse_claim_release BEFORE DELETE ON work_claims FOR EACH ROW EXECUTE FUNCTION refuse_claim_release()")
    try:
        with caplog.at_level(logging.WARNING, logger="escalation"), pytest.raises(ServiceUnavailable, match="could not be recorded"):
            quick.handle(event(events.INCIDENT_OPENED, row))
    finally:
        with clean_db.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse_claim_release ON work_claims")
            conn.exec_driver_sql("DROP FUNCTION refuse_claim_release()")
    (kept,) = [r for r in caplog.records if r.getMessage() == "Claim not released; it goes stale"]
    assert kept.key.startswith("notify:slack:message:") and kept.stale_after_s == quick.stale_seconds


def take_over(engine, row, name="TargetDown"):
    """Another alert takes over as the incident's root, as
    shared.correlation.store records it."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET alert_name = :n, root_generation = root_generation + 1 WHERE id = :id"),
                     {"n": name, "id": row["id"]})
        svc.add_timeline(conn, row["id"], "root_changed", {"alert_name": name, "reason": f"{name} explains the others"}, "intake")
        return svc.get_incident(conn, row["id"])


def test_each_roots_events_are_told_once_under_that_roots_claims(handler, receivers, clean_db):
    """An old root's outcome redelivered after a take-over is not told
    again as the new root's; the new root's opening is a follow-up, and
    its own outcome, once remediation records it, is told once."""
    pd, slack = receivers
    row = incident(clean_db, name="FirstRoot")
    record_remediation(clean_db, row, "failed", "dry-run: a human must act")
    old_outcome = event(events.INCIDENT_REMEDIATION_FAILED, row)
    assert handler.handle(old_outcome).status_code == 202
    told = len(pd.bodies()), len(slack.bodies())
    assert told == (1, 1)

    new_root = take_over(clean_db, row)
    assert handler.handle(old_outcome).status_code == 202  # the Broker redelivers it
    assert (len(pd.bodies()), len(slack.bodies())) == told

    opening = event(events.INCIDENT_OPENED, new_root)
    assert opening.get_data()["root_generation"] == 1
    assert handler.handle(opening).status_code == 202
    assert handler.handle(opening).status_code == 202
    assert [b["event_action"] for b in pd.bodies()] == ["trigger", "trigger"]
    assert "is now the root of the incident" in slack.bodies()[-1]["text"]

    new_outcome = event(events.INCIDENT_REMEDIATION_FAILED, new_root)
    assert handler.handle(new_outcome).status_code == 202  # its result is not recorded yet: nothing to tell
    assert len(slack.bodies()) == 2
    with clean_db.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result", {
            "outcome": "failed", "reason": "TargetDown: no playbook", "actions": [], "playbook": None,
            "generation": 0, "root_generation": 1}, "remediation")
    for _ in range(2):
        assert handler.handle(new_outcome).status_code == 202
    assert len(slack.bodies()) == 3 and "TargetDown: no playbook" in str(slack.bodies()[-1])
    assert handler.handle(old_outcome).status_code == 202
    assert len(slack.bodies()) == 3


def test_a_reopen_after_a_take_over_is_told_as_an_opening(handler, receivers, clean_db):
    """The fix did not hold: the reopened generation starts from its first
    root, so its opening is told as one, not as a root change."""
    pd, slack = receivers
    row = incident(clean_db, name="Reopened")
    take_over(clean_db, row)
    resolve(clean_db, row)
    reopened = reopen(clean_db, row)
    assert (reopened["generation"], reopened["root_generation"]) == (1, 0)
    assert handler.handle(event(events.INCIDENT_OPENED, reopened)).status_code == 202
    assert "is now the root" not in slack.bodies()[-1]["text"]
    assert slack.bodies()[-1]["text"].count("opened") >= 1


def test_a_root_change_updates_only_a_page_of_its_own_generation(handler, receivers, clean_db):
    """A P1 incident paged when its remediation failed, then resolved (the
    page too) and reopened: a root change in the new generation pages no
    one. Paged again in this generation, the next root change updates it."""
    pd, slack = receivers
    row = incident(clean_db, priority="P1", name="PagedBefore")
    record_remediation(clean_db, row, "failed", "dry-run: a human must act")
    assert handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row)).status_code == 202
    assert handler.handle(event(events.INCIDENT_RESOLVED, resolve(clean_db, row))).status_code == 202
    assert [b["event_action"] for b in pd.bodies()] == ["trigger", "resolve"]

    reopened = reopen(clean_db, row)
    assert handler.handle(event(events.INCIDENT_OPENED, take_over(clean_db, reopened))).status_code == 202
    assert [b["event_action"] for b in pd.bodies()] == ["trigger", "resolve"]

    with clean_db.begin() as conn:
        current = svc.get_incident(conn, row["id"])
        svc.add_timeline(conn, row["id"], "remediation_result", {
            "outcome": "failed", "reason": "still failing", "actions": [], "playbook": None,
            "generation": 1, "root_generation": 1}, "remediation")
    assert handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, current)).status_code == 202
    assert handler.handle(event(events.INCIDENT_OPENED, take_over(clean_db, current, "KubeNodeNotReady"))).status_code == 202
    assert [b["event_action"] for b in pd.bodies()] == ["trigger", "resolve", "trigger", "trigger"]
    assert "KubeNodeNotReady" in pd.bodies()[-1]["payload"]["summary"]


def why(body):
    """The *Why* section of a Slack message, or None when it has none."""
    sections = [b["text"]["text"] for b in body["blocks"] if b.get("type") == "section" and "text" in b]
    told = [s.removeprefix("*Why*\n") for s in sections if s.startswith("*Why*\n")]
    return told[0] if told else None


def test_a_root_change_is_told_with_why_the_latest_root_took_over(handler, receivers, clean_db):
    """The follow-up says why the root is what it is now: the reason of the
    latest take-over with how many alerts the incident groups, whatever the
    timeline holds after it (a person taking the incident, a result of the
    old root recorded late: kinds that sort after and before
    ``root_changed``)."""
    _, slack = receivers
    row = incident(clean_db, name="FirstRoot")
    assert handler.handle(event(events.INCIDENT_OPENED, take_over(clean_db, row))).status_code == 202
    assert why(slack.bodies()[-1]) == "TargetDown explains the others (1 alerts in this incident)"

    second = take_over(clean_db, row, "KubeNodeNotReady")
    acknowledge(clean_db, row, "alice@example.org")
    record_remediation(clean_db, row, "failed", "dry-run: a human must act")
    assert handler.handle(event(events.INCIDENT_OPENED, second)).status_code == 202
    assert len(slack.bodies()) == 2
    assert why(slack.bodies()[-1]) == "KubeNodeNotReady explains the others (1 alerts in this incident)"


def test_an_old_roots_outcome_delivered_after_the_new_roots_result_tells_nothing(handler, receivers, clean_db):
    """The Broker delivers the first root's failure only after the new root
    took over and was remediated: it is stale (the incident's root is the
    new one, whose own outcome is the one told), not told with the first
    root's result as if it were the incident's."""
    _, slack = receivers
    row = incident(clean_db, name="SlowDelivery")
    record_remediation(clean_db, row, "failed", "dry-run: a human must act")
    old_outcome = event(events.INCIDENT_REMEDIATION_FAILED, row)
    take_over(clean_db, row)
    with clean_db.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result", {
            "outcome": "remediated", "reason": "TargetDown: restarted", "actions": [], "playbook": None,
            "generation": 0, "root_generation": 1}, "remediation")
    assert handler.handle(old_outcome).status_code == 202
    assert sent(receivers) == ([], 0)


class Pager:
    """A channel of someone's own, written before channels had ``accept``:
    judged by the status, as the Channel protocol's default."""

    name = "pager"
    title = "Pager"
    setting = "PAGER_URL"

    def __init__(self, url):
        self.url = url

    def configured(self) -> bool:
        return True

    def message(self, note: Note):
        from functions.escalation.channels import Outgoing

        return Outgoing("page", self.url, {"incident": note.incident["id"]}) if note.transition == "opened" else None

    def retry(self, status: int) -> bool:
        return status >= 500


def test_a_channel_without_accept_is_judged_by_the_status_not_a_500(receivers, database_url, clean_db):
    pd, _ = receivers
    pd.server.requests.clear(), pd.script.clear()
    config = load_settings({"DATABASE_URL": database_url, "NOTIFY_TIMEOUT_SECONDS": "2", "NOTIFY_MAX_ATTEMPTS": "1"})
    handler = EscalationHandler(config, [Pager(pd.server.url + "/page")])
    row = incident(clean_db)
    assert handler.handle(event(events.INCIDENT_OPENED, row)).status_code == 202
    assert len(pd.server.received()) == 1
    assert [(n["channel"], n["outcome"], n["status"]) for n in notifications(clean_db, row["id"])] == [("pager", "sent", 202)]


@pytest.mark.parametrize("outcome, event_type", [("remediated", events.INCIDENT_REMEDIATED),
                                                 ("failed", events.INCIDENT_REMEDIATION_FAILED)])
def test_an_old_roots_remediation_outcome_arriving_after_a_take_over_is_stale_and_tells_nothing(
        handler, receivers, clean_db, caplog, outcome, event_type):
    """A run (or an approval) of FirstRoot finishes after TargetDown took
    over: remediation records and replies its outcome as root 0's and
    resolves nothing. Told, it would say "remediated automatically" of an
    incident that stays open, or page a P0 for a run that only stopped at
    the take-over; it is stale, as remediation treats the old root's late
    diagnosis: acknowledged, nothing sent, logged."""
    row = incident(clean_db, name="FirstRoot")
    take_over(clean_db, row)
    record_remediation(clean_db, row, outcome, "stopped before scale_deployment: another alert took over as the incident's root")
    with caplog.at_level("WARNING", logger="escalation"):
        assert handler.handle(event(event_type, row)).status_code == 202
    assert sent(receivers) == ([], 0)
    assert not notifications(clean_db, row["id"])
    assert [r.reason for r in caplog.records if r.getMessage().startswith("Escalation skipped")] == [
        "the event is of root 0's remediation; the incident's root is 1 since"]


def record_old_root(engine, row, outcome, reason, actions, **extra):
    """A result of root 0, as remediation records it after a take-over."""
    with engine.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result", {
            "outcome": outcome, "reason": reason, "actions": actions, "playbook": "scale", "generation": row["generation"],
            "root_generation": 0, **extra}, "remediation")


LIVE_SCALE = {"action": "scale_deployment", "target": "email", "namespace": "production", "from": 2, "to": 4,
              "success": True, "dry_run": False, "error": None}
ACTED = {
    "an approved run that crashed": (
        "remediation crashed while executing (ApiException); the actions it ran are on the timeline; a human must check the target",
        [], {"crashed": True, "approved_proposal": "5f0c2b1e-0000-4000-8000-000000000001"}),
    "a run stopped after its first step": (
        "stopped before rollout_restart: another alert took over as the incident's root (root generation 1) since the run "
        "began at root generation 0; the actions before it are on the timeline", [LIVE_SCALE], {}),
    "a verify that failed and reverted": (
        "the error rate stayed above 5%; reverted scale_deployment on email",
        [LIVE_SCALE, {**LIVE_SCALE, "revert": True, "from": 4, "to": 2}], {}),
}


@pytest.mark.parametrize("case", list(ACTED))
def test_an_old_roots_failed_run_that_acted_is_told_naming_the_previous_root(handler, receivers, clean_db, case):
    """FirstRoot's run changed the target, then failed, after TargetDown
    took over: a human must check what it changed. Paged and posted once,
    saying it is the previous root's remediation."""
    pd, slack = receivers
    row = incident(clean_db, name="FirstRootActed")
    take_over(clean_db, row)
    reason, actions, extra = ACTED[case]
    record_old_root(clean_db, row, "failed", reason, actions, **extra)
    for _ in range(2):  # the Broker redelivers it
        assert handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    told = str(slack.bodies()[-1])
    assert "remediation of the previous root (root generation 0)" in told and reason.split(";")[0] in told
    assert "previous root" in pd.bodies()[-1]["payload"]["custom_details"]["reason"]


NOTHING_RAN = {
    "an approval not executed": ("not executed: another alert took over as the incident's root (root generation 1) since "
                                 "the approval (root generation 0)", []),
    "a run stopped before its first step": ("stopped before scale_deployment: another alert took over as the incident's root", []),
    "a dry run": ("dry-run: nothing was changed, a human must act", [{**LIVE_SCALE, "dry_run": True}]),
    "a step blocked by a rail": ("blocked by cooldown: scale_deployment ran 2m ago",
                                 [{**LIVE_SCALE, "success": False, "blocked_by": "cooldown", "error": "blocked"}]),
}


@pytest.mark.parametrize("case", list(NOTHING_RAN))
def test_an_old_roots_failure_that_ran_nothing_tells_nothing(handler, receivers, clean_db, case):
    row = incident(clean_db, name="FirstRootIdle")
    take_over(clean_db, row)
    reason, actions = NOTHING_RAN[case]
    record_old_root(clean_db, row, "failed", reason, actions)
    assert handler.handle(event(events.INCIDENT_REMEDIATION_FAILED, row)).status_code == 202
    assert sent(receivers) == ([], 0)
    assert not notifications(clean_db, row["id"])


def test_an_old_roots_run_that_acted_and_remediated_tells_nothing(handler, receivers, clean_db):
    """It resolved nothing of the new root: not "remediated automatically"."""
    row = incident(clean_db, name="FirstRootFixed")
    take_over(clean_db, row)
    record_old_root(clean_db, row, "remediated", "every action succeeded and was verified", [LIVE_SCALE])
    assert handler.handle(event(events.INCIDENT_REMEDIATED, row)).status_code == 202
    assert sent(receivers) == ([], 0)
