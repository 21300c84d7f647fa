"""The notification channels through one door: every channel gets its own
message for each transition, once, over real HTTP from the real escalation
process to loopback PagerDuty, Slack, Teams and signed-webhook receivers
that check what they get."""

import json
import logging
from dataclasses import dataclass, field, replace
from io import StringIO
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from functions.escalation.channels import REGISTRY, Channel, webhook as webhook_channel
from shared import events
from shared import incidents as svc
from shared import log as logs
from shared.config import ConfigError, Secret, Settings, load_settings, secret
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook
from loopback.notify import TEAMS_MAX_BYTES, signed_webhook, teams
from loopback.processes import FunctionProcess, free_port, wait_until
from tests.test_escalation import (
    HOSTILE, ROUTING_KEY, SLACK_PATH, deliver, notifications, open_incident, record_remediation, resolve,
)

ROOT = Path(__file__).resolve().parent.parent
# Shaped like a Workflows trigger URL: the sig= query parameter is the secret.
TEAMS_SIG = "kq3Vd8ZtW1pLr7YxN2cB5mF9hJ4sA6eG0uTiOwQvXyz"
TEAMS_PATH = f"/workflows/7f1c2b9e0d3a4c5b/triggers/manual/paths/invoke?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={TEAMS_SIG}"
WEBHOOK_SECRET = "whsec_9Qm2Lx7Rt4Vb8Nc1Zp6Hs3Kd5Fg0Jw"
MARKDOWN_HOSTILE = "[click](https://evil.example) **bold** # head _it_ `code` <at>all</at> ~~x~~ > quote | a & b \\"


@pytest.fixture(scope="module")
def teams_hook():
    receiver = teams()
    receiver.server.start()
    yield receiver
    receiver.server.stop()


@pytest.fixture(scope="module")
def outgoing():
    receiver = signed_webhook(WEBHOOK_SECRET)
    receiver.server.start()
    yield receiver
    receiver.server.stop()


@pytest.fixture
def hooks(pd, slack_hook, teams_hook, outgoing):
    every = (pd, slack_hook, teams_hook, outgoing)
    for receiver in every:
        receiver.reset()
    yield every
    assert [r.invalid for r in every] == [[], [], [], []], [r.invalid for r in every]


def channel_env(base_env, pd, slack_hook, teams_hook, outgoing, **extra):
    return {
        **base_env,
        "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue",
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH,
        "TEAMS_WEBHOOK_URL": teams_hook.url + TEAMS_PATH,
        "OUTGOING_WEBHOOK_URL": outgoing.url + "/hooks/incidents",
        "OUTGOING_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "NOTIFY_TIMEOUT_SECONDS": "1",
        "NOTIFY_MAX_ATTEMPTS": "3",
        "PUBLIC_URL": "http://incident-api.production:8080",
        **extra,
    }


@pytest.fixture(scope="module")
def escalation(base_env, pd, slack_hook, teams_hook, outgoing):
    proc = FunctionProcess("escalation", channel_env(base_env, pd, slack_hook, teams_hook, outgoing)).start()
    yield proc
    proc.stop()


def acknowledge(engine, row, actor="alice"):
    with engine.begin() as conn:
        updated, event_ids = svc.transition(conn, row["id"], "investigating", actor, "/test")
    assert event_ids == [f"{row['id']}.acknowledged.0"]
    return updated


def teams_header(message):
    return message["attachments"][0]["content"]["body"][0]["text"]


def test_every_channel_is_in_the_registry_and_keeps_the_protocol():
    config = load_settings({"DATABASE_URL": "postgresql://u@h/d"})
    assert [c.name for c in REGISTRY] == ["pagerduty", "slack", "teams", "webhook"]
    for channel in REGISTRY:
        assert isinstance(channel(config), Channel)
        assert not channel(config).configured()


