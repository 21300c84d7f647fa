"""Correlation in the ingest transaction: joins with their reasons, per-member
resolve, late roots merging, priority, the common path left alone; against
real PostgreSQL and the loopback Kubernetes API."""

import json

import pytest
import sqlalchemy as sa

from shared import incidents as svc
from shared.correlation.plan import Correlator
from shared.correlation.rules import RuleSet, load, parse
from shared.correlation.topology import Topology
from shared.errors import Conflict
from shared.members import members_of
from tests import storms
from tests.storms import KUBE_PROMETHEUS, Cluster, kp

SOURCE = "/test"


def correlator(kube, rules: RuleSet | None = None) -> Correlator:
    return Correlator(rules or load(), Topology(storms.kube_client_factory(kube.kubeconfig_path), configured=lambda: True))


def record(engine, corr, items):
    alerts = [i.alert() for i in items]
    with engine.begin() as conn:
        return svc.record_alerts(conn, alerts, SOURCE, "alertmanager", plan=corr.plan(alerts))


def incident(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_incident(conn, incident_id), svc.get_timeline(conn, incident_id), members_of(conn, incident_id)


def outbox(engine):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT subject, type, data FROM event_outbox ORDER BY created_at, id")).mappings().all()


def test_pods_join_their_node_with_a_reason_on_the_timeline(clean_db, kube):
    c = Cluster(kube, "join")
    node = c.node("ip-10-0-3-17")
    pods = c.deployment("checkout", [node, node])
    corr = correlator(kube)
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    assert root.action == "created"
    result = record(clean_db, corr, [kp("KubePodNotReady", "n", namespace="join", pod=p) for p in pods])
    assert [(o.action, o.incident_id) for o in result.outcomes] == [("joined", root.incident_id)] * 2
    assert result.event_ids == []  # a join opens nothing, so nothing is paged
    row, timeline, members = incident(clean_db, root.incident_id)
    assert row["alert_name"] == "KubeNodeNotReady" and row["status"] == "open"
    assert [m["alert_name"] for m in members] == ["KubeNodeNotReady", "KubePodNotReady", "KubePodNotReady"]
    assert members[0]["correlation_reason"] == "root" and members[0]["is_root"]
    joins = [t["details"]["reason"] for t in timeline if t["kind"] == "alert_joined"]
    assert joins == [
        f"KubePodNotReady join/{p} joined: pod runs on node {node}, where KubeNodeNotReady fires" for p in pods
    ]
    assert [m["correlation_reason"] for m in members[1:]] == joins
    # A repeat of a member refreshes it in place: no new incident, no new member.
    again = record(clean_db, corr, [kp("KubePodNotReady", "n", namespace="join", pod=pods[0])]).outcomes[0]
    assert (again.action, again.incident_id) == ("refreshed", root.incident_id)
    assert len(incident(clean_db, root.incident_id)[2]) == 3



def test_a_member_stays_a_member_once_no_rule_concerns_it(clean_db, kube):
    """Rules change between deliveries: a pod that joined its node's
    incident, delivered again when no rule concerns it any more (the plain
    upsert, without the offers), still refreshes its membership instead of
    opening an incident of its own."""
    c = Cluster(kube, "unruled")
    node = c.node("ip-10-0-3-40")
    (pod,) = c.deployment("cart", [node])
    corr = correlator(kube)
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    member = kp("KubePodNotReady", "n", namespace="unruled", pod=pod)
    assert record(clean_db, corr, [member]).outcomes[0].action == "joined"
    with clean_db.begin() as conn:
        (again,) = svc.record_alerts(conn, [member.alert()], SOURCE, "alertmanager", plan=None).outcomes
    assert (again.action, again.incident_id) == ("refreshed", root.incident_id)
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar() == 1

def test_incident_resolves_only_when_every_member_has(clean_db, kube):
    c = Cluster(kube, "resolve")
    node = c.node("ip-10-0-20-1")
    pods = c.deployment("render", [node, node])
    corr = correlator(kube)
    items = [kp("KubeNodeNotReady", "n", node=node)] + [kp("KubePodNotReady", "n", namespace="resolve", pod=p) for p in pods]
    incident_id = record(clean_db, corr, items).outcomes[0].incident_id
    resolved = [storms.Item(i.labels, "n", "resolved") for i in items]
    # The root resolves first: its pods still fire, the incident stays open.
    out = record(clean_db, corr, resolved[:1]).outcomes[0]
    assert (out.action, out.incident_id) == ("resolved", incident_id)
    assert incident(clean_db, incident_id)[0]["status"] == "open"
    record(clean_db, corr, resolved[1:2])
    row, timeline, members = incident(clean_db, incident_id)
    assert row["status"] == "open"
    assert [m["status"] for m in members] == ["resolved", "resolved", "firing"]
    assert [t["kind"] for t in timeline].count("alert_resolved") == 2
    assert not [e for e in outbox(clean_db) if e["type"].endswith("resolved")]
    record(clean_db, corr, resolved[2:])
    row, timeline, _ = incident(clean_db, incident_id)
    assert (row["status"], row["resolved_by"]) == ("resolved", "alert")
    assert [e["subject"] for e in outbox(clean_db) if e["type"].endswith("resolved")] == [incident_id]


def test_late_root_merges_the_incidents_its_pods_opened(clean_db, kube):
    c = Cluster(kube, "late")
    node = c.node("ip-10-0-21-1")
    pods = c.deployment("orders", [node, node])
    corr = correlator(kube)
    early = [record(clean_db, corr, [kp("KubePodNotReady", "n", namespace="late", pod=p)]).outcomes[0] for p in pods]
    assert [o.action for o in early] == ["created", "created"]
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    assert root.action == "created"
    row, timeline, members = incident(clean_db, root.incident_id)
    assert len(members) == 3 and sum(m["is_root"] for m in members) == 1
    assert sum(t["kind"] == "alert_joined" for t in timeline) == 2
    for old in early:
        old_row, old_timeline, old_members = incident(clean_db, old.incident_id)
        assert (old_row["status"], old_row["resolved_by"], old_row["merged_into"]) == ("resolved", "merged", root.incident_id)
        assert old_members == []
        assert [t["kind"] for t in old_timeline] == ["opened", "merged"]  # its history is kept
        assert old_timeline[-1]["details"]["into"] == root.incident_id
    resolved = [e for e in outbox(clean_db) if e["type"].endswith("resolved")]
    assert sorted(e["subject"] for e in resolved) == sorted(o.incident_id for o in early)
    assert all(e["data"]["merged_into"] == root.incident_id for e in resolved)
    # A merged incident cannot be reopened: its alerts belong to the survivor.
    with pytest.raises(Conflict, match=f"merged into {root.incident_id}"), clean_db.begin() as conn:
        svc.transition(conn, early[0].incident_id, "investigating", "api", SOURCE)
    # The pods' fingerprints now find the node's incident.
    with clean_db.connect() as conn:
        found, _ = svc.list_incidents(conn, svc.IncidentFilter(statuses=("open",), fingerprints=(storms.kp(
            "KubePodNotReady", "n", namespace="late", pod=pods[0]).fingerprint,)))
    assert [f["id"] for f in found] == [root.incident_id]


def test_a_member_raises_the_incident_priority(clean_db, kube):
    c = Cluster(kube, "prio")
    node = c.node("ip-10-0-22-1")
    pods = c.deployment("ledger", [node])
    corr = correlator(kube)
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    assert incident(clean_db, root.incident_id)[0]["priority"] == "P1"  # warning
    critical = kp("KubePodNotReady", "n", namespace="prio", pod=pods[0])
    critical.labels["severity"] = "critical"
    record(clean_db, corr, [critical])
    row, timeline, _ = incident(clean_db, root.incident_id)
    assert row["priority"] == "P0"
    assert [t["details"]["to"] for t in timeline if t["kind"] == "priority_raised"] == ["P0"]
    raised = [e for e in outbox(clean_db) if e["data"].get("raised_to")]
    assert [(e["subject"], e["type"], e["data"]["priority"]) for e in raised] == [
        (root.incident_id, "io.incidentresponse.incident.opened", "P0")]


def test_alerts_no_rule_concerns_never_call_kubernetes(clean_db, kube):
    corr = correlator(kube)
    before = len(kube.requests)
    plain = [storms.Item({"alertname": "TargetDown", "severity": "warning", "job": "x", "namespace": "n", "service": "s"}, "a"),
             storms.Item({"alertname": "KubeJobFailed", "severity": "warning", "namespace": "n", "job_name": "j"}, "b")]
    assert corr.plan([i.alert() for i in plain]) == {}
    outcomes = record(clean_db, corr, plain).outcomes
    assert [o.action for o in outcomes] == ["created", "created"]
    assert len(kube.requests) == before


def test_pod_lookups_are_cached_and_a_deleted_pod_keeps_its_membership(clean_db, kube):
    c = Cluster(kube, "cache")
    node = c.node("ip-10-0-23-1")
    pods = c.deployment("stream", [node])
    corr = correlator(kube)
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    item = kp("KubePodNotReady", "n", namespace="cache", pod=pods[0])
    record(clean_db, corr, [item])
    calls = len(kube.calls("GET", f"/pods/{pods[0]}"))
    record(clean_db, corr, [item])
    assert len(kube.calls("GET", f"/pods/{pods[0]}")) == calls == 1
    # The node is gone and its pod with it: a fresh lookup finds nothing, the
    # re-sent alert still refreshes its membership instead of opening anew.
    kube.pods = [p for p in kube.pods if p["metadata"]["name"] != pods[0]]
    out = record(clean_db, correlator(kube), [item]).outcomes[0]
    assert (out.action, out.incident_id) == ("refreshed", root.incident_id)


def test_label_rule_window_and_peers(clean_db, kube):
    rules = parse(storms.LABEL_RULES, "test")
    corr = correlator(kube, rules)
    a = kp("TargetDown", "a", namespace="lbl", job="j1", service="svc")
    b = kp("TargetDown", "a", namespace="lbl", job="j2", service="svc")
    first = record(clean_db, corr, [a]).outcomes[0]
    second = record(clean_db, corr, [b]).outcomes[0]
    assert (second.action, second.incident_id) == ("joined", first.incident_id)
    reason = incident(clean_db, first.incident_id)[2][1]["correlation_reason"]
    assert reason == "TargetDown svc joined: same namespace=lbl, service=svc, as TargetDown (rule same-service)"
    # Past the window the peers are not related any more.
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incident_members SET last_seen_at = last_seen_at - interval '11 minutes'"))
    late = record(clean_db, corr, [kp("TargetDown", "a", namespace="lbl", job="j3", service="svc")]).outcomes[0]
    assert late.action == "created" and late.incident_id != first.incident_id


def test_seed_alerts_keep_their_own_incidents_under_the_shipped_rules(clean_db, kube):
    """Test 2, 4 and 5 of the seed: no rule concerns them, each is its own incident."""
    corr = correlator(kube)
    seeds = [storms.Item({"alertname": name, "severity": "critical", "service": service}, name)
             for name, service in [("TestIncident", "test"), ("KafkaConsumerLagHigh", "email"), ("EmailServiceDown", "email")]]
    alerts = [i.alert() for i in seeds]
    assert corr.plan(alerts) == {}
    with clean_db.begin() as conn:
        outcomes = svc.record_alerts(conn, alerts, SOURCE, "alertmanager", plan=corr.plan(alerts)).outcomes
    assert [o.action for o in outcomes] == ["created"] * 3 and len({o.incident_id for o in outcomes}) == 3


def test_a_page_carries_the_member_count_and_the_reason(clean_db, kube, settings_obj):
    from functions.escalation.channels.pagerduty import trigger_event
    from functions.escalation.channels.slack import slack_message
    from shared.members import page_summary

    c = Cluster(kube, "page")
    node = c.node("ip-10-0-24-1")
    pods = c.deployment("mail", [node, node])
    corr = correlator(kube)
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    record(clean_db, corr, [kp("KubePodNotReady", "n", namespace="page", pod=p) for p in pods])
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, root.incident_id)
        row["correlation"] = page_summary(conn, root.incident_id)
    assert row["correlation"]["alert_count"] == 3 and row["correlation"]["firing"] == 3
    details = trigger_event(settings_obj, row, "key", "opened", None)["payload"]["custom_details"]
    assert details["alert_count"] == 3
    assert details["correlation_reason"].endswith(f"pod runs on node {node}, where KubeNodeNotReady fires")
    text = json.dumps(slack_message(settings_obj, row, "opened", None))
    assert "3 alerts in this incident, 3 firing" in text and "where KubeNodeNotReady fires" in text
    from functions.escalation.channels.teams import teams_message

    card = json.dumps(teams_message(settings_obj, row, "opened", None))
    assert "3 alerts in this incident, 3 firing" in card and "where KubeNodeNotReady fires" in card
    # A lone alert's page is as before.
    lone = {**row, "correlation": {"alert_count": 1, "firing": 1, "latest_reason": None}}
    assert "alert_count" not in trigger_event(settings_obj, lone, "key", "opened", None)["payload"]["custom_details"]


