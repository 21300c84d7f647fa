"""Every remediation rail, each in a test that fails when that rail is
switched off: in-process against the real PostgreSQL (fast enough for the
mutation run), then through a real remediation process whose loopback
Kubernetes API can hold a request, so that two incidents overlap for certain."""

from __future__ import annotations

import os
import threading

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from functions.remediation import rails
from functions.remediation.actions import ActionContext, ScaleParams, TargetRef, scale_deployment
from shared import events, kube as kube_module
from shared import incidents as svc
from shared.config import load_settings
from tests.factories import alert
from tests.fake_kube import FakeKubernetes, deployment
from tests.holding import HoldingKubernetes
from tests.processes import FunctionProcess, wait_until

DEPLOYMENT = TargetRef("deployment", "email-service", "production")


def settings(database_url, **env):
    base = {"DATABASE_URL": database_url, "REMEDIATION_ALLOWED_NAMESPACES": "production,kube-system"}
    return load_settings({**base, **{k.upper(): str(v) for k, v in env.items()}})


def new_incident(engine, name="RailProbe", **labels) -> str:
    with engine.begin() as conn:
        return svc.record_alerts(conn, [alert(name, **labels)], "/test", "test").outcomes[0].incident_id


def judge(engine, config, action="rollout_restart", target=DEPLOYMENT, dry_run=False):
    with engine.begin() as conn:
        return rails.judge(conn, config, action, target, dry_run)


def record(engine, incident_id, action="rollout_restart", target=DEPLOYMENT, dry_run=False, blocked_by=None, age_seconds=0):
    with engine.begin() as conn:
        run_id = rails.runs.record(conn, incident_id, action, str(target), dry_run, blocked_by, "x" if blocked_by else "")
        if age_seconds:
            conn.execute(
                sa.text("UPDATE remediation_runs SET started_at = started_at - make_interval(secs => :s) WHERE id = :id"),
                {"s": age_seconds, "id": run_id},
            )
    return run_id


# --------------------------------------------------------------------------- the judge


def test_denied_targets_block_even_inside_an_allowed_namespace(database_url, clean_db):
    config = settings(database_url)
    assert config.remediation_denied_targets == ("kube-system/*",)
    verdict = judge(clean_db, config, target=TargetRef("deployment", "coredns", "kube-system"))
    assert verdict.blocked_by == "denied_target" and "kube-system/*" in verdict.reason and "kube-system/coredns" in verdict.reason
    assert judge(clean_db, config).blocked_by is None


def test_a_denied_pattern_names_one_workload_and_spares_the_others(database_url, clean_db):
    config = settings(database_url, remediation_denied_targets="production/payments-*,kube-system/*")
    assert judge(clean_db, config, target=TargetRef("deployment", "payments-api", "production")).blocked_by == "denied_target"
    assert judge(clean_db, config, target=TargetRef("deployment", "email-service", "production")) == rails.ALLOWED


def test_node_actions_need_the_opt_in(database_url, clean_db):
    node = TargetRef("node", "node-7")
    off = judge(clean_db, settings(database_url), "cordon_node", node)
    assert off.blocked_by == "node_actions_disabled" and "REMEDIATION_ALLOW_NODE_ACTIONS" in off.reason
    assert judge(clean_db, settings(database_url, remediation_allow_node_actions="true"), "cordon_node", node) == rails.ALLOWED


def test_node_opt_in_does_not_open_denied_nodes(database_url, clean_db):
    config = settings(database_url, remediation_allow_node_actions="true", remediation_denied_targets="control-plane-*")
    assert judge(clean_db, config, "cordon_node", TargetRef("node", "control-plane-1")).blocked_by == "denied_target"


def test_namespace_allow_list(database_url, clean_db):
    config = settings(database_url)
    verdict = judge(clean_db, config, target=TargetRef("deployment", "email-service", "staging"))
    assert verdict.blocked_by == "namespace_allow_list" and "staging" in verdict.reason and "production, kube-system" in verdict.reason
    nobody = settings(database_url, remediation_allowed_namespaces="")
    assert "(none)" in judge(clean_db, nobody).reason
    # Cluster-scoped targets have no namespace to check.
    assert judge(clean_db, nobody, "terminate_idle_db_connections", TargetRef("database", "REMEDIATION_DB_DSN")) == rails.ALLOWED


