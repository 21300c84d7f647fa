"""Remediation over real HTTP, against a loopback Kubernetes API reached
through the official client, and the real PostgreSQL."""

import json
import time

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from functions.remediation import playbooks as pb
from functions.remediation.actions import ActionContext, IdleConnectionsParams, terminate_idle_db_connections
from shared import events
from shared import incidents as svc
from shared.config import load_settings
from tests.factories import alert, mark_diagnosed
from loopback.kube import deployment, pod, replicaset
from loopback.processes import FunctionProcess
from tests.conftest import needs_own_backend

REMEDIATED = events.INCIDENT_REMEDIATED
FAILED = events.INCIDENT_REMEDIATION_FAILED


@pytest.fixture
def cluster(kube):
    kube.deployments.clear(), kube.pods.clear(), kube.failures.clear(), kube.requests.clear(), kube.jobs.clear(), kube.nodes.clear()
    kube.replicasets.clear()
    kube.rollout_delay = 0.0
    kube.add_deployment(deployment("email-service", 1))
    kube.add_deployment(billing := deployment("billing", 2))
    # billing's rollout history: revision 1, then the current revision 2.
    kube.replicasets.extend([replicaset(billing, 1, "registry.local/billing:1"), replicaset(billing, 2, "registry.local/app:1", replicas=2)])
    kube.add_deployment(deployment("email-service", 1, namespace="staging"))
    kube.pods.extend([
        pod("email-service-a", {"app": "email-service"}),
        pod("email-service-b", {"app": "email-service"}, ready=False, restarts=9, waiting="CrashLoopBackOff"),
        pod("batch-1", {"app": "batch"}, phase="Failed", reason="Evicted"),
        pod("batch-2", {"app": "batch"}, phase="Failed", reason="Evicted"),
        pod("report-x", {"job-name": "report"}, phase="Failed", ready=False),
    ])
    kube.add_node("node-7")
    return kube


def _env(base_env, kube, database_url, **extra):
    return {
        **base_env,
        "KUBECONFIG": str(kube.kubeconfig_path),
        "REMEDIATION_ALLOWED_NAMESPACES": "production",
        "REMEDIATION_VERIFY_TIMEOUT_SECONDS": "5",
        "REMEDIATION_ALLOW_NODE_ACTIONS": "true",
        "REMEDIATION_DB_DSN": database_url,
        **extra,
    }


@pytest.fixture(scope="module")
def live(base_env, kube, database_url):
    proc = FunctionProcess("remediation", _env(base_env, kube, database_url, REMEDIATION_MODE="live")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def dry(base_env, kube, database_url):
    proc = FunctionProcess("remediation", _env(base_env, kube, database_url, REMEDIATION_MODE="dry-run")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tight(base_env, kube, database_url):
    """A ceiling of 4 replicas and one live action an hour."""
    env = _env(base_env, kube, database_url, REMEDIATION_MODE="live", REMEDIATION_MAX_REPLICAS="4", REMEDIATION_MAX_ACTIONS_PER_HOUR="1")
    proc = FunctionProcess("remediation", env).start()
    yield proc
    proc.stop()


def incident(engine, name, **labels):
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, **labels)], "/test", "test").outcomes[0].incident_id
        return mark_diagnosed(conn, incident_id)