def test_each_channel_gets_its_message_for_each_transition_once(escalation, hooks, clean_db):
    pd, slack, teams_hook, outgoing = hooks
    row = open_incident(clean_db)
    steps = [(events.INCIDENT_OPENED, lambda: row)]
    steps.append((events.INCIDENT_ACKNOWLEDGED, lambda: acknowledge(clean_db, row)))
    steps.append((events.INCIDENT_REMEDIATION_FAILED,
                  lambda: (record_remediation(clean_db, row, "failed", "blocked by cooldown"), row)[1]))
    steps.append((events.INCIDENT_RESOLVED, lambda: resolve(clean_db, row)))
    for event_type, step in steps:
        current = step()
        for _ in range(2):  # a redelivery sends nothing twice
            assert deliver(escalation, event_type, current).status_code == 202
    assert [b["event_action"] for b in pd.bodies()] == ["trigger", "acknowledge", "trigger", "resolve"]
    assert [b["blocks"][0]["text"]["text"] for b in slack.bodies()] == [
        "[P0] EmailServiceDown opened", "[P0] EmailServiceDown acknowledged",
        "[P0] EmailServiceDown needs a human: remediation did not fix it", "[P0] EmailServiceDown resolved"]
    assert [teams_header(b) for b in teams_hook.bodies()] == [
        r"\[P0\] EmailServiceDown opened", r"\[P0\] EmailServiceDown acknowledged",
        r"\[P0\] EmailServiceDown needs a human\: remediation did not fix it", r"\[P0\] EmailServiceDown resolved"]
    sent = outgoing.bodies()
    assert [b["transition"] for b in sent] == ["opened", "acknowledged", "remediation_failed", "resolved"]
    assert [b["id"] for b in sent] == [f"{row['id']}.{t}.0" for t in ("opened", "acknowledged", "remediation_failed", "resolved")]
    assert sent[1]["reason"] == "alice" and sent[2]["reason"] == "blocked by cooldown"
    assert sent[0]["incident"]["links"] == {"incident": f"http://incident-api.production:8080/ui/incidents/{row['id']}",
                                            "runbook": "https://runbooks.example/email"}
    assert sent[3]["incident"]["status"] == "resolved" and sent[0]["incident"]["service"] == "email"
    card = teams_hook.bodies()[1]["attachments"][0]["content"]
    assert card["version"] == "1.4" and card["actions"][0]["url"].endswith(f"/ui/incidents/{row['id']}")
    assert {"type": "TextBlock", "text": "alice", "wrap": True} in card["body"]
    with clean_db.connect() as conn:
        done = conn.execute(sa.text("SELECT key FROM work_claims WHERE key LIKE 'escalated:%' AND completed_at IS NOT NULL")).scalars().all()
    assert sorted(done) == sorted(f"escalated:{row['id']}:0:{t}" for t in ("opened", "acknowledged", "remediation_failed", "resolved"))


def test_a_p1_is_announced_not_paged_and_an_acknowledgement_without_a_page_acknowledges_nothing(escalation, hooks, clean_db):
    pd, slack, teams_hook, outgoing = hooks
    row = open_incident(clean_db, "KafkaConsumerLagHigh", priority="P1")
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, acknowledge(clean_db, row, "bob")).status_code == 202
    record_remediation(clean_db, row, "remediated", "every action succeeded and was verified")
    assert deliver(escalation, events.INCIDENT_REMEDIATED, row).status_code == 202
    assert pd.requests == []
    assert len(slack.requests) == len(teams_hook.requests) == len(outgoing.requests) == 3
    assert [b["transition"] for b in outgoing.bodies()] == ["opened", "acknowledged", "remediated"]


def test_a_forged_acknowledgement_tells_nobody(escalation, hooks, clean_db):
    row = open_incident(clean_db)
    with clean_db.begin() as conn:  # diagnostics taking the incident is no acknowledgement
        svc.mark_investigating(conn, row["id"], "diagnostics")
    assert deliver(escalation, events.INCIDENT_ACKNOWLEDGED, row).status_code == 202
    assert all(r.requests == [] for r in hooks)


