"""Claims under certain overlap: the first delivery is held inside the
receiver (PagerDuty, the Kubernetes API) until the others have arrived and
been answered, so a claim taken twice, or a held claim taken for done, fails
every run rather than some (the timing-dependent versions these replace
caught a claim taken twice only some of the time)."""

from __future__ import annotations

import threading

import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from shared import events
from shared import incidents as svc
from tests.factories import alert, mark_diagnosed
from loopback.kube import deployment, pod
from tests.holding import HoldingKubernetes, HoldingReceiver
from loopback.processes import FunctionProcess, free_port

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"
OTHERS = 3


def deliver(proc, event_type, row):
    spec = events.incident_event(event_type, row, "/test")
    headers, body = to_binary(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", **spec["extensions"]}, spec["data"]))
    return requests.post(proc.url + "/", data=body, headers={**headers, "Prefer": "reply"}, timeout=60)


def new_incident(engine, name, diagnosed=False, **labels):
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, priority="P0", **labels)], "/test", "test").outcomes[0].incident_id
        if diagnosed:
            return mark_diagnosed(conn, incident_id)
        return svc.get_incident(conn, incident_id)


def overlapping(gate, send_first, send_other) -> tuple[int, list[int]]:
    """Send the first delivery, wait until the receiver holds it, send the
    others and collect their answers, then release the first."""
    first, errors = {}, []

    def run():
        try:
            first["status"] = send_first().status_code
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        gate.wait_held()
        others = [send_other().status_code for _ in range(OTHERS)]
    finally:
        gate.release()
        thread.join(60)
    assert not errors, errors
    return first["status"], others


# --------------------------------------------------------------------------- escalation


@pytest.fixture(scope="module")
def pagerduty():
    server = HoldingReceiver().start()
    yield server
    server.gate.reset()
    server.stop()


@pytest.fixture(scope="module")
def slack():
    server = HoldingReceiver(default=(200, {"Content-Type": "text/plain"}, b"ok")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def escalation(base_env, pagerduty, slack):
    env = {**base_env, "PAGERDUTY_EVENTS_URL": pagerduty.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
           "SLACK_WEBHOOK_URL": slack.url + "/services/T000/B000/XXXX", "NOTIFY_TIMEOUT_SECONDS": "35", "NOTIFY_MAX_ATTEMPTS": "1"}
    proc = FunctionProcess("escalation", env, threads=6).start()
    yield proc
    proc.stop()


@pytest.fixture
def receivers(pagerduty, slack):
    for r in (pagerduty, slack):
        r.requests.clear(), r.script.clear(), r.gate.reset()
    pagerduty.gate.arm("/v2/enqueue")
    yield pagerduty, slack
    pagerduty.gate.reset()


def test_deliveries_arriving_while_the_page_is_sent_are_told_to_retry(escalation, receivers, clean_db):
    pd, hook = receivers
    row = new_incident(clean_db, "ClaimProbe")
    first, others = overlapping(pd.gate, lambda: deliver(escalation, events.INCIDENT_OPENED, row),
                                lambda: deliver(escalation, events.INCIDENT_OPENED, row))
    assert others == [409] * OTHERS  # not 2xx: the Broker must come back
    assert first == 202
    assert len(pd.requests) == 1 and len(hook.requests) == 1
    # The Broker's retry after the page went out: done, nothing sent again.
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert len(pd.requests) == 1 and len(hook.requests) == 1


def test_a_page_that_failed_while_others_waited_is_sent_by_the_retry(escalation, receivers, clean_db):
    pd, hook = receivers
    pd.script.append((500, {}, b'{"status":"error"}'))
    row = new_incident(clean_db, "ClaimProbeFail")
    first, others = overlapping(pd.gate, lambda: deliver(escalation, events.INCIDENT_OPENED, row),
                                lambda: deliver(escalation, events.INCIDENT_OPENED, row))
    assert others == [409] * OTHERS and first == 502
    assert len(pd.requests) == 1
    # The claim was given back: the retry pages.
    assert deliver(escalation, events.INCIDENT_OPENED, row).status_code == 202
    assert len(pd.requests) == 2 and len(hook.requests) == 1


# --------------------------------------------------------------------------- remediation and diagnostics


@pytest.fixture(scope="module")
def holding_kube(tmp_path_factory):
    server = HoldingKubernetes().start()
    server.kubeconfig_path = server.kubeconfig(tmp_path_factory.mktemp("claimkube"))
    yield server
    server.gate.reset()
    server.stop()


@pytest.fixture
def cluster(holding_kube):
    k = holding_kube
    k.deployments.clear(), k.requests.clear(), k.pods.clear(), k.failures.clear()
    k.gate.reset()
    k.add_deployment(deployment("email-service", 1))
    k.pods.append(pod("email-service-0", {"app": "email-service"}))
    yield k
    k.gate.reset()


@pytest.fixture(scope="module")
def remediation(base_env, holding_kube):
    env = {**base_env, "KUBECONFIG": str(holding_kube.kubeconfig_path), "REMEDIATION_MODE": "live",
           "REMEDIATION_ALLOWED_NAMESPACES": "production", "REMEDIATION_VERIFY_TIMEOUT_SECONDS": "5",
           "PROBE_TIMEOUT_SECONDS": "35"}  # longer than any hold
    proc = FunctionProcess("remediation", env, threads=6).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def diagnostics(base_env, holding_kube):
    env = {**base_env, "KUBECONFIG": str(holding_kube.kubeconfig_path), "PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}",
           "PROBE_TIMEOUT_SECONDS": "35", "DIAGNOSTICS_DEADLINE_SECONDS": "40"}
    proc = FunctionProcess("diagnostics", env, threads=6).start()
    yield proc
    proc.stop()


def test_remediation_runs_once_while_others_are_told_to_retry(remediation, cluster, clean_db):
    row = new_incident(clean_db, "KafkaConsumerLagHigh", diagnosed=True, namespace="production")
    cluster.gate.arm("/deployments/email-service")
    first, others = overlapping(cluster.gate, lambda: deliver(remediation, events.INCIDENT_DIAGNOSED, row),
                                lambda: deliver(remediation, events.INCIDENT_DIAGNOSED, row))
    assert others == [409] * OTHERS and first == 200
    assert len(cluster.calls("PATCH", "/scale")) == 1
    with clean_db.connect() as conn:
        assert len(svc.get_incident(conn, row["id"])["remediation_actions"]) == 1


def test_diagnostics_probe_once_while_others_are_told_to_retry(diagnostics, cluster, clean_db):
    row = new_incident(clean_db, "EmailServiceDown", service="email", namespace="production")
    cluster.gate.arm("/api/v1/namespaces/production/pods")
    first, others = overlapping(cluster.gate, lambda: deliver(diagnostics, events.INCIDENT_OPENED, row),
                                lambda: deliver(diagnostics, events.INCIDENT_OPENED, row))
    assert others == [409] * OTHERS and first == 200
    assert len(cluster.calls("GET", "/pods")) == 1
    with clean_db.connect() as conn:
        assert [t["kind"] for t in svc.get_timeline(conn, row["id"])].count("diagnosed") == 1
