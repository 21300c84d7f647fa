"""Diagnostics over real HTTP against a real Prometheus and a loopback
Kubernetes API reached through the official client."""

from dataclasses import replace
from datetime import datetime

import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from shared import events
from shared import incidents as svc
from tests.factories import alert
from loopback.kube import deployment, pod
from loopback.processes import FunctionProcess, free_port


@pytest.fixture
def cluster(kube):
    kube.clear()
    kube.add_node("node-1", {"Ready": "True", "DiskPressure": "False"})
    kube.add_node("node-2", {"Ready": "True", "DiskPressure": "False"})
    kube.add_deployment(deployment("email-service", 3))
    kube.pods.extend(pod(f"email-service-{i}", {"app": "email-service"}) for i in range(3))
    return kube


@pytest.fixture(scope="module")
def diagnostics(base_env, kube, prometheus):
    proc = FunctionProcess("diagnostics", {**base_env, "KUBECONFIG": str(kube.kubeconfig_path), "PROMETHEUS_URL": prometheus.url}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def degraded(base_env, kube):
    """Prometheus unreachable, short probe timeouts."""
    env = {**base_env, "KUBECONFIG": str(kube.kubeconfig_path), "PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}",
           "PROBE_TIMEOUT_SECONDS": "1", "DIAGNOSTICS_DEADLINE_SECONDS": "3"}
    proc = FunctionProcess("diagnostics", env).start()
    yield proc
    proc.stop()


def open_incident(engine, name="EmailServiceDown", **labels):
    labels = {"service": "email", "namespace": "production", **labels}
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, **labels)], "/test", "test").outcomes[0].incident_id
        return svc.get_incident(conn, incident_id)


def deliver(proc, incident):
    spec = events.incident_event(events.INCIDENT_OPENED, incident, "/test")
    attributes = {"id": spec["id"], "type": spec["type"], "source": spec["source"], **spec["extensions"]}
    headers, body = to_binary(CloudEvent(attributes, spec["data"]))
    return requests.post(proc.url + "/", data=body, headers={**headers, "Prefer": "reply"}, timeout=30)


