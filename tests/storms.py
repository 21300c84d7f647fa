"""Labelled alert storms for correlation: the alert names and label sets of
the real kube-prometheus rules (tests/fixtures/kube-prometheus-rules.json),
the cluster they happen in served by the loopback Kubernetes API, and for
every alert the incident a person would have wanted it in (its ``group``).

A scenario is scored by pairwise precision and recall over its alerts: a
pair grouped together that belongs together is a true positive, grouped but
not belonging a false positive, belonging but apart a false negative.
``make bench`` prints the table (bench/run.py), the tests assert it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import combinations
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from loopback.kube import FakeKubernetes, deployment, pod, owned_replicaset, statefulset
from shared.alerts import Alert, label_fingerprint
from shared.correlation.plan import Correlator
from shared.correlation.rules import DEFAULT_FILE, RuleSet, load, parse
from shared.correlation.topology import Topology
from shared.ingest import record_alerts

RULES_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "kube-prometheus-rules.json"
KUBE_PROMETHEUS = {r["alert"]: r for r in json.loads(RULES_FIXTURE.read_text())["rules"]}
PRIORITY = {"critical": "P0", "warning": "P1", "info": "P2"}
KSM = {"job": "kube-state-metrics", "container": "kube-state-metrics", "instance": "10.0.9.9:8080"}
T0 = datetime(2026, 11, 28, 10, 0, 0)


@dataclass
class Item:
    labels: dict
    group: str
    status: str = "firing"

    @property
    def fingerprint(self) -> str:
        return label_fingerprint(self.labels)

    def alert(self) -> Alert:
        name = self.labels["alertname"]
        rule = KUBE_PROMETHEUS.get(name, {})
        return Alert(
            fingerprint=self.fingerprint, status=self.status, alert_name=name,
            priority=PRIORITY[self.labels["severity"]], summary=rule.get("summary") or name,
            description=rule.get("description") or "", labels=self.labels, annotations={"summary": rule.get("summary") or name},
            starts_at=T0, ends_at=T0 + timedelta(minutes=5) if self.status == "resolved" else None, source="alertmanager",
        )

    def raw(self) -> dict:
        """As AlertManager's webhook carries it."""
        return {
            "status": self.status, "labels": self.labels, "fingerprint": self.fingerprint,
            "annotations": {"summary": KUBE_PROMETHEUS[self.labels["alertname"]].get("summary") or ""},
            "startsAt": "2026-11-28T10:00:00Z",
            "endsAt": "2026-11-28T10:05:00Z" if self.status == "resolved" else "0001-01-01T00:00:00Z",
        }


def kp(name: str, group: str, status: str = "firing", **labels) -> Item:
    """An alert of the kube-prometheus rule ``name`` (its real severity)."""
    rule = KUBE_PROMETHEUS[name]  # KeyError: not a kube-prometheus alert
    extra = dict(KSM) if "kube-state-metrics" in rule["expr"] or "kube_" in rule["expr"] else {}
    if name.startswith("Node"):
        extra = {"job": "node-exporter", "container": "node-exporter"}
    return Item({"alertname": name, "severity": rule["severity"], **extra, **labels}, group, status)


class Cluster:
    """Objects of one scenario in the loopback API (a namespace of its own)."""

    def __init__(self, kube: FakeKubernetes, namespace: str):
        self.kube = kube
        self.ns = namespace

    def node(self, name: str) -> str:
        self.kube.add_node(name)
        return name

    def deployment(self, name: str, nodes: list[str]) -> list[str]:
        """A Deployment with one pod per entry of ``nodes``; the pods' names."""
        labels = {"app": name}
        self.kube.add_deployment(deployment(name, len(nodes), namespace=self.ns, labels=labels))
        rs = f"{name}-7d9f8"
        self.kube.add_replicaset(owned_replicaset(rs, name, namespace=self.ns, labels=labels))
        names = []
        for i, node in enumerate(nodes):
            pod_name = f"{rs}-{i:05d}"
            self.kube.pods.append(pod(pod_name, labels, node=node, namespace=self.ns, owner=("ReplicaSet", rs)))
            names.append(pod_name)
        return names

    def statefulset(self, name: str, nodes: list[str]) -> list[str]:
        labels = {"app": name}
        self.kube.add_statefulset(statefulset(name, len(nodes), namespace=self.ns, labels=labels))
        names = []
        for i, node in enumerate(nodes):
            pod_name = f"{name}-{i}"
            self.kube.pods.append(pod(pod_name, labels, node=node, namespace=self.ns, owner=("StatefulSet", name)))
            names.append(pod_name)
        return names


