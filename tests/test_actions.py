"""Each remediation action in-process against the loopback Kubernetes API:
what it reads, what it sends, what it verifies, what it refuses. Needs no
database but the one ``terminate_idle_db_connections`` works on, so the
mutation run can use it with ``--noconftest``."""

from __future__ import annotations

import json
import os
import time

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from functions.remediation import actions as act
from functions.remediation.actions import ActionContext, ActionFailed, NotConfigured, TargetRef
from shared import kube as kube_module
from shared.config import load_settings
from loopback.kube import FakeKubernetes, deployment, pod

SERVER_URL = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL") or "postgresql+pg8000://postgres@127.0.0.1:5432/postgres"


def config(**env):
    base = {"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "PROBE_TIMEOUT_SECONDS": "5"}
    return load_settings({**base, **env})


def ctx(dry_run=False, verify_timeout=3.0, **env):
    return ActionContext(config(**env), {"id": "11111111-2222-4333-8444-555555555555"}, dry_run, verify_timeout, poll_interval=0.02)


@pytest.fixture
def k8s(tmp_path):
    server = FakeKubernetes().start()
    with server.as_cluster(tmp_path):
        yield server
    server.stop()


def paths(server, method):
    return [r.path.split("?")[0] for r in server.calls(method)]


# --------------------------------------------------------------------------- registry and targets


def test_registry_names_every_action_with_its_target():
    assert set(act.REGISTRY) == {"scale_deployment", "rollout_restart", "delete_pods", "run_job", "cordon_node",
                                 "terminate_idle_db_connections", "escalate", "rollback_deployment"}
    spec = act.REGISTRY["scale_deployment"]
    params = spec.params(namespace="production", name="email", replicas=3)
    assert spec.target(params) == TargetRef("deployment", "email", "production") and str(spec.target(params)) == "production/email"
    assert str(act.REGISTRY["cordon_node"].target(act.NodeParams(node="n1"))) == "n1"
    job = act.REGISTRY["run_job"].target(act.RunJobParams(namespace="ops", name_prefix="clean", template={}))
    assert (job.kind, str(job)) == ("job", "ops/clean-*")
    assert act.REGISTRY["terminate_idle_db_connections"].target(act.IdleConnectionsParams()) == TargetRef("database", "REMEDIATION_DB_DSN")
    assert act.REGISTRY["escalate"].target(act.EscalateParams()).kind == "human"
    pods = act.REGISTRY["delete_pods"].target
    assert str(pods(act.DeletePodsParams(namespace="p", pod="x", selector="app=y"))) == "p/x"
    assert str(pods(act.DeletePodsParams(namespace="p", selector="app=y"))) == "p/app=y"
    assert str(pods(act.DeletePodsParams(namespace="p"))) == "p/*"


@pytest.mark.parametrize("model, fields", [
    (act.ScaleParams, {"namespace": "p", "name": "d", "replicas": 0}),
    (act.ScaleParams, {"namespace": "p", "name": "d", "replicas": 1001}),
    (act.ScaleParams, {"namespace": "", "name": "d", "replicas": 1}),
    (act.ScaleParams, {"namespace": "p", "name": "d", "replicas": 1, "force": True}),
    (act.DeletePodsParams, {"namespace": "p", "max_pods": 0}),
    (act.DeletePodsParams, {"namespace": "p", "max_pods": 101}),
    (act.RunJobParams, {"namespace": "p", "name_prefix": "Bad_Name", "template": {}}),
    (act.RunJobParams, {"namespace": "p", "name_prefix": "x" * 41, "template": {}}),
    (act.IdleConnectionsParams, {"idle_seconds": 0}),
    (act.IdleConnectionsParams, {"max_connections": 0}),
    (act.EscalateParams, {"reason": "x" * 501}),
    (act.DeploymentParams, {"namespace": "p", "name": "x" * 254}),
    (act.DeletePodsParams, {"namespace": "x" * 64}),
    (act.DeletePodsParams, {"namespace": ""}),
    (act.RunJobParams, {"namespace": "x" * 64, "name_prefix": "a", "template": {}}),
    (act.RunJobParams, {"namespace": "p", "name_prefix": "", "template": {}}),
    (act.NodeParams, {"node": ""}),
    (act.NodeParams, {"node": "x" * 254}),
    (act.DeploymentParams, {"namespace": "x" * 64, "name": "d"}),
    (act.RunJobParams, {"namespace": "", "name_prefix": "a", "template": {}}),
    (act.IdleConnectionsParams, {"max_connections": 1001}),
])
def test_parameters_out_of_range_are_refused(model, fields):
    with pytest.raises(ValidationError):
        model(**fields)


@pytest.mark.parametrize("model, fields", [
    (act.ScaleParams, {"namespace": "p", "name": "d", "replicas": 1}),
    (act.ScaleParams, {"namespace": "p", "name": "d", "replicas": 1000}),
    (act.DeletePodsParams, {"namespace": "p", "max_pods": 100}),
    (act.RunJobParams, {"namespace": "p", "name_prefix": "x" * 40, "template": {}}),
    (act.EscalateParams, {"reason": "x" * 500}),
    (act.DeploymentParams, {"namespace": "x" * 63, "name": "x" * 253}),
    (act.DeploymentParams, {"namespace": "p", "name": "x"}),
    (act.DeletePodsParams, {"namespace": "x" * 63, "max_pods": 1}),
    (act.RunJobParams, {"namespace": "x" * 63, "name_prefix": "a", "template": {}}),
    (act.NodeParams, {"node": "x"}),
    (act.NodeParams, {"node": "x" * 253}),
    (act.IdleConnectionsParams, {"max_connections": 1}),
    (act.IdleConnectionsParams, {"max_connections": 1000}),
])
def test_parameters_at_the_limits_are_accepted(model, fields):
    model(**fields)


def test_defaults():
    p = act.DeletePodsParams(namespace="p")
    assert p.reasons == ["CrashLoopBackOff", "Evicted", "Failed"] and p.max_pods == 10
    i = act.IdleConnectionsParams()
    assert (i.idle_seconds, i.application_names, i.users, i.max_connections) == (600, [], [], 50)
    assert act.EscalateParams().reason == "this alert needs a human"


def test_denied_matches_case_sensitively_and_returns_the_pattern():
    patterns = ("kube-system/*", "production/payments-?")
    assert act.denied(TargetRef("deployment", "dns", "kube-system"), patterns) == "kube-system/*"
    assert act.denied(TargetRef("deployment", "payments-1", "production"), patterns) == "production/payments-?"
    assert act.denied(TargetRef("deployment", "payments-10", "production"), patterns) is None
    assert act.denied(TargetRef("deployment", "dns", "Kube-System"), patterns) is None
    assert act.denied(TargetRef("deployment", "dns", "kube-system"), ()) is None


def test_kubernetes_not_configured_is_its_own_failure(tmp_path):
    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(tmp_path / "missing")
    kube_module.reset()
    try:
        with pytest.raises(NotConfigured, match="Kubernetes is not configured .*missing"):
            act.rollout_restart(ctx(), act.DeploymentParams(namespace="p", name="d"))
        assert issubclass(NotConfigured, ActionFailed)
    finally:
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved
        kube_module.reset()


def test_api_errors_become_action_failures_with_status_and_message(k8s):
    k8s.add_deployment(deployment("web", 1))
    k8s.fail("GET", r"/deployments/web/scale$", 403)
    with pytest.raises(ActionFailed) as err:
        act.scale_deployment(ctx(), act.ScaleParams(namespace="production", name="web", replicas=3))
    assert str(err.value) == "Kubernetes API 403 Forbidden: injected 403"
    with pytest.raises(ActionFailed, match=r'^Kubernetes API 404 Not Found: deployments.apps "nope" not found$'):
        act.rollout_restart(ctx(), act.DeploymentParams(namespace="production", name="nope"))


def test_an_api_answer_whose_body_is_not_a_status_is_told_by_its_status_line(k8s):
    k8s.add_deployment(deployment("web", 1))
    k8s.server.responder = lambda req: (500, {"Content-Type": "text/plain"}, b"not json")
    with pytest.raises(ActionFailed, match=r"^Kubernetes API 500 Internal Server Error$"):
        act.rollout_restart(ctx(), act.DeploymentParams(namespace="production", name="web"))


def test_an_error_without_an_http_status_is_named_by_its_type_and_cut_to_300_characters(k8s):
    # The API server is gone: the client's connection error has no status.
    k8s.stop()
    with pytest.raises(ActionFailed) as err:
        act.rollout_restart(ctx(PROBE_TIMEOUT_SECONDS="1"), act.DeploymentParams(namespace="production", name="web-" + "x" * 55))
    text = str(err.value)
    assert text.startswith("MaxRetryError: HTTPConnectionPool(host='127.0.0.1'") and "web-xxxx" in text and len(text) == 300, text


# --------------------------------------------------------------------------- scale_deployment: never down, never above the ceiling


def scale(replicas, dry_run=False, ceiling=20):
    return act.scale_deployment(ctx(dry_run, REMEDIATION_MAX_REPLICAS=str(ceiling)),
                                act.ScaleParams(namespace="production", name="email-service", replicas=replicas))


@pytest.mark.parametrize("current, requested", [(10, 6), (6, 6)])
def test_scale_deployment_never_scales_down(k8s, current, requested):
    k8s.add_deployment(deployment("email-service", current))
    outcome = scale(requested)
    assert (outcome.before, outcome.after) == (current, current) and f"already at {current}" in outcome.details["note"]
    assert k8s.calls("PATCH") == []
    assert k8s.deployments[("production", "email-service")]["spec"]["replicas"] == current


def test_scale_deployment_scales_up_and_waits_for_ready(k8s):
    k8s.add_deployment(deployment("email-service", 1))
    k8s.rollout_delay = 0.1
    outcome = scale(3)
    assert (outcome.before, outcome.after, outcome.details) == (1, 3, {})
    (patch,) = k8s.calls("PATCH", "/scale")
    assert patch.json() == {"spec": {"replicas": 3}} and patch.headers["content-type"] == "application/merge-patch+json"
    assert k8s.deployments[("production", "email-service")]["status"]["readyReplicas"] == 3


def test_revert_scale_returns_to_the_recorded_count_and_leaves_it_when_already_there(k8s):
    """The one scale-down remediation makes: undoing its own scale-up after
    a verification failed."""
    k8s.add_deployment(deployment("email-service", 6))
    target = act.DeploymentParams(namespace="production", name="email-service")
    outcome = act.revert_scale(ctx(), target, 2)
    assert (outcome.target, outcome.before, outcome.after) == ("email-service", 6, 2)
    assert [p.json() for p in k8s.calls("PATCH", "/scale")] == [{"spec": {"replicas": 2}}]
    assert k8s.deployments[("production", "email-service")]["spec"]["replicas"] == 2
    # Already at the recorded count: nothing is sent.
    assert (act.revert_scale(ctx(), target, 2).before, len(k8s.calls("PATCH"))) == (2, 1)


def test_revert_scale_also_scales_back_up_to_the_recorded_count(k8s):
    # Scaled down by someone after the action: the revert restores the
    # recorded count, whichever side of it the deployment is on.
    k8s.add_deployment(deployment("email-service", 1))
    target = act.DeploymentParams(namespace="production", name="email-service")
    assert (act.revert_scale(ctx(), target, 3).before, act.revert_scale(ctx(), target, 3).before) == (1, 3)
    assert [p.json() for p in k8s.calls("PATCH", "/scale")] == [{"spec": {"replicas": 3}}]


def test_revert_scale_reads_a_deployment_scaled_to_zero_as_zero(k8s):
    k8s.add_deployment(deployment("email-service", 0))
    target = act.DeploymentParams(namespace="production", name="email-service")
    assert act.revert_scale(ctx(), target, 0).before == 0
    assert not k8s.calls("PATCH")


def test_scale_deployment_stops_at_the_ceiling(k8s):
    k8s.add_deployment(deployment("email-service", 1))
    outcome = scale(9, ceiling=4)
    assert (outcome.before, outcome.after, outcome.details) == (1, 4, {"requested": 9, "ceiling": 4})
    assert k8s.calls("PATCH", "/scale")[0].json() == {"spec": {"replicas": 4}}
    # At the ceiling already: nothing to do, and never down to it.
    k8s.add_deployment(deployment("email-service", 7))
    outcome = scale(9, ceiling=4)
    assert (outcome.before, outcome.after) == (7, 7) and len(k8s.calls("PATCH")) == 1


def test_scale_deployment_in_dry_run_reads_and_changes_nothing(k8s):
    k8s.add_deployment(deployment("email-service", 1))
    outcome = scale(5, dry_run=True)
    assert (outcome.before, outcome.after) == (1, 5)
    assert [r.method for r in k8s.requests] == ["GET"]


def test_scale_deployment_that_never_gets_ready_fails(k8s):
    k8s.add_deployment(deployment("email-service", 1))
    k8s.rollout_delay = 60
    with pytest.raises(ActionFailed, match="^not verified after 0.1s: 1/3 replicas ready$"):
        act.scale_deployment(ctx(verify_timeout=0.1), act.ScaleParams(namespace="production", name="email-service", replicas=3))


# --------------------------------------------------------------------------- rollout_restart


def test_rollout_restart_bumps_the_annotation_and_waits_for_the_rollout(k8s):
    k8s.add_deployment(deployment("web", 2))
    k8s.rollout_delay = 0.2
    outcome = act.rollout_restart(ctx(), act.DeploymentParams(namespace="production", name="web"))
    (patch,) = k8s.calls("PATCH")
    assert patch.headers["content-type"] == "application/strategic-merge-patch+json"
    stamp = patch.json()["spec"]["template"]["metadata"]["annotations"][act.RESTARTED_AT]
    assert (outcome.target, outcome.before, outcome.after) == ("web", None, stamp)
    assert time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    assert k8s.deployments[("production", "web")]["status"]["readyReplicas"] == 2


def test_rollout_restart_reports_the_previous_restart(k8s):
    d = deployment("web", 1)
    d["spec"]["template"]["metadata"]["annotations"] = {act.RESTARTED_AT: "2026-01-01T00:00:00Z"}
    k8s.add_deployment(d)
    assert act.rollout_restart(ctx(dry_run=True), act.DeploymentParams(namespace="production", name="web")).before == "2026-01-01T00:00:00Z"
    assert k8s.calls("PATCH") == []


def test_rollout_restart_that_does_not_roll_out_fails(k8s):
    k8s.add_deployment(deployment("web", 2, ready=0))
    k8s.rollout_delay = 60
    with pytest.raises(ActionFailed, match=r"^not verified after 0.1s: generation 2/2, 2 updated, 0/2 ready$"):
        act.rollout_restart(ctx(verify_timeout=0.1), act.DeploymentParams(namespace="production", name="web"))


def test_rollout_restart_waits_for_the_new_generation(k8s):
    """A deployment whose status still shows the old generation is not rolled out."""
    k8s.add_deployment(deployment("web", 1))

    def lagging(method, obj):
        if method == "GET":
            obj["status"]["observedGeneration"] = 1

    k8s.reshape_deployments(lagging)
    with pytest.raises(ActionFailed, match="generation 1/2"):
        act.rollout_restart(ctx(verify_timeout=0.1), act.DeploymentParams(namespace="production", name="web"))


# --------------------------------------------------------------------------- delete_pods


@pytest.fixture
def pods(k8s):
    k8s.pods.extend([
        pod("ok-1", {"app": "web"}),
        pod("loop-1", {"app": "web"}, ready=False, waiting="CrashLoopBackOff"),
        pod("oom-1", {"app": "web"}, terminated="OOMKilled"),
        pod("evicted-1", {"app": "batch"}, phase="Failed", reason="Evicted"),
        pod("failed-1", {"app": "batch"}, phase="Failed"),
        pod("other-ns", {"app": "web"}, ready=False, waiting="CrashLoopBackOff", namespace="staging"),
    ])
    return k8s


def deleted(server):
    return sorted(p.rsplit("/", 1)[1] for p in paths(server, "DELETE"))


def test_delete_pods_deletes_only_matching_pods_in_the_namespace(pods):
    outcome = act.delete_pods(ctx(), act.DeletePodsParams(namespace="production"))
    assert deleted(pods) == ["evicted-1", "failed-1", "loop-1"]
    assert (outcome.target, outcome.before, outcome.after) == ("*", 3, 0)
    assert sorted(outcome.details["pods"]) == ["evicted-1", "failed-1", "loop-1"]
    assert all(p.startswith("/api/v1/namespaces/production/pods/") for p in paths(pods, "DELETE"))


def test_delete_pods_by_selector_reason_and_name(pods):
    act.delete_pods(ctx(), act.DeletePodsParams(namespace="production", selector="app=web", reasons=["OOMKilled"]))
    assert deleted(pods) == ["oom-1"]
    assert "labelSelector=app%3Dweb" in pods.calls("GET")[0].path
    pods.requests.clear()
    outcome = act.delete_pods(ctx(), act.DeletePodsParams(namespace="production", pod="ok-1", reasons=["*"]))
    assert deleted(pods) == ["ok-1"] and outcome.target == "ok-1"


def test_delete_pods_stops_at_max_pods_and_dry_run_deletes_nothing(pods):
    # Three pods of "production" match the default reasons; the cap cuts them to two.
    outcome = act.delete_pods(ctx(dry_run=True), act.DeletePodsParams(namespace="production", max_pods=2))
    assert outcome.before == 2 and len(outcome.details["pods"]) == 2 and pods.calls("DELETE") == []
    act.delete_pods(ctx(), act.DeletePodsParams(namespace="production", max_pods=1))
    assert len(pods.calls("DELETE")) == 1


def test_delete_pods_in_any_state_needs_a_pod_or_a_selector():
    with pytest.raises(ValidationError, match="never a whole namespace"):
        act.DeletePodsParams(namespace="production", reasons=["*"])
    assert act.DeletePodsParams(namespace="production", selector="app=web", reasons=["*"]).selector == "app=web"
    assert act.DeletePodsParams(namespace="production", pod="loop-1", reasons=["*"]).pod == "loop-1"


def test_pods_are_matched_by_phase_status_reason_waiting_reason_and_last_termination(k8s):
    bare = pod("no-status", {"app": "w"})
    del bare["status"]
    k8s.pods.extend([
        pod("failed", {"app": "w"}, phase="Failed"),
        pod("evicted", {"app": "w"}, reason="Evicted"),
        pod("pulling", {"app": "w"}, ready=False, waiting="ImagePullBackOff"),
        pod("errored", {"app": "w"}, terminated="Error"),
        pod("waiting", {"app": "w"}, ready=False, waiting="X"),
        bare,
    ])

    def matching(*reasons):
        return act.delete_pods(ctx(True, REMEDIATION_MAX_PODS_DELETED_SHARE="1"), act.DeletePodsParams(namespace="production", selector="app=w", reasons=list(reasons),
                                                               max_pods=100)).details["pods"]

    assert matching("Failed") == ["failed"]
    assert matching("Evicted") == ["evicted"]
    assert matching("ImagePullBackOff") == ["pulling"]
    assert matching("Error") == ["errored"]
    # A pod without a status matches nothing but "any state".
    assert "no-status" not in matching("Failed", "Evicted", "ImagePullBackOff", "Error", "X", "Running")
    assert "no-status" in matching("*")


# --------------------------------------------------------------------------- run_job


def test_run_job_creates_a_labelled_job_from_the_template(k8s):
    template = {"backoffLimit": 1, "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
    outcome = act.run_job(ctx(), act.RunJobParams(namespace="ops", name_prefix="log-cleanup", template=template))
    (post,) = k8s.calls("POST")
    assert post.path.split("?")[0] == "/apis/batch/v1/namespaces/ops/jobs"
    job = post.json()
    assert job["metadata"]["generateName"] == "log-cleanup-" and job["metadata"]["namespace"] == "ops"
    assert job["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "incident-response",
                                         "incident-response/incident": "11111111-2222-4333-8444-555555555555"}
    assert job["spec"] == {"ttlSecondsAfterFinished": 3600, **template}
    assert (outcome.target, outcome.after, outcome.details) == ("log-cleanup-0", "created", {"job": "log-cleanup-0"})


def test_run_job_in_dry_run_shows_the_job_and_creates_nothing(k8s):
    outcome = act.run_job(ctx(dry_run=True), act.RunJobParams(namespace="ops", name_prefix="x", template={"ttlSecondsAfterFinished": 5}))
    assert k8s.requests == [] and outcome.target == "x-*" and outcome.details["job"]["spec"] == {"ttlSecondsAfterFinished": 5}


# --------------------------------------------------------------------------- cordon_node


def test_cordon_node_marks_it_unschedulable_and_checks(k8s):
    k8s.add_node("n1")
    outcome = act.cordon_node(ctx(), act.NodeParams(node="n1"))
    (patch,) = k8s.calls("PATCH")
    assert patch.json() == {"spec": {"unschedulable": True}} and patch.headers["content-type"] == act.MERGE_PATCH
    assert (outcome.target, outcome.before, outcome.after) == ("n1", False, True)
    assert len(k8s.calls("GET")) == 2


def test_cordon_node_already_cordoned_or_dry_run_sends_nothing(k8s):
    k8s.add_node("n1")
    assert act.cordon_node(ctx(dry_run=True), act.NodeParams(node="n1")).before is False
    k8s.nodes["n1"]["spec"]["unschedulable"] = True
    assert act.cordon_node(ctx(), act.NodeParams(node="n1")).before is True
    assert k8s.calls("PATCH") == []


def test_cordon_that_does_not_stick_fails(k8s):
    k8s.add_node("n1")

    def ignore_patch(req):
        if req.method == "PATCH":
            return 200, {"Content-Type": "application/json"}, json.dumps(k8s.nodes["n1"]).encode()
        return k8s.respond(req)

    k8s.server.responder = ignore_patch
    with pytest.raises(ActionFailed, match="still reports schedulable"):
        act.cordon_node(ctx(), act.NodeParams(node="n1"))


# --------------------------------------------------------------------------- escalate and the database


def test_escalate_changes_nothing_and_carries_the_reason():
    outcome = act.escalate(ctx(), act.EscalateParams(reason="disk"))
    assert (outcome.target, outcome.before, outcome.after, outcome.details) == ("on-call", None, None, {"reason": "disk", "escalate": True})


def test_terminate_idle_db_connections_needs_the_dsn():
    with pytest.raises(NotConfigured, match="REMEDIATION_DB_DSN is not set"):
        act.terminate_idle_db_connections(ctx(), act.IdleConnectionsParams())


def test_terminate_idle_db_connections_filters_and_terminates():
    name = f"victim-{os.getpid()}-{time.monotonic_ns()}"
    victims = sa.create_engine(SERVER_URL, connect_args={"application_name": name}, poolclass=sa.pool.NullPool)
    conns = [victims.connect() for _ in range(3)]
    try:
        for c in conns:
            c.execute(sa.text("SELECT 1"))
            c.commit()
        time.sleep(0.15)
        params = act.IdleConnectionsParams(idle_seconds=0.1, application_names=[name], max_connections=2)
        dry = act.terminate_idle_db_connections(ctx(dry_run=True, REMEDIATION_DB_DSN=SERVER_URL), params)
        assert (dry.before, dry.after, dry.details["terminated"], len(dry.details["pids"])) == (2, 0, 0, 2)
        live = act.terminate_idle_db_connections(ctx(REMEDIATION_DB_DSN=SERVER_URL), params)
        assert (live.before, live.after, live.details["terminated"]) == (2, 0, 2)
        nobody = act.IdleConnectionsParams(idle_seconds=0.1, application_names=[name], users=["no-such-role"])
        assert act.terminate_idle_db_connections(ctx(REMEDIATION_DB_DSN=SERVER_URL), nobody).before == 0
        young = act.IdleConnectionsParams(idle_seconds=3600, application_names=[name])
        assert act.terminate_idle_db_connections(ctx(REMEDIATION_DB_DSN=SERVER_URL), young).before == 0
        alive = []
        for c in conns:
            try:
                c.execute(sa.text("SELECT 1"))
                alive.append(True)
            except Exception:  # noqa: BLE001 - terminated
                alive.append(False)
        assert sorted(alive) == [False, False, True]
    finally:
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass


def test_unreachable_database_is_an_action_failure():
    with pytest.raises(ActionFailed, match="^(OperationalError|InterfaceError): "):
        act.terminate_idle_db_connections(ctx(REMEDIATION_DB_DSN="postgresql+pg8000://u@127.0.0.1:1/db", PROBE_TIMEOUT_SECONDS="0.5"), act.IdleConnectionsParams())



# --------------------------------------------------------------------------- edges the mutation run found


def test_verification_polls_until_ready_within_a_sub_second_timeout(k8s):
    k8s.add_deployment(deployment("email-service", 1))
    k8s.rollout_delay = 0.1
    outcome = act.scale_deployment(ctx(verify_timeout=0.8), act.ScaleParams(namespace="production", name="email-service", replicas=2))
    assert outcome.after == 2 and len(k8s.calls("GET", "/deployments/email-service")) >= 2


def test_a_deployment_scaled_to_zero_is_scaled_up(k8s):
    k8s.add_deployment(deployment("email-service", 0))
    outcome = act.scale_deployment(ctx(), act.ScaleParams(namespace="production", name="email-service", replicas=1))
    assert (outcome.before, outcome.after) == (0, 1) and len(k8s.calls("PATCH")) == 1


def test_restarting_a_deployment_scaled_to_zero_completes(k8s):
    k8s.add_deployment(deployment("web", 0))
    assert act.rollout_restart(ctx(verify_timeout=1), act.DeploymentParams(namespace="production", name="web")).after


def test_large_replica_counts_and_generations_compare_by_value(k8s):
    big = deployment("web", 300)
    big["metadata"]["generation"] = 299
    k8s.add_deployment(big)
    assert act.rollout_restart(ctx(verify_timeout=1), act.DeploymentParams(namespace="production", name="web")).after


def test_one_pod_by_name_is_exactly_that_pod(pods):
    act.delete_pods(ctx(), act.DeletePodsParams(namespace="production", pod="loop-1", reasons=["*"]))
    assert deleted(pods) == ["loop-1"]


def test_a_database_error_is_cut_to_its_first_200_characters():
    missing = SERVER_URL.rsplit("/", 1)[0] + "/no_such_database_" + "x" * 40
    with pytest.raises(ActionFailed) as err:
        act.terminate_idle_db_connections(ctx(REMEDIATION_DB_DSN=missing), act.IdleConnectionsParams())
    kind, _, message = str(err.value).partition(": ")
    assert kind in {"ProgrammingError", "OperationalError", "DatabaseError", "InterfaceError"} and len(message) == 200


def test_the_database_connect_timeout_is_three_probe_timeouts():
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers: only the connect timeout ends the wait
    port = silent.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(ActionFailed):
            act.terminate_idle_db_connections(
                ctx(REMEDIATION_DB_DSN=f"postgresql+pg8000://u@127.0.0.1:{port}/db", PROBE_TIMEOUT_SECONDS="0.2"), act.IdleConnectionsParams())
        assert 0.55 <= time.monotonic() - started < 3
    finally:
        silent.close()


def _surging(k8s, extra=1):
    """Status reports more ready/updated replicas than wanted (a surge, or an
    HPA that scaled further): that is rolled out, not short."""

    def surge(_method, obj):
        if obj.get("status", {}).get("readyReplicas"):
            obj["status"]["readyReplicas"] += extra
            obj["status"]["updatedReplicas"] += extra

    k8s.reshape_deployments(surge)


def test_more_ready_replicas_than_wanted_is_verified(k8s):
    k8s.add_deployment(deployment("web", 2))
    _surging(k8s)
    assert act.scale_deployment(ctx(verify_timeout=0.5), act.ScaleParams(namespace="production", name="web", replicas=3)).after == 3
    assert act.rollout_restart(ctx(verify_timeout=0.5), act.DeploymentParams(namespace="production", name="web")).after


def test_a_deployment_scaled_up_from_zero_is_verified_not_assumed(k8s):
    k8s.add_deployment(deployment("web", 0))
    k8s.rollout_delay = 60
    with pytest.raises(ActionFailed, match="^not verified after 0.1s: 0/1 replicas ready$"):
        act.scale_deployment(ctx(verify_timeout=0.1), act.ScaleParams(namespace="production", name="web", replicas=1))


def test_targets_and_specs_are_values():
    assert len({TargetRef("deployment", "a", "p"), TargetRef("deployment", "a", "p")}) == 1
    assert hash(act.REGISTRY["escalate"]) == hash(act.REGISTRY["escalate"])


def test_the_default_poll_is_half_a_second(k8s):
    k8s.add_deployment(deployment("web", 1))
    k8s.rollout_delay = 0.8
    reads = []

    def timed(req):
        if req.method == "GET" and req.path.split("?")[0].endswith("/deployments/web"):
            reads.append(time.monotonic())
        return k8s.respond(req)

    k8s.server.responder = timed
    context = ActionContext(config(), {"id": "x"}, False, verify_timeout=30)
    assert context.poll_interval == 0.5
    act.scale_deployment(context, act.ScaleParams(namespace="production", name="web", replicas=2))
    # A sleep never ends early: each read comes at least the interval after
    # the one before, however loaded the machine (no upper bound is safe).
    gaps = [b - a for a, b in zip(reads, reads[1:], strict=False)]
    assert len(reads) >= 2 and min(gaps) >= 0.5, gaps


def test_requesting_exactly_the_ceiling_is_not_a_capped_request(k8s):
    k8s.add_deployment(deployment("email-service", 1))
    assert scale(4, ceiling=4).details == {}


def test_scaling_to_hundreds_compares_counts_by_value(k8s):
    k8s.add_deployment(deployment("web", 1))
    context = ctx(REMEDIATION_MAX_REPLICAS="1000", REMEDIATION_MAX_REPLICA_CHANGE="1000")
    assert act.scale_deployment(context, act.ScaleParams(namespace="production", name="web", replicas=300)).after == 300


def _reshape(k8s, change):
    k8s.reshape_deployments(lambda _method, obj: change(obj))


def test_a_deployment_without_status_is_not_ready(k8s):
    k8s.add_deployment(deployment("web", 0))
    _reshape(k8s, lambda obj: obj.pop("status", None))
    with pytest.raises(ActionFailed, match="0/1 replicas ready"):
        act.scale_deployment(ctx(verify_timeout=0.1), act.ScaleParams(namespace="production", name="web", replicas=1))


def test_a_rollout_without_updated_replicas_is_not_done(k8s):
    """A real API server omits zero counts: no updatedReplicas means none."""
    k8s.add_deployment(deployment("web", 1))
    _reshape(k8s, lambda obj: obj["status"].pop("updatedReplicas", None))
    with pytest.raises(ActionFailed, match="0 updated"):
        act.rollout_restart(ctx(verify_timeout=0.1), act.DeploymentParams(namespace="production", name="web"))


def test_a_newer_observed_generation_is_rolled_out(k8s):
    k8s.add_deployment(deployment("web", 1))
    _reshape(k8s, lambda obj: obj["status"].update(observedGeneration=obj["status"]["observedGeneration"] + 1))
    assert act.rollout_restart(ctx(verify_timeout=0.5), act.DeploymentParams(namespace="production", name="web")).after


def test_a_node_without_spec_is_schedulable_and_cordoned(k8s):
    k8s.nodes["bare"] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bare"}}

    def patch_adds_spec(req):
        if req.method == "PATCH" and req.path.startswith("/api/v1/nodes/bare"):
            k8s.nodes["bare"]["spec"] = {}
        return k8s.respond(req)

    k8s.server.responder = patch_adds_spec
    outcome = act.cordon_node(ctx(dry_run=True), act.NodeParams(node="bare"))
    assert (outcome.before, outcome.after) == (False, True)


def test_an_already_cordoned_node_reports_cordoned(k8s):
    k8s.add_node("n1")
    k8s.nodes["n1"]["spec"]["unschedulable"] = True
    assert act.cordon_node(ctx(), act.NodeParams(node="n1")).after is True


def test_an_empty_deployment_name_is_refused():
    with pytest.raises(ValidationError):
        act.DeploymentParams(namespace="p", name="")


SCALE_IN_A_FRESH_PROCESS = """
import json, sys
from functions.remediation import actions as act
from shared.config import load_settings

config = load_settings({"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "PROBE_TIMEOUT_SECONDS": "5"})
context = act.ActionContext(config, {"id": "11111111-2222-4333-8444-555555555555"}, False, 3.0, poll_interval=0.02)
outcome = act.scale_deployment(context, act.ScaleParams(namespace="production", name="email-service", replicas=3))
print(json.dumps({"outcome": [outcome.before, outcome.after],
                  "generated": sorted(m for m in sys.modules if m.startswith(("kubernetes.client.api.", "kubernetes.client.models.")))}))
"""


def test_the_deployment_actions_load_no_generated_api_class_nor_model(k8s):
    # AppsV1Api's module loads a pydantic model for every apps/v1 type
    # (~0.5 s and ~11 MB on a cold instance's first action).
    import subprocess
    import sys
    from pathlib import Path

    k8s.add_deployment(deployment("email-service", 1))
    done = subprocess.run([sys.executable, "-c", SCALE_IN_A_FRESH_PROCESS], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": os.environ["KUBECONFIG"],
                               "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["outcome"] == [1, 3] and seen["generated"] == []
