"""A root change drives the pipeline again, over real HTTP through the local
Broker and the shipped Triggers: the intake, diagnostics, remediation and
escalation processes, PostgreSQL, loopback PagerDuty and Slack.

- a stronger alert taking over as root: diagnostics runs again on the new
  root, remediation acts on that diagnosis, PagerDuty's alert is updated
  under the same dedup_key (never a second page) and Slack is told the new
  root, why, and the member count;
- a late node root merging the incident its pod opened: diagnostics runs on
  the node;
- a redelivery of the old events does nothing twice."""

from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess, wait_until
from tests.conftest import TEST_TOKEN
from tests.factories import mark_diagnosed, webhook
from tests.storms import kp
from tests.test_escalation import ROUTING_KEY, SLACK_PATH

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
# The shipped rules, and a labels rule whose root list makes TargetDown
# take over from the alerts of its service.
SAME_SERVICE = """
  - name: same-service
    kind: labels
    labels: [namespace, service]
    alerts: [TargetDown, KubeHpaMaxedOut]
    root: [TargetDown]
    window: 10m
"""


@pytest.fixture(scope="module")
def pipeline(base_env, pd, slack_hook, tmp_path_factory):
    from deploy.services import SERVICES
    from local.broker import LocalBroker, load_brokers
    from loopback.servers import RecordingServer

    rules = tmp_path_factory.mktemp("rules") / "correlation.yaml"
    rules.write_text((ROOT / "functions" / "intake" / "correlation.yaml").read_text() + SAME_SERVICE)
    env = {**base_env, "REMEDIATION_MODE": "off", "KUBECONFIG": "/nonexistent/kubeconfig", "PROMETHEUS_URL": ""}
    started = []
    try:
        diagnostics = FunctionProcess("diagnostics", env).start()
        started.append(diagnostics)
        remediation = FunctionProcess("remediation", env).start()
        started.append(remediation)
        escalation = FunctionProcess("escalation", {
            **env, "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
            "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH}).start()
        started.append(escalation)
        others = RecordingServer().start()
        started.append(others)
        services = {name: others.url for name in SERVICES} | {
            "diagnostics": diagnostics.url, "remediation": remediation.url, "escalation": escalation.url}
        # The Triggers' real pauses (15 s doubling for a resolve) at a twentieth:
        # a 409 while a page is in flight is retried in 1.5 s, not 30.
        broker = LocalBroker(load_brokers(ROOT / "knative" / "base", services), port=0, backoff_scale=0.05).start()
        started.append(broker)
        intake = FunctionProcess("intake", {**env, "CORRELATION_FILE": str(rules),
                                            "K_SINK": broker.ingress_url("default", "incidents")}).start()
        started.append(intake)
        yield intake, broker
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.fixture
def flow(pipeline, pd, slack_hook, clean_db):
    pd.reset(), slack_hook.reset()
    yield pipeline
    pd.reset(), slack_hook.reset()


def post(intake, *items) -> list[dict]:
    alerts = [{"status": "firing", "labels": i.labels, "annotations": {"summary": f"{i.labels['alertname']} here"},
               "startsAt": "2026-11-27T10:00:00Z", "fingerprint": i.fingerprint} for i in items]
    answer = requests.post(intake.url + "/webhook/alert", json=webhook(alerts), headers=AUTH, timeout=10)
    answer.raise_for_status()
    return answer.json()["results"]


def timeline(engine, incident_id, kind) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT details, actor FROM incident_timeline WHERE incident_id = :id AND kind = :kind ORDER BY at, id"),
            {"id": incident_id, "kind": kind}).mappings()]


def delivered(broker, trigger, event_id) -> bool:
    return any(t == trigger and e == event_id and 200 <= status < 300 for t, e, status in broker.delivered)