def test_cooldown_blocks_a_recent_live_run_on_the_same_action_and_target(database_url, clean_db):
    config = settings(database_url, remediation_cooldown_seconds=900)
    record(clean_db, new_incident(clean_db))
    verdict = judge(clean_db, config)
    assert verdict.blocked_by == "cooldown" and "900s" in verdict.reason and "production/email-service" in verdict.reason
    assert judge(clean_db, config, "scale_deployment") == rails.ALLOWED
    assert judge(clean_db, config, target=TargetRef("deployment", "billing", "production")) == rails.ALLOWED


def test_cooldown_counts_only_live_unblocked_runs_within_the_window(database_url, clean_db):
    config = settings(database_url, remediation_cooldown_seconds=900)
    incident_id = new_incident(clean_db)
    record(clean_db, incident_id, dry_run=True)
    record(clean_db, incident_id, blocked_by="hourly_cap")
    record(clean_db, incident_id, age_seconds=901)
    assert judge(clean_db, config) == rails.ALLOWED
    record(clean_db, incident_id, age_seconds=880)
    assert judge(clean_db, config).blocked_by == "cooldown"
    assert judge(clean_db, settings(database_url, remediation_cooldown_seconds=0)) == rails.ALLOWED


def test_hourly_cap_counts_live_unblocked_runs_of_the_last_hour(database_url, clean_db):
    config = settings(database_url, remediation_max_actions_per_hour=2, remediation_cooldown_seconds=0)
    incident_id = new_incident(clean_db)
    record(clean_db, incident_id, dry_run=True)
    record(clean_db, incident_id, blocked_by="cooldown")
    record(clean_db, incident_id, age_seconds=3700)
    record(clean_db, incident_id, target=TargetRef("deployment", "a", "production"))
    assert judge(clean_db, config) == rails.ALLOWED
    record(clean_db, incident_id, target=TargetRef("deployment", "b", "production"))
    verdict = judge(clean_db, config)
    assert verdict.blocked_by == "hourly_cap" and "2 live actions" in verdict.reason and "(2)" in verdict.reason
    # The cap limits changes; a dry-run changes nothing.
    assert judge(clean_db, config, dry_run=True) == rails.ALLOWED


def test_a_human_is_never_blocked(database_url, clean_db):
    config = settings(database_url, remediation_max_actions_per_hour=0, remediation_denied_targets="*")
    incident_id = new_incident(clean_db)
    human = TargetRef("human", "on-call")
    record(clean_db, incident_id, "escalate", human)
    assert judge(clean_db, config, "escalate", human) == rails.ALLOWED


def test_judge_and_record_keeps_the_verdict(database_url, clean_db):
    config = settings(database_url)
    incident_id = new_incident(clean_db)
    with clean_db.begin() as conn:
        verdict, run_id = rails.judge_and_record(conn, config, incident_id, "rollout_restart", TargetRef("deployment", "x", "staging"), False)
    with clean_db.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM remediation_runs WHERE id = :i"), {"i": run_id}).mappings().one()
    assert verdict.blocked_by == "namespace_allow_list"
    assert (row["incident_id"], row["action"], row["target"], row["dry_run"], row["blocked_by"]) == (
        incident_id, "rollout_restart", "staging/x", False, "namespace_allow_list")
    assert row["details"] == {"reason": verdict.reason}
    with clean_db.begin() as conn:
        rails.finish(conn, run_id, True)
        assert conn.execute(sa.text("SELECT success FROM remediation_runs WHERE id = :i"), {"i": run_id}).scalar() is True


