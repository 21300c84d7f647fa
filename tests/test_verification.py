"""Verification after remediation against the real Prometheus binary, with
an alerting rule over series the test controls: the problem went away
(verified), or it did not (not verified: what was done is reverted, both
are on the timeline, and remediation_failed says so)."""

from __future__ import annotations

import copy
import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
import requests

from functions.remediation import playbooks as pb
from functions.remediation.verify import alerts_query
from loopback.kube import deployment, replicaset
from loopback.processes import FunctionProcess, wait_until
from loopback.trickle import HEADERS_THEN_BODY, STATUS_LINE, Trickler, run_bounded
from shared import events
from shared import incidents as svc
from tests.prometheus import Prometheus
from tests.test_remediation import _env, actions_of, deliver, incident, reply_of

RULES = """
groups:
  - name: test
    interval: 1s
    rules:
      - alert: KafkaConsumerLagHigh
        expr: max by (consumergroup) (kafka_consumergroup_lag) > 1000
        labels: {namespace: production, severity: warning}
      # A bad release the rollback does not cure: it keeps firing.
      - alert: KubeDeploymentRolloutStuck
        expr: vector(1)
        labels: {namespace: production, deployment: checkout}
"""

PLAYBOOKS = """
playbooks:
  - name: lag-promql
    match:
      alertname: KafkaConsumerLagHigh
      labels: ['check=promql']
    verify:
      promql: 'max(kafka_consumergroup_lag{consumergroup="{{ labels.consumergroup }}"}) < 100'
      within_seconds: 4
    actions:
      - action: scale_deployment
        params: {namespace: "{{ namespace }}", name: email-service, replicas: 6}
  - name: lag-default
    match:
      alertname: KafkaConsumerLagHigh
    actions:
      - action: scale_deployment
        params: {namespace: "{{ namespace }}", name: email-service, replicas: 6}
  - name: rollout-stuck
    match:
      alertname: KubeDeploymentRolloutStuck
    verify:
      alert_stops_firing: KubeDeploymentRolloutStuck
      within_seconds: 3
    actions:
      - action: rollback_deployment
        params: {namespace: "{{ namespace }}", name: "{{ labels.deployment }}"}
"""

LAG = 15234


@pytest.fixture(scope="module")
def prom():
    server = Prometheus(rules=RULES).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remediation(base_env, kube, database_url, prom, tmp_path_factory):
    playbooks = tmp_path_factory.mktemp("playbooks") / "playbooks.yaml"
    playbooks.write_text(PLAYBOOKS)
    env = _env(base_env, kube, database_url, REMEDIATION_MODE="live", PROMETHEUS_URL=prom.url, PLAYBOOKS_FILE=str(playbooks),
               REMEDIATION_VERIFY_WINDOW_SECONDS="4", REMEDIATION_COOLDOWN_SECONDS="0")
    proc = FunctionProcess("remediation", env).start()
    yield proc
    proc.stop()


@pytest.fixture
def cluster(kube, prom):
    kube.deployments.clear(), kube.pods.clear(), kube.failures.clear(), kube.requests.clear(), kube.replicasets.clear()
    kube.rollout_delay = 0.0
    kube.add_deployment(deployment("email-service", 1))
    prom.exporter.lag = LAG
    # Scraped, and the rule evaluated after the scrape (an earlier test may
    # have drained the lag moments ago).
    wait_until(lambda: prom.query(f"kafka_consumergroup_lag == {LAG}"), 30, interval=0.2, message="the lag scraped")
    scraped = datetime.now(timezone.utc)
    wait_until(lambda: evaluated_since(prom, scraped) and prom.query('ALERTS{alertname="KafkaConsumerLagHigh", alertstate="firing"}'),
               30, interval=0.2, message="the lag alert firing")
    return kube


def evaluated_since(prom, moment) -> bool:
    groups = requests.get(prom.url + "/api/v1/rules", timeout=5).json()["data"]["groups"]
    last = groups[0]["lastEvaluation"]
    stamp = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", last).replace("Z", "+00:00"))
    return stamp > moment


def deliver_and_cure(remediation, row, cluster, prom):
    """Deliver the incident; once the scale-out reached Kubernetes, the lag
    drains (the exporter reports it low), as a real consumer group would."""
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(deliver, remediation, row)
        wait_until(lambda: cluster.calls("PATCH", "/scale"), 30, message="the scale-out")
        prom.exporter.lag = 10
        return reply_of(pending.result(timeout=60))