def redeliver(broker, engine, event_id) -> None:
    """Send an event of the outbox to the Broker again, as a publisher
    retrying after a lost answer would."""
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM event_outbox WHERE id = :id"), {"id": event_id}).mappings().one()
    headers = {"ce-specversion": "1.0", "ce-id": row["id"], "ce-type": row["type"], "ce-source": row["source"],
               "ce-subject": row["subject"], "Content-Type": "application/json",
               **{f"ce-{k}": str(v) for k, v in (row["extensions"] or {}).items()}}
    before = len(broker.delivered)
    requests.post(broker.ingress_url("default", "incidents"), json=row["data"], headers=headers, timeout=10).raise_for_status()
    # Diagnostics and escalation both listen to openings: wait for both answers.
    wait_until(lambda: sum(e == event_id for _, e, _ in broker.delivered[before:]) >= 2, 30,
               message=f"the redelivery of {event_id}")


def test_a_root_taking_over_is_diagnosed_remediated_and_told_once_and_old_events_do_nothing_twice(flow, pd, slack_hook, clean_db):
    intake, broker = flow
    hpa = kp("KubeHpaMaxedOut", "a", namespace="pipe", horizontalpodautoscaler="svc", service="svc")
    hpa.labels["severity"] = "critical"
    (first,) = post(intake, hpa)
    incident_id = first["incident_id"]
    wait_until(lambda: len(timeline(clean_db, incident_id, "remediation_result")) == 1, 30, message="the first remediation")
    wait_until(lambda: delivered(broker, "escalate-opened-incidents", f"{incident_id}.opened.0"), 15, message="the first page")
    (diagnosed,) = timeline(clean_db, incident_id, "diagnosed")
    assert diagnosed["details"]["root"] == {"alert_name": "KubeHpaMaxedOut", "fingerprint": hpa.fingerprint, "root_generation": 0}

    target = kp("TargetDown", "a", namespace="pipe", job="svc-metrics", service="svc")
    target.labels["severity"] = "critical"
    (joined,) = post(intake, target)
    assert (joined["action"], joined["incident_id"]) == ("joined", incident_id)
    (change,) = timeline(clean_db, incident_id, "root_changed")
    assert (change["details"]["alert_name"], change["details"]["root_generation"]) == ("TargetDown", 1)
    # Diagnostics runs again, on the new root; remediation acts on that diagnosis.
    wait_until(lambda: len(timeline(clean_db, incident_id, "remediation_result")) == 2, 30, message="the new root's remediation")
    roots = [d["details"]["root"] for d in timeline(clean_db, incident_id, "diagnosed")]
    assert roots == [{"alert_name": "KubeHpaMaxedOut", "fingerprint": hpa.fingerprint, "root_generation": 0},
                     {"alert_name": "TargetDown", "fingerprint": target.fingerprint, "root_generation": 1}]
    results = [r["details"] for r in timeline(clean_db, incident_id, "remediation_result")]
    assert [(r["root"], r["root_generation"]) for r in results] == [("KubeHpaMaxedOut", 0), ("TargetDown", 1)]
    with clean_db.connect() as conn:
        stored = conn.execute(sa.text("SELECT diagnostics FROM incidents WHERE id = :id"), {"id": incident_id}).scalar()
    assert stored["root"]["alert_name"] == "TargetDown"

    # Escalation: one PagerDuty alert (one dedup_key), updated to the new root.
    wait_until(lambda: delivered(broker, "escalate-opened-incidents", f"{incident_id}.opened.0.root1"), 15,
               message="escalation to hear of the new root")
    wait_until(lambda: any(b["payload"]["custom_details"]["transition"] == "root_changed"
                           for b in pd.bodies() if b["event_action"] == "trigger"), 15, message="the page's update")
    pages = pd.bodies()
    assert {b["dedup_key"] for b in pages} == {incident_id}
    (update,) = [b for b in pages if b["payload"]["custom_details"]["transition"] == "root_changed"]
    assert update["payload"]["summary"].startswith("TargetDown - ")
    assert update["payload"]["custom_details"]["alert_count"] == 2
    wait_until(lambda: any("is now the root" in b["text"] for b in slack_hook.bodies()), 15, message="the Slack follow-up")
    (told,) = [b for b in slack_hook.bodies() if "is now the root" in b["text"]]
    assert "TargetDown svc took over as root from KubeHpaMaxedOut" in str(told["blocks"])
    assert "(2 alerts in this incident)" in str(told["blocks"])
    assert [t["details"]["transition"] for t in timeline(clean_db, incident_id, "notification")
            if t["details"]["channel"] == "pagerduty" and t["details"]["transition"] == "root_changed"] == ["root_changed"]

    # Redeliveries of the old opening and of the root change: nothing twice.
    broker.wait_idle(30)
    counts = {kind: len(timeline(clean_db, incident_id, kind)) for kind in ("diagnosed", "remediation_result", "notification")}
    sent = (len(pd.requests), len(slack_hook.requests))
    for event_id in (f"{incident_id}.opened.0", f"{incident_id}.opened.0.root1"):
        redeliver(broker, clean_db, event_id)
    broker.wait_idle(30)
    assert {kind: len(timeline(clean_db, incident_id, kind)) for kind in counts} == counts
    assert (len(pd.requests), len(slack_hook.requests)) == sent


