"""Escalation over real HTTP to loopback PagerDuty and Slack receivers that
check every request against the documented shape."""

import json
import time

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from shared import eventio, events
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook
from loopback.processes import FunctionProcess, wait_until

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
assert len(ROUTING_KEY) == 32
# Shaped like a real incoming webhook: team, channel, token.
SLACK_TEAM, SLACK_CHANNEL, SLACK_TOKEN = "T0AAAAAAA", "B0BBBBBBB", "Xq7cVb9TzLk2Wm4Rp8Ns1Jd5"
SLACK_PATH = f"/services/{SLACK_TEAM}/{SLACK_CHANNEL}/{SLACK_TOKEN}"


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
        "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH,
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
    assert [link["text"] for link in trigger["links"]] == ["Incident", "Runbook"]
    assert trigger["links"][0]["href"] == f"http://incident-api.production:8080/ui/incidents/{row['id']}"
    assert trigger["client"] == "Incident Response"


def test_p1_opened_is_announced_on_slack_without_paging(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert pd.requests == [] and len(hook.requests) == 1
    assert hook.bodies()[0]["blocks"][0]["text"]["text"] == "[P1] KafkaConsumerLagHigh opened"


def record_remediation(engine, row, outcome, reason):
    """What remediation records before it replies (the escalation reads it)."""
    with engine.begin() as conn:
        svc.add_timeline(conn, row["id"], "remediation_result",
                         {"outcome": outcome, "reason": reason, "actions": [], "playbook": None, "generation": row["generation"]}, "remediation")


def resolve(engine, row):
    with engine.begin() as conn:
        return svc.transition(conn, row["id"], "resolved", "test", "/test")[0]


def test_remediation_failed_pages_p1_with_the_reason(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    record_remediation(clean_db, row, "failed", "blocked by cooldown")
    deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, row, {"remediation": {"outcome": "failed", "reason": "blocked by cooldown"}})
    (trigger,) = pd.bodies()
    assert trigger["payload"]["severity"] == "error"
    assert trigger["payload"]["custom_details"]["reason"] == "blocked by cooldown"
    assert "blocked by cooldown" in json.dumps(hook.bodies()[0]["blocks"])


def test_one_slack_message_per_transition_and_no_resolve_without_a_page(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    record_remediation(clean_db, row, "remediated", "every action succeeded and was verified")
    assert deliver(escalation, events.INCIDENT_REMEDIATED, row).status_code == 202
    row = resolve(clean_db, row)
    assert deliver(escalation, events.INCIDENT_RESOLVED, row).status_code == 202
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
    assert ROUTING_KEY not in escalation.logs() and SLACK_TOKEN not in escalation.logs()


# --------------------------------------------------------------------------- a 2xx is not yet an acceptance
# A captive portal, a proxy's error page or a wrong endpoint answers 200 with
# a page of its own: nothing reached PagerDuty or Slack.
PORTAL = (200, {"Content-Type": "text/html; charset=utf-8"}, b"<!DOCTYPE html><html><body>Sign in to the guest network</body></html>")


def _escalation_through_proxy(base_env, pagerduty_url: str, slack_url: str, proxy: str):
    """The escalation posting to a service's own host through an HTTP proxy
    that is that service's loopback receiver, so its answers are judged by
    their body as the real host's are."""
    env = {
        **base_env,
        "PAGERDUTY_EVENTS_URL": pagerduty_url,
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack_url,
        "HTTP_PROXY": proxy, "http_proxy": proxy,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "NOTIFY_TIMEOUT_SECONDS": "1",
        "NOTIFY_MAX_ATTEMPTS": "3",
        "PUBLIC_URL": "http://incident-api.production:8080",
    }
    proc = FunctionProcess("escalation", env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def escalation_at_slack(base_env, pd, slack_hook):
    """Slack's own host, through the loopback Slack."""
    yield from _escalation_through_proxy(base_env, pd.url + "/v2/enqueue", "http://hooks.slack.com" + SLACK_PATH, slack_hook.url)


@pytest.fixture
def at_slack(escalation_at_slack, receivers):
    """The process, and that its Slack posts did reach Slack's host."""
    yield escalation_at_slack
    _, hook = receivers
    assert all(r.path.startswith("http://hooks.slack.com/services/") for r in hook.requests), [r.path for r in hook.requests]


@pytest.fixture(scope="module")
def escalation_at_pagerduty(base_env, pd, slack_hook):
    """PagerDuty's own host, through the loopback PagerDuty."""
    yield from _escalation_through_proxy(base_env, "http://events.pagerduty.com/v2/enqueue", slack_hook.url + SLACK_PATH, pd.url)


@pytest.fixture
def at_pagerduty(escalation_at_pagerduty, receivers):
    """The process, and that its pages did reach PagerDuty's host."""
    yield escalation_at_pagerduty
    pd, _ = receivers
    assert all(r.path == "http://events.pagerduty.com/v2/enqueue" for r in pd.requests), [r.path for r in pd.requests]


def test_a_200_page_that_is_not_pagerdutys_answer_is_retried_then_answered_502(at_pagerduty, receivers, clean_db):
    a_200_page_that_is_not_the_services_answer_is_retried_then_answered_502(at_pagerduty, receivers, clean_db, "pagerduty")


def test_a_200_page_that_is_not_slacks_answer_is_retried_then_answered_502(at_slack, receivers, clean_db):
    a_200_page_that_is_not_the_services_answer_is_retried_then_answered_502(at_slack, receivers, clean_db, "slack")


def a_200_page_that_is_not_the_services_answer_is_retried_then_answered_502(at_slack, receivers, clean_db, which):
    pd, hook = receivers
    receiver = pd if which == "pagerduty" else hook
    receiver.script.extend([PORTAL] * 3)
    row = open_incident(clean_db)
    response = deliver(at_slack, events.INCIDENT_OPENED, row)
    assert response.status_code == 502 and which in response.text
    assert len(receiver.requests) == 3  # NOTIFY_MAX_ATTEMPTS: retried like an error on their side
    (failed,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == which]
    assert (failed["outcome"], failed["status"], failed["attempts"]) == ("failed", 200, 3)
    assert failed["error"].startswith("HTTP 200, not accepted: <!DOCTYPE html>")
    assert claim_rows(clean_db, f"escalated:{row['id']}") == []
    # The Broker's redelivery, once the portal is gone: sent, and only what was missing.
    assert deliver(at_slack, events.INCIDENT_OPENED, row).status_code == 202
    assert len(receiver.requests) == 4 and len(pd.requests) + len(hook.requests) == 5


def test_slack_saying_ok_false_with_a_200_is_a_refusal_not_retried(at_slack, receivers, clean_db):
    _, hook = receivers
    hook.script.append((200, {"Content-Type": "application/json"}, b'{"ok":false,"error":"channel_not_found"}'))
    row = open_incident(clean_db)
    response = deliver(at_slack, events.INCIDENT_OPENED, row)
    assert response.status_code == 502 and "channel_not_found" in response.text
    assert len(hook.requests) == 1
    (failed,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == "slack"]
    assert (failed["outcome"], failed["status"], failed["attempts"]) == ("failed", 200, 1)
    assert "Notification refused" in at_slack.logs()


@pytest.mark.parametrize("answer", [
    (200, {"Content-Type": "application/json"}, b'{"ok":true}'),  # a workflow's webhook, the Web API
    (200, {"Content-Type": "text/html"}, b"ok\n"),
])
def test_slacks_other_words_for_accepted_are_accepted(at_slack, receivers, clean_db, answer):
    _, hook = receivers
    hook.script.append(answer)
    row = open_incident(clean_db)
    assert deliver(at_slack, events.INCIDENT_OPENED, row).status_code == 202
    assert len(hook.requests) == 1


# JSON nested deeper than the parser goes: json.loads raises RecursionError.
TOO_DEEP = b"[" * 60000


def test_no_answer_from_pagerduty_drops_the_event_or_goes_unrecorded(at_pagerduty, receivers, clean_db):
    no_answer_to_a_notification_drops_the_event_or_goes_unrecorded(
        at_pagerduty, receivers, clean_db, "pagerduty", (200, {"Content-Type": "application/json"}, TOO_DEEP))


@pytest.mark.parametrize("answer", [
    (200, {"Content-Type": "application/json"}, TOO_DEEP),
    (200, {"Content-Type": "application/json"}, b'{"ok":false,"error":["internal_error"]}'),
], ids=["too-deep", "error-not-a-string"])
def test_no_answer_from_slack_drops_the_event_or_goes_unrecorded(at_slack, receivers, clean_db, answer):
    no_answer_to_a_notification_drops_the_event_or_goes_unrecorded(at_slack, receivers, clean_db, "slack", answer)


def no_answer_to_a_notification_drops_the_event_or_goes_unrecorded(at_slack, receivers, clean_db, which, answer):
    # Before: the judge raised (RecursionError, mapped to 400: the Broker
    # dropped the event, the page was lost and Slack never tried; TypeError:
    # 500 and no timeline entry).
    pd, hook = receivers
    receiver = pd if which == "pagerduty" else hook
    receiver.script.extend([answer] * 3)
    row = open_incident(clean_db)
    response = deliver(at_slack, events.INCIDENT_OPENED, row)
    assert response.status_code == 502, (response.status_code, response.text)
    (failed,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == which]
    assert (failed["outcome"], failed["status"]) == ("failed", 200)
    # Every channel was tried: the other one was sent.
    assert [n["outcome"] for n in notifications(clean_db, row["id"]) if n["channel"] != which] == ["sent"]
    # The Broker's redelivery, once the receiver answers as it should: sent.
    receiver.script.clear()
    assert deliver(at_slack, events.INCIDENT_OPENED, row).status_code == 202


# A Slack-compatible receiver that is not Slack (Mattermost answers the text
# "ok", Rocket.Chat {"success": true}): judged by the status alone, so its
# own word for "accepted" is not taken for a portal's page.
@pytest.mark.parametrize("answer", [
    (200, {"Content-Type": "text/plain"}, b"ok"),                             # Mattermost
    (200, {"Content-Type": "application/json"}, b'{"success":true}'),          # Rocket.Chat
], ids=["mattermost", "rocket.chat"])
def test_a_slack_compatible_receiver_elsewhere_is_accepted_at_its_first_answer(escalation, receivers, clean_db, answer):
    _, hook = receivers
    hook.script.append(answer)
    row = open_incident(clean_db)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert len(hook.requests) == 1
    (sent,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == "slack"]
    assert (sent["outcome"], sent["attempts"]) == ("sent", 1)


def test_an_answer_quoting_a_nul_is_still_recorded(escalation, receivers, clean_db):
    # PostgreSQL keeps no NUL in JSONB: the failure went unrecorded (503).
    pd, _ = receivers
    pd.script.append((400, {"Content-Type": "application/json"}, b'{"status":"invalid event","message":"bad\x00key"}'))
    row = open_incident(clean_db)
    response = deliver(escalation, events.INCIDENT_OPENED, row)
    assert response.status_code == 502, (response.status_code, response.text)
    (failed,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == "pagerduty"]
    assert failed["outcome"] == "failed" and "\x00" not in failed["error"] and "bad\ufffdkey" in failed["error"]


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


# --------------------------------------------------------------------------- what is sent is always accepted and safe

from dataclasses import replace  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

from shared.config import load_settings  # noqa: E402
from loopback.notify import slack_control_sequences, u16  # noqa: E402
from loopback.servers import TcpProxy  # noqa: E402
from loopback.processes import free_port  # noqa: E402

HOSTILE = "<!channel> <!here> <@U123> <#C024BE7LR|general> <https://evil.example|login> & &amp; >quote"


def incident_with(engine, name="DiskFull", priority="P0", summary="", description="", annotations=None, **labels):
    a = alert(name, priority=priority, namespace="production", **labels)
    a = replace(a, summary=summary, description=description, annotations=annotations or {})
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [a], "/test", "test").outcomes[0].incident_id
        return svc.get_incident(conn, incident_id)


def our_link_only(message, incident_id):
    assert slack_control_sequences(message) == [
        f"http://incident-api.production:8080/ui/incidents/{incident_id}|Open incident {incident_id}"]


def test_hostile_alert_text_is_escaped_in_every_slack_field_and_bounded(escalation, receivers, clean_db):
    pd, hook = receivers
    row = incident_with(clean_db, "DiskFull<!channel>&", annotations={"title": HOSTILE}, service="&<>" * 900)
    record_remediation(clean_db, row, "failed", HOSTILE)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, row).status_code == 202
    assert len(hook.requests) == 2 and hook.invalid == []
    for message in hook.bodies():
        our_link_only(message, row["id"])
        assert "&lt;!channel&gt; &lt;!here&gt; &lt;@U123&gt;" in message["text"]
        assert "&lt;https://evil.example|login&gt; &amp; &amp;amp;" in json.dumps(message["blocks"])
    # PagerDuty renders no Slack syntax: the same text goes as it is.
    assert pd.bodies()[0]["payload"]["summary"] == f"DiskFull<!channel>& - {HOSTILE}"


@pytest.mark.parametrize("annotations, stored", [
    ({"title": "Disk /var is 97% full"}, {}),
    ({"description": "Disk /var is 97% full\non node-3, growing 1%/h"}, {"description": "Disk /var is 97% full\non node-3, growing 1%/h"}),
])
def test_an_alert_with_only_a_title_or_a_description_gets_a_meaningful_summary(escalation, receivers, clean_db, annotations, stored):
    pd, hook = receivers
    row = incident_with(clean_db, annotations=annotations, **{})
    if stored:
        with clean_db.begin() as conn:
            conn.execute(sa.text("UPDATE incidents SET description = :d WHERE id = :id"), {"d": stored["description"], "id": row["id"]})
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    (message,) = hook.bodies()
    assert message["text"].startswith("[P0] DiskFull opened: Disk /var is 97% full (")
    assert message["blocks"][1]["text"]["text"].startswith("Disk /var is 97% full")
    assert pd.bodies()[0]["payload"]["summary"] == "DiskFull - Disk /var is 97% full"


@pytest.mark.parametrize("unit", ["&", "<", "e\u0301", "👍🏽", "👨‍👩‍👧", "🇺🇦", "\U0001F525"])
def test_truncation_never_cuts_an_entity_a_surrogate_pair_or_a_combining_sequence(unit):
    from functions.escalation.channels import slack
    from functions.escalation.channels.text import ELLIPSIS

    for limit in (150, 1999, 2000, 3000):
        text = slack.fit(["x" * (limit % 7), unit * 3000], limit)
        assert u16(text) <= limit and text.endswith(ELLIPSIS)
        body = text[limit % 7:-1]
        escaped = slack.escape(unit)
        assert body == escaped * (len(body) // len(escaped)), f"a {unit!r} was cut"


def test_pagerduty_event_is_bounded_to_512_kb_and_valid_against_the_official_schema(escalation, receivers, clean_db):
    pd, _ = receivers
    labels = {f"label_{i}": "v" * 3000 for i in range(150)}
    row = incident_with(clean_db, summary="s" * 5000, description="d" * 600_000, annotations={"summary": "s" * 5000}, **labels)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET diagnostics = CAST(:d AS json) WHERE id = :id"),
                     {"d": json.dumps({"metrics": {f"m{i}": "x" * 2000 for i in range(200)}}), "id": row["id"]})
    # The event carries a bounded projection; escalation reads the rest from the database.
    assert deliver_forged(escalation, events.INCIDENT_OPENED, row, description="", summary="", labels={}, annotations={}).status_code == 202
    (trigger,) = pd.bodies()
    assert len(pd.requests[0].body) <= 512 * 1024
    assert len(trigger["payload"]["summary"]) <= 1024 and trigger["payload"]["custom_details"]["incident_id"] == row["id"]


# --------------------------------------------------------------------------- the database decides, not the event


def deliver_forged(proc, event_type, row, **data):
    spec = events.incident_event(event_type, row, "/test")
    spec["data"].update(data)
    headers, body = to_binary(CloudEvent({"id": f"forged-{time.monotonic_ns()}", "type": spec["type"], "source": "/test",
                                          **spec["extensions"]}, spec["data"]))
    return requests.post(proc.url + "/", data=body, headers=headers, timeout=60)


def test_forged_generations_page_once(escalation, receivers, clean_db):
    """Generations the incident never had are refused for good (nothing
    legitimate carries one: events leave after their commit)."""
    pd, hook = receivers
    row = open_incident(clean_db)
    assert deliver_forged(escalation, events.INCIDENT_OPENED, row, generation=0, priority="P0").status_code == 202
    for generation in (1, 2, 3):
        response = deliver_forged(escalation, events.INCIDENT_OPENED, row, generation=generation, priority="P0")
        assert response.status_code == 400 and "data.generation" in response.json()["message"]
    assert len(pd.requests) == 1 and len(hook.requests) == 1


def test_forged_outcomes_and_resolutions_notify_nobody(escalation, receivers, clean_db):
    pd, hook = receivers
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    # No remediation ran: a remediation_failed event is a lie.
    assert deliver_forged(escalation, events.INCIDENT_REMEDIATION_FAILED, row,
                          remediation={"outcome": "failed", "reason": "forged"}).status_code == 202
    # Remediation succeeded: an event claiming it failed pages nobody either.
    record_remediation(clean_db, row, "remediated", "every action succeeded and was verified")
    assert deliver_forged(escalation, events.INCIDENT_REMEDIATION_FAILED, row,
                          remediation={"outcome": "failed", "reason": "forged"}).status_code == 202
    assert pd.requests == [] and hook.requests == []
    # A P0 paged, then a forged "resolved" while it is still open: the page stays.
    p0 = open_incident(clean_db)
    assert deliver(escalation, events.INCIDENT_OPENED, p0).status_code == 202
    assert deliver_forged(escalation, events.INCIDENT_RESOLVED, p0, status="resolved").status_code == 202
    assert [b["event_action"] for b in pd.bodies()] == ["trigger"]
    assert "Escalation skipped: the event does not match the incident" in escalation.logs()


def claim_rows(engine, prefix):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT key, completed_at IS NOT NULL AS done FROM work_claims WHERE key LIKE :p ORDER BY key"),
                            {"p": prefix + "%"}).mappings().all()


