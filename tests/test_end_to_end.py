"""The whole system as ``make run`` starts it: every function process, the
local Broker wired from knative/, a real Prometheus, and loopback
Kubernetes, PagerDuty and Slack."""

import pytest
import requests

from local.run import FUNCTIONS, Stack
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from loopback.kube import deployment, pod
from tests.factories import raw_alert, webhook
from loopback.processes import free_port, settled, wait_until

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
ROUTING_KEY = "E2EROUTINGKEY0123456789abcdefABC"


@pytest.fixture(scope="module")
def outside(kube, pd, slack_hook):
    """What cannot run here: the Kubernetes API, PagerDuty and Slack."""
    return kube, pd, slack_hook


def make_stack(database_url, outside, prometheus, tmp_path, duplicates=1):
    kube, pd, hook = outside
    env = {
        "KUBECONFIG": str(kube.kubeconfig_path),
        "PROMETHEUS_URL": prometheus.url,
        "REMEDIATION_MODE": "live",
        "REMEDIATION_ALLOWED_NAMESPACES": "production",
        "REMEDIATION_VERIFY_TIMEOUT_SECONDS": "5",
        # Remediation then asks Prometheus whether the alert still fires (this
        # one has no rules, so it does not): after one second, not two minutes.
        "REMEDIATION_VERIFY_WINDOW_SECONDS": "1",
        "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue",
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": hook.url + "/services/T/B/X",
        "LOCAL_PING_INTERVAL_SECONDS": "2",
        "LOCAL_BROKER_RETRY": "2",
        "LOCAL_BROKER_BACKOFF_SECONDS": "0.1",
        "NOTIFY_MAX_ATTEMPTS": "2",
    }
    ports = {name: free_port() for name in FUNCTIONS}
    return Stack(database_url, TEST_TOKEN, ports, free_port(), env=env, duplicates=duplicates, log_dir=tmp_path).start()


@pytest.fixture(scope="module")
def stack(database_url, outside, prometheus, tmp_path_factory):
    s = make_stack(database_url, outside, prometheus, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


@pytest.fixture
def world(outside, clean_db):
    kube, pd, hook = outside
    kube.deployments.clear(), kube.pods.clear(), kube.failures.clear(), kube.requests.clear()
    kube.add_deployment(deployment("email-service", 3, ready=1))
    kube.add_deployment(deployment("email-service", 1, namespace="staging"))
    kube.pods.extend(pod(f"email-service-{i}", {"app": "email-service"}, ready=i == 0,
                         waiting=None if i == 0 else "CrashLoopBackOff") for i in range(3))
    pd.reset(), hook.reset()
    return kube, pd, hook


def fire(stack, name, severity, status="firing", **labels):
    alert = raw_alert(name, severity=severity, status=status, **labels)
    response = requests.post(stack.url("intake") + "/webhook/alert", json=webhook([alert], status=status), headers=AUTH, timeout=10)
    response.raise_for_status()
    return response.json()["results"][0]["incident_id"]


def timeline(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_timeline(conn, incident_id)


def kinds(engine, incident_id):
    return [t["kind"] for t in timeline(engine, incident_id)]


def test_p0_alert_is_diagnosed_remediated_paged_and_resolved_in_causal_order(stack, world, clean_db):
    kube, pd, hook = world
    incident_id = fire(stack, "EmailServiceDown", "critical", service="email", namespace="production")
    wait_until(lambda: "remediation_result" in kinds(clean_db, incident_id), 30, message="the pipeline to finish")
    wait_until(lambda: len([b for b in pd.bodies() if b["event_action"] == "resolve"]) == 1, 15, message="the page resolved")

    entries = timeline(clean_db, incident_id)
    order = [t["kind"] for t in entries]
    assert order.index("opened") < order.index("diagnosed") < order.index("remediation_action") < order.index("remediation_result")
    assert order.index("opened") < order.index("notification")
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, incident_id)
    assert row["diagnostics"]["pods"]["email-service"]["status"] == "CrashLoopBackOff"
    assert row["diagnostics"]["metrics"]["availability"] == pytest.approx(0.999)
    assert row["diagnostics"]["dependencies"] == {"kafka": "up", "postgres": "down"}
    (action,) = row["remediation_actions"]
    assert (action["action"], action["target"], action["success"]) == ("rollout_restart", "email-service", True)
    assert row["status"] == "resolved" and row["resolved_by"] == "remediation"

    trigger, resolve = pd.bodies()
    assert trigger["event_action"] == "trigger" and trigger["payload"]["summary"] == "EmailServiceDown - EmailServiceDown summary"
    assert resolve["dedup_key"] == trigger["dedup_key"] == incident_id
    wait_until(lambda: len(hook.requests) == 3, 10, message="Slack: opened, remediated, resolved")
    titles = sorted(b["blocks"][0]["text"]["text"] for b in hook.bodies())
    assert titles == ["[P0] EmailServiceDown opened", "[P0] EmailServiceDown remediated automatically", "[P0] EmailServiceDown resolved"]


def test_blocked_remediation_escalates_and_the_resolved_alert_resolves_the_page(stack, world, clean_db):
    kube, pd, hook = world
    incident_id = fire(stack, "KafkaConsumerLagHigh", "warning", service="email", namespace="staging")
    wait_until(lambda: [b for b in pd.bodies() if b["event_action"] == "trigger"], 30, message="a page after remediation failed")
    (trigger,) = pd.bodies()
    assert trigger["payload"]["severity"] == "error" and "namespace_allow_list" in trigger["payload"]["custom_details"]["reason"]
    assert kube.calls("PATCH") == []

    fire(stack, "KafkaConsumerLagHigh", "warning", status="resolved", service="email", namespace="staging")
    wait_until(lambda: len(pd.bodies()) == 2, 15, message="the page resolved")
    assert pd.bodies()[1] == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": incident_id}
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, incident_id)["status"] == "resolved"