def test_a_late_node_root_is_diagnosed_on_the_node(flow, clean_db):
    intake, broker = flow
    pod = kp("KubePodNotReady", "n", namespace="pipe", pod="web-1", node="ip-10-0-40-1")
    (early,) = post(intake, pod)
    wait_until(lambda: len(timeline(clean_db, early["incident_id"], "diagnosed")) == 1, 30, message="the pod's diagnosis")
    node = kp("KubeNodeNotReady", "n", node="ip-10-0-40-1")
    (root,) = post(intake, node)
    assert root["action"] == "created"
    wait_until(lambda: len(timeline(clean_db, root["incident_id"], "diagnosed")) == 1, 30, message="the node's diagnosis")
    (diagnosed,) = timeline(clean_db, root["incident_id"], "diagnosed")
    assert diagnosed["details"]["root"]["alert_name"] == "KubeNodeNotReady"
    with clean_db.connect() as conn:
        merged = conn.execute(sa.text("SELECT status, merged_into FROM incidents WHERE id = :id"), {"id": early["incident_id"]}).one()
    assert tuple(merged) == ("resolved", root["incident_id"])
    # The pod's incident is not diagnosed again: it was merged away.
    broker.wait_idle(30)
    assert len(timeline(clean_db, early["incident_id"], "diagnosed")) == 1


@pytest.fixture(scope="module")
def remediation(base_env):
    proc = FunctionProcess("remediation", {**base_env, "REMEDIATION_MODE": "off"}).start()
    yield proc
    proc.stop()


def test_remediation_acts_only_on_a_diagnosis_of_the_current_root(remediation, clean_db):
    """The old root's incident.diagnosed arriving after a take-over, before
    the new root's diagnosis: remediation leaves it to the new root's."""
    from shared import incidents as svc
    from shared.correlation.plan import Correlator
    from shared.correlation.rules import parse
    from tests.test_remediation import deliver

    corr = Correlator(parse("rules:" + SAME_SERVICE, "test"))
    hpa = kp("KubeHpaMaxedOut", "s", namespace="stale", horizontalpodautoscaler="svc", service="svc")
    target = kp("TargetDown", "s", namespace="stale", job="svc-metrics", service="svc")
    with clean_db.begin() as conn:
        (first,) = svc.record_alerts(conn, [hpa.alert()], "/test", "alertmanager", plan=corr.plan([hpa.alert()])).outcomes
        svc.store_diagnostics(conn, first.incident_id, {"root": {"alert_name": "KubeHpaMaxedOut", "root_generation": 0}})
        mark_diagnosed(conn, first.incident_id)
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [target.alert()], "/test", "alertmanager", plan=corr.plan([target.alert()]))
        row = svc.get_incident(conn, first.incident_id)
    assert (row["alert_name"], row["root_generation"]) == ("TargetDown", 1)
    assert deliver(remediation, row).status_code == 202
    assert timeline(clean_db, first.incident_id, "remediation_result") == []
    with clean_db.connect() as conn:  # the claim is given back for the new root's run
        assert conn.execute(sa.text("SELECT count(*) FROM work_claims WHERE incident_id = :id AND key LIKE 'remediation:%'"),
                            {"id": first.incident_id}).scalar() == 0
    with clean_db.begin() as conn:
        svc.store_diagnostics(conn, first.incident_id, {"root": {"alert_name": "TargetDown", "root_generation": 1}})
        mark_diagnosed(conn, first.incident_id)
    assert deliver(remediation, row).status_code == 200
    (result,) = timeline(clean_db, first.incident_id, "remediation_result")
    assert (result["details"]["root"], result["details"]["root_generation"]) == ("TargetDown", 1)


