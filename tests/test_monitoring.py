"""The system's own alerts and dashboard: the rules pass `promtool check
rules` and their unit tests (`promtool test rules`, one firing and one quiet
case per alert), the PrometheusRule carries exactly those rules, and every
query of the rules and of the Grafana dashboard names a series the system
exports (read from a real /metrics rendering against the test database)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy import monitoring
from functions.query import metrics
from shared import incidents as svc
from tests.factories import alert

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool comes with Debian's prometheus package (make test installs it)")
TESTS = monitoring.ROOT / "prometheus" / "incident-response-rules.test.yml"
# Series the rules read that other components export, and who exports them.
EXTERNAL = {
    "revision_app_request_count": "Knative Serving's queue-proxy, in front of every function (user metrics port 9091)",
    "up": "Prometheus itself, per scrape target",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: identifiers that are not
    functions, aggregations, keywords, label names or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


@pytest.fixture(scope="module")
def exported(engine) -> set[str]:
    """Every series name the query function's /metrics exposes, samples or not."""
    names = set()
    for family in text_string_to_metric_families(metrics.render(metrics.build_registry()).decode()):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count", ""]}
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(monitoring.RULES.read_text())["groups"] for rule in group["rules"]]


def test_metric_names_are_read_out_of_promql():
    assert metric_names('max by (le) (increase(a_total{x="y(z)"}[1h])) / ignoring(b) c_sum > 0.5 and on() absent(up == 1)') == {
        "a_total", "c_sum", "up"}