@pytest.mark.parametrize("which", ["teams", "webhook"])
def test_429_and_5xx_are_retried(escalation, hooks, clean_db, which):
    receiver = hooks[2] if which == "teams" else hooks[3]
    receiver.script.extend([(429, {"Retry-After": "0"}, b""), (503, {}, b"busy")])
    row = open_incident(clean_db)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert len(receiver.requests) == 3
    (note,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == which]
    assert (note["outcome"], note["attempts"]) == ("sent", 3)


@pytest.mark.parametrize("which, refusal", [
    ("teams", (400, {"Content-Type": "application/json"}, b'{"error":{"code":"InvalidRequestContent"}}')),
    ("webhook", (401, {"Content-Type": "application/json"}, b'{"error":"bad signature"}')),
])
def test_a_refusal_is_not_retried_answers_502_and_a_redelivery_sends_only_what_is_missing(escalation, hooks, clean_db, which, refusal):
    pd, slack, teams_hook, outgoing = hooks
    receiver = teams_hook if which == "teams" else outgoing
    receiver.script.append(refusal)
    row = open_incident(clean_db)
    response = deliver(escalation, events.INCIDENT_OPENED, row)
    assert response.status_code == 502 and which in response.text
    assert len(receiver.requests) == 1
    (failed,) = [n for n in notifications(clean_db, row["id"]) if n["channel"] == which]
    assert (failed["outcome"], failed["status"], failed["attempts"]) == ("failed", refusal[0], 1)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert len(receiver.requests) == 2
    assert len(pd.requests) == len(slack.requests) == 1
    assert len(teams_hook.requests) + len(outgoing.requests) == 3


def test_hostile_text_is_escaped_for_teams_and_everything_is_bounded(escalation, hooks, clean_db):
    pd, slack, teams_hook, outgoing = hooks
    labels = {f"label_{i}": MARKDOWN_HOSTILE * 40 for i in range(60)}
    a = alert(f"Disk{MARKDOWN_HOSTILE}", priority="P0", namespace="production", service=MARKDOWN_HOSTILE * 50, **labels)
    a = replace(a, summary=MARKDOWN_HOSTILE, description="🔥" * 300_000,
                annotations={"summary": MARKDOWN_HOSTILE, "runbook_url": "javascript:alert(1)"})
    with clean_db.begin() as conn:
        row = svc.get_incident(conn, svc.record_alerts(conn, [a], "/test", "test").outcomes[0].incident_id)
    record_remediation(clean_db, row, "failed", HOSTILE + MARKDOWN_HOSTILE * 100)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, row).status_code == 202
    assert len(teams_hook.requests) == 2  # and the receiver found no unescaped Markdown (the fixture checks)
    for request in teams_hook.requests:
        assert len(request.body) <= TEAMS_MAX_BYTES
        card = request.json()["attachments"][0]["content"]
        assert [a["title"] for a in card["actions"]] == ["Open incident"]  # no javascript: runbook
        assert card["body"][1]["text"].startswith(r"\[click\]\(https\:\/\/evil\.example\) \*\*bold\*\*")
    for request in outgoing.requests:
        body = request.json()
        assert len(request.body) <= 64 * 1024 and len(body["incident"]["labels"]) <= 32
        assert len(body["incident"]["summary"]) <= 1024 and body["incident"]["links"].keys() == {"incident"}
    assert outgoing.bodies()[1]["reason"].startswith(HOSTILE)


