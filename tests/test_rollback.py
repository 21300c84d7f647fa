"""rollback_deployment against the loopback Kubernetes API through the
official client: the requests `kubectl rollout undo` sends, the previous (or
a named) revision's template restored, readiness awaited, and the refusals.
Also the blast-radius limits, judged on the state read before acting."""

from __future__ import annotations

import copy

import pytest

from functions.remediation import actions as act
from functions.remediation.actions import ActionContext, ActionFailed, BlastRadiusExceeded
from loopback.kube import FakeKubernetes, deployment, pod, replicaset
from shared.config import load_settings


def ctx(dry_run=False, **env):
    base = {"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "PROBE_TIMEOUT_SECONDS": "5"}
    return ActionContext(load_settings({**base, **env}), {"id": "11111111-2222-4333-8444-555555555555"}, dry_run, 3.0, poll_interval=0.02)


@pytest.fixture
def k8s(tmp_path):
    server = FakeKubernetes().start()
    with server.as_cluster(tmp_path):
        yield server
    server.stop()


def released(server, revisions=("app:1", "app:2", "app:3"), ns="production"):
    """A deployment on its last revision, with a ReplicaSet per revision
    (and one of another deployment that shares the labels)."""
    d = deployment("checkout", 3, namespace=ns)
    d["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": str(len(revisions)),
                                    "kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "shop"}
    for c in d["spec"]["template"]["spec"]["containers"]:
        c["image"] = f"registry.local/{revisions[-1]}"
    server.add_deployment(d)
    for i, image in enumerate(revisions, start=1):
        server.replicasets.append(replicaset(d, i, f"registry.local/{image}", replicas=3 if i == len(revisions) else 0,
                                             annotations={"kubernetes.io/change-cause": f"release {image}"}))
    stranger = copy.deepcopy(d)
    stranger["metadata"].update(name="checkout-canary", uid="uid-canary")
    server.replicasets.append(replicaset(stranger, 9, "registry.local/canary:9"))
    return d


def test_undo_sends_what_kubectl_sends_and_restores_the_previous_template(k8s):
    d = released(k8s)
    k8s.rollout_delay = 0.3
    outcome = act.rollback_deployment(ctx(), act.RollbackParams(namespace="production", name="checkout"))
    assert (outcome.before, outcome.after) == (3, 2)
    assert outcome.details["images"] == {"from": ["registry.local/app:3"], "to": ["registry.local/app:2"]}
    gets = [r.path for r in k8s.calls("GET")]
    assert gets[0] == "/apis/apps/v1/namespaces/production/deployments/checkout"
    assert gets[1] == "/apis/apps/v1/namespaces/production/replicasets?labelSelector=app%3Dcheckout"
    (patch,) = k8s.calls("PATCH")
    assert patch.path == "/apis/apps/v1/namespaces/production/deployments/checkout"
    assert patch.headers["content-type"] == "application/json-patch+json"
    previous = next(rs for rs in k8s.replicasets if rs["metadata"]["name"] == "checkout-h0002")
    template = copy.deepcopy(previous["spec"]["template"])
    del template["metadata"]["labels"]["pod-template-hash"]
    assert patch.json() == [
        {"op": "replace", "path": "/spec/template", "value": template},
        # kubectl keeps the deployment's revision and last-applied annotations
        # and takes the rest from the ReplicaSet.
        {"op": "replace", "path": "/metadata/annotations", "value": {
            "deployment.kubernetes.io/revision": "3", "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "kubernetes.io/change-cause": "release app:2"}},
    ]
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/app:2"
    assert "pod-template-hash" not in d["spec"]["template"]["metadata"]["labels"]
    # Readiness was awaited: the deployment was read until its replicas came up.
    assert d["status"]["readyReplicas"] == 3 and len(k8s.calls("GET", "/deployments/checkout")) >= 3
    # The controller made revision 2's ReplicaSet the newest (revision 4).
    assert previous["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "4"


def test_undo_to_a_named_revision(k8s):
    d = released(k8s)
    outcome = act.rollback_deployment(ctx(), act.RollbackParams(namespace="production", name="checkout", to_revision=1))
    assert (outcome.before, outcome.after) == (3, 1)
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/app:1"


def test_a_named_revision_that_is_not_in_the_history_is_refused(k8s):
    released(k8s)
    with pytest.raises(ActionFailed, match="unable to find specified revision 7"):
        act.rollback_deployment(ctx(), act.RollbackParams(namespace="production", name="checkout", to_revision=7))
    assert not k8s.calls("PATCH")


def test_no_previous_revision_is_refused_clearly(k8s):
    released(k8s, revisions=("app:1",))
    with pytest.raises(ActionFailed, match="no previous revision to roll back to"):
        act.rollback_deployment(ctx(), act.RollbackParams(namespace="production", name="checkout"))
    assert not k8s.calls("PATCH")


def test_a_paused_deployment_is_refused(k8s):
    released(k8s)["spec"]["paused"] = True
    with pytest.raises(ActionFailed, match="paused"):
        act.rollback_deployment(ctx(), act.RollbackParams(namespace="production", name="checkout"))
    assert not k8s.calls("PATCH")


def test_dry_run_previews_the_revision_and_images_and_patches_nothing(k8s):
    released(k8s)
    outcome = act.rollback_deployment(ctx(dry_run=True), act.RollbackParams(namespace="production", name="checkout"))
    assert (outcome.before, outcome.after) == (3, 2) and outcome.details["replicaset"] == "checkout-h0002"
    assert outcome.details["images"]["to"] == ["registry.local/app:2"]
    assert not k8s.calls("PATCH")


def test_not_ready_after_the_rollback_fails_the_action(k8s):
    released(k8s)
    k8s.rollout_delay = 60
    with pytest.raises(ActionFailed, match="not verified after"):
        act.rollback_deployment(ctx(), act.RollbackParams(namespace="production", name="checkout"))


# --------------------------------------------------------------------------- blast radius


def test_scale_beyond_the_largest_replica_change_is_refused_in_dry_run_too(k8s):
    k8s.add_deployment(deployment("email", 2))
    for dry in (True, False):
        with pytest.raises(BlastRadiusExceeded, match="changes 8 replicas; REMEDIATION_MAX_REPLICA_CHANGE allows 5"):
            act.scale_deployment(ctx(dry, REMEDIATION_MAX_REPLICA_CHANGE="5"), act.ScaleParams(namespace="production", name="email", replicas=10))
    assert not k8s.calls("PATCH")
    assert act.scale_deployment(ctx(REMEDIATION_MAX_REPLICA_CHANGE="8"), act.ScaleParams(namespace="production", name="email", replicas=10)).after == 10


def test_deleting_more_pods_than_allowed_is_refused(k8s):
    k8s.pods.extend(pod(f"w-{i}", {"app": "w"}, phase="Failed", reason="Evicted") for i in range(6))
    k8s.pods.extend(pod(f"ok-{i}", {"app": "w"}) for i in range(14))
    with pytest.raises(BlastRadiusExceeded, match="deleting 6 pods in production; REMEDIATION_MAX_PODS_DELETED allows 5"):
        act.delete_pods(ctx(True, REMEDIATION_MAX_PODS_DELETED="5"), act.DeletePodsParams(namespace="production", reasons=["Evicted"]))
    assert not k8s.calls("DELETE")


def test_deleting_too_large_a_share_of_the_workload_is_refused(k8s):
    k8s.pods.extend(pod(f"w-{i}", {"app": "w"}, ready=False, waiting="CrashLoopBackOff") for i in range(3))
    k8s.pods.append(pod("w-ok", {"app": "w"}))
    params = act.DeletePodsParams(namespace="production", selector="app=w", reasons=["CrashLoopBackOff"])
    with pytest.raises(BlastRadiusExceeded, match="deleting 3 of the 4 live pods of the workload \\(75%\\); REMEDIATION_MAX_PODS_DELETED_SHARE allows 50%"):
        act.delete_pods(ctx(False), params)
    assert not k8s.calls("DELETE")
    assert act.delete_pods(ctx(False, REMEDIATION_MAX_PODS_DELETED_SHARE="0.8"), params).details["pods"] == ["w-0", "w-1", "w-2"]


def test_the_share_counts_live_pods_per_workload(k8s):
    # Evicted pods serve nothing: clearing all of them costs no capacity.
    k8s.pods.extend(pod(f"e-{i}", {"app": "w"}, phase="Failed", reason="Evicted") for i in range(4))
    k8s.pods.extend(pod(f"x-{i}", {"app": "x"}, ready=False, waiting="CrashLoopBackOff") for i in range(2))
    k8s.pods.extend(pod(f"x-ok-{i}", {"app": "x"}) for i in range(2))
    evicted = act.DeletePodsParams(namespace="production", reasons=["Evicted"])
    assert len(act.delete_pods(ctx(True), evicted).details["pods"]) == 4
    # Half of workload x's live pods: allowed at 50 %, refused below.
    looping = act.DeletePodsParams(namespace="production", reasons=["CrashLoopBackOff"])
    assert act.delete_pods(ctx(True), looping).details["pods"] == ["x-0", "x-1"]
    with pytest.raises(BlastRadiusExceeded, match="deleting 2 of the 4 live pods"):
        act.delete_pods(ctx(True, REMEDIATION_MAX_PODS_DELETED_SHARE="0.4"), looping)


def test_only_a_fresh_release_is_rolled_back_when_asked(k8s):
    from datetime import datetime, timedelta, timezone

    d = released(k8s)
    newest = next(rs for rs in k8s.replicasets if rs["metadata"]["name"] == "checkout-h0003")
    params = act.RollbackParams(namespace="production", name="checkout", rolled_out_within_seconds=1800)
    newest["metadata"]["creationTimestamp"] = (datetime.now(timezone.utc) - timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(ActionFailed, match=r"revision 3 of 'checkout' was rolled out 1800\d s ago|not a fresh release"):
        act.rollback_deployment(ctx(), params)
    assert not k8s.calls("PATCH")
    newest["metadata"]["creationTimestamp"] = (datetime.now(timezone.utc) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert act.rollback_deployment(ctx(), params).after == 2
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/app:2"