@needs_promtool
def test_promtool_accepts_the_rules_and_the_prometheus_rule_spec(tmp_path):
    spec = tmp_path / "from-prometheusrule.yml"
    doc = yaml.safe_load((monitoring.MONITORING / "prometheusrule.yaml").read_text())
    assert doc["spec"] == yaml.safe_load(monitoring.RULES.read_text())
    spec.write_text(yaml.safe_dump(doc["spec"]))
    for path in (monitoring.RULES, spec):
        result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_alert_passes_its_unit_tests():
    result = subprocess.run([PROMTOOL, "test", "rules", TESTS.name], cwd=TESTS.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [case for test in yaml.safe_load(TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it stays quiet"


def test_the_alerts_cover_the_systems_own_failures():
    by_name = {rule["alert"]: rule["expr"] for rule in rules()}
    wanted = {"IncidentIntakeErrors": "revision_app_request_count", "IncidentOutboxEventsOld": "outbox_oldest_pending_age_seconds",
              "IncidentDeadLetters": "dead_letters_not_redriven", "IncidentEscalationFailures": "escalations_total",
              "IncidentRemediationFailureRate": "remediation_actions_total", "IncidentDatabaseUnreachable": "up"}
    for name, series in wanted.items():
        assert series in metric_names(by_name[name]), name


def test_every_rule_reads_a_series_the_system_or_knative_exports(exported):
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - exported - set(EXTERNAL)
        assert not unknown, (rule["alert"], unknown)


def test_every_dashboard_query_names_an_exported_metric(exported):
    board = json.loads((monitoring.MONITORING / "grafana-dashboard.json").read_text())
    assert board == monitoring.dashboard()
    used = set()
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names and names <= exported, (panel["title"], target["expr"], names - exported)
            used |= names
    # What the on-call engineer asks of it.
    assert used >= {"incidents_total", "incident_time_to_resolve_seconds_bucket", "remediation_success_rate",
                    "escalations_total", "incident_alerts_bucket", "outbox_oldest_pending_age_seconds",
                    "dead_letters_not_redriven"}
    # And the check is not blind: a misspelt series would be caught.
    assert "incidents_totl" not in exported and metric_names("max(incidents_totl)") - exported


def test_alerts_per_incident_counts_each_incidents_alerts(clean_db):
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [alert("DiskSpaceLow", priority="P1", fingerprint="disk")] * 1, "/test", "test")
    for _ in range(2):
        with clean_db.begin() as conn:
            svc.record_alerts(conn, [alert("DiskSpaceLow", priority="P1", fingerprint="disk")], "/test", "test")
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [alert("HighErrorRate", priority="P0", fingerprint="errors")], "/test", "test")
    samples = {}
    for family in text_string_to_metric_families(metrics.render(metrics.build_registry()).decode()):
        for s in family.samples:
            if s.name.startswith("incident_alerts"):
                samples[(s.name, s.labels.get("le"))] = s.value
    assert samples[("incident_alerts_count", None)] == 2
    assert samples[("incident_alerts_sum", None)] == 4
    assert samples[("incident_alerts_bucket", "1.0")] == 1
    assert samples[("incident_alerts_bucket", "2.0")] == 1
    assert samples[("incident_alerts_bucket", "5.0")] == 2
    assert samples[("incident_alerts_bucket", "+Inf")] == 2


def test_the_service_monitor_scrapes_the_incident_api_service():
    from tests.test_manifests import build

    docs = build("knative/monitoring")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (dashboard,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert json.loads(dashboard["data"]["grafana-dashboard.json"]) == monitoring.dashboard()
    (api,) = [d for d in build("knative/overlays/production") if d["kind"] == "Service" and d["apiVersion"] == "v1"]
    assert monitor["metadata"]["namespace"] == api["metadata"]["namespace"] == "production"
    assert all(api["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in api["spec"]["ports"]] and endpoint["path"] == "/metrics"
    # The job label the rules use is the Service's name (no jobLabel set).
    assert "jobLabel" not in monitor["spec"] and api["metadata"]["name"] == "incident-api"
    assert 'job="incident-api"' in monitoring.RULES.read_text()


def test_the_stuck_outbox_alert_says_where_the_reason_is_and_that_it_needs_a_second_route():
    # A K_SINK no request can be made to stops the drain for good: the alert
    # sent the reader to the Broker, not to the error that names the setting.
    (rule,) = [r for r in rules() if r["alert"] == "IncidentOutboxEventsOld"]
    description = rule["annotations"]["description"]
    for words in ("K_SINK", "last_error", "second receiver"):
        assert words in description, words


def test_a_stuck_escalation_is_a_critical_alert_of_its_own_that_says_it_needs_a_second_route():
    # A stuck page was a warning after 5 minutes, routed through the very
    # escalation path that had failed: nobody was told a P0 went unpaged.
    by_name = {rule["alert"]: rule for rule in rules()}
    escalation, others = by_name["IncidentEscalationStuck"], by_name["IncidentsStuck"]
    assert escalation["labels"]["severity"] == "critical" and others["labels"]["severity"] == "warning"
    assert 'step=~"escalation:.*"' in escalation["expr"] and 'step!~"escalation:.*"' in others["expr"]
    for words in ("second receiver", "/dead-letters", "RECONCILE_STUCK_RESEND_SECONDS"):
        assert words in escalation["annotations"]["description"], words


def test_the_deploy_guide_routes_every_own_alert_to_a_receiver_outside_the_system():
    # The second receiver is where IncidentEscalationStuck is heard at all.
    guide = (monitoring.ROOT / "docs" / "deploy.md").read_text()
    snippet = yaml.safe_load(re.search(r"```yaml\n(route:\n  routes:\n    - receiver: incident-response-own.*?)```", guide, re.S)[1])
    own, back = snippet["route"]["routes"]
    assert own["receiver"] == "incident-response-own" and own["continue"] is True and back["receiver"] == "incident-webhook"
    (matcher,) = own["matchers"]
    names = re.fullmatch(r'alertname =~ "(.*)"', matcher)[1]
    assert back["matchers"] == [matcher]
    for rule in rules():
        assert re.fullmatch(names, rule["alert"]), rule["alert"]
    (receiver,) = snippet["receivers"]
    assert "webhook_configs" not in receiver