@pytest.mark.parametrize("kind", ["refused", "answered"])
def test_channel_secrets_never_reach_the_timeline_the_reply_or_the_logs(base_env, pd, slack_hook, teams_hook, outgoing, hooks, clean_db, kind):
    env = channel_env(base_env, pd, slack_hook, teams_hook, outgoing)
    if kind == "refused":
        env["TEAMS_WEBHOOK_URL"] = f"http://127.0.0.1:{free_port()}{TEAMS_PATH}"
    else:
        # A receiver that quotes the request back in its error (proxies do).
        teams_hook.script.append((400, {}, f"bad request to {TEAMS_PATH} signed {WEBHOOK_SECRET}".encode()))
    outgoing.script.append((500, {}, f"secret was {WEBHOOK_SECRET}".encode()))
    proc = FunctionProcess("escalation", {**env, "NOTIFY_MAX_ATTEMPTS": "1"}).start()
    try:
        row = open_incident(clean_db)
        response = deliver(proc, events.INCIDENT_OPENED, row)
        assert response.status_code == 502
        wait_until(lambda: "Notification failed" in proc.logs() or "Notification refused" in proc.logs(), 10, message="the failure logged")
        stored = json.dumps(notifications(clean_db, row["id"]))
        for where, text in {"timeline": stored, "reply": response.text, "logs": proc.logs()}.items():
            for secret_text in (TEAMS_SIG, TEAMS_PATH, WEBHOOK_SECRET):
                assert secret_text not in text, (where, secret_text)
    finally:
        proc.stop()


def test_the_reference_verification_refuses_tampering_and_stale_timestamps():
    body = b'{"id":"x"}'
    header = webhook_channel.sign("k", 1_700_000_000, body)
    assert webhook_channel.verify("k", header, body, now=1_700_000_100)
    assert not webhook_channel.verify("k", header, body + b" ", now=1_700_000_100)
    assert not webhook_channel.verify("other", header, body, now=1_700_000_100)
    assert not webhook_channel.verify("k", header, body, now=1_700_000_000 + 301)
    assert not webhook_channel.verify("k", "v1=" + header.split("v1=")[1], body, now=1_700_000_000)


@pytest.mark.parametrize("forged", ["t=1700000000,v1=\u00e9", "t=1700000000,v1=\ud800", "t=" + "9" * 5000 + ",v1=00", "t=1e3,v1=00"])
def test_the_reference_verification_refuses_a_forged_header_without_raising(forged):
    # compare_digest raised TypeError on a non-ASCII signature: a receiver
    # built on it answered 500 to a forger instead of refusing.
    assert not webhook_channel.verify("k", forged, b"{}", now=1_700_000_000)


# --------------------------------------------------------------------------- settings


def test_a_newly_declared_secret_field_is_read_and_masked_in_logs_with_no_other_change(tmp_path):
    from shared.bootstrap import register_secrets

    @dataclass(frozen=True)
    class WithPager(Settings):
        pager_token: Secret | None = field(default=None, metadata=secret("PAGER_TOKEN"))

    token_file = tmp_path / "token"
    token_file.write_text("pg-7Hq2Xv9LmN4Rt8Kw3Jd6\n")
    config = load_settings({"DATABASE_URL": "postgresql://u@h/d", "PAGER_TOKEN_FILE": str(token_file)}, WithPager)
    assert config.pager_token.reveal() == "pg-7Hq2Xv9LmN4Rt8Kw3Jd6"
    register_secrets(config)
    out = StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test-new-secret")
    logger.addHandler(handler)
    try:
        logger.warning("calling with pg-7Hq2Xv9LmN4Rt8Kw3Jd6", extra={"token": "pg-7Hq2Xv9LmN4Rt8Kw3Jd6"})
    finally:
        logger.removeHandler(handler)
    assert "pg-7Hq2Xv9LmN4Rt8Kw3Jd6" not in out.getvalue() and "****" in out.getvalue()


