"""rollback_deployment against the loopback Kubernetes API through the
official client: the requests `kubectl rollout undo` sends, the previous (or
a named) revision's template restored, readiness awaited, and the refusals.
Also the blast-radius limits, judged on the state read before acting."""

from __future__ import annotations

import copy
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from functions.remediation import actions as act
from functions.remediation.actions import ActionContext, ActionFailed, BlastRadiusExceeded
from loopback.kube import FakeKubernetes, deployment, pod, replicaset
from shared.config import load_settings
from shared.kuberaw import LIST_PAGE_SIZE


def ctx(dry_run=False, verify_timeout=3.0, **env):
    base = {"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "PROBE_TIMEOUT_SECONDS": "5"}
    return ActionContext(load_settings({**base, **env}), {"id": "11111111-2222-4333-8444-555555555555"}, dry_run, verify_timeout,
                         poll_interval=0.02)


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
    # As kubectl lists them, a page at a time (shared/kuberaw.py paged).
    listing = urlsplit(gets[1])
    assert listing.path == "/apis/apps/v1/namespaces/production/replicasets"
    assert parse_qs(listing.query) == {"labelSelector": ["app=checkout"], "limit": [str(LIST_PAGE_SIZE)]}
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
    with pytest.raises(ActionFailed, match="not verified after 0.2s"):
        act.rollback_deployment(ctx(verify_timeout=0.2), act.RollbackParams(namespace="production", name="checkout"))


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


# --------------------------------------------------------------------------- the revision to return to


def named_in_order(server, *revisions):
    """Name the deployment's ReplicaSets so the API lists them in this order
    of revisions: it lists by name, and a real name ends in a hash, so the
    listing order says nothing about the revision."""
    for rs in server.replicasets:
        revision = rs["metadata"]["annotations"].get(act.REVISION)
        if rs["metadata"]["name"].startswith("checkout-h") and revision.isdigit() and int(revision) in revisions:
            rs["metadata"]["name"] = f"checkout-{revisions.index(int(revision)) + 1}-r{revision}"


def test_the_replicasets_are_listed_by_the_deployments_whole_selector(k8s):
    d = released(k8s)
    d["spec"]["selector"]["matchExpressions"] = [
        {"key": "tier", "operator": "In", "values": ["web", "api"]},
        {"key": "track", "operator": "NotIn", "values": ["canary"]},
        {"key": "release", "operator": "Exists"},
        {"key": "legacy", "operator": "DoesNotExist"},
    ]
    for rs in k8s.replicasets:
        rs["metadata"]["labels"].update(tier="web", release="r1")
    outcome = act.rollback_deployment(ctx(dry_run=True), act.RollbackParams(namespace="production", name="checkout"))
    assert (outcome.before, outcome.after) == (3, 2)
    (listing,) = [r for r in k8s.calls("GET") if "/replicasets" in r.path]
    assert parse_qs(urlsplit(listing.path).query)["labelSelector"] == \
        ["app=checkout,tier in (web,api),track notin (canary),release,!legacy"]


@pytest.mark.parametrize("order", [(3, 1, 2), (3, 2, 1), (1, 3, 2)])
def test_the_previous_revision_is_the_second_highest_whatever_the_listing_order(k8s, order):
    d = released(k8s)
    named_in_order(k8s, *order)
    # Listed first: a ReplicaSet whose revision cannot be read (skipped), and
    # one controlled by another deployment whose uid sorts after this one's.
    garbled = replicaset(d, 8, "registry.local/app:8", pod_hash="0-garbled")
    garbled["metadata"]["annotations"][act.REVISION] = "eight"
    stranger = copy.deepcopy(d)
    stranger["metadata"].update(name="checkout-zz", uid="uid-zz")
    k8s.replicasets += [garbled, replicaset(stranger, 9, "registry.local/other:9", pod_hash="0-other")]
    # A week's window takes in these two-day-old revisions.
    params = act.RollbackParams(namespace="production", name="checkout", rolled_out_within_seconds=7 * 86400)
    outcome = act.rollback_deployment(ctx(dry_run=True), params)
    assert (outcome.before, outcome.after) == (3, 2)
    assert outcome.details["replicaset"] == f"checkout-{order.index(2) + 1}-r2"
    named = act.rollback_deployment(ctx(dry_run=True), act.RollbackParams(namespace="production", name="checkout", to_revision=2))
    assert (named.before, named.after) == (3, 2)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_replicaset_without_a_revision_counts_as_revision_zero(k8s, order):
    # What kubectl reads for a ReplicaSet the deployment controller made
    # before it annotated revisions.
    d = released(k8s, revisions=("app:0", "app:1"))
    d["metadata"]["annotations"][act.REVISION] = "1"
    oldest, newest = (next(rs for rs in k8s.replicasets if rs["metadata"]["name"] == name) for name in ("checkout-h0001", "checkout-h0002"))
    del oldest["metadata"]["annotations"][act.REVISION]
    newest["metadata"]["annotations"][act.REVISION] = "1"
    oldest["metadata"]["name"] = "checkout-x"
    newest["metadata"]["name"] = "checkout-a" if order == (1, 0) else "checkout-y"
    outcome = act.rollback_deployment(ctx(dry_run=True), act.RollbackParams(namespace="production", name="checkout"))
    assert (outcome.before, outcome.after, outcome.details["replicaset"]) == (1, 0, "checkout-x")
    assert outcome.details["images"]["to"] == ["registry.local/app:0"]


def test_rolling_back_to_the_running_template_patches_nothing(k8s):
    released(k8s)
    outcome = act.rollback_deployment(ctx(), act.RollbackParams(namespace="production", name="checkout", to_revision=3))
    assert (outcome.before, outcome.after) == (3, 3)
    assert outcome.details["note"] == "skipped: the template already matches revision 3"
    assert not k8s.calls("PATCH")


def test_a_rollback_the_controller_has_not_observed_is_not_rolled_out(k8s):
    released(k8s)

    def lagging(method, obj):
        if method == "GET":
            obj["status"]["observedGeneration"] = 1

    k8s.reshape_deployments(lagging)
    with pytest.raises(ActionFailed, match="generation 1/2"):
        act.rollback_deployment(ctx(verify_timeout=0.1), act.RollbackParams(namespace="production", name="checkout"))


def test_the_named_revision_and_the_release_window_are_bounded():
    def rollback(**p):
        return act.RollbackParams(namespace="production", name="checkout", **p)

    # kubectl reads --to-revision=0 as "the previous one": here that is no revision at all.
    with pytest.raises(ValidationError):
        rollback(to_revision=0)
    assert rollback(to_revision=1).to_revision == 1
    for seconds in (0.5, 7 * 86400):
        assert rollback(rolled_out_within_seconds=seconds).rolled_out_within_seconds == seconds
    for seconds in (0, 7 * 86400 + 0.5):
        with pytest.raises(ValidationError):
            rollback(rolled_out_within_seconds=seconds)


# --------------------------------------------------------------------------- the share of each workload


def test_exactly_the_largest_number_of_pods_may_be_deleted(k8s):
    k8s.pods.extend(pod(f"w-{i}", {"app": "w"}, phase="Failed", reason="Evicted") for i in range(5))
    outcome = act.delete_pods(ctx(True, REMEDIATION_MAX_PODS_DELETED="5"), act.DeletePodsParams(namespace="production", reasons=["Evicted"]))
    assert len(outcome.details["pods"]) == 5


def test_one_crash_looping_pod_is_replaced_even_when_it_is_its_workloads_only_one(k8s):
    k8s.pods.append(pod("solo-0", {"app": "solo"}, ready=False, waiting="CrashLoopBackOff"))
    outcome = act.delete_pods(ctx(True), act.DeletePodsParams(namespace="production", reasons=["CrashLoopBackOff"]))
    assert outcome.details["pods"] == ["solo-0"]


def test_each_workloads_share_counts_its_own_live_pods_and_its_own_deletions(k8s):
    # Three workloads of bare pods, told apart by their labels: a (4 up),
    # x (2 of 4 crash-looping) and y (1 of 3).
    k8s.pods.extend(pod(f"a-{i}", {"app": "a"}) for i in range(4))
    k8s.pods.extend(pod(f"x-{i}", {"app": "x"}, ready=False, waiting="CrashLoopBackOff") for i in range(2))
    k8s.pods.extend(pod(f"x-ok-{i}", {"app": "x"}) for i in range(2))
    k8s.pods.append(pod("y-0", {"app": "y"}, ready=False, waiting="CrashLoopBackOff"))
    k8s.pods.extend(pod(f"y-ok-{i}", {"app": "y"}) for i in range(2))
    looping = act.DeletePodsParams(namespace="production", reasons=["CrashLoopBackOff"])
    # x loses half its pods, y one of three: allowed at 50 %.
    assert act.delete_pods(ctx(True, REMEDIATION_MAX_PODS_DELETED_SHARE="0.5"), looping).details["pods"] == ["x-0", "x-1", "y-0"]
    # Below 50 %, x's half is too much, however many pods a and y have.
    with pytest.raises(BlastRadiusExceeded, match="deleting 2 of the 4 live pods"):
        act.delete_pods(ctx(True, REMEDIATION_MAX_PODS_DELETED_SHARE="0.4"), looping)


def test_pods_of_one_controller_are_one_workload_whatever_their_labels(k8s):
    # Mid-rollout, a ReplicaSet's pods carry two pod-template-hash labels.
    owner = ("ReplicaSet", "web-1")
    k8s.pods.extend(pod(f"web-old-{i}", {"app": "web", "pod-template-hash": "old"}, ready=False, waiting="CrashLoopBackOff", owner=owner)
                    for i in range(2))
    k8s.pods.extend(pod(f"web-new-{i}", {"app": "web", "pod-template-hash": "new"}, owner=owner) for i in range(2))
    looping = act.DeletePodsParams(namespace="production", reasons=["CrashLoopBackOff"])
    with pytest.raises(BlastRadiusExceeded, match="deleting 2 of the 4 live pods"):
        act.delete_pods(ctx(True, REMEDIATION_MAX_PODS_DELETED_SHARE="0.4"), looping)