def ce(spec):
    from cloudevents.http import CloudEvent
    return CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", "subject": spec["subject"],
                       **spec["extensions"]}, spec["data"])


class SlowCollector:
    """A collection during which something else happens (``during``)."""
    def __init__(self):
        self.during = None

    def collect(self, incident):
        if self.during:
            hook, self.during = self.during, None
            hook()
        return {"durations_ms": {}, "alert": incident["alert_name"]}


def test_a_late_diagnosis_of_the_old_root_is_dropped_and_the_new_roots_is_remediated(clean_db, settings_obj):
    """The first root's diagnosis is slow: meanwhile TargetDown takes over
    and its own diagnosis is stored. The late one neither overwrites it nor
    replies; remediation then runs once, on the new root's diagnosis."""
    from dataclasses import replace

    from functions.diagnostics.handler import DiagnosticsHandler
    from functions.remediation import playbooks as pb
    from functions.remediation.handler import RemediationHandler
    from shared import events
    from shared.publisher import Publisher
    from shared import incidents as svc
    from shared.correlation.plan import Correlator
    from shared.correlation.rules import parse

    corr = Correlator(parse("rules:" + SAME_SERVICE, "test"))
    hpa = kp("KubeHpaMaxedOut", "s", namespace="late", horizontalpodautoscaler="svc", service="svc")
    target = kp("TargetDown", "s", namespace="late", job="svc-metrics", service="svc")
    with clean_db.begin() as conn:
        (first,) = svc.record_alerts(conn, [hpa.alert()], "/test", "alertmanager", plan=corr.plan([hpa.alert()])).outcomes
        old_root = svc.get_incident(conn, first.incident_id)
    collector = SlowCollector()
    diagnostics = DiagnosticsHandler(settings_obj, collector)

    def take_over_and_diagnose_the_new_root():
        with clean_db.begin() as conn:
            svc.record_alerts(conn, [target.alert()], "/test", "alertmanager", plan=corr.plan([target.alert()]))
            new_root = svc.get_incident(conn, first.incident_id)
        assert new_root["root_generation"] == 1
        reply = diagnostics.handle(ce(events.incident_event(events.INCIDENT_OPENED, new_root, "/test")))
        assert reply.status_code == 200 and reply.headers["ce-id"] == f"{first.incident_id}.diagnosed.0.root1"

    collector.during = take_over_and_diagnose_the_new_root
    late = diagnostics.handle(ce(events.incident_event(events.INCIDENT_OPENED, old_root, "/test")))
    assert late.status_code == 202  # dropped: nothing replied for a root that no longer is
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, first.incident_id)
        done = conn.execute(sa.text("SELECT key FROM work_claims WHERE incident_id = :i AND completed_at IS NOT NULL ORDER BY key"),
                            {"i": first.incident_id}).scalars().all()
    assert row["diagnostics"]["root"] == {"alert_name": "TargetDown", "fingerprint": target.alert().fingerprint, "root_generation": 1}
    assert done == [f"diagnostics:{first.incident_id}:0", f"diagnostics:{first.incident_id}:0.root1"]
    assert [t["details"]["root"]["root_generation"] for t in timeline(clean_db, first.incident_id, "diagnosed")] == [1]

    config = replace(settings_obj, remediation_mode="off", k_sink=None)  # events stay in the outbox
    remediation = RemediationHandler(config, pb.load(), Publisher(config))
    for _ in range(2):  # a redelivery replays
        reply = remediation.handle(ce(events.incident_event(events.INCIDENT_DIAGNOSED, row, "/test")))
        assert reply.status_code == 200 and reply.headers["ce-id"] == f"{first.incident_id}.remediation_failed.0.root1"
    (result,) = timeline(clean_db, first.incident_id, "remediation_result")
    assert (result["details"]["root"], result["details"]["root_generation"]) == ("TargetDown", 1)