def test_a_late_dependency_merges_its_dependents_incidents_and_becomes_the_root(clean_db, kube):
    ns = "dep"
    c = Cluster(kube, ns)
    n1 = c.node("ip-10-0-25-1")
    db = c.statefulset("postgres", [n1])
    accounts = c.deployment("accounts", [n1])
    frontend = c.deployment("frontend", [n1])
    corr = correlator(kube, parse(storms.dependency_rules(ns), "test"))
    early = [record(clean_db, corr, [kp("KubePodCrashLooping", "d", namespace=ns, pod=accounts[0], container="app")]).outcomes[0],
             record(clean_db, corr, [kp("KubePodNotReady", "d", namespace=ns, pod=frontend[0])]).outcomes[0]]
    # frontend needs accounts: its pod joins the incident of accounts' pod.
    assert [o.action for o in early] == ["created", "joined"] and early[0].incident_id == early[1].incident_id
    root = record(clean_db, corr, [kp("KubeStatefulSetReplicasMismatch", "d", namespace=ns, statefulset="postgres")]).outcomes[0]
    assert root.action == "created"
    row, timeline, members = incident(clean_db, root.incident_id)
    assert (row["alert_name"], members[0]["alert_name"], members[0]["is_root"]) == ("KubeStatefulSetReplicasMismatch",) * 2 + (True,)
    assert len(members) == 3
    merged_reason = (f"KubePodCrashLooping joined when KubeStatefulSetReplicasMismatch {ns}/postgres arrived: "
                     "it depends on postgres, where KubeStatefulSetReplicasMismatch fires")
    assert sorted(m["correlation_reason"] for m in members[1:]) == [
        f"{merged_reason} (was {name} of incident {early[0].incident_id})" for name in ("KubePodCrashLooping", "KubePodNotReady")]
    old_row, old_timeline, old_members = incident(clean_db, early[0].incident_id)
    assert (old_row["status"], old_row["resolved_by"], old_row["merged_into"]) == ("resolved", "merged", root.incident_id)
    # Its history is kept: the chain frontend -> accounts -> postgres is on it.
    assert old_members == [] and [t["kind"] for t in old_timeline] == ["opened", "alert_joined", "merged"]
    assert old_timeline[1]["details"]["reason"] == (f"KubePodNotReady {ns}/{frontend[0]} joined: frontend depends on accounts, "
                                                    f"where KubePodCrashLooping fires")
    assert old_timeline[-1]["details"]["reason"] == merged_reason
    (resolved,) = [e for e in outbox(clean_db) if e["type"].endswith("resolved")]
    assert (resolved["subject"], resolved["data"]["merged_into"]) == (early[0].incident_id, root.incident_id)
    # The database's own pod joins the database's incident; the root stays.
    pod = record(clean_db, corr, [kp("KubePodNotReady", "d", namespace=ns, pod=db[0])]).outcomes[0]
    assert (pod.action, pod.incident_id) == ("joined", root.incident_id)
    assert incident(clean_db, root.incident_id)[0]["alert_name"] == "KubeStatefulSetReplicasMismatch"