def deliver(proc, row):
    spec = events.incident_event(events.INCIDENT_DIAGNOSED, row, "/test")
    headers, body = to_binary(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", **spec["extensions"]}, spec["data"]))
    response = requests.post(proc.url + "/", data=body, headers={**headers, "Prefer": "reply"}, timeout=60)
    return response


def reply_of(response):
    assert response.status_code == 200, response.text
    return from_http(response.headers, response.content)


def actions_of(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_incident(conn, incident_id)["remediation_actions"]


def status_of(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_incident(conn, incident_id)["status"]


def test_seed_test4_scales_email_service_from_1_to_6_verified(live, cluster, clean_db):
    cluster.rollout_delay = 1.0
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", severity="warning")
    event = reply_of(deliver(live, row))
    assert event["type"] == REMEDIATED and event["id"] == f"{row['id']}.remediated.0"
    (record,) = actions_of(clean_db, row["id"])
    assert {k: record[k] for k in ("action", "target", "from", "to", "success", "dry_run", "error")} == {
        "action": "scale_deployment", "target": "email-service", "from": 1, "to": 6, "success": True, "dry_run": False, "error": None}
    assert record["timestamp"].endswith("Z") and record["namespace"] == "production"
    (patch,) = cluster.calls("PATCH", "/scale")
    assert patch.path.startswith("/apis/apps/v1/namespaces/production/deployments/email-service/scale")
    assert patch.headers["content-type"] == "application/merge-patch+json"
    assert patch.json() == {"spec": {"replicas": 6}}
    assert cluster.deployments[("production", "email-service")]["status"]["readyReplicas"] == 6
    with clean_db.connect() as conn:
        resolved = svc.get_incident(conn, row["id"])
        kinds = [t["kind"] for t in svc.get_timeline(conn, row["id"])]
    assert resolved["status"] == "resolved" and resolved["resolved_by"] == "remediation"
    assert kinds[-3:] == ["remediation_action", "status_changed", "remediation_result"]


def test_rollout_restart_patches_the_template_annotation_like_kubectl(live, cluster, clean_db):
    row = incident(clean_db, "EmailServiceDown", namespace="production")
    assert reply_of(deliver(live, row))["type"] == REMEDIATED
    (patch,) = cluster.calls("PATCH", "/deployments/email-service")
    assert patch.headers["content-type"] == "application/strategic-merge-patch+json"
    stamp = patch.json()["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
    assert stamp.endswith("Z")
    assert actions_of(clean_db, row["id"])[0]["to"] == stamp


def test_crash_looping_pod_is_deleted_and_healthy_ones_are_not(live, cluster, clean_db):
    row = incident(clean_db, "KubePodCrashLooping", namespace="production", pod="email-service-b")
    assert reply_of(deliver(live, row))["type"] == REMEDIATED
    assert [r.path.split("?")[0] for r in cluster.calls("DELETE")] == ["/api/v1/namespaces/production/pods/email-service-b"]
    assert actions_of(clean_db, row["id"])[0]["pods"] == ["email-service-b"]


def test_evicted_pods_are_cleaned_up(live, cluster, clean_db):
    row = incident(clean_db, "PodEvicted", namespace="production")
    reply_of(deliver(live, row))
    assert sorted(r.path.rsplit("/", 1)[1] for r in cluster.calls("DELETE")) == ["batch-1", "batch-2"]


def test_disk_space_low_creates_a_cleanup_job_on_the_node(live, cluster, clean_db):
    row = incident(clean_db, "DiskSpaceLow", namespace="production", node="node-7")
    assert reply_of(deliver(live, row))["type"] == REMEDIATED
    (post,) = cluster.calls("POST", "/apis/batch/v1/namespaces/production/jobs")
    job = post.json()
    assert job["metadata"]["generateName"] == "log-cleanup-"
    assert job["metadata"]["labels"]["incident-response/incident"] == row["id"]
    assert job["spec"]["template"]["spec"]["nodeName"] == "node-7"


def test_node_not_ready_cordons_then_hands_to_a_human(live, cluster, clean_db):
    row = incident(clean_db, "KubeNodeNotReady", node="node-7")
    event = reply_of(deliver(live, row))
    assert event["type"] == FAILED and "human" in event.data["remediation"]["reason"]
    (patch,) = cluster.calls("PATCH", "/api/v1/nodes/node-7")
    assert patch.headers["content-type"] == "application/merge-patch+json"
    assert patch.json() == {"spec": {"unschedulable": True}}
    assert [a["action"] for a in actions_of(clean_db, row["id"])] == ["cordon_node", "escalate"]
    assert status_of(clean_db, row["id"]) == "investigating"


@needs_own_backend
def test_terminate_idle_connections_only_those_older_than_the_threshold(database_url):
    victims = sa.create_engine(database_url, connect_args={"application_name": "idle-victim"}, pool_size=5, max_overflow=0)
    old = [victims.connect() for _ in range(3)]
    for c in old:
        c.execute(sa.text("SELECT 1"))
        c.commit()
    time.sleep(1.5)
    fresh = [victims.connect() for _ in range(2)]
    for c in fresh:
        c.execute(sa.text("SELECT 1"))
        c.commit()
    config = load_settings({"DATABASE_URL": database_url, "REMEDIATION_DB_DSN": database_url})
    ctx = ActionContext(config, {"id": "x"}, dry_run=False, verify_timeout=1)
    outcome = terminate_idle_db_connections(ctx, IdleConnectionsParams(idle_seconds=1.0, application_names=["idle-victim"]))
    assert outcome.before == 3 and outcome.details["terminated"] == 3
    alive = []
    for c in old + fresh:
        try:
            c.execute(sa.text("SELECT 1"))
            alive.append(True)
        except Exception:  # noqa: BLE001 - any failure means the connection is gone
            alive.append(False)
    assert alive == [False, False, False, True, True]
    victims.dispose()


def test_dry_run_records_what_it_would_do_and_changes_nothing(dry, cluster, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production")
    event = reply_of(deliver(dry, row))
    assert event["type"] == FAILED and "dry-run" in event.data["remediation"]["reason"]
    (record,) = actions_of(clean_db, row["id"])
    assert (record["from"], record["to"], record["dry_run"], record["success"]) == (1, 6, True, True)
    assert [r.method for r in cluster.requests] == ["GET"]
    assert status_of(clean_db, row["id"]) == "investigating"


def test_namespace_outside_the_allow_list_is_blocked(live, cluster, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="staging")
    event = reply_of(deliver(live, row))
    assert event["type"] == FAILED
    (record,) = actions_of(clean_db, row["id"])
    assert record["success"] is False and record["blocked_by"] == "namespace_allow_list"
    assert "staging" in record["error"] and cluster.requests == []


def test_replica_ceiling_caps_the_scale(tight, cluster, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production")
    reply_of(deliver(tight, row))
    (record,) = actions_of(clean_db, row["id"])
    assert (record["from"], record["to"], record["requested"], record["ceiling"]) == (1, 4, 6, 4)


def test_hourly_cap_holds(tight, cluster, clean_db):
    first = incident(clean_db, "KafkaConsumerLagHigh", namespace="production")
    assert reply_of(deliver(tight, first))["type"] == REMEDIATED
    second = incident(clean_db, "EmailServiceDown", namespace="production")
    event = reply_of(deliver(tight, second))
    assert event["type"] == FAILED
    assert actions_of(clean_db, second["id"])[0]["blocked_by"] == "hourly_cap"


def test_cooldown_blocks_the_second_attempt_on_one_target(live, cluster, clean_db):
    first = incident(clean_db, "EmailServiceDown", namespace="production")
    assert reply_of(deliver(live, first))["type"] == REMEDIATED
    second = incident(clean_db, "EmailServiceDown", namespace="production", replica="b")
    event = reply_of(deliver(live, second))
    assert event["type"] == FAILED and "cooldown" in event.data["remediation"]["reason"]
    assert len(cluster.calls("PATCH")) == 1


def test_a_fix_that_does_not_hold_reopens_the_incident_and_ends_with_a_human(live, cluster, clean_db):
    from datetime import datetime

    fired = alert("EmailServiceDown", namespace="production")
    fired = fired.__class__(**{**fired.__dict__, "starts_at": datetime(2026, 11, 27, 10, 0, 0)})
    with clean_db.begin() as conn:
        row_id = svc.record_alerts(conn, [fired], "/test", "am", reopen_window_seconds=1800).outcomes[0].incident_id
        row = mark_diagnosed(conn, row_id)
    assert reply_of(deliver(live, row))["type"] == REMEDIATED

    # AlertManager re-sends the same firing (same startsAt): noted, nothing opened.
    with clean_db.begin() as conn:
        same = svc.record_alerts(conn, [fired], "/test", "am", reopen_window_seconds=1800).outcomes[0]
    assert (same.action, same.incident_id) == ("refreshed", row_id)
    assert status_of(clean_db, row_id) == "resolved"

    # It fires again (a new startsAt): the same incident reopens, a new generation.
    again = fired.__class__(**{**fired.__dict__, "starts_at": datetime(2026, 11, 27, 10, 30, 0)})
    with clean_db.begin() as conn:
        reopened = svc.record_alerts(conn, [again], "/test", "am", reopen_window_seconds=1800)
        row = svc.get_incident(conn, row_id)
    assert (reopened.outcomes[0].action, reopened.outcomes[0].incident_id) == ("reopened", row_id)
    assert (row["status"], row["generation"]) == ("open", 1)
    assert reopened.event_ids == [f"{row_id}.opened.1"]

    # Its opening diagnosed, the new generation's remediation meets the
    # cooldown: a human gets it, not a loop.
    with clean_db.begin() as conn:
        row = mark_diagnosed(conn, row_id)
    event = reply_of(deliver(live, row))
    assert event["type"] == FAILED and "cooldown" in event.data["remediation"]["reason"]
    assert len(cluster.calls("PATCH")) == 1
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar() == 1
        kept = svc.get_incident(conn, row_id)["remediation_actions"]
    # The history is kept, each record stamped with the generation it was taken under.
    assert [(a["action"], a["success"], a["generation"], a["root_generation"]) for a in kept] == [
        ("rollout_restart", True, 0, 0), ("rollout_restart", False, 1, 0)]


def test_redelivery_after_completion_replies_the_same_without_acting(live, cluster, clean_db):
    row = incident(clean_db, "EmailServiceDown", namespace="production")
    first = deliver(live, row)
    again = deliver(live, row)
    assert again.status_code == 200 and again.headers["ce-id"] == first.headers["ce-id"]
    assert again.headers["ce-type"] == first.headers["ce-type"]
    assert len(cluster.calls("PATCH")) == 1


@pytest.mark.parametrize("status", [403, 409, "hang", "trickle"])
def test_failing_kubernetes_call_is_recorded_and_leads_to_remediation_failed(live, cluster, clean_db, status):
    # "trickle": the answer to the PATCH comes a byte every 0.2 s; the
    # client's own timeout bounded each read only, and the action (and its
    # claim) was held for as long as it went on.
    cluster.fail("PATCH", r"/scale$", status)
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production")
    event = reply_of(deliver(live, row))
    assert event["type"] == FAILED
    (record,) = actions_of(clean_db, row["id"])
    assert record["success"] is False and record["error"]
    if status == "trickle":
        assert record["error"].startswith("ReadTimeoutError") and "timed out" in record["error"], record["error"]
    elif status != "hang":
        assert str(status) in record["error"]
    assert status_of(clean_db, row["id"]) == "investigating"


def test_resolved_incident_is_never_remediated(live, cluster, clean_db):
    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production")
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "t", "/test")
    response = deliver(live, row)
    assert response.status_code == 202 and cluster.requests == []
    assert actions_of(clean_db, row["id"]) == []


def test_no_playbook_is_remediation_failed(live, cluster, clean_db):
    row = incident(clean_db, "SomethingNobodyWroteAPlaybookFor", namespace="production")
    event = reply_of(deliver(live, row))
    assert event["type"] == FAILED and "no playbook" in event.data["remediation"]["reason"]


# Every shipped scenario, in dry-run: the playbook is found, its parameters
# render from a realistic alert of that name, and the rails let it through.
SCENARIOS = {
    "KafkaConsumerLagHigh": {"namespace": "production"},
    "PostgreSQLConnectionsHigh": {"namespace": "production"},
    "DiskSpaceLow": {"namespace": "production", "node": "node-7"},
    "EmailServiceDown": {"namespace": "production"},
    "KubePodCrashLooping": {"namespace": "production", "pod": "email-service-b", "container": "app"},
    "KubePodNotReady": {"namespace": "production", "pod": "email-service-a"},
    "KubeDeploymentReplicasMismatch": {"namespace": "production", "deployment": "billing"},
    "KubeDeploymentRolloutStuck": {"namespace": "production", "deployment": "billing"},
    "HighMemoryUsage": {"namespace": "production", "deployment": "billing"},
    "ContainerOOMKilled": {"namespace": "production", "pod": "email-service-b"},
    "PodEvicted": {"namespace": "production"},
    "KubeJobFailed": {"namespace": "production", "job_name": "report"},
    "KubeNodeNotReady": {"node": "node-7"},
    "NodeNotReady": {"node": "node-7"},
    "NodeFilesystemSpaceFillingUp": {"namespace": "production", "instance": "node-7:9100", "mountpoint": "/"},
    "HighErrorRate": {"service": "email"},
    "CertificateExpiringSoon": {"service": "email"},
    "KubeContainerWaiting": {"namespace": "production", "pod": "email-service-b"},
    "KubeHpaMaxedOut": {"namespace": "production", "horizontalpodautoscaler": "email"},
    "KubePersistentVolumeFillingUp": {"namespace": "production", "persistentvolumeclaim": "data"},
    "TargetDown": {"job": "email"},
}


def test_every_shipped_playbook_has_a_scenario():
    assert {p.alertname for p in pb.load()} == set(SCENARIOS)
    assert len(SCENARIOS) > 12


@pytest.mark.parametrize("alert_name", sorted(SCENARIOS))
def test_shipped_scenario_runs_in_dry_run(dry, cluster, clean_db, alert_name):
    playbook = pb.find(pb.load(), alert_name, SCENARIOS[alert_name])
    row = incident(clean_db, alert_name, **SCENARIOS[alert_name])
    event = reply_of(deliver(dry, row))
    records = actions_of(clean_db, row["id"])
    assert [r["action"] for r in records] == [s.action for s in playbook.steps]
    assert all(r["success"] and r["dry_run"] for r in records), records
    assert event["type"] == FAILED
    assert not cluster.calls("PATCH") and not cluster.calls("DELETE") and not cluster.calls("POST")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({}, "'playbooks' list"),
        ({"playbooks": [{"match": {"alertname": "A"}, "actions": [{"action": "escalate"}]}]}, "field 'name'"),
        ({"playbooks": [{"name": "x", "actions": [{"action": "escalate"}]}]}, "playbook 'x': field 'match.alertname'"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": []}]}, "field 'actions'"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "reboot_cluster"}]}]}, "unknown action 'reboot_cluster'"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "scale_deployment", "params": {"namespace": "a", "name": "b"}}]}]}, "field 'replicas': required"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "scale_deployment", "params": {"namespace": "a", "name": "b", "replicas": "many"}}]}]}, "field 'replicas'"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "scale_deployment", "params": {"namespace": "a", "name": "b", "replicas": 0}}]}]}, "field 'replicas'"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "escalate", "params": {"colour": "red"}}]}]}, "field 'colour'"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A", "labels": ["sev~~x"]}, "actions": [{"action": "escalate"}]}]}, "matcher 'sev~~x'"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A", "labels": ["sev=~("]}, "actions": [{"action": "escalate"}]}]}, "bad regex"),
        ({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "escalate"}]}] * 2}, "used twice"),
    ],
)
def test_invalid_playbooks_are_refused_naming_file_playbook_and_field(spec, message):
    with pytest.raises(pb.PlaybookError) as err:
        pb.parse(spec, "custom.yaml")
    assert str(err.value).startswith("custom.yaml") and message in str(err.value)


