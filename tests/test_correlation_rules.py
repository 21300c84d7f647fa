"""Loading correlation.yaml: the shipped rules, and errors that name the
file, the rule and the field."""

import os

import pytest

from shared.config import load_settings
from shared.correlation import topology
from shared.correlation.plan import Correlator
from shared.correlation.rules import DEFAULT_FILE, CorrelationConfigError, LabelsRule, TopologyRule, load, parse
from tests.storms import KUBE_PROMETHEUS


def test_shipped_rules_load_and_name_real_kube_prometheus_alerts():
    rules = load()
    assert {r.name for r in rules.rules} == {"node", "workload"}
    for rule in rules.topology:
        assert set(rule.root_alerts) <= set(KUBE_PROMETHEUS), rule.name


def test_correlation_file_replaces_the_shipped_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: svc, kind: labels, labels: [namespace, service], window: 5m}\n")
    (rule,) = load(str(path)).rules
    assert isinstance(rule, LabelsRule) and rule.window_seconds == 300


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - {name: a, kind: labels, labels: [x], window: soon}\n",
     "rule 'a' (rules[0]), field window: Value error, must be a duration like 90s, 15m or 2h, got 'soon'"),
    ("rules:\n  - {name: a, kind: labels, labels: []}\n", "rule 'a' (rules[0]), field labels: List should have at least 1 item"),
    ("rules:\n  - {name: ok, kind: labels, labels: [x]}\n  - {name: b, kind: topology, scope: rack, root_alerts: [X]}\n",
     "rule 'b' (rules[1]), field scope: Input should be 'node' or 'workload'"),
    ("rules:\n  - {name: c, kind: graph}\n", "rule 'c' (rules[0]), field kind: Input tag 'graph' found using 'kind' does not match"),
    ("rules:\n  - {name: d, kind: topology, scope: node, root_alerts: [X], nodes: [y]}\n",
     "rule 'd' (rules[0]), field nodes: Extra inputs are not permitted"),
    ("rules:\n  - {name: e, kind: labels, labels: [x]}\n  - {name: e, kind: labels, labels: [y]}\n", "rule 'e', field name: defined twice"),
    ("rules:\n  - {name: d, kind: dependency, services: {db: {workloads: [shop/StatefulSet/db]}}, depends_on: {app: [db]}}\n",
     "rule 'd' (rules[0]), field depends_on: Value error, app: names 'app', which is not under services"),
    ("rules:\n  - {name: d, kind: dependency, services: {a: {labels: [{job: a}]}, b: {labels: [{job: b}]}},"
     " depends_on: {a: [b], b: [a]}}\n", "rule 'd' (rules[0]), field depends_on: Value error, a cycle: a -> b -> a"),
    ("rules:\n  - {name: d, kind: dependency, services: {db: {workloads: [shop/Pod/db-0]}, app: {labels: [{job: app}]}},"
     " depends_on: {app: [db]}}\n",
     "rule 'd' (rules[0]), field services.db.workloads: Value error, 'shop/Pod/db-0' is not namespace/Kind/name"),
    ("rules:\n  - {name: d, kind: dependency, services: {db: {}, app: {labels: [{job: app}]}}, depends_on: {app: [db]}}\n",
     "rule 'd' (rules[0]), field services.db: Value error, names neither workloads nor labels"),
    ("rules:\n  - {name: d, kind: dependency, services: {db: {labels: [{job: ''}]}}, depends_on: {db: []}}\n",
     "rule 'd' (rules[0]), field services.db.labels: Value error, every label set needs at least one label"),
    ("rules: [\n", "not YAML"),
    ("- a\n", "expected a mapping with 'rules'"),
])
def test_errors_name_file_rule_and_field(text, message):
    with pytest.raises(CorrelationConfigError) as info:
        parse(text, "/etc/incident-response/correlation/correlation.yaml")
    assert str(info.value).startswith("/etc/incident-response/correlation/correlation.yaml: ")
    assert message in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CorrelationConfigError, match=f"{tmp_path}/nope.yaml: cannot read"):
        load(str(tmp_path / "nope.yaml"))


def test_without_kubernetes_or_prometheus_topology_rules_say_so_once_and_label_rules_still_apply(caplog, monkeypatch, tmp_path):
    rules = parse("rules:\n  - {name: n, kind: topology, scope: node, root_alerts: [KubeNodeNotReady]}\n"
                  "  - {name: s, kind: labels, labels: [service]}\n", "x")
    assert isinstance(rules.rules[0], TopologyRule)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    said = "Topology correlation rules have neither a Kubernetes API nor kube-state-metrics (PROMETHEUS_URL) to read; only label rules apply"

    def never():
        raise AssertionError("no Kubernetes client is made without a configuration")

    correlator = Correlator(rules, topology.from_settings(load_settings({**os.environ, "PROMETHEUS_URL": ""}), never))
    from tests.storms import Item

    pod = Item({"alertname": "KubePodNotReady", "severity": "warning", "namespace": "a", "pod": "p", "service": "s"}, "g")
    for _ in range(3):
        (links,) = correlator.plan([pod.alert()]).values()
        assert list(links.seeks) == ["labels:s:s"]  # the label rule; no node lookup
    assert [r.message for r in caplog.records].count(said) == 1
    assert DEFAULT_FILE.name == "correlation.yaml"
    # With PROMETHEUS_URL, kube-state-metrics is a source: nothing to say.
    caplog.clear()
    Correlator(rules, topology.from_settings(load_settings({**os.environ, "PROMETHEUS_URL": "http://127.0.0.1:9"}), never))
    assert said not in [r.message for r in caplog.records]


def test_the_intake_reads_topology_with_read_only_rights_and_mounts_the_rules():
    from pathlib import Path

    import yaml

    base = Path(__file__).resolve().parent.parent / "knative" / "base"
    docs = list(yaml.safe_load_all((base / "rbac.yaml").read_text()))
    (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "incident-correlation-reader"]
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    # What shared/correlation/topology.py calls, and nothing that writes.
    assert granted == {("", "pods"): {"get", "list"}, **{("apps", r): {"get"} for r in
                       ("replicasets", "deployments", "statefulsets", "daemonsets")}}
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == role["metadata"]["name"]]
    assert [s["name"] for s in binding["subjects"]] == ["incident-intake"]
    services = {d["metadata"]["name"]: d for d in yaml.safe_load_all((base / "services.yaml").read_text())}
    for name in ("intake", "intake-events"):
        spec = services[name]["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "incident-intake"
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["CORRELATION_FILE"] == "/etc/incident-response/correlation/correlation.yaml"
    assert load(str(base / "config" / "correlation.yaml")) == load()


def test_dependency_levels_put_the_deepest_dependency_first():
    from tests.storms import dependency_rules

    (rule,) = parse(dependency_rules("shop"), "test").dependency
    assert rule.levels() == {"postgres": 2, "accounts": 1, "orders": 0, "frontend": 0}
    assert rule.needs("frontend") == [("accounts", ["frontend", "accounts"]), ("postgres", ["frontend", "accounts", "postgres"])]


def test_the_dependency_example_in_the_shipped_file_is_a_valid_rule():
    lines = DEFAULT_FILE.read_text().splitlines()
    start = lines.index("  # - name: dependencies")
    example = [line.replace("  # ", "  ", 1) for line in lines[start:] if line.startswith("  # ")]
    (rule,) = parse("rules:\n" + "\n".join(example) + "\n", "example").dependency
    assert rule.levels() == {"postgres": 1, "kafka": 1, "email": 0}
    assert load().dependency == []  # the edges are a site's own: none ship