def test_a_dependency_alert_that_joins_takes_over_the_root(clean_db, kube):
    """The database's pod opened the incident; its StatefulSet's alert joins
    it (same service) and, ranking higher, becomes the root."""
    ns = "dep-take"
    c = Cluster(kube, ns)
    n1 = c.node("ip-10-0-26-1")
    db = c.statefulset("postgres", [n1])
    corr = correlator(kube, parse(storms.dependency_rules(ns), "test"))
    pod = kp("KubePodNotReady", "d", namespace=ns, pod=db[0])
    first = record(clean_db, corr, [pod]).outcomes[0]
    workload = kp("KubeStatefulSetReplicasMismatch", "d", namespace=ns, statefulset="postgres")
    second = record(clean_db, corr, [workload]).outcomes[0]
    assert (second.action, second.incident_id) == ("joined", first.incident_id)
    row, timeline, members = incident(clean_db, first.incident_id)
    assert (row["alert_name"], row["fingerprint"]) == ("KubeStatefulSetReplicasMismatch", workload.fingerprint)
    (change,) = [t["details"] for t in timeline if t["kind"] == "root_changed"]
    assert change["reason"] == (f"KubeStatefulSetReplicasMismatch {ns}/postgres took over as root from KubePodNotReady: "
                                f"a workload alert (statefulset {ns}/postgres), and postgres is a dependency of accounts, orders "
                                "(rule dependencies)")


