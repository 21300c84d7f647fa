"""Escalation over real HTTP to loopback PagerDuty and Slack receivers that
check every request against the documented shape."""

import json
import time

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from shared import events
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook
from tests.processes import FunctionProcess, at_once, wait_until

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
assert len(ROUTING_KEY) == 32


@pytest.fixture
def receivers(pd, slack_hook):
    pd.reset(), slack_hook.reset()
    yield pd, slack_hook
    assert pd.invalid == [] and slack_hook.invalid == [], (pd.invalid, slack_hook.invalid)


@pytest.fixture(scope="module")
def escalation(base_env, pd, slack_hook):
    env = {
        **base_env,
        "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue",
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack_hook.url + "/services/T000/B000/XXXX",
        "NOTIFY_TIMEOUT_SECONDS": "1",
        "NOTIFY_MAX_ATTEMPTS": "3",
        "PUBLIC_URL": "http://incident-api.production:8080",
    }
    proc = FunctionProcess("escalation", env).start()
    yield proc
    proc.stop()


def open_incident(engine, name="EmailServiceDown", priority="P0", **labels):
    a = alert(name, priority=priority, service="email", namespace="production", **labels)
    a = a.__class__(**{**a.__dict__, "summary": "Service completely down",
                       "annotations": {"summary": "Service completely down", "runbook_url": "https://runbooks.example/email"}})
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [a], "/test", "test").outcomes[0].incident_id
        return svc.get_incident(conn, incident_id)