@dataclass
class Scenario:
    name: str
    about: str
    build: Callable[[Cluster], list[list[Item]]]  # the batches, in the order they arrive
    rules: str | None = None  # YAML replacing the shipped rules
    steps: list[list[Item]] = field(default_factory=list)


# --------------------------------------------------------------------------- scenarios


def node_lost(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    lost, ok1, ok2 = c.node("ip-10-0-3-17"), c.node("ip-10-0-3-18"), c.node("ip-10-0-3-19")
    pods_on_lost = []
    for i, name in enumerate(["checkout", "cart", "search", "payments", "email", "catalog", "ads", "reviews"]):
        pods = c.deployment(name, [lost] * 5 + [ok1, ok2][: i % 3])
        pods_on_lost += [(name, p) for p in pods[:5]]
    calm = c.deployment("frontend", [ok1, ok2])
    node = [kp("KubeNodeNotReady", "node", node=lost), kp("KubeNodeUnreachable", "node", node=lost)]
    pods = [kp("KubePodNotReady", "node", namespace=ns, pod=p) for _, p in pods_on_lost]
    pods += [kp("KubeContainerWaiting", "node", namespace=ns, pod=p, container="app") for _, p in pods_on_lost[:6]]
    workloads = [kp("KubeDeploymentReplicasMismatch", "node", namespace=ns, deployment=d)
                 for d in ["checkout", "cart", "search"]]
    unrelated = [
        kp("KubePodCrashLooping", "crash-frontend", namespace=ns, pod=calm[0], container="app"),
        kp("TargetDown", "target", namespace="monitoring", job="blackbox", service="blackbox"),
        kp("KubePersistentVolumeFillingUp", "pv", namespace=ns, persistentvolumeclaim="data-search-0"),
    ]
    return [node + pods[:20], pods[20:] + workloads, unrelated]


def pods_before_node(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    lost = c.node("ip-10-0-4-1")
    other = c.node("ip-10-0-4-2")
    a = c.deployment("orders", [lost, lost, other])
    b = c.deployment("billing", [lost, lost])
    first = [kp("KubePodNotReady", "node", namespace=ns, pod=p) for p in a[:2]]
    second = [kp("KubePodNotReady", "node", namespace=ns, pod=p) for p in b]
    root = [kp("KubeNodeNotReady", "node", node=lost)]
    later = [kp("KubeContainerWaiting", "node", namespace=ns, pod=a[0], container="app")]
    return [first, second, root, later]


def bad_rollout(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    n1, n2 = c.node("ip-10-0-5-1"), c.node("ip-10-0-5-2")
    web = c.deployment("web", [n1, n2, n1, n2])
    api = c.deployment("api", [n1, n2])
    root = [kp("KubeDeploymentRolloutStuck", "rollout", namespace=ns, deployment="web"),
            kp("KubeDeploymentReplicasMismatch", "rollout", namespace=ns, deployment="web")]
    crash = [kp("KubePodCrashLooping", "rollout", namespace=ns, pod=p, container="app") for p in web]
    unrelated = [kp("KubePodCrashLooping", "api-crash", namespace=ns, pod=api[0], container="app")]
    return [crash[:2], root, crash[2:] + unrelated]


def load_text() -> str:
    """The shipped rules file, as text."""
    return DEFAULT_FILE.read_text()


def dependency_rules(namespace: str) -> str:
    """The shipped rules plus declared dependencies of the scenario's
    services: accounts and orders need the postgres database, frontend
    needs accounts (so, through it, postgres too)."""
    return load_text() + f"""
  - name: dependencies
    kind: dependency
    window: 15m
    services:
      postgres:
        workloads: [{namespace}/StatefulSet/postgres]
        labels: [{{job: postgres, namespace: {namespace}}}]
      accounts:
        workloads: [{namespace}/Deployment/accounts]
      orders:
        workloads: [{namespace}/Deployment/orders]
      frontend:
        workloads: [{namespace}/Deployment/frontend]
    depends_on:
      accounts: [postgres]
      orders: [postgres]
      frontend: [accounts]
"""


def database_down(c: Cluster) -> list[list[Item]]:
    """The database's StatefulSet is the root of its pods and, by the
    declared dependencies, of its dependents' alerts too; a Deployment that
    needs no database, failing at the same moment, stays apart."""
    ns = c.ns
    n1, n2 = c.node("ip-10-0-6-1"), c.node("ip-10-0-6-2")
    db = c.statefulset("postgres", [n1, n2, n1])
    app = c.deployment("accounts", [n1, n2])
    other = c.deployment("reports", [n2])
    storm = [kp("KubeStatefulSetReplicasMismatch", "db", namespace=ns, statefulset="postgres")]
    storm += [kp("KubePodNotReady", "db", namespace=ns, pod=p) for p in db]
    storm += [kp("KubeContainerWaiting", "db", namespace=ns, pod=db[0], container="app")]
    storm += [kp("TargetDown", "db", namespace=ns, job="postgres", service="postgres")]
    dependents = [kp("KubeDeploymentReplicasMismatch", "db", namespace=ns, deployment="accounts")]
    dependents += [kp("KubePodCrashLooping", "db", namespace=ns, pod=p, container="app") for p in app]
    dependents += [kp("KubePodCrashLooping", "reports", namespace=ns, pod=other[0], container="app")]
    return [storm, dependents]


def dependency_late(c: Cluster) -> list[list[Item]]:
    """The dependents fail first (their own incidents open, accounts' pods
    and then its Deployment, frontend's pods through accounts), then the
    database's alert arrives: their incidents merge into its incident, the
    database the root. An application with no declared dependency crashing
    at the same time stays apart."""
    ns = c.ns
    n1, n2 = c.node("ip-10-0-14-1"), c.node("ip-10-0-14-2")
    db = c.statefulset("postgres", [n1, n2])
    accounts = c.deployment("accounts", [n1, n2])
    orders = c.deployment("orders", [n2])
    frontend = c.deployment("frontend", [n1, n2])
    lone = c.deployment("search", [n1])
    first = [kp("KubePodCrashLooping", "db", namespace=ns, pod=p, container="app") for p in accounts]
    first += [kp("KubePodCrashLooping", "db", namespace=ns, pod=orders[0], container="app")]
    second = [kp("KubePodNotReady", "db", namespace=ns, pod=p) for p in frontend]
    second += [kp("KubePodCrashLooping", "search", namespace=ns, pod=lone[0], container="app")]
    third = [kp("KubeDeploymentReplicasMismatch", "db", namespace=ns, deployment="accounts")]
    root = [kp("KubeStatefulSetReplicasMismatch", "db", namespace=ns, statefulset="postgres")]
    later = [kp("KubePodNotReady", "db", namespace=ns, pod=p) for p in db]
    later += [kp("TargetDown", "db", namespace=ns, job="postgres", service="postgres")]
    return [first, second, third, root, later]


def two_independent(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    lost, healthy = c.node("ip-10-0-7-1"), c.node("ip-10-0-7-2")
    on_lost = c.deployment("queue", [lost, lost, lost])
    web = c.deployment("site", [healthy, healthy])
    batch = [kp("KubeNodeNotReady", "node", node=lost)]
    batch += [kp("KubePodNotReady", "node", namespace=ns, pod=p) for p in on_lost]
    batch += [kp("KubeDeploymentRolloutStuck", "rollout", namespace=ns, deployment="site")]
    batch += [kp("KubePodCrashLooping", "rollout", namespace=ns, pod=p, container="app") for p in web]
    return [batch]


def flapping_member(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    lost = c.node("ip-10-0-8-1")
    pods = c.deployment("stream", [lost, lost, lost])
    flap = kp("KubePodNotReady", "node", namespace=ns, pod=pods[0])
    resolved = Item(flap.labels, "node", "resolved")
    return [[kp("KubeNodeNotReady", "node", node=lost)] + [kp("KubePodNotReady", "node", namespace=ns, pod=p) for p in pods],
            [resolved], [flap], [resolved], [flap]]


def member_resolves(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    lost = c.node("ip-10-0-9-1")
    pods = c.deployment("render", [lost, lost, lost, lost])
    firing = [kp("KubeNodeNotReady", "node", node=lost)] + [kp("KubePodNotReady", "node", namespace=ns, pod=p) for p in pods]
    return [firing, [Item(firing[1].labels, "node", "resolved"), Item(firing[2].labels, "node", "resolved")]]


def node_exporter_root(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    full = c.node("ip-10-0-10-1")
    pods = c.deployment("indexer", [full, full])
    root = [kp("NodeFilesystemAlmostOutOfSpace", "disk", instance=f"{full}:9100", device="/dev/nvme0n1p1",
               mountpoint="/", fstype="ext4")]
    return [[kp("KubePodNotReady", "disk", namespace=ns, pod=p) for p in pods], root]


def noise_without_roots(c: Cluster) -> list[list[Item]]:
    """Alerts of different pods on healthy nodes at the same moment: nothing
    relates them, so each stays its own incident."""
    ns = c.ns
    n1, n2 = c.node("ip-10-0-11-1"), c.node("ip-10-0-11-2")
    a = c.deployment("alpha", [n1])
    b = c.deployment("beta", [n2])
    d = c.deployment("delta", [n1])
    return [[kp("KubePodCrashLooping", "alpha", namespace=ns, pod=a[0], container="app"),
             kp("KubePodNotReady", "beta", namespace=ns, pod=b[0]),
             kp("CPUThrottlingHigh", "delta", namespace=ns, pod=d[0], container="app"),
             kp("KubeJobFailed", "job", namespace=ns, job_name="nightly-report"),
             kp("TargetDown", "target", namespace=ns, job="gamma", service="gamma")]]


def two_nodes_lost(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    n1, n2 = c.node("ip-10-0-12-1"), c.node("ip-10-0-12-2")
    a = c.deployment("ledger", [n1, n1, n2, n2])
    batch = [kp("KubeNodeNotReady", "n1", node=n1), kp("KubeNodeNotReady", "n2", node=n2)]
    batch += [kp("KubePodNotReady", "n1", namespace=ns, pod=p) for p in a[:2]]
    batch += [kp("KubePodNotReady", "n2", namespace=ns, pod=p) for p in a[2:]]
    return [batch]


def statefulset_late_root(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    n1 = c.node("ip-10-0-13-1")
    pods = c.statefulset("kafka", [n1, n1, n1])
    return [[kp("KubePodNotReady", "kafka", namespace=ns, pod=p) for p in pods[:2]],
            [kp("KubeStatefulSetReplicasMismatch", "kafka", namespace=ns, statefulset="kafka")],
            [kp("KubePodNotReady", "kafka", namespace=ns, pod=pods[2])]]


LABEL_RULES = """
rules:
  - name: same-service
    kind: labels
    labels: [namespace, service]
    alerts: [TargetDown, KubeAPIErrorBudgetBurn, KubeHpaMaxedOut]
    window: 10m
"""


def label_rule(c: Cluster) -> list[list[Item]]:
    ns = c.ns
    return [[kp("TargetDown", "svc-a", namespace=ns, job="a-metrics", service="svc-a"),
             kp("TargetDown", "svc-a", namespace=ns, job="a-sidecar", service="svc-a"),
             kp("KubeHpaMaxedOut", "svc-a", namespace=ns, horizontalpodautoscaler="svc-a", service="svc-a"),
             kp("TargetDown", "svc-b", namespace=ns, job="b-metrics", service="svc-b")]]


SCENARIOS = [
    Scenario("node-lost", "a node lost: 40 pods of 8 deployments, 3 deployments below replicas, 3 unrelated alerts", node_lost),
    Scenario("pods-before-node", "pod alerts arrive first; the node alert merges their incidents", pods_before_node),
    Scenario("bad-rollout", "a rollout stuck, its crash-looping pods before and after it, another deployment crashing", bad_rollout),
    Scenario("database-down", "a database StatefulSet down with its pods and its dependents; an independent crash apart",
             database_down, rules=dependency_rules("database-down")),
    Scenario("dependency-late", "dependents fail first; the database's alert merges their incidents and becomes the root",
             dependency_late, rules=dependency_rules("dependency-late")),
    Scenario("two-independent", "a node lost and an unrelated rollout, in one batch", two_independent),
    Scenario("flapping-member", "a member resolves and fires again twice while its node is down", flapping_member),
    Scenario("member-resolves", "two members resolve while the others fire", member_resolves),
    Scenario("node-exporter-root", "a full disk (node-exporter, by instance) after its pods fail", node_exporter_root),
    Scenario("noise-without-roots", "unrelated alerts at the same moment", noise_without_roots),
    Scenario("two-nodes-lost", "two nodes lost at once, one deployment across both", two_nodes_lost),
    Scenario("statefulset-late-root", "a StatefulSet's pods, then its root, then one more pod", statefulset_late_root),
    Scenario("label-rule", "a labels rule: same namespace and service within 10 minutes", label_rule, rules=LABEL_RULES),
]


# --------------------------------------------------------------------------- running and scoring


def kube_client_factory(kubeconfig: Path):
    def factory():
        from kubernetes import client, config

        from shared.kubebound import api_client

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        return api_client(configuration)

    return factory


def correlator_for(scenario: Scenario, kubeconfig: Path) -> Correlator:
    rules: RuleSet = parse(scenario.rules, f"scenario {scenario.name}") if scenario.rules else load()
    return Correlator(rules, Topology(kube_client_factory(kubeconfig), configured=lambda: True))


def prepare(scenario: Scenario, kube: FakeKubernetes) -> list[list[Item]]:
    return scenario.build(Cluster(kube, scenario.name))


def feed(engine, correlator: Correlator, steps: list[list[Item]], config=None) -> None:
    """``config``: the Settings noise control reads (default: the process's)."""
    for step in steps:
        alerts = [i.alert() for i in step]
        plan = correlator.plan(alerts)
        with engine.begin() as conn:
            record_alerts(conn, alerts, "/test", "alertmanager", plan=plan, config=config)


# An alert's incident now: its latest membership, or the incident it opened
# alone (no member row: no rule concerned it).
GROUPING = sa.text(
    "SELECT DISTINCT ON (fingerprint) fingerprint, incident_id FROM ("
    " SELECT fingerprint, incident_id, joined_at FROM incident_members"
    " WHERE fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:fps AS jsonb))))"
    " UNION ALL"
    " SELECT i.fingerprint, i.id, i.created_at FROM incidents i"
    " WHERE i.fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:fps AS jsonb)))) AND i.merged_into IS NULL"
    "  AND NOT EXISTS (SELECT 1 FROM incident_members r WHERE r.incident_id = i.id AND r.fingerprint = i.fingerprint)"
    ") AS a ORDER BY fingerprint, joined_at DESC"
)


def grouping(engine, steps: list[list[Item]]) -> dict[str, str]:
    """fingerprint -> the incident it is a member of now."""
    fps = sorted({i.fingerprint for step in steps for i in step})
    with engine.connect() as conn:
        return {r.fingerprint: r.incident_id for r in conn.execute(GROUPING, {"fps": json.dumps(fps)})}


@dataclass
class Score:
    alerts: int
    incidents: int
    expected: int
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def score(steps: list[list[Item]], got: dict[str, str]) -> Score:
    truth = {i.fingerprint: i.group for step in steps for i in step}
    tp = fp = fn = 0
    for a, b in combinations(sorted(truth), 2):
        same_truth = truth[a] == truth[b]
        same_got = got.get(a) is not None and got.get(a) == got.get(b)
        tp += same_truth and same_got
        fp += same_got and not same_truth
        fn += same_truth and not same_got
    return Score(len(truth), len({got.get(f) for f in truth}), len(set(truth.values())), tp, fp, fn)


def table(rows: list[tuple[Scenario, Score]]) -> list[str]:
    lines = ["| scenario | alerts | incidents (expected) | precision | recall |", "|---|---|---|---|---|"]
    for scenario, s in rows:
        lines.append(f"| {scenario.name} | {s.alerts} | {s.incidents} ({s.expected}) | {s.precision:.3f} | {s.recall:.3f} |")
    total = Score(sum(s.alerts for _, s in rows), sum(s.incidents for _, s in rows), sum(s.expected for _, s in rows),
                  sum(s.tp for _, s in rows), sum(s.fp for _, s in rows), sum(s.fn for _, s in rows))
    lines.append(f"| **all** | {total.alerts} | {total.incidents} ({total.expected}) | {total.precision:.3f} | {total.recall:.3f} |")
    return lines


def overall(rows: list[tuple[Scenario, Score]]) -> Score:
    return Score(0, 0, 0, sum(s.tp for _, s in rows), sum(s.fp for _, s in rows), sum(s.fn for _, s in rows))