LABEL_ROOT_RULES = """
rules:
  - name: same-service
    kind: labels
    labels: [namespace, service]
    alerts: [TargetDown, KubeHpaMaxedOut, KubeDeploymentReplicasMismatch]
    root: [TargetDown, KubeDeploymentReplicasMismatch]
    window: 10m
"""


def test_a_labels_join_that_ranks_above_the_root_takes_it_over(clean_db, kube):
    corr = correlator(kube, parse(LABEL_ROOT_RULES, "test"))
    hpa = kp("KubeHpaMaxedOut", "a", namespace="lbl", horizontalpodautoscaler="svc", service="svc")
    first = record(clean_db, corr, [hpa]).outcomes[0]
    mismatch = kp("KubeDeploymentReplicasMismatch", "a", namespace="lbl", deployment="svc", service="svc")
    target = kp("TargetDown", "a", namespace="lbl", job="svc-metrics", service="svc")
    target.labels["severity"] = "critical"
    assert [o.action for o in record(clean_db, corr, [mismatch]).outcomes] == ["joined"]
    row = incident(clean_db, first.incident_id)[0]
    assert (row["alert_name"], row["summary"]) == ("KubeDeploymentReplicasMismatch", KUBE_PROMETHEUS["KubeDeploymentReplicasMismatch"]["summary"])
    out = record(clean_db, corr, [target]).outcomes[0]
    assert (out.action, out.incident_id) == ("joined", first.incident_id)
    row, timeline, members = incident(clean_db, first.incident_id)
    assert (row["alert_name"], row["summary"], row["fingerprint"], row["priority"]) == (
        "TargetDown", KUBE_PROMETHEUS["TargetDown"]["summary"], target.fingerprint, "P0")
    assert row["labels"] == target.labels
    assert [(m["alert_name"], m["is_root"]) for m in members] == [
        ("TargetDown", True), ("KubeHpaMaxedOut", False), ("KubeDeploymentReplicasMismatch", False)]
    changes = [t["details"] for t in timeline if t["kind"] == "root_changed"]
    assert [(c["from_alert_name"], c["alert_name"]) for c in changes] == [
        ("KubeHpaMaxedOut", "KubeDeploymentReplicasMismatch"), ("KubeDeploymentReplicasMismatch", "TargetDown")]
    assert changes[-1]["reason"] == ("TargetDown svc took over as root from KubeDeploymentReplicasMismatch: "
                                     "TargetDown is first in rule same-service's root list")
    assert changes[-1]["from"] == mismatch.fingerprint and changes[-1]["to"] == target.fingerprint
    # A lower-ranked peer joining later leaves the root alone.
    peer = kp("KubeHpaMaxedOut", "a", namespace="lbl", horizontalpodautoscaler="svc-2", service="svc")
    assert record(clean_db, corr, [peer]).outcomes[0].action == "joined"
    assert incident(clean_db, first.incident_id)[0]["alert_name"] == "TargetDown"
    # Each member still resolves on its own, the new root and the old ones alike.
    again = record(clean_db, corr, [hpa]).outcomes[0]
    assert (again.action, again.incident_id) == ("refreshed", first.incident_id)
    for item in (target, hpa, mismatch):
        assert record(clean_db, corr, [storms.Item(item.labels, "a", "resolved")]).outcomes[0].incident_id == first.incident_id
        assert incident(clean_db, first.incident_id)[0]["status"] == "open"
    record(clean_db, corr, [storms.Item(peer.labels, "a", "resolved")])
    assert incident(clean_db, first.incident_id)[0]["status"] == "resolved"