def stored(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_incident(conn, incident_id), svc.get_timeline(conn, incident_id)


def test_seed_test3_shape_with_values_promql_computes(diagnostics, cluster, clean_db, prometheus):
    incident = open_incident(clean_db)
    response = deliver(diagnostics, incident)
    assert response.status_code == 200, response.text
    reply = from_http(response.headers, response.content)
    assert reply["type"] == events.INCIDENT_DIAGNOSED
    assert reply["id"] == f"{incident['id']}.diagnosed.0"
    assert reply["priority"] == "p0" and reply["alertname"] == "EmailServiceDown"

    row, timeline = stored(clean_db, incident["id"])
    d = row["diagnostics"]
    assert d["pods"]["email-service"]["ready"] == "3/3"
    assert d["pods"]["email-service"]["status"] == "Running"
    assert d["pods"]["email-service"]["replicas"]["desired"] == 3
    assert d["metrics"]["availability"] == pytest.approx(0.999)
    assert d["metrics"]["latency_p95"] == pytest.approx(350.0)
    assert d["metrics"]["kafka_consumer_lag"] == 15234
    promql_p95 = float(prometheus.query(
        '1000 * histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket{service="email"}[5m])))')[0]["value"][1])
    assert d["metrics"]["latency_p95"] == pytest.approx(promql_p95)
    assert d["dependencies"] == {"kafka": "up", "postgres": "down"}
    assert {"pods", "metrics", "dependencies", "events", "nodes"} <= set(d["durations_ms"]) and d["collected_at"].endswith("Z")
    # Healthy pods and Postgres down: the probable cause, citing the fact.
    assert d["probable_causes"][0] == {"cause": "dependency_down", "confidence": 0.82,
                                       "summary": "Dependency postgres is down.", "evidence": ["dependency/postgres"]}
    assert [s["state"] for s in d["sources"]] == ["ok"] * len(d["sources"])
    assert reply.data["diagnostics"]["probable_causes"] == d["probable_causes"]
    assert timeline[-1]["details"]["summary"]["probable_causes"][0]["cause"] == "dependency_down"
    assert row["status"] == "investigating"
    assert [t["kind"] for t in timeline] == ["opened", "status_changed", "diagnosed"]
    assert reply.data["diagnostics"]["pods"]["email-service"]["ready"] == "3/3"
    assert "Running diagnostics" in diagnostics.logs()
    assert cluster.calls("GET", "/pods")[0].headers["authorization"] == "Bearer fake-service-account-token"


def test_crash_looping_and_oom_killed_pods_are_reported(diagnostics, cluster, clean_db):
    cluster.pods[:] = [
        pod("email-service-0", {"app": "email-service"}),
        pod("email-service-1", {"app": "email-service"}, ready=False, restarts=7, waiting="CrashLoopBackOff", terminated="OOMKilled"),
        pod("email-service-2", {"app": "email-service"}, ready=False, restarts=4, waiting="CrashLoopBackOff", terminated="OOMKilled", node="node-2"),
    ]
    cluster.deployments[("production", "email-service")]["status"]["readyReplicas"] = 1
    incident = open_incident(clean_db, "KubePodCrashLooping")
    assert deliver(diagnostics, incident).status_code == 200
    pods = stored(clean_db, incident["id"])[0]["diagnostics"]["pods"]["email-service"]
    assert pods["ready"] == "1/3" and pods["status"] == "CrashLoopBackOff"
    assert pods["restarts"] == 11 and pods["last_terminated_reasons"] == ["OOMKilled"]
    assert pods["nodes"] == ["node-1", "node-2"]


def test_prometheus_down_and_kubernetes_403_are_recorded_and_the_function_answers(degraded, cluster, clean_db):
    cluster.fail("GET", r"/deployments/email-service$", 403)
    incident = open_incident(clean_db)
    response = deliver(degraded, incident)
    assert response.status_code == 200
    d = stored(clean_db, incident["id"])[0]["diagnostics"]
    assert "403" in d["pods"]["error"], d
    assert "ConnectionError" in d["metrics"]["availability"]["error"]
    assert "error" in d["dependencies"]["kafka"]


def test_an_alert_that_started_in_the_first_hour_of_year_one_is_diagnosed_not_a_500(degraded, cluster, clean_db):
    # A zero time written in a zone east of UTC ("0001-01-02T00:10:00+23:59")
    # is 00:11 UTC on 1 January of year 1, and the lookback before it was out
    # of range: an OverflowError's 500 on every redelivery, never a diagnosis.
    ancient = replace(alert("EmailServiceDown", service="email", namespace="production"), starts_at=datetime(1, 1, 1, 0, 11))
    with clean_db.begin() as conn:
        incident = svc.get_incident(conn, svc.record_alerts(conn, [ancient], "/test", "test").outcomes[0].incident_id)
    response = deliver(degraded, incident)
    assert response.status_code == 200, response.text
    row, _ = stored(clean_db, incident["id"])
    assert row["diagnostics"]["window"]["from"].startswith("0001-01-01T00:00:00"), row["diagnostics"]["window"]


def test_a_hanging_probe_is_bounded_by_its_timeout(degraded, cluster, clean_db):
    cluster.fail("GET", r"/pods$", "hang")
    incident = open_incident(clean_db)
    response = deliver(degraded, incident)
    assert response.status_code == 200
    d = stored(clean_db, incident["id"])[0]["diagnostics"]
    assert "error" in d["pods"]
    assert d["durations_ms"]["pods"] < 5000


def test_without_kubernetes_or_prometheus_sections_say_not_configured(base_env, clean_db):
    proc = FunctionProcess("diagnostics", {**base_env, "KUBECONFIG": "/nonexistent/kubeconfig"}).start()
    try:
        incident = open_incident(clean_db)
        assert deliver(proc, incident).status_code == 200
        d = stored(clean_db, incident["id"])[0]["diagnostics"]
        assert d["pods"] == d["metrics"] == d["dependencies"] == "not configured"
        assert "Kubernetes is not configured" in proc.logs()
    finally:
        proc.stop()


def test_redelivery_replies_the_same_event_without_probing_again(diagnostics, cluster, clean_db):
    incident = open_incident(clean_db)
    first = deliver(diagnostics, incident)
    calls = len(cluster.requests)
    second = deliver(diagnostics, incident)
    assert second.status_code == 200 and second.headers["ce-id"] == first.headers["ce-id"]
    assert len(cluster.requests) == calls
    kinds = [t["kind"] for t in stored(clean_db, incident["id"])[1]]
    assert kinds.count("diagnosed") == 1


def test_resolved_incident_is_acknowledged_and_not_probed(diagnostics, cluster, clean_db):
    incident = open_incident(clean_db)
    with clean_db.begin() as conn:
        svc.transition(conn, incident["id"], "resolved", "t", "/test")
    response = deliver(diagnostics, incident)
    assert response.status_code == 202 and response.content == b""
    assert cluster.requests == []


def test_events_it_does_not_handle_are_400(diagnostics):
    headers, body = to_binary(CloudEvent({"type": "io.incidentresponse.incident.resolved", "source": "/t", "id": "1"}, {}))
    assert requests.post(diagnostics.url + "/", data=body, headers=headers, timeout=5).status_code == 400
    headers, body = to_binary(CloudEvent({"type": events.INCIDENT_OPENED, "source": "/t", "id": "1"}, {"incident_id": "nope"}))
    assert requests.post(diagnostics.url + "/", data=body, headers=headers, timeout=5).status_code == 400
    assert requests.post(diagnostics.url + "/", data=b"{}", headers={"Content-Type": "application/json"}, timeout=5).status_code == 400


def test_log_lines_are_stored_redacted_and_the_probable_cause_cites_them(diagnostics, cluster, clean_db):
    cluster.pods[:] = [pod("email-service-0", {"app": "email-service"}, ready=False, restarts=5, waiting="CrashLoopBackOff", terminated="Error")]
    cluster.deployments[("production", "email-service")]["status"]["readyReplicas"] = 0
    cluster.add_log("production", "email-service-0", "app", previous=True, text=(
        "calling billing with Authorization: Bearer sk-live-8f3kQ29xLmP0aZ77bT\n"
        "db url postgres://email:Wint3r-Is-Coming@db.production:5432/email\n"
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n-----END OPENSSH PRIVATE KEY-----\n"
        "fatal: cannot start\n"))
    incident = open_incident(clean_db, "KubePodCrashLooping")
    assert deliver(diagnostics, incident).status_code == 200
    with clean_db.connect() as conn:
        raw = conn.exec_driver_sql("SELECT diagnostics::text FROM incidents WHERE id = %s", (incident["id"],)).scalar()
    for secret in ("sk-live-8f3kQ29xLmP0aZ77bT", "Wint3r-Is-Coming", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"):
        assert secret not in raw
    d = stored(clean_db, incident["id"])[0]["diagnostics"]
    (entry,) = d["logs"]
    assert entry["id"] == "log/email-service-0/app/previous" and entry["lines"][-1] == "fatal: cannot start"
    crash = next(c for c in d["probable_causes"] if c["cause"] == "crash_loop")
    assert "log/email-service-0/app/previous" in crash["evidence"] and "fatal: cannot start" in crash["summary"]
