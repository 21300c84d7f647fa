"""The rails through a real remediation process, whose loopback Kubernetes
API can hold a request, so that two incidents overlap for certain."""

from __future__ import annotations

import threading

import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from shared import events
from shared import incidents as svc
from tests.factories import alert, mark_diagnosed
from loopback.kube import deployment
from tests.holding import HoldingKubernetes
from loopback.processes import FunctionProcess


@pytest.fixture(scope="module")
def holding_kube(tmp_path_factory):
    server = HoldingKubernetes().start()
    server.kubeconfig_path = server.kubeconfig(tmp_path_factory.mktemp("holdkube"))
    yield server
    server.gate.reset()
    server.stop()


@pytest.fixture
def cluster(holding_kube):
    k = holding_kube
    k.deployments.clear(), k.requests.clear(), k.nodes.clear(), k.pods.clear(), k.failures.clear()
    k.rollout_delay = 0.0
    k.gate.reset()
    k.add_deployment(deployment("email-service", 1))
    k.add_deployment(deployment("email-service", 1, namespace="kube-system"))
    k.add_node("node-7")
    yield k
    k.gate.reset()


def _process(base_env, k, **env):
    full = {
        **base_env, "KUBECONFIG": str(k.kubeconfig_path), "REMEDIATION_MODE": "live",
        "REMEDIATION_ALLOWED_NAMESPACES": "production,kube-system", "REMEDIATION_VERIFY_TIMEOUT_SECONDS": "5",
        "PROBE_TIMEOUT_SECONDS": "35",  # longer than any hold
        **env,
    }
    return FunctionProcess("remediation", full).start()


@pytest.fixture(scope="module")
def guarded(base_env, holding_kube):
    """The default rails: kube-system denied, node actions off, a cooldown."""
    proc = _process(base_env, holding_kube)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def no_cooldown(base_env, holding_kube):
    proc = _process(base_env, holding_kube, REMEDIATION_MAX_ACTIONS_PER_HOUR="1", REMEDIATION_COOLDOWN_SECONDS="0")
    yield proc
    proc.stop()


def diagnosed(engine, name, **labels):
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, **labels)], "/test", "test").outcomes[0].incident_id
        return mark_diagnosed(conn, incident_id)


def deliver(proc, row):
    spec = events.incident_event(events.INCIDENT_DIAGNOSED, row, "/test")
    headers, body = to_binary(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", **spec["extensions"]}, spec["data"]))
    return requests.post(proc.url + "/", data=body, headers={**headers, "Prefer": "reply"}, timeout=60)


def actions_of(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_incident(conn, incident_id)["remediation_actions"]


def test_kube_system_is_never_touched_by_the_function(guarded, cluster, clean_db):
    row = diagnosed(clean_db, "KafkaConsumerLagHigh", namespace="kube-system")
    response = deliver(guarded, row)
    assert response.status_code == 200
    assert from_http(response.headers, response.content)["type"] == events.INCIDENT_REMEDIATION_FAILED
    (record,) = actions_of(clean_db, row["id"])
    assert record["blocked_by"] == "denied_target" and record["success"] is False
    assert cluster.requests == []


def test_node_is_not_cordoned_without_the_opt_in(guarded, cluster, clean_db):
    row = diagnosed(clean_db, "KubeNodeNotReady", node="node-7")
    assert deliver(guarded, row).status_code == 200
    (record,) = actions_of(clean_db, row["id"])
    assert (record["action"], record["blocked_by"]) == ("cordon_node", "node_actions_disabled")
    assert cluster.requests == [] and not cluster.nodes["node-7"]["spec"].get("unschedulable")


def test_the_function_never_scales_a_deployment_down(guarded, cluster, clean_db):
    cluster.add_deployment(deployment("email-service", 10))
    row = diagnosed(clean_db, "KafkaConsumerLagHigh", namespace="production")
    assert deliver(guarded, row).status_code == 200
    (record,) = actions_of(clean_db, row["id"])
    assert (record["from"], record["to"], record["success"]) == (10, 10, True)
    assert cluster.calls("PATCH") == []


def _race(proc, k, engine, first_name, second_name):
    """The first incident's action is held inside the Kubernetes API while the
    second one is judged: the overlap is certain, not likely."""
    k.gate.arm("/deployments/email-service")
    first = diagnosed(engine, first_name, namespace="production")
    second = diagnosed(engine, second_name, namespace="production", replica="b")
    replies, errors = {}, []

    def send():
        try:
            replies["first"] = deliver(proc, first)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    k.gate.wait_held()
    try:
        replies["second"] = deliver(proc, second)
    finally:
        k.gate.release()
        thread.join(60)
    assert not errors, errors
    return first, second, replies


def test_two_incidents_racing_for_one_target_meet_the_cooldown(guarded, cluster, clean_db):
    first, second, replies = _race(guarded, cluster, clean_db, "KafkaConsumerLagHigh", "KafkaConsumerLagHigh")
    assert from_http(replies["second"].headers, replies["second"].content)["type"] == events.INCIDENT_REMEDIATION_FAILED
    assert actions_of(clean_db, second["id"])[0]["blocked_by"] == "cooldown"
    assert from_http(replies["first"].headers, replies["first"].content)["type"] == events.INCIDENT_REMEDIATED
    assert len(cluster.calls("PATCH")) == 1


def test_two_incidents_racing_under_the_hourly_cap_make_one_change(no_cooldown, cluster, clean_db):
    first, second, replies = _race(no_cooldown, cluster, clean_db, "EmailServiceDown", "KafkaConsumerLagHigh")
    (blocked,) = actions_of(clean_db, second["id"])
    assert blocked["blocked_by"] == "hourly_cap"
    assert actions_of(clean_db, first["id"])[0]["success"] is True
    assert len(cluster.calls("PATCH")) == 1