def timeline(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_timeline(conn, incident_id)


def test_alert_stopped_firing_is_verified(remediation, cluster, prom, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", consumergroup="email-service")
    event = deliver_and_cure(remediation, row, cluster, prom)
    assert event["type"] == events.INCIDENT_REMEDIATED, event.data
    verification = event.data["remediation"]["verification"]
    assert verification["verified"] is True
    assert verification["query"] == 'ALERTS{alertname="KafkaConsumerLagHigh", alertstate="firing", namespace="production"}'
    assert [p.json() for p in cluster.calls("PATCH", "/scale")] == [{"spec": {"replicas": 6}}]
    assert "remediation_verification" in [t["kind"] for t in timeline(clean_db, row["id"])]


def test_alert_still_firing_is_not_verified_reverted_and_escalated(remediation, cluster, prom, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", consumergroup="email-service")
    event = reply_of(deliver(remediation, row))
    assert event["type"] == events.INCIDENT_REMEDIATION_FAILED
    reason = event.data["remediation"]["reason"]
    assert reason.startswith("not verified: KafkaConsumerLagHigh is still firing 4s after the actions") and "reverted scale_deployment on email-service" in reason
    # The scale-out, then the scale back to the recorded `from`.
    assert [p.json() for p in cluster.calls("PATCH", "/scale")] == [{"spec": {"replicas": 6}}, {"spec": {"replicas": 1}}]
    assert cluster.deployments[("production", "email-service")]["spec"]["replicas"] == 1
    action, revert = actions_of(clean_db, row["id"])
    assert (action["action"], action["from"], action["to"], action.get("revert")) == ("scale_deployment", 1, 6, None)
    assert (revert["action"], revert["from"], revert["to"], revert["revert"], revert["success"]) == ("scale_deployment", 6, 1, True, True)
    kinds = [t["kind"] for t in timeline(clean_db, row["id"])]
    assert kinds[-4:] == ["remediation_action", "remediation_verification", "remediation_action", "remediation_result"]
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, row["id"])["status"] == "investigating"


def test_promql_verify_that_becomes_true_is_verified(remediation, cluster, prom, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", consumergroup="email-service", check="promql")
    event = deliver_and_cure(remediation, row, cluster, prom)
    assert event["type"] == events.INCIDENT_REMEDIATED, event.data
    assert event.data["remediation"]["verification"]["query"] == 'max(kafka_consumergroup_lag{consumergroup="email-service"}) < 100'


def test_promql_verify_that_stays_false_reverts(remediation, cluster, prom, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", consumergroup="email-service", check="promql")
    event = reply_of(deliver(remediation, row))
    assert event["type"] == events.INCIDENT_REMEDIATION_FAILED
    assert "returned nothing 4s after the actions" in event.data["remediation"]["reason"]
    assert [p.json() for p in cluster.calls("PATCH", "/scale")] == [{"spec": {"replicas": 6}}, {"spec": {"replicas": 1}}]


def test_a_rollback_that_did_not_help_is_rolled_forward_again(remediation, cluster, prom, clean_db):
    d = deployment("checkout", 2)
    d["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.local/app:3"
    cluster.add_deployment(d)
    cluster.replicasets.extend([replicaset(d, 2, "registry.local/app:2"), replicaset(d, 3, "registry.local/app:3", replicas=2)])
    current = copy.deepcopy(d["spec"]["template"])
    wait_until(lambda: prom.query('ALERTS{alertname="KubeDeploymentRolloutStuck"}'), 30, interval=0.2, message="the rollout alert")
    row = incident(clean_db, "KubeDeploymentRolloutStuck", namespace="production", deployment="checkout")
    event = reply_of(deliver(remediation, row))
    assert event["type"] == events.INCIDENT_REMEDIATION_FAILED
    assert event.data["remediation"]["reason"].startswith("not verified: ALERTS{")
    undo, redo = cluster.calls("PATCH", "/deployments/checkout")
    assert undo.headers["content-type"] == redo.headers["content-type"] == "application/json-patch+json"
    assert undo.json()[0]["value"]["spec"]["containers"][0]["image"] == "registry.local/app:2"
    # Back to the revision before the action (3), the template as it was.
    assert redo.json()[0]["value"]["spec"]["containers"][0]["image"] == "registry.local/app:3"
    assert d["spec"]["template"] == current
    action, revert = actions_of(clean_db, row["id"])
    assert action["revision"] == {"from": 3, "to": 2}
    assert revert["revert"] and revert["success"] and revert["to"] == 3


# --------------------------------------------------------------------------- the playbook fields


def _book(**extra):
    return {"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "escalate"}], **extra}]}


@pytest.mark.parametrize("extra, message", [
    ({"approval": "maybe"}, "field 'approval': must be 'required' or 'none'"),
    ({"verify": "up"}, "field 'verify': must be a mapping"),
    ({"verify": {}}, "exactly one of promql and alert_stops_firing"),
    ({"verify": {"promql": "up", "alert_stops_firing": "A"}}, "exactly one of promql and alert_stops_firing"),
    ({"verify": {"promql": " "}}, "field 'verify.promql': must be a non-empty string"),
    ({"verify": {"promql": "up", "within_seconds": 0}}, "field 'verify.within_seconds'"),
    ({"verify": {"promql": "up", "within_seconds": True}}, "field 'verify.within_seconds'"),
    ({"verify": {"promql": "up", "window": 3}}, "field 'verify.window': unknown"),
])
def test_invalid_approval_and_verify_are_refused_naming_the_field(extra, message):
    with pytest.raises(pb.PlaybookError, match="custom.yaml: playbook 'x': ") as err:
        pb.parse(_book(**extra), "custom.yaml")
    assert message in str(err.value)


def test_approval_on_one_action_or_the_playbook_and_by_mode():
    (plain,) = pb.parse(_book(), "p.yaml")
    (whole,) = pb.parse(_book(approval="required"), "p.yaml")
    (one,) = pb.parse({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [
        {"action": "escalate"}, {"action": "escalate", "approval": "required"}]}]}, "p.yaml")
    assert [plain.needs_approval("live"), whole.needs_approval("live"), one.needs_approval("live")] == [False, True, True]
    assert plain.needs_approval("approve")
    with pytest.raises(pb.PlaybookError, match="actions\\[0\\]: field 'approve': unknown"):
        pb.parse({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "escalate", "approve": True}]}]}, "p.yaml")
    (shipped,) = [p for p in pb.load() if p.name == "deployment-rollout-stuck"]
    assert shipped.approval and shipped.steps[0].action == "rollback_deployment"
    assert shipped.verify == pb.Verify(alert_stops_firing="KubeDeploymentRolloutStuck")