def test_label_matchers_select_the_playbook():
    books = pb.parse({"playbooks": [
        {"name": "prod", "match": {"alertname": "A", "labels": ["namespace=~prod.*", "team!=payments"]}, "actions": [{"action": "escalate"}]},
        {"name": "any", "match": {"alertname": "A"}, "actions": [{"action": "escalate"}]},
    ]}, "x.yaml")
    assert pb.find(books, "A", {"namespace": "production"}).name == "prod"
    assert pb.find(books, "A", {"namespace": "production", "team": "payments"}).name == "any"
    assert pb.find(books, "A", {"namespace": "preprod"}).name == "any"
    assert pb.find(books, "B", {}) is None


def test_bad_playbooks_file_stops_the_function_with_one_line(base_env, tmp_path):
    bad = tmp_path / "playbooks.yaml"
    bad.write_text(json.dumps({"playbooks": [{"name": "x", "match": {"alertname": "A"}, "actions": [{"action": "nope"}]}]}))
    proc = FunctionProcess("remediation", {**base_env, "PLAYBOOKS_FILE": str(bad)})
    with pytest.raises(RuntimeError) as err:
        proc.start(timeout=20)
    assert "PLAYBOOKS_FILE" in str(err.value) and "unknown action 'nope'" in str(err.value)