def test_pod_alerts_cost_no_candidate_statement_until_a_root_offers_their_node(clean_db, kube):
    """A batch of alerts that only look for a root sends the statements a
    batch without correlation sends (its advisory locks travel with the
    upsert); the candidate statement is sent only for alerts some active
    incident offers a key to."""
    c = Cluster(kube, "cost")
    node = c.node("ip-10-0-50-1")
    pods = c.deployment("shop", [node, node, node])
    corr = correlator(kube)
    sent: list[str] = []

    def seen(conn, cursor, statement, *args):
        sent.append(statement)

    sa.event.listen(clean_db, "before_cursor_execute", seen)
    try:
        def statements(items, plan=True):
            sent.clear()
            alerts = [i.alert() for i in items]
            with clean_db.begin() as conn:
                outcomes = svc.record_alerts(conn, alerts, SOURCE, "alertmanager", plan=corr.plan(alerts) if plan else None).outcomes
            return [s for s in sent if not s.startswith("SELECT count(pg_advisory_xact_lock")], outcomes

        plain, _ = statements([kp("KubePodNotReady", "c", namespace="cost", pod=pods[0])], plan=False)
        lone, outcomes = statements([kp("KubePodNotReady", "c", namespace="cost", pod=pods[1])])
        assert [o.action for o in outcomes] == ["created"]
        assert len(lone) == len(plain) and not any("WITH found AS" in s for s in lone)
        statements([kp("KubeNodeNotReady", "c", node=node)])
        joined, outcomes = statements([kp("KubePodNotReady", "c", namespace="cost", pod=pods[2])])
        assert [o.action for o in outcomes] == ["joined"]
        assert sum("WITH found AS" in s for s in joined) == 1
    finally:
        sa.event.remove(clean_db, "before_cursor_execute", seen)