def test_a_broker_that_delivers_everything_three_times_changes_nothing_twice(database_url, outside, prometheus, world, clean_db, tmp_path):
    kube, pd, hook = world
    tripled = make_stack(database_url, outside, prometheus, tmp_path, duplicates=3)
    try:
        incident_id = fire(tripled, "EmailServiceDown", "critical", service="email", namespace="production")
        wait_until(lambda: len([b for b in pd.bodies() if b["event_action"] == "resolve"]) >= 1, 40, message="the whole flow")
        # Slack's messages about this incident: the module's other stack may
        # still be telling Slack about the previous test's incident.
        def messages() -> list:
            return [r for r in hook.requests if incident_id in r.body.decode(errors="replace")]

        wait_until(lambda: len(messages()) >= 3, 10, message="Slack messages")
        # Let any late duplicates land before counting: what the system did
        # (timeline, Kubernetes, PagerDuty, Slack) stops changing.
        settled(lambda: (kinds(clean_db, incident_id), len(kube.requests), len(pd.requests), len(messages())),
                message="the flow under triplicate delivery")
        order = kinds(clean_db, incident_id)
        assert order.count("diagnosed") == 1
        assert order.count("remediation_action") == 1 and len(kube.calls("PATCH")) == 1
        assert [b["event_action"] for b in pd.bodies() if b.get("dedup_key") == incident_id] == ["trigger", "resolve"]
        assert len(messages()) == 3
        notes = [t["details"] for t in timeline(clean_db, incident_id) if t["kind"] == "notification"]
        assert sorted((n["channel"], n["transition"]) for n in notes) == [
            ("pagerduty", "opened"), ("pagerduty", "resolved"), ("slack", "opened"), ("slack", "remediated"), ("slack", "resolved")]
    finally:
        tripled.stop()


def test_undeliverable_events_are_dead_lettered_and_recorded(stack, world, clean_db):
    kube, pd, hook = world
    pd.script.extend([(500, {}, b"pagerduty is down")] * 100)
    incident_id = fire(stack, "HighErrorRate", "critical", service="email", namespace="production")
    wait_until(lambda: "dead_letter" in kinds(clean_db, incident_id), 60, message="the page to be dead-lettered")
    dead = next(t for t in timeline(clean_db, incident_id) if t["kind"] == "dead_letter")["details"]
    assert dead["code"] == "502" and "pagerduty" in dead["error"]
    assert dead["destination"] == stack.url("escalation")
    pd.script.clear()