def test_dry_run_without_kubernetes_records_the_intent(base_env, clean_db):
    env = {**base_env, "KUBECONFIG": "/nonexistent", "REMEDIATION_MODE": "dry-run", "REMEDIATION_ALLOWED_NAMESPACES": "production"}
    proc = FunctionProcess("remediation", env).start()
    try:
        row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production")
        event = reply_of(deliver(proc, row))
        (record,) = actions_of(clean_db, row["id"])
        assert record["success"] and record["dry_run"] and "'replicas': 6" in record["note"]
        assert event["type"] == FAILED
    finally:
        proc.stop()


def test_a_claim_whose_holder_died_is_taken_over_after_the_playbooks_worst_case_not_half_an_hour(live, cluster, clean_db):
    from functions.remediation.handler import claim_stale_seconds

    settings = load_settings(live.env)
    bound = claim_stale_seconds(settings, pb.load(settings.playbooks_file))
    assert bound < 600  # well inside what reconciliation re-emits within
    row = incident(clean_db, "EmailServiceDown", namespace="production")
    with clean_db.begin() as conn:  # a remediation process that died holding the claim, just over the bound ago
        conn.execute(sa.text("INSERT INTO work_claims (key, incident_id, claimed_at) "
                             "VALUES (:key, :id, timezone('utc', now()) - make_interval(secs => :age))"),
                     {"key": f"remediation:{row['id']}:{row['generation']}", "id": row["id"], "age": bound + 5})
    assert reply_of(deliver(live, row))["type"].endswith("remediated")
    assert len(cluster.calls("PATCH")) == 1