def test_a_diagnosis_from_before_root_generations_is_taken_as_the_current_roots(clean_db, settings_obj):
    """Rolling upgrade: a diagnostics replica of the previous release stores
    a diagnosis naming no root. Remediation does not wait for one that
    replica will never write: it acts on it, as of the root the incident has."""
    from dataclasses import replace

    from functions.remediation import playbooks as pb
    from functions.remediation.handler import RemediationHandler
    from shared import events
    from shared.publisher import Publisher
    from shared import incidents as svc
    from shared.correlation.plan import Correlator
    from shared.correlation.rules import parse

    corr = Correlator(parse("rules:" + SAME_SERVICE, "test"))
    hpa = kp("KubeHpaMaxedOut", "s", namespace="upgrade", horizontalpodautoscaler="svc", service="svc")
    target = kp("TargetDown", "s", namespace="upgrade", job="svc-metrics", service="svc")
    with clean_db.begin() as conn:
        (first,) = svc.record_alerts(conn, [hpa.alert()], "/test", "alertmanager", plan=corr.plan([hpa.alert()])).outcomes
    with clean_db.begin() as conn:
        svc.record_alerts(conn, [target.alert()], "/test", "alertmanager", plan=corr.plan([target.alert()]))
        svc.store_diagnostics(conn, first.incident_id, {"durations_ms": {}, "alert": "TargetDown"})
        # and completes its step under the key it knows, without a root
        conn.execute(sa.text("INSERT INTO work_claims (key, incident_id, completed_at) VALUES (:k, :i, now())"),
                     {"k": f"diagnostics:{first.incident_id}:0", "i": first.incident_id})
        row = svc.get_incident(conn, first.incident_id)
    assert row["root_generation"] == 1
    old_style = events.incident_event(events.INCIDENT_DIAGNOSED, row, "/test")
    old_style["data"].pop("root_generation", None)  # and the old replica's event names none either
    config = replace(settings_obj, remediation_mode="off", k_sink=None)  # events stay in the outbox
    remediation = RemediationHandler(config, pb.load(), Publisher(config))
    reply = remediation.handle(ce(old_style))
    assert reply.status_code == 200 and reply.headers["ce-id"] == f"{first.incident_id}.remediation_failed.0.root1"
    (result,) = timeline(clean_db, first.incident_id, "remediation_result")
    assert result["details"]["root_generation"] == 1


def test_a_diagnosis_reply_is_of_the_generation_and_root_diagnosed_whatever_the_incident_is_at_by_then(clean_db, settings_obj):
    """The reply leaves after the diagnosis committed; a person may have
    reopened the incident in between (generation 1, first root). It names
    the generation and root the diagnosis is of (0, root 2): stale to
    remediation and escalation. Stamped with the incident's generation by
    then it was (1, root 2), a pair that never existed: a 400 for good."""
    import json

    from functions.diagnostics.handler import DiagnosticsHandler
    from shared import claims
    from shared import incidents as svc

    hpa = kp("KubeHpaMaxedOut", "s", namespace="reply", horizontalpodautoscaler="svc", service="svc")
    with clean_db.begin() as conn:
        (first,) = svc.record_alerts(conn, [hpa.alert()], "/test", "alertmanager").outcomes
        conn.execute(sa.text("UPDATE incidents SET root_generation = 2 WHERE id = :id"), {"id": first.incident_id})
        diagnosed = svc.get_incident(conn, first.incident_id)
    diagnosis = {"durations_ms": {}, "root": {"alert_name": "KubeHpaMaxedOut", "root_generation": 2}}
    with clean_db.begin() as conn:
        svc.transition(conn, first.incident_id, "resolved", "test", "/test")
        svc.transition(conn, first.incident_id, "investigating", "test", "/test")
        now = svc.get_incident(conn, first.incident_id)
    assert (now["generation"], now["root_generation"]) == (1, 0)
    reply = DiagnosticsHandler(settings_obj, SlowCollector())._reply(diagnosed, diagnosis)
    data = json.loads(reply.get_data())
    assert reply.headers["ce-id"] == f"{first.incident_id}.diagnosed.0.root2"
    assert (data["generation"], data["root_generation"]) == (0, 2)
    assert claims.judge_event(now, data["generation"], data["root_generation"]).startswith("the event is of generation 0")