def test_a_completely_handled_event_records_its_escalated_claim(escalation, receivers, clean_db):
    pd, _ = receivers
    row = open_incident(clean_db)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert [dict(r) for r in claim_rows(clean_db, "escalated:")] == [{"key": f"escalated:{row['id']}:0:opened", "done": True}]
    failing = open_incident(clean_db, "OtherAlert")
    pd.script.extend([(500, {}, b"oops")] * 3)
    assert deliver(escalation, events.INCIDENT_OPENED, failing).status_code == 502
    assert claim_rows(clean_db, f"escalated:{failing['id']}") == []


# --------------------------------------------------------------------------- no secret in stored text or logs


@pytest.fixture
def blackhole():
    """Accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("kind", ["refused", "timeout"])
def test_an_unreachable_slack_url_never_reaches_the_timeline_the_api_or_the_logs(base_env, clean_db, blackhole, kind):
    port = free_port() if kind == "refused" else blackhole
    url = f"http://127.0.0.1:{port}{SLACK_PATH}"
    env = {**base_env, "SLACK_WEBHOOK_URL": url, "NOTIFY_TIMEOUT_SECONDS": "0.5", "NOTIFY_MAX_ATTEMPTS": "2"}
    proc = FunctionProcess("escalation", env).start()
    query = FunctionProcess("query", dict(base_env)).start()
    try:
        row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
        response = deliver(proc, events.INCIDENT_OPENED, row)
        assert response.status_code == 502
        (failed,) = notifications(clean_db, row["id"])
        assert failed["outcome"] == "failed" and ("refused" if kind == "refused" else "no answer") in failed["error"]
        api = requests.get(f"{query.url}/incidents/{row['id']}", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10).text
        wait_until(lambda: "Notification failed after retries" in proc.logs(), 10, message="the failure logged")
        for where, text in {"timeline": json.dumps(failed), "api": api, "reply": response.text, "logs": proc.logs()}.items():
            for secret in (url, SLACK_PATH, SLACK_PATH.lstrip("/"), SLACK_TOKEN, SLACK_TEAM, SLACK_CHANNEL):
                assert secret not in text, (where, secret)
    finally:
        proc.stop(), query.stop()


# --------------------------------------------------------------------------- claims: never stuck, never twice


def kill_tree(pid: int) -> None:
    """SIGKILL a process and any descendants, so that nothing finishes the
    request it was killed under."""
    import os
    import signal
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_an_orphaned_claim_goes_stale_after_the_notification_budget_not_minutes(base_env, slack_hook, clean_db):
    slack_hook.reset()
    release = threading.Event()

    def hang(_):
        release.wait(30)
        return 200, {}, b"ok"

    from functions.escalation.handler import claim_stale_seconds

    env = {**base_env, "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH, "NOTIFY_TIMEOUT_SECONDS": "3",
           "NOTIFY_MAX_ATTEMPTS": "2", "DB_TIMEOUT_SECONDS": "2"}
    stale = claim_stale_seconds(load_settings(env))
    assert stale == 3 * 2 + 0.5 + 2
    # The Broker (retry 6, exponential from 0.5 s) retries for about 63 s.
    assert stale < 63 / 4
    slack_hook.script.append(hang)
    first = FunctionProcess("escalation", env).start()
    second = FunctionProcess("escalation", env).start()
    try:
        row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
        def in_flight():
            try:
                deliver(first, events.INCIDENT_OPENED, row)
            except requests.ConnectionError:
                pass  # its process is killed under it

        threading.Thread(target=in_flight, daemon=True).start()
        wait_until(lambda: len(slack_hook.requests) == 1, 10, message="the Slack post in flight")
        kill_tree(first.process.pid)  # dies holding the claim: nothing can release it
        first.process.wait()
        release.set()
        with clean_db.connect() as conn:
            claimed_at = conn.execute(sa.text("SELECT claimed_at, timezone('utc', now()) FROM work_claims WHERE key LIKE 'notify:slack:%'")).one()
        assert deliver(second, events.INCIDENT_OPENED, row).status_code == 409
        wait_until(lambda: deliver(second, events.INCIDENT_OPENED, row).status_code == 202, stale + 5, interval=0.2,
                   message="the claim to go stale")
        with clean_db.connect() as conn:
            now = conn.execute(sa.text("SELECT timezone('utc', now())")).scalar()
        assert stale - 0.5 <= (now - claimed_at[0]).total_seconds() <= stale + 5
        assert len(slack_hook.requests) == 2
        assert [n["outcome"] for n in notifications(clean_db, row["id"])] == ["sent"]
    finally:
        release.set()
        first.stop(), second.stop()
        slack_hook.reset()


def test_a_database_blip_after_the_slack_post_is_ridden_out_without_a_second_post(base_env, database_url, slack_hook, clean_db):
    from urllib.parse import urlsplit, urlunsplit

    slack_hook.reset()
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname, parts.port).start()
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))

    def accept_then_lose_the_database(_):
        proxy.cut()
        threading.Timer(0.7, proxy.restore).start()
        return 200, {}, b"ok"

    slack_hook.script.append(accept_then_lose_the_database)
    env = {**base_env, "DATABASE_URL": proxied, "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH, "DB_TIMEOUT_SECONDS": "3"}
    proc = FunctionProcess("escalation", env).start()
    try:
        row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
        assert deliver(proc, events.INCIDENT_OPENED, row).status_code == 202
        assert deliver(proc, events.INCIDENT_OPENED, row).status_code == 202
        assert len(slack_hook.requests) == 1
        assert [n["outcome"] for n in notifications(clean_db, row["id"])] == ["sent"]
    finally:
        proc.stop()
        proxy.stop()
        slack_hook.reset()


# --------------------------------------------------------------------------- text that reorders or hides itself

# A right-to-left override makes "DiskFull" followed by "lluFksiD" read as
# anything; a zero-width space and a word joiner hide inside a name.
SPOOFED_NAME = "Disk\u202eFull\u202c\u200bLow\u2066x\u2069\ufeff\u2060"
SPOOFED_SHOWN = "Disk‹U+202E›Full‹U+202C›‹U+200B›Low‹U+2066›x‹U+2069›‹U+FEFF›‹U+2060›"
HIDDEN_CHARACTERS = "\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2066\u2067\u2068\u2069\ufeff"


def test_bidi_controls_and_zero_width_characters_are_shown_in_the_page_and_the_slack_message(escalation, receivers, clean_db):
    pd, hook = receivers
    row = incident_with(clean_db, SPOOFED_NAME, summary="Primary \u202edown\u202c, firefighter 👩\u200d🚒 paged",
                        description="replica\u200b lag")
    assert row["alert_name"] == SPOOFED_NAME  # the record keeps what the alert said
    spec = events.incident_event(events.INCIDENT_OPENED, row, "/test", None)
    # As the outbox sends it: the alertname attribute percent-encoded.
    headers, body = eventio.to_http(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", **spec["extensions"]},
                                               spec["data"]))
    assert requests.post(escalation.url + "/", data=body, headers={**headers, "Prefer": "reply"}, timeout=60).status_code == 202
    (page,) = pd.bodies()
    (message,) = hook.bodies()
    assert page["payload"]["summary"] == f"{SPOOFED_SHOWN} - Primary ‹U+202E›down‹U+202C›, firefighter 👩\u200d🚒 paged"
    assert page["payload"]["class"] == SPOOFED_SHOWN
    assert page["payload"]["custom_details"]["labels"]["alertname"] == SPOOFED_SHOWN
    assert page["payload"]["custom_details"]["description"] == "replica‹U+200B› lag"
    assert message["text"].startswith(f"[P0] {SPOOFED_SHOWN} opened: Primary ‹U+202E›down‹U+202C›, firefighter 👩\u200d🚒 paged")
    assert message["blocks"][0]["text"]["text"] == f"[P0] {SPOOFED_SHOWN} opened"
    for sent in (page, message):
        # Only the joiner of the emoji sequence is left, as it is written.
        assert {c for c in json.dumps(sent, ensure_ascii=False) if c in HIDDEN_CHARACTERS} == {"\u200d"}
        assert "🚒" in json.dumps(sent, ensure_ascii=False).split("\u200d", 1)[1][:1]


def test_bidi_controls_and_zero_width_characters_are_shown_in_a_teams_card():
    from functions.escalation.channels.teams import teams_message
    from shared.config import load_settings

    config = load_settings({"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db"})
    incident = {"id": "00000000-0000-4000-8000-000000000000", "alert_name": SPOOFED_NAME, "priority": "P0", "status": "open",
                "summary": "Primary \u202edown", "labels": {"alertname": SPOOFED_NAME, "service": "pay\u200bments"}}
    card = json.dumps(teams_message(config, incident, "opened", "by \u2067ops\u2069"), ensure_ascii=False).replace("\\\\", "\\")
    assert [c for c in card if c in HIDDEN_CHARACTERS] == []
    # Teams' Markdown escape backslashes the punctuation of what is shown.
    for shown in ("Disk‹U\\+202E›Full", "Primary ‹U\\+202E›down", "pay‹U\\+200B›ments", "by ‹U\\+2067›ops‹U\\+2069›"):
        assert shown in card, shown


@pytest.mark.parametrize("limit", range(150, 170))
def test_a_shown_character_is_never_cut_in_half(limit):
    from functions.escalation.channels import slack
    from functions.escalation.channels.text import ELLIPSIS

    text = slack.fit(["x" * 7, "\u202e" * 3000], limit)
    assert u16(text) <= limit and text.endswith(ELLIPSIS)
    assert text[7:-1] == "‹U+202E›" * ((len(text) - 8) // 8)