def deliver(proc, event_type, row, extra=None):
    spec = events.incident_event(event_type, row, "/test", extra)
    headers, body = to_binary(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", **spec["extensions"]}, spec["data"]))
    return requests.post(proc.url + "/", data=body, headers={**headers, "Prefer": "reply"}, timeout=60)


def notifications(engine, incident_id):
    with engine.connect() as conn:
        return [t["details"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "notification"]


def test_seed_test5_through_the_intake_pages_once_and_resolving_resolves_the_page(base_env, escalation, receivers, clean_db):
    pd, hook = receivers
    intake = FunctionProcess("intake", {**base_env, "K_SINK": escalation.url}).start()
    try:
        auth = {"Authorization": f"Bearer {TEST_TOKEN}"}
        firing = raw_alert("EmailServiceDown", severity="critical")
        firing["annotations"] = {"summary": "Service completely down"}
        requests.post(intake.url + "/webhook/alert", json=webhook([firing]), headers=auth, timeout=10).raise_for_status()
        wait_until(lambda: len(pd.requests) == 1 and len(hook.requests) == 1, 15, message="page and Slack message")
        (trigger,) = pd.bodies()
        assert trigger["event_action"] == "trigger"
        assert trigger["payload"]["summary"] == "EmailServiceDown - Service completely down"
        assert trigger["payload"]["severity"] == "critical"
        incident_id = trigger["dedup_key"]
        resolved = {**firing, "status": "resolved", "endsAt": "2026-11-27T22:00:00Z"}
        requests.post(intake.url + "/webhook/alert", json=webhook([resolved], status="resolved"), headers=auth, timeout=10).raise_for_status()
        wait_until(lambda: len(pd.requests) == 2 and len(hook.requests) == 2, 15, message="resolve and Slack message")
        resolve = pd.bodies()[1]
        assert resolve == {"routing_key": trigger["routing_key"], "event_action": "resolve", "dedup_key": incident_id}
        assert "resolved" in hook.bodies()[1]["text"]
    finally:
        intake.stop()


def test_trigger_carries_context_links_and_runbook(escalation, receivers, clean_db):
    pd, _ = receivers
    row = open_incident(clean_db)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    (trigger,) = pd.bodies()
    payload = trigger["payload"]
    assert payload["source"] == "email" and payload["component"] == "email" and payload["group"] == "production"
    assert payload["custom_details"]["priority"] == "P0" and payload["custom_details"]["labels"]["service"] == "email"
    assert [l["text"] for l in trigger["links"]] == ["Incident", "Runbook"]
    assert trigger["links"][0]["href"] == f"http://incident-api.production:8080/ui/incidents/{row['id']}"
    assert trigger["client"] == "Incident Response"


def test_p1_opened_is_announced_on_slack_without_paging(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert pd.requests == [] and len(hook.requests) == 1
    assert hook.bodies()[0]["blocks"][0]["text"]["text"] == "[P1] KafkaConsumerLagHigh opened"


def test_remediation_failed_pages_p1_with_the_reason(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, row, {"remediation": {"outcome": "failed", "reason": "blocked by cooldown"}})
    (trigger,) = pd.bodies()
    assert trigger["payload"]["severity"] == "error"
    assert trigger["payload"]["custom_details"]["reason"] == "blocked by cooldown"
    assert "blocked by cooldown" in json.dumps(hook.bodies()[0]["blocks"])


def test_one_slack_message_per_transition_and_no_resolve_without_a_page(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    for event_type in (events.INCIDENT_OPENED, events.INCIDENT_REMEDIATED, events.INCIDENT_RESOLVED):
        assert deliver(escalation, event_type, row).status_code == 202
    assert [b["blocks"][0]["text"]["text"] for b in hook.bodies()] == [
        "[P1] KafkaConsumerLagHigh opened", "[P1] KafkaConsumerLagHigh remediated automatically", "[P1] KafkaConsumerLagHigh resolved"]
    assert pd.requests == []


def test_redelivered_event_sends_nothing_twice(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db)
    for _ in range(3):
        assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert len(pd.requests) == 1 and len(hook.requests) == 1
    assert [n["channel"] for n in notifications(clean_db, row["id"])] == ["pagerduty", "slack"]


def test_concurrent_deliveries_page_once(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db)
    statuses = at_once(lambda: deliver(escalation, events.INCIDENT_OPENED, row).status_code, 4)
    assert 202 in statuses and set(statuses) <= {202, 409}
    assert len(pd.requests) == 1 and len(hook.requests) == 1


def test_429_with_retry_after_then_success(escalation, receivers, clean_db):
    pd, _ = receivers
    pd.script.append((429, {"Retry-After": "1"}, b'{"status":"throttle event"}'))
    row = open_incident(clean_db)
    started = time.monotonic()
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert time.monotonic() - started >= 1.0
    assert len(pd.requests) == 2
    (page,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == "pagerduty"]
    assert (page["outcome"], page["attempts"]) == ("sent", 2)


def test_500s_exhaust_the_retries_and_the_broker_gets_a_5xx_then_redelivery_succeeds(escalation, receivers, clean_db):
    pd, hook = receivers
    pd.script.extend([(500, {}, b"oops")] * 3)
    row = open_incident(clean_db)
    response = deliver(escalation, events.INCIDENT_OPENED, row)
    assert response.status_code == 502
    assert len(pd.requests) == 3 and len(hook.requests) == 1
    assert notifications(clean_db, row["id"])[0]["outcome"] == "failed"
    again = deliver(escalation, events.INCIDENT_OPENED, row)
    assert again.status_code == 202 and len(pd.requests) == 4 and len(hook.requests) == 1


def test_400_is_not_retried_is_recorded_and_never_logs_the_key(escalation, receivers, clean_db):
    pd, _ = receivers
    pd.script.append((400, {"Content-Type": "application/json"}, b'{"status":"invalid event","message":"Event object is invalid"}'))
    row = open_incident(clean_db)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 502
    assert len(pd.requests) == 1
    (failed,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == "pagerduty"]
    assert (failed["outcome"], failed["status"], failed["attempts"]) == ("failed", 400, 1)
    assert "Notification refused" in escalation.logs()
    assert ROUTING_KEY not in escalation.logs() and "XXXX" not in escalation.logs()


def test_a_hanging_receiver_is_bounded_by_the_timeout(escalation, receivers, clean_db):
    pd, _ = receivers
    pd.script.extend(["hang:5"] * 3)
    row = open_incident(clean_db)
    started = time.monotonic()
    response = deliver(escalation, events.INCIDENT_OPENED, row)
    elapsed = time.monotonic() - started
    assert response.status_code == 502
    assert elapsed < 3 * 1 + 0.5 + 1.0 + 2.0  # three 1 s timeouts, two backoffs, slack


def test_without_settings_channels_are_off_and_say_so(base_env, clean_db):
    proc = FunctionProcess("escalation", dict(base_env)).start()
    try:
        row = open_incident(clean_db)
        assert deliver(proc, events.INCIDENT_OPENED, row).status_code == 202
        logs = proc.logs()
        assert "PagerDuty is off" in logs and "Slack is off" in logs
        assert "not notifying" in logs
        with clean_db.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM incident_timeline WHERE kind = 'notification'")).scalar() == 0
    finally:
        proc.stop()