@pytest.mark.parametrize("env, message", [
    ({"PAGE_ON_OPEN_PRIORITIES": "P0,P2"}, "PAGE_ON_OPEN_PRIORITIES: P2 incidents never open, because MIN_INCIDENT_PRIORITY is P1"),
    ({"OUTGOING_WEBHOOK_URL": "https://hooks.example/x"}, "OUTGOING_WEBHOOK_URL and OUTGOING_WEBHOOK_SECRET: set both"),
    ({"TEAMS_WEBHOOK_URL": "not a url sig=s3cr3t"}, "TEAMS_WEBHOOK_URL: expected an http(s) URL"),
])
def test_channel_settings_that_cannot_work_fail_at_start_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as error:
        load_settings({"DATABASE_URL": "postgresql://u@h/d", **env})
    assert str(error.value).startswith(message) and "s3cr3t" not in str(error.value)


# --------------------------------------------------------------------------- paging decided in one place


def test_a_p2_incident_is_paged_through_the_local_broker_when_the_settings_say_so(base_env, pd, slack_hook, clean_db):
    """The shipped Triggers deliver every incident.opened to escalation; only
    PAGE_ON_OPEN_PRIORITIES decides that a P2 pages."""
    from local.broker import LocalBroker, load_brokers
    from deploy.services import SERVICES
    from loopback.servers import RecordingServer

    pd.reset(), slack_hook.reset()
    settings = {"MIN_INCIDENT_PRIORITY": "P2", "PAGE_ON_OPEN_PRIORITIES": "P0,P2", "ANNOUNCE_ON_OPEN_PRIORITIES": "P0"}
    escalation = FunctionProcess("escalation", {
        **base_env, **settings, "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH}).start()
    others = RecordingServer().start()  # diagnostics and the rest: accepted, not under test
    services = {name: others.url for name in SERVICES} | {"escalation": escalation.url}
    broker = LocalBroker(load_brokers(ROOT / "knative" / "base", services), port=0).start()
    intake = FunctionProcess("intake", {**base_env, **settings, "K_SINK": broker.ingress_url("default", "incidents")}).start()
    try:
        firing = raw_alert("QueueBacklogGrowing", severity="info")
        firing["annotations"] = {"summary": "backlog growing"}
        answer = requests.post(intake.url + "/webhook/alert", json=webhook([firing]),
                               headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10)
        answer.raise_for_status()
        incident_id = answer.json()["results"][0]["incident_id"]
        wait_until(lambda: len(pd.requests) == 1, 15, message="the P2 page")
        (page,) = pd.bodies()
        assert page["dedup_key"] == incident_id and page["payload"]["severity"] == "warning"
        assert page["payload"]["custom_details"]["priority"] == "P2"
        # ANNOUNCE_ON_OPEN_PRIORITIES=P0: the chat channel is told nothing of a P2 opening.
        wait_until(lambda: any(t[0] == "escalate-opened-incidents" and t[2] == 202 for t in broker.delivered), 10,
                   message="escalation to answer")
        assert slack_hook.requests == []
    finally:
        intake.stop(), broker.stop(), escalation.stop(), others.stop()
        pd.reset(), slack_hook.reset()


def test_a_new_root_updates_what_each_channel_sent_once_and_never_pages_again(escalation, hooks, clean_db):
    """A labels rule's stronger alert takes over as root: PagerDuty's alert
    is updated under the same dedup_key, the chat rooms get one follow-up
    each, the webhook one incident.root_changed; a redelivery sends nothing."""
    from shared.correlation.plan import Correlator
    from shared.correlation.rules import parse
    from tests.storms import kp

    pd, slack, teams_hook, outgoing = hooks
    corr = Correlator(parse("rules:\n  - {name: svc, kind: labels, labels: [namespace, service], "
                            "alerts: [TargetDown, KubeHpaMaxedOut], root: [TargetDown], window: 10m}\n", "test"))
    hpa = kp("KubeHpaMaxedOut", "r", namespace="prod", horizontalpodautoscaler="web", service="web")
    hpa.labels["severity"] = "critical"
    target = kp("TargetDown", "r", namespace="prod", job="web-metrics", service="web")
    with clean_db.begin() as conn:
        (first,) = svc.record_alerts(conn, [hpa.alert()], "/test", "alertmanager", plan=corr.plan([hpa.alert()])).outcomes
        row = svc.get_incident(conn, first.incident_id)
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [target.alert()], "/test", "alertmanager", plan=corr.plan([target.alert()]))
        changed = svc.get_incident(conn, first.incident_id)
    for _ in range(2):  # the root change's event, then a redelivery of it
        assert deliver(escalation, events.INCIDENT_OPENED, changed).status_code == 202
    assert [(b["event_action"], b["dedup_key"], b["payload"]["custom_details"]["transition"]) for b in pd.bodies()] == [
        ("trigger", row["id"], "opened"), ("trigger", row["id"], "root_changed")]
    assert pd.bodies()[1]["payload"]["summary"].startswith("TargetDown - ")
    assert [b["blocks"][0]["text"]["text"] for b in slack.bodies()] == [
        "[P0] KubeHpaMaxedOut opened", "[P0] TargetDown is now the root of the incident"]
    assert "TargetDown web took over as root from KubeHpaMaxedOut" in str(slack.bodies()[1]["blocks"])
    assert [teams_header(b) for b in teams_hook.bodies()] == [
        r"\[P0\] KubeHpaMaxedOut opened", r"\[P0\] TargetDown is now the root of the incident"]
    assert [(b["type"], b["id"]) for b in outgoing.bodies()] == [
        ("incident.opened", f"{row['id']}.opened.0"), ("incident.root_changed", f"{row['id']}.root_changed.0.root1")]


# --------------------------------------------------------------------------- remediation actions: this round's, newest first


SCALED = {"action": "scale_deployment", "target": "email-service", "namespace": "production", "from": 1, "to": 3,
          "success": True, "dry_run": False, "error": None, "timestamp": "2026-11-29T10:00:00Z"}
FORBIDDEN = {**SCALED, "action": "restart_pods", "from": None, "to": None, "success": False,
             "error": "CURRENT GENERATION FAILURE: forbidden", "timestamp": "2026-11-29T11:00:00Z"}


def flappy_reopened(engine):
    """Generation 0 scaled 36 times (records the release before this one
    wrote, without a generation); remediation resolved it; the alert fired
    again and reopened it as generation 1, whose one action failed."""
    a = alert("Flappy", priority="P0", service="email", namespace="production")
    with engine.begin() as conn:
        row_id = svc.record_alerts(conn, [a], "/test", "test").outcomes[0].incident_id
        conn.execute(sa.text("UPDATE incidents SET remediation_actions = CAST(:a AS json) WHERE id = :id"),
                     {"a": json.dumps([SCALED] * 36), "id": row_id})
        svc.transition(conn, row_id, "resolved", "remediation", "/test", resolved_by="remediation")
        again = svc.record_alerts(conn, [a], "/test", "test", reopen_window_seconds=1800)
        assert again.outcomes[0].action == "reopened"
        svc.append_remediation_action(conn, row_id, FORBIDDEN)
        row = svc.get_incident(conn, row_id)
    assert row["generation"] == 1 and len(row["remediation_actions"]) == 37
    return row


def test_a_reopened_incident_shows_its_own_failure_not_the_last_generations_successes(escalation, hooks, clean_db):
    pd, slack, teams_hook, outgoing = hooks
    row = flappy_reopened(clean_db)
    record_remediation(clean_db, row, "failed", "restart_pods failed")
    deliver(escalation, events.INCIDENT_REMEDIATION_FAILED, row, {"remediation": {"outcome": "failed", "reason": "restart_pods failed"}})
    (page,) = pd.bodies()
    details = page["payload"]["custom_details"]
    assert [a["action"] for a in details["remediation_actions"]] == ["restart_pods"]
    assert details["earlier_remediation_actions"] == "36 of previous generations, on the incident page"
    (message,) = slack.bodies()
    (section,) = [b["text"]["text"] for b in message["blocks"] if b.get("text", {}).get("text", "").startswith("*Remediation*")]
    assert section == ("*Remediation*\n:x: `restart_pods` email-service — CURRENT GENERATION FAILURE: forbidden\n"
                       "and 36 earlier actions of previous generations, on the incident page")
    (card,) = teams_hook.bodies()
    body = card["attachments"][0]["content"]["body"]
    shown = body[[b.get("text") for b in body].index("Remediation") + 1]["text"]
    assert shown == ("failed\\: restart\\_pods email\\-service — CURRENT GENERATION FAILURE\\: forbidden\n\n"
                     "and 36 earlier actions of previous generations, on the incident page")
    with clean_db.connect() as conn:
        assert len(svc.get_incident(conn, row["id"])["remediation_actions"]) == 37  # the history is kept


def test_when_the_actions_do_not_fit_the_oldest_go_and_the_newest_stays():
    from functions.escalation.channels import pagerduty, slack as slack_channel, teams as teams_channel

    config = load_settings({"DATABASE_URL": "postgresql://u@h/d", "PUBLIC_URL": "http://x:8080"})
    current = [{**FORBIDDEN, "error": f"attempt {n}: " + "x" * 3000, "generation": 1, "root_generation": 0} for n in range(300)]
    incident = {"id": "00000000-0000-4000-8000-000000000000", "alert_name": "Flappy", "priority": "P0", "status": "open",
                "summary": "s", "labels": {"service": "email"}, "generation": 1, "root_generation": 0,
                "remediation_actions": [SCALED] * 36 + current}
    message = json.dumps(slack_channel.slack_message(config, incident, "remediation_failed", "why"))
    assert "attempt 299:" in message and "attempt 0:" not in message and "scale_deployment" not in message
    assert "older actions, and 36 earlier actions of previous generations, on the incident page" in message
    card = json.dumps(teams_channel.teams_message(config, incident, "remediation_failed", "why"))
    assert "attempt 299\\\\:" in card and "attempt 0\\\\:" not in card
    assert "36 earlier actions of previous generations, on the incident page" in card
    # PagerDuty shrinks the list to its first items when the event is too large: the newest.
    event = pagerduty.trigger_event(config, incident, ROUTING_KEY, "remediation_failed", "why")
    kept = event["payload"]["custom_details"]["remediation_actions"]
    assert kept[0]["error"].startswith("attempt 299:") and not any(str(a).startswith("attempt 0:") for a in kept)
    assert kept[-1].endswith(" more") and len(json.dumps(event)) <= pagerduty.PAGERDUTY_EVENT_MAX_BYTES


def test_a_new_roots_message_lists_only_that_roots_actions():
    from functions.escalation.channels import slack as slack_channel

    config = load_settings({"DATABASE_URL": "postgresql://u@h/d", "PUBLIC_URL": "http://x:8080"})
    incident = {"id": "00000000-0000-4000-8000-000000000000", "alert_name": "Flappy", "priority": "P0", "status": "open",
                "summary": "s", "labels": {"service": "email"}, "generation": 2, "root_generation": 1,
                "remediation_actions": [{**SCALED, "generation": 2, "root_generation": 0},
                                        {**FORBIDDEN, "generation": 2, "root_generation": 1}]}
    text = json.dumps(slack_channel.slack_message(config, incident, "remediation_failed", "why"))
    assert "restart_pods" in text and "scale_deployment" not in text
    assert "and 1 earlier action of previous generations or roots, on the incident page" in text
    incident["root_generation"] = 2
    assert "none in this generation\\nand 2 earlier actions of previous generations or roots" in json.dumps(
        slack_channel.slack_message(config, incident, "remediation_failed", "why"))
