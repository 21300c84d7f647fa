"""Topology from kube-state-metrics: the real Prometheus binary scrapes a
loopback exporter serving ``kube_pod_info``, ``kube_pod_owner`` and
``kube_replicaset_owner`` in the text format, and correlation places pods
by what PromQL answers, with no Kubernetes API configured (or with one that
no longer knows the pod)."""

from __future__ import annotations

import logging
import os

import pytest

from loopback.processes import free_port, wait_until
from shared.config import load_settings
from shared.correlation import topology
from shared.correlation.plan import Correlator
from shared.correlation.rules import load
from shared.correlation.topology import KubeStateMetrics, Sources, Topology
from tests import storms
from tests.storms import kp
from tests.test_correlation import incident, record

# One exposition for every test of the session's Prometheus: a metric's
# lines must stay together in the text format.
SERIES: dict[str, list[str]] = {"kube_pod_info": [], "kube_pod_owner": [], "kube_replicaset_owner": []}


def serve(prometheus, namespace: str, deployments: dict[str, list[str]], statefulsets: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """kube-state-metrics series for Deployments (pods through a ReplicaSet)
    and StatefulSets, one pod per node listed; the pods' names by workload.
    Returns once Prometheus answers for all of them."""
    pods: dict[str, list[str]] = {}
    for kind, workloads in (("Deployment", deployments), ("StatefulSet", statefulsets or {})):
        for name, nodes in workloads.items():
            owner = ("ReplicaSet", f"{name}-5c6d7") if kind == "Deployment" else ("StatefulSet", name)
            if kind == "Deployment":
                SERIES["kube_replicaset_owner"].append(
                    f'kube_replicaset_owner{{namespace="{namespace}",replicaset="{owner[1]}",owner_kind="Deployment",'
                    f'owner_name="{name}",owner_is_controller="true"}} 1')
            for i, node in enumerate(nodes):
                pod = f"{owner[1]}-{i:05d}" if kind == "Deployment" else f"{name}-{i}"
                pods.setdefault(name, []).append(pod)
                SERIES["kube_pod_info"].append(
                    f'kube_pod_info{{namespace="{namespace}",pod="{pod}",uid="uid-{pod}",host_ip="10.0.1.{i}",pod_ip="10.2.0.{i}",'
                    f'node="{node}",created_by_kind="{owner[0]}",created_by_name="{owner[1]}",priority_class="",host_network="false"}} 1')
                SERIES["kube_pod_owner"].append(
                    f'kube_pod_owner{{namespace="{namespace}",pod="{pod}",uid="uid-{pod}",owner_kind="{owner[0]}",'
                    f'owner_name="{owner[1]}",owner_is_controller="true"}} 1')
    prometheus.exporter.extra["kube-state-metrics"] = [line for name in sorted(SERIES) for line in SERIES[name]]
    expected = sum(len(p) for p in pods.values())
    wait_until(lambda: len(prometheus.query(f'kube_pod_info{{namespace="{namespace}"}}')) == expected, 30, interval=0.2,
               message="kube-state-metrics series scraped")
    return pods


@pytest.fixture
def no_kubernetes(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def never():
    raise AssertionError("no Kubernetes client without a Kubernetes configuration")


def test_pods_join_their_node_and_workload_by_kube_state_metrics(clean_db, prometheus, no_kubernetes, caplog):
    ns = "ksm"
    lost, ok = "ip-10-0-40-1", "ip-10-0-40-2"
    pods = serve(prometheus, ns, {"checkout": [lost, lost, ok], "cart": [lost, ok], "search": [ok]})
    sources = topology.from_settings(load_settings({**os.environ, "PROMETHEUS_URL": prometheus.url}), never)
    assert sources.names() == ["KubeStateMetrics"]
    corr = Correlator(load(), sources)
    steps = [
        [kp("KubeNodeNotReady", "node", node=lost)]
        + [kp("KubePodNotReady", "node", namespace=ns, pod=p) for p in pods["checkout"][:2] + pods["cart"][:1]],
        [kp("KubeDeploymentReplicasMismatch", "search", namespace=ns, deployment="search"),
         kp("KubePodCrashLooping", "search", namespace=ns, pod=pods["search"][0], container="app"),
         kp("KubePodNotReady", "checkout-ok", namespace=ns, pod=pods["checkout"][2])],
    ]
    for step in steps:
        record(clean_db, corr, step)
    result = storms.score(steps, storms.grouping(clean_db, steps))
    assert (result.precision, result.recall, result.incidents) == (1.0, 1.0, 3)
    (node_incident,) = {storms.grouping(clean_db, steps)[steps[0][0].fingerprint]}
    _, _, members = incident(clean_db, node_incident)
    assert sorted(m["correlation_reason"] for m in members[1:]) == sorted(
        f"KubePodNotReady {ns}/{p} joined: pod runs on node {lost}, where KubeNodeNotReady fires"
        for p in pods["checkout"][:2] + pods["cart"][:1])
    (crash,) = [m for m in incident(clean_db, storms.grouping(clean_db, steps)[steps[1][0].fingerprint])[2] if not m["is_root"]]
    assert crash["correlation_reason"].endswith(f"pod belongs to deployment {ns}/search, where KubeDeploymentReplicasMismatch fires")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "correlation"]


def test_a_pod_the_kubernetes_api_no_longer_knows_is_placed_by_kube_state_metrics(clean_db, prometheus, kube):
    """A lost node's pods are soon deleted from the API; kube-state-metrics
    still has their last placement, so they still join their node."""
    ns = "ksm-fallback"
    lost = "ip-10-0-41-1"
    pods = serve(prometheus, ns, {}, {"kafka": [lost, lost]})
    api = Topology(storms.kube_client_factory(kube.kubeconfig_path), configured=lambda: True)
    corr = Correlator(load(), Sources([api, KubeStateMetrics(prometheus.url)]))
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=lost)]).outcomes[0]
    outcomes = record(clean_db, corr, [kp("KubePodNotReady", "n", namespace=ns, pod=p) for p in pods["kafka"]]).outcomes
    assert [(o.action, o.incident_id) for o in outcomes] == [("joined", root.incident_id)] * 2
    assert kube.calls("GET", f"/namespaces/{ns}/pods/{pods['kafka'][0]}")  # the API was asked first