@pytest.fixture
def long_history(clean_db):
    """40 000 resolved incidents whose members offer nodes (the statistics
    know them), then a storm of 20 000 active incidents the statistics do
    not know yet."""
    with clean_db.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics, remediation_actions,
                                   fingerprint, labels, annotations, source, resolved_at)
            SELECT 'h' || g, 'Hist', 'P2', 'resolved', 's', 'd', '{}'::json, '[]'::json, 'fp' || g, '{}'::jsonb, '{}'::jsonb,
                   'alertmanager', timezone('utc', now())
            FROM generate_series(1, 40000) g"""))
        conn.execute(sa.text("""
            INSERT INTO incident_members (incident_id, fingerprint, alert_name, provides, seeks, is_root)
            SELECT 'h' || g, 'fp' || g, 'Hist', ARRAY['node:n' || (g % 50)], '{}', true FROM generate_series(1, 40000) g"""))
        conn.execute(sa.text("ANALYZE incidents; ANALYZE incident_members"))
    with clean_db.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics, remediation_actions,
                                   fingerprint, labels, annotations, source)
            SELECT 's' || g, 'Storm', 'P2', 'open', 's', 'd', '{}'::json, '[]'::json, 'sfp' || g, '{}'::jsonb, '{}'::jsonb,
                   'alertmanager'
            FROM generate_series(1, 20000) g"""))
    return clean_db