def test_the_alerts_query_names_the_alert_by_its_identifying_labels_escaped():
    query = alerts_query("Kube\"Pod", {"namespace": "prod", "pod": 'a"b', "cluster": "eu-1", "severity": "critical"})
    assert query == 'ALERTS{alertname="Kube\\"Pod", alertstate="firing", namespace="prod", pod="a\\"b"}'


def test_a_revert_that_fails_is_recorded_and_said(remediation, cluster, prom, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", consumergroup="email-service")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(deliver, remediation, row)
        wait_until(lambda: cluster.calls("PATCH", "/scale"), 30, message="the scale-out")
        # The scale-out went through; the scale back is refused.
        cluster.fail("PATCH", r"/deployments/email-service/scale$", 403)
        event = reply_of(pending.result(timeout=60))
    reason = event.data["remediation"]["reason"]
    assert reason.startswith("not verified:") and "could not revert scale_deployment on email-service (Kubernetes API 403" in reason
    action, revert = actions_of(clean_db, row["id"])
    assert revert["revert"] and not revert["success"] and "403" in revert["error"]
    assert cluster.deployments[("production", "email-service")]["spec"]["replicas"] == 6


def test_prometheus_unreachable_is_inconclusive_never_a_reason_to_revert():
    from loopback.processes import free_port
    from shared.config import load_settings
    from functions.remediation.verify import Verifier

    base = {"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "REMEDIATION_VERIFY_WINDOW_SECONDS": "0"}
    (book,) = pb.parse(_book(verify={"promql": "up", "within_seconds": 1}), "p.yaml")
    (plain,) = pb.parse(_book(), "p.yaml")
    row = {"alert_name": "A", "labels": {"namespace": "prod"}}
    dead = Verifier(load_settings({**base, "PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}", "PROBE_TIMEOUT_SECONDS": "1"}))
    verdict = dead.check(row, book, {})
    assert verdict.verified is None and verdict.reason.startswith("not verified: Prometheus could not be asked")
    unset = Verifier(load_settings(base))
    assert unset.check(row, book, {}).reason == "not verified: the playbook declares verify but PROMETHEUS_URL is not set"
    assert (unset.check(row, plain, {}).verified, unset.check(row, plain, {}).reason) == (None, "")


@pytest.mark.parametrize("body", [
    b'{"status": "success", "data": null}',
    b'{"status": "success", "data": {"resultType": "vector", "result": null}}',
    b'{"status": "success", "data": {"resultType": "vector"}}',
    b'["success"]',
])
def test_an_answer_without_a_result_list_is_inconclusive_never_verified(body):
    from loopback.servers import RecordingServer
    from shared.config import load_settings
    from functions.remediation.verify import Verifier

    prometheus = RecordingServer(lambda request: (200, {"Content-Type": "application/json"}, body)).start()
    try:
        config = load_settings({"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "REMEDIATION_VERIFY_WINDOW_SECONDS": "0",
                                "PROMETHEUS_URL": prometheus.url, "PROBE_TIMEOUT_SECONDS": "2"})
        (stops,) = pb.parse(_book(verify={"alert_stops_firing": "A", "within_seconds": 1}), "p.yaml")
        (plain,) = pb.parse(_book(), "p.yaml")
        row = {"alert_name": "A", "labels": {"namespace": "prod"}}
        for book in (stops, plain):
            verdict = Verifier(config, poll_interval=0.1).check(row, book, {})
            assert verdict.verified is None and verdict.reason.startswith("not verified: Prometheus could not be asked"), verdict
    finally:
        prometheus.stop()


@pytest.mark.parametrize("start", [STATUS_LINE, HEADERS_THEN_BODY], ids=["headers", "body"])
def test_a_prometheus_that_trickles_its_answer_is_a_failed_query_at_the_probe_timeout(start):
    # requests' timeout bounds each read: a byte every 0.2 s would hold the
    # verification (and the remediation's claim) for as long as the peer likes.
    from shared.config import load_settings
    from functions.remediation.verify import Verifier

    (plain,) = pb.parse(_book(), "p.yaml")
    row = {"alert_name": "A", "labels": {"namespace": "prod"}}
    with Trickler(start) as prometheus:
        config = load_settings({"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "REMEDIATION_VERIFY_WINDOW_SECONDS": "0",
                                "PROMETHEUS_URL": prometheus.url, "PROBE_TIMEOUT_SECONDS": "0.5"})
        ended, verdict, took = run_bounded(lambda: Verifier(config).check(row, plain, {}), 6)
    assert ended, "the query outlived the probe timeout"
    assert took < 2.5
    assert verdict.verified is None and verdict.reason.startswith("not verified: Prometheus could not be asked"), verdict


def test_a_prometheus_url_no_request_can_be_made_to_is_one_of_requests_errors_and_inconclusive():
    # urllib3 refused the label over 63 characters with LocationParseError,
    # no requests error: a caller catching those (the topology's, the
    # verifier's) was left to its broadest except, or none.
    from shared import promapi
    from shared.config import load_settings
    from functions.remediation.verify import Verifier

    url = "http://" + "p" * 64 + ".example:9090"
    with pytest.raises(requests.exceptions.InvalidURL):
        promapi.instant(url, "up", 1.0)
    # Such a PROMETHEUS_URL fails the start (shared.config); the verifier
    # still copes with one, whatever let it through.
    config = dataclasses.replace(load_settings({"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db",
                                                "REMEDIATION_VERIFY_WINDOW_SECONDS": "0", "PROBE_TIMEOUT_SECONDS": "1"}),
                                 prometheus_url=url)
    (plain,) = pb.parse(_book(), "p.yaml")
    verdict = Verifier(config).check({"alert_name": "A", "labels": {"namespace": "prod"}}, plain, {})
    assert verdict.verified is None and verdict.reason.startswith("not verified: Prometheus could not be asked (Failed to parse"), verdict