def test_a_playbook_that_requires_approval_proposes_even_in_live_mode(live, cluster, clean_db):
    row = incident(clean_db, "KubeDeploymentRolloutStuck", namespace="production", deployment="billing")
    event = reply_of(deliver(live, row))
    assert event["type"] == FAILED
    remediation = event.data["remediation"]
    assert remediation["reason"].startswith("awaiting approval: rollback_deployment production/billing")
    assert remediation["proposal"]["status"] == "pending" and remediation["proposal"]["url"] in remediation["reason"]
    assert not cluster.calls("PATCH") and actions_of(clean_db, row["id"]) == []
    from shared import proposals

    with clean_db.connect() as conn:
        (proposal,) = proposals.of_incident(conn, row["id"])
    (preview,) = proposal["preview"]
    assert (preview["from"], preview["to"], preview["dry_run"]) == (2, 1, True)
    assert preview["images"] == {"from": ["registry.local/app:1"], "to": ["registry.local/billing:1"]}
    assert status_of(clean_db, row["id"]) == "investigating"


def test_an_action_over_the_blast_radius_is_blocked_and_recorded(live, cluster, clean_db):
    cluster.pods.extend(pod(f"batch-{i}", {"app": "batch"}, phase="Failed", reason="Evicted") for i in range(3, 12))
    row = incident(clean_db, "PodEvicted", namespace="production")
    event = reply_of(deliver(live, row))
    assert event["type"] == FAILED
    (record,) = actions_of(clean_db, row["id"])
    assert record["blocked_by"] == "blast_radius" and "REMEDIATION_MAX_PODS_DELETED allows 10" in record["error"]
    assert not cluster.calls("DELETE")
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT blocked_by FROM remediation_runs WHERE incident_id = :i"), {"i": row["id"]}).scalar() == "blast_radius"


