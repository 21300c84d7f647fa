"""Which answers each channel counts as delivered: the answer the real
service gives, never just any 2xx (a captive portal, a proxy's error page or
a wrong endpoint answers 200 too). Pure judgements, then a round trip to the
loopback receivers, whose own answers are checked against the real ones."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests

from functions.escalation.channels import pagerduty, slack
from functions.escalation.channels.slack import Slack
from functions.escalation.channels.teams import Teams
from functions.escalation.channels.webhook import Webhook
from functions.escalation.answer import Answer
from functions.escalation.delivery import send
from loopback import notify
from shared.config import load_settings
from shared.deadline import bounded

PORTAL = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>Guest Wi-Fi</body></html>"


def pagerduty_responses() -> dict:
    return json.loads(notify.PD_SCHEMA_FILE.read_text())["components"]["responses"]


def example(name: str) -> str:
    examples = pagerduty_responses()[name]["content"]["application/json"]["examples"]
    return json.dumps(next(iter(examples.values()))["value"])


@pytest.mark.parametrize("body, answer", [
    # PagerDuty's own example of its success answer, from its OpenAPI document.
    (example("Success"), Answer.ACCEPTED),
    ('{"status":"success"}', Answer.ACCEPTED),
    # Its error shape, or anything else, under a 2xx: not PagerDuty accepting.
    (example("Error"), Answer.UNRECOGNISED),
    ('{"status":"Success"}', Answer.UNRECOGNISED),
    ("[]", Answer.UNRECOGNISED),
    (PORTAL, Answer.UNRECOGNISED),
    ("", Answer.UNRECOGNISED),
    ("ok", Answer.UNRECOGNISED),
])
def test_pagerduty_accepts_only_its_success_answer(body, answer):
    assert pagerduty.judge(202, body) is answer


@pytest.mark.parametrize("body, answer", [
    ("ok", Answer.ACCEPTED),             # an incoming webhook
    ("ok\n", Answer.ACCEPTED),
    ('{"ok":true}', Answer.ACCEPTED),    # a workflow's webhook trigger, the Web API
    ('{"ok": true, "channel": "C123ABC456", "ts": "1503435956.000247"}', Answer.ACCEPTED),
    # Slack's own no, in a 200: a refusal, never retried...
    ('{"ok":false,"error":"channel_not_found"}', Answer.REFUSED),
    ('{"ok":false,"error":"invalid_blocks"}', Answer.REFUSED),
    ('{"ok":false}', Answer.REFUSED),
    # ...unless Slack says it is its own passing trouble.
    ('{"ok":false,"error":"internal_error"}', Answer.UNRECOGNISED),
    ('{"ok":false,"error":"ratelimited"}', Answer.UNRECOGNISED),
    # Not Slack speaking.
    (PORTAL, Answer.UNRECOGNISED),
    ("", Answer.UNRECOGNISED),
    ("OK", Answer.UNRECOGNISED),
    ('{"ok":"true"}', Answer.UNRECOGNISED),
    ('{"status":"success"}', Answer.UNRECOGNISED),
    ('"ok"', Answer.UNRECOGNISED),
])
def test_slack_accepts_ok_or_ok_true_and_refuses_ok_false(body, answer):
    assert slack.judge(200, body) is answer


# JSON nested deeper than the parser goes: json.loads raises RecursionError,
# not ValueError, and it fits in the 64 KiB of an answer that are read.
TOO_DEEP = "[" * 60000


@pytest.mark.parametrize("judge", [pagerduty.judge, slack.judge], ids=["pagerduty", "slack"])
@pytest.mark.parametrize("body", [TOO_DEEP, '{"ok": ' + "[" * 60000, '{"status": ' + "{\"a\": " * 30000])
def test_an_answer_nested_too_deep_to_parse_is_unrecognised_not_an_error(judge, body):
    assert judge(200, body) is Answer.UNRECOGNISED


@pytest.mark.parametrize("body", [
    '{"ok":false,"error":["internal_error"]}',  # unhashable: no `in` a frozenset
    '{"ok":false,"error":{"code":"internal_error"}}',
    '{"ok":false,"error":5}',
    '{"ok":false,"error":null}',
])
def test_slack_saying_no_with_an_error_that_is_not_a_string_is_a_refusal(body):
    assert slack.judge(200, body) is Answer.REFUSED


def slack_at(url: str) -> Slack:
    return Slack(load_settings({"DATABASE_URL": "postgresql://u@h/d", "SLACK_WEBHOOK_URL": url}))


@pytest.mark.parametrize("url", [
    "https://hooks.slack.com/services/T0/B0/X",
    "https://hooks.slack.com/triggers/T0/1/abc",
    "https://HOOKS.SLACK.COM/services/T0/B0/X",
    "https://hooks.slack-gov.com/services/T0/B0/X",  # GovSlack
])
def test_slacks_own_webhooks_are_judged_by_their_answer(url):
    channel = slack_at(url)
    assert channel.accept(200, "ok") is Answer.ACCEPTED
    assert channel.accept(200, PORTAL) is Answer.UNRECOGNISED
    assert channel.accept(200, '{"ok":false,"error":"channel_not_found"}') is Answer.REFUSED


@pytest.mark.parametrize("url", [
    "https://mattermost.example.com/hooks/xxxgenerated",
    "https://chat.example.com/hooks/abc/def",  # Rocket.Chat
    "https://hooks.slack.com.evil.example/services/T0/B0/X",
    "https://slack-proxy.internal/services/T0/B0/X",
])
@pytest.mark.parametrize("body", [
    "ok",                # Mattermost (as text/plain)
    '{"success":true}',  # Rocket.Chat
    "",
])
def test_a_slack_compatible_receiver_elsewhere_is_judged_by_the_status_alone(url, body):
    # Its own words for "accepted" are not Slack's: judged by Slack's, every
    # message would be posted again and again, then dead-lettered.
    assert slack_at(url).accept(200, body) is Answer.ACCEPTED


@pytest.mark.parametrize("channel", [Teams, Webhook])
@pytest.mark.parametrize("status, body", [(202, ""), (200, "1"), (204, ""), (200, PORTAL)])
def test_teams_and_the_webhook_are_judged_by_the_status_alone(channel, status, body):
    # A workflow answers 202 with no body, a connector 200 with "1", our
    # webhook's receivers any 2xx: no body to check, so none is second-guessed.
    assert channel.accept(object.__new__(channel), status, body) is Answer.ACCEPTED


# --------------------------------------------------------------------------- the loopback receivers answer as the services do

EVENT = {"routing_key": "R" * 32, "event_action": "trigger", "dedup_key": "incident-1",
         "payload": {"summary": "EmailServiceDown - Service completely down", "source": "email", "severity": "critical"}}


@pytest.fixture
def receivers():
    pd, hook = notify.pagerduty(), notify.slack()
    pd.server.start(), hook.server.start()
    yield pd, hook
    pd.server.stop(), hook.server.stop()


def post(url, body, channel, accept, attempts=1):
    with bounded(requests.Session()) as http:
        return send(http, url, body, channel, 2.0, attempts, 1.0, 0.01, accept=accept)


def test_the_loopback_pagerduty_answers_what_pagerduty_answers(receivers):
    pd, _ = receivers
    result = post(pd.url + "/v2/enqueue", EVENT, "pagerduty", pagerduty.judge)
    assert result.ok and result.status == 202 and pd.invalid == []
    answer = json.loads(result.body)
    schema = pagerduty_responses()["Success"]["content"]["application/json"]["schema"]
    jsonschema.validate(answer, schema)
    assert answer == {"status": "success", "message": "Event processed", "dedup_key": "incident-1"}


def test_the_loopback_slack_answers_what_an_incoming_webhook_answers(receivers):
    _, hook = receivers
    result = post(hook.url + "/services/T0/B0/X", {"text": "hello"}, "slack", slack.judge)
    assert result.ok and (result.status, result.body) == (200, "ok") and hook.invalid == []


@pytest.mark.parametrize("which", ["pagerduty", "slack"])
def test_a_portal_answering_200_is_never_delivered(receivers, which):
    pd, hook = receivers
    receiver, judge, body = (pd, pagerduty.judge, EVENT) if which == "pagerduty" else (hook, slack.judge, {"text": "hello"})
    receiver.script.extend([(200, {"Content-Type": "text/html"}, PORTAL.encode())] * 3)
    result = post(receiver.url + "/x", body, which, judge, attempts=3)
    assert (result.ok, result.status, result.attempts) == (False, 200, 3)
    assert result.error == f"HTTP 200, not accepted: {PORTAL}"
    assert len(receiver.requests) == 3


def pagerduty_at(url: str) -> pagerduty.PagerDuty:
    return pagerduty.PagerDuty(load_settings({"DATABASE_URL": "postgresql://u@h/d", "PAGERDUTY_ROUTING_KEY": "k" * 32,
                                              "PAGERDUTY_EVENTS_URL": url}))


@pytest.mark.parametrize("url", [
    "https://events.pagerduty.com/v2/enqueue",
    "https://events.eu.pagerduty.com/v2/enqueue",
    "https://EVENTS.PagerDuty.com/v2/enqueue",
])
def test_pagerdutys_own_events_api_is_judged_by_its_answer(url):
    channel = pagerduty_at(url)
    assert channel.accept(202, '{"status":"success","message":"Event processed","dedup_key":"x"}') is Answer.ACCEPTED
    assert channel.accept(200, PORTAL) is Answer.UNRECOGNISED


@pytest.mark.parametrize("url", [
    "https://pd-relay.internal/v2/enqueue",
    "https://events.pagerduty.com.evil.example/v2/enqueue",
    "http://127.0.0.1:8080/v2/enqueue",
])
@pytest.mark.parametrize("body", ["", "accepted", '{"ok":true}'])
def test_a_pagerduty_compatible_receiver_elsewhere_is_judged_by_the_status_alone(url, body):
    # Its words for "accepted" are its own: judged by PagerDuty's, every page
    # would be sent again and again, then dead-lettered.
    assert pagerduty_at(url).accept(202, body) is Answer.ACCEPTED