def test_an_unreachable_prometheus_leaves_label_rules_and_never_fails_the_intake(clean_db, caplog):
    source = KubeStateMetrics(f"http://127.0.0.1:{free_port()}", timeout=0.5)
    corr = Correlator(load(), Sources([source]))
    item = kp("KubePodNotReady", "p", namespace="ksm-down", pod="web-0", node="ip-10-0-42-1")
    (links,) = corr.plan([item.alert()]).values()
    assert list(links.seeks) == ["node:ip-10-0-42-1"]  # the alert's own `node` label still counts
    assert record(clean_db, corr, [item]).outcomes[0].action == "created"
    assert [r.message for r in caplog.records].count("kube-state-metrics topology lookup failed") == 1  # cached briefly


def test_series_scraped_without_honor_labels_are_read_by_their_exported_labels(clean_db, prometheus, no_kubernetes):
    """A Prometheus that scrapes kube-state-metrics without honor_labels
    keeps the target's namespace and pod and renames the object's to
    exported_namespace and exported_pod (stored as such here)."""
    ns, node = "ksm-exported", "ip-10-0-43-1"
    pods = [f"ledger-6f7a8-{i:05d}" for i in range(2)]
    target = 'namespace="monitoring",pod="kube-state-metrics-0"'
    SERIES["kube_replicaset_owner"].append(
        f'kube_replicaset_owner{{{target},exported_namespace="{ns}",replicaset="ledger-6f7a8",owner_kind="Deployment",'
        f'owner_name="ledger",owner_is_controller="true"}} 1')
    for pod in pods:
        SERIES["kube_pod_info"].append(f'kube_pod_info{{{target},exported_namespace="{ns}",exported_pod="{pod}",node="{node}"}} 1')
        SERIES["kube_pod_owner"].append(f'kube_pod_owner{{{target},exported_namespace="{ns}",exported_pod="{pod}",'
                                        'owner_kind="ReplicaSet",owner_name="ledger-6f7a8",owner_is_controller="true"} 1')
    prometheus.exporter.extra["kube-state-metrics"] = [line for name in sorted(SERIES) for line in SERIES[name]]
    wait_until(lambda: len(prometheus.query(f'kube_pod_info{{exported_namespace="{ns}"}}')) == 2, 30, interval=0.2,
               message="kube-state-metrics series scraped")
    corr = Correlator(load(), Sources([KubeStateMetrics(prometheus.url)]))
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    outcomes = record(clean_db, corr, [kp("KubePodNotReady", "n", namespace=ns, pod=p) for p in pods]).outcomes
    assert [(o.action, o.incident_id) for o in outcomes] == [("joined", root.incident_id)] * 2
    # The monitoring namespace's own pods are not confused with them.
    assert KubeStateMetrics(prometheus.url).placement("monitoring", "kube-state-metrics-0") is None