def test_a_run_a_person_reopened_the_incident_during_resolves_only_its_own_generation(live, cluster, clean_db):
    """The playbook is scaling generation 0 when a person resolves the
    incident by hand and reopens it (generation 1: they think the fix did
    not hold). The run then succeeds: its outcome is generation 0's, and
    the generation the person reopened stays theirs, investigating."""
    import threading

    from loopback.processes import wait_until

    row = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", severity="warning")
    cluster.released.clear()
    cluster.fail("PATCH", "/deployments/email-service/scale$", "hold")
    answer = {}
    running = threading.Thread(target=lambda: answer.setdefault("response", deliver(live, row)))
    running.start()
    try:
        wait_until(lambda: cluster.calls("PATCH", "/scale"), 30, message="the scale under way")
        with clean_db.begin() as conn:
            svc.transition(conn, row["id"], "resolved", "test", "/test")
            svc.transition(conn, row["id"], "investigating", "test", "/test")
    finally:
        cluster.released.set()
        running.join(60)
    event = reply_of(answer["response"])
    assert event["type"] == REMEDIATED and event["id"] == f"{row['id']}.remediated.0"
    with clean_db.connect() as conn:
        now = svc.get_incident(conn, row["id"])
        results = [t["details"]["generation"] for t in svc.get_timeline(conn, row["id"]) if t["kind"] == "remediation_result"]
    assert (now["generation"], now["status"], now["resolved_by"]) == (1, "investigating", None)
    assert results == [0]
    # The scale was taken under generation 0: a message about generation 1 does not list it.
    assert [(a["action"], a["generation"], a["root_generation"]) for a in now["remediation_actions"]] == [("scale_deployment", 0, 0)]