def explain(engine, statement, params) -> str:
    """The plans the server runs for ``statement``, the statements of a
    function it calls included (the firing upsert is one): auto_explain's,
    in a transaction rolled back."""
    with engine.connect() as conn, conn.begin() as transaction:
        conn.exec_driver_sql("LOAD 'auto_explain'")
        for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_nested_statements = on",
                        "auto_explain.log_level = notice", "client_min_messages = notice"):
            conn.exec_driver_sql(f"SET LOCAL {setting}")
        notices = conn.connection.dbapi_connection.notices
        notices.clear()
        result = conn.execute(statement, params)
        if result.returns_rows:  # a CALL of a procedure returns none
            result.fetchall()
        conn.exec_driver_sql("SELECT 1")  # a plan reaches the client with the next exchange
        plans = [n.get(b"M", b"").decode() for n in notices]
        transaction.rollback()
    assert plans, "auto_explain reported no plan"
    return "\n".join(plans)


def test_offers_are_checked_by_primary_key_whatever_the_statistics(long_history):
    """Whether a member's incident is active is one primary-key lookup per
    member, in the upsert's check for offers, the candidate statement, the
    lock taken before it and the resolve statement: never the active-fingerprint index filtered on the id, which
    visits every active incident for each member after a storm."""
    from shared import ingest
    from shared.correlation import store
    row = {"id": "new1", "alert_name": "A", "priority": "P2", "summary": "s", "description": "d", "fingerprint": "zz",
           "labels": {}, "annotations": {}, "source": "alertmanager", "starts_at": None, "seen": 1, "rank": 0,
           "provides": [], "seeks": ["node:n8"]}
    upsert = explain(long_history, ingest.UPSERT_FIRING, {"rows": json.dumps([row]), "window": 0, "actor": "t", "events": "[]",
                                                          "sought": json.dumps(["node:n8"]), "lock_also": json.dumps(["sfp7"])})
    candidates = explain(long_history, store.CANDIDATES, {"fps": json.dumps(["zz"]), "seeks": json.dumps(["node:n8"]),
                                                          "provides": "[]"})
    held = explain(long_history, store.HOLD, {"fps": json.dumps(["zz", "sfp7"]), "seeks": json.dumps(["node:n8"]), "provides": "[]",
                                              "ids": json.dumps(["h7"])})  # a flapping alert's resolved incident
    resolve = explain(long_history, ingest.RESOLVE_MEMBERS, {"rows": json.dumps([{"fingerprint": "zz", "ends_at": None}])})
    for plan in (upsert, candidates, held, resolve):
        assert "incidents_pkey" in plan, plan
        assert "Filter: ((id)::text = " not in plan, plan
        assert "idx_incidents_status" not in plan, plan  # nor a pass over the active incidents by status