def _waiting_on_advisory_lock(engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")).scalar())


def test_the_lock_makes_a_racing_judge_see_the_first_record(database_url, clean_db):
    """The first incident holds the lock, judged and recorded but not yet
    committed; the second must wait for it, then see its run and stop."""
    config = settings(database_url, remediation_max_actions_per_hour=1, remediation_cooldown_seconds=0)
    first, second = new_incident(clean_db), new_incident(clean_db, "RailProbe2")
    verdicts, errors = [], []

    def racer():
        try:
            with clean_db.begin() as conn:
                verdicts.append(rails.judge_and_record(conn, config, second, "scale_deployment", DEPLOYMENT, False)[0])
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    with clean_db.begin() as conn:
        verdict, _ = rails.judge_and_record(conn, config, first, "rollout_restart", DEPLOYMENT, False)
        assert verdict == rails.ALLOWED
        thread = threading.Thread(target=racer)
        thread.start()
        # Either it queues behind the lock, or (without the lock) it has
        # already judged without seeing the first run: both end the wait.
        wait_until(lambda: _waiting_on_advisory_lock(clean_db) or not thread.is_alive(), 10, message="the racer to reach the lock")
    thread.join(10)
    assert not errors, errors
    assert [v.blocked_by for v in verdicts] == ["hourly_cap"]


# --------------------------------------------------------------------------- scale_deployment


@pytest.fixture
def kube_api(tmp_path):
    server = FakeKubernetes().start()
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(server.kubeconfig(tmp_path))
    kube_module.reset()
    yield server
    server.stop()
    if saved is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = saved
    kube_module.reset()


def scale(database_url, replicas, dry_run=False, **env):
    config = settings(database_url, remediation_max_replicas=env.pop("ceiling", 20), probe_timeout_seconds=5)
    ctx = ActionContext(config, {"id": "x"}, dry_run, verify_timeout=5, poll_interval=0.05)
    return scale_deployment(ctx, ScaleParams(namespace="production", name="email-service", replicas=replicas))


@pytest.mark.parametrize("current, requested", [(10, 6), (6, 6)])
def test_scale_deployment_never_scales_down(database_url, kube_api, current, requested):
    kube_api.add_deployment(deployment("email-service", current))
    outcome = scale(database_url, requested)
    assert (outcome.before, outcome.after) == (current, current) and f"already at {current}" in outcome.details["note"]
    assert kube_api.calls("PATCH") == []
    assert kube_api.deployments[("production", "email-service")]["spec"]["replicas"] == current


def test_scale_deployment_scales_up_and_waits_for_ready(database_url, kube_api):
    kube_api.add_deployment(deployment("email-service", 1))
    kube_api.rollout_delay = 0.3
    outcome = scale(database_url, 3)
    assert (outcome.before, outcome.after, outcome.details) == (1, 3, {})
    (patch,) = kube_api.calls("PATCH", "/scale")
    assert patch.json() == {"spec": {"replicas": 3}} and patch.headers["content-type"] == "application/merge-patch+json"
    assert kube_api.deployments[("production", "email-service")]["status"]["readyReplicas"] == 3


def test_scale_deployment_stops_at_the_ceiling(database_url, kube_api):
    kube_api.add_deployment(deployment("email-service", 1))
    outcome = scale(database_url, 9, ceiling=4)
    assert (outcome.before, outcome.after, outcome.details) == (1, 4, {"requested": 9, "ceiling": 4})
    assert kube_api.calls("PATCH", "/scale")[0].json() == {"spec": {"replicas": 4}}
    # At the ceiling already: nothing to do, and never down to it.
    kube_api.add_deployment(deployment("email-service", 7))
    outcome = scale(database_url, 9, ceiling=4)
    assert (outcome.before, outcome.after) == (7, 7) and len(kube_api.calls("PATCH")) == 1


def test_scale_deployment_in_dry_run_reads_and_changes_nothing(database_url, kube_api):
    kube_api.add_deployment(deployment("email-service", 1))
    outcome = scale(database_url, 5, dry_run=True)
    assert (outcome.before, outcome.after) == (1, 5)
    assert [r.method for r in kube_api.requests] == ["GET"]


def test_scale_deployment_that_never_gets_ready_fails(database_url, kube_api):
    from functions.remediation.actions import ActionFailed

    kube_api.add_deployment(deployment("email-service", 1))
    kube_api.rollout_delay = 60
    config = settings(database_url, probe_timeout_seconds=5)
    ctx = ActionContext(config, {"id": "x"}, False, verify_timeout=0.3, poll_interval=0.05)
    with pytest.raises(ActionFailed, match="not verified after 0.3s: 1/3 replicas ready"):
        scale_deployment(ctx, ScaleParams(namespace="production", name="email-service", replicas=3))


# --------------------------------------------------------------------------- through the function


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
        svc.mark_investigating(conn, incident_id, "diagnostics")
        return svc.get_incident(conn, incident_id)


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
