"""A late root merging many incidents at once: what the merge writes (member
moves, the merged incidents resolved, their timeline entries and resolved
events) and what it costs in statements, whatever the number merged.
Against real PostgreSQL and the loopback Kubernetes API."""

import pytest
import sqlalchemy as sa

from shared import incidents as svc
from shared.correlation.plan import Correlator
from shared.correlation.rules import load
from shared.correlation.topology import Topology
from tests import storms
from tests.storms import Cluster, kp

SOURCE = "/test"


def correlator(kube) -> Correlator:
    return Correlator(load(), Topology(storms.kube_client_factory(kube.kubeconfig_path), configured=lambda: True))


def record(engine, corr, items):
    alerts = [i.alert() for i in items]
    with engine.begin() as conn:
        return svc.record_alerts(conn, alerts, SOURCE, "alertmanager", plan=corr.plan(alerts))


def pods_then_node(kube, namespace: str, count: int):
    """``count`` pod alerts on one node, each recorded on its own (an
    incident each), and the node's alert that comes after them."""
    c = Cluster(kube, namespace)
    node = c.node(f"ip-10-0-70-{count}")
    pods = c.deployment("many", [node] * count)
    items = [kp("KubePodNotReady", "m", namespace=namespace, pod=p) for p in pods]
    return items, kp("KubeNodeNotReady", "m", node=node)


def test_a_late_root_merging_several_incidents_writes_what_each_merge_writes(clean_db, kube):
    """Every merged incident's members move to the survivor with the reason
    and the incident they came from; each merged incident is resolved as
    merged, with a ``merged`` timeline entry naming its members' count and
    a resolved event naming the survivor; the survivor gets one
    ``alert_joined`` per moved member, and its priority follows its members."""
    corr = correlator(kube)
    items, root = pods_then_node(kube, "merge", 4)
    items[2].labels["severity"] = "critical"  # a P0 member raises the survivor
    early = [record(clean_db, corr, [i]).outcomes[0] for i in items]
    assert [o.action for o in early] == ["created"] * 4
    with clean_db.begin() as conn:
        conn.execute(sa.text("DELETE FROM event_outbox"))
    node = record(clean_db, corr, [root]).outcomes[0]
    assert node.action == "created"
    survivor = node.incident_id
    by_fp = {o.fingerprint: o.incident_id for o in early}
    reason = {fp: f"KubePodNotReady joined when KubeNodeNotReady {root.labels['node']} arrived: it runs on node "
                  f"{root.labels['node']}, where KubeNodeNotReady fires" for fp in by_fp}
    with clean_db.connect() as conn:
        members = conn.execute(sa.text(
            "SELECT incident_id, fingerprint, alert_name, is_root, correlation_reason, status FROM incident_members "
            "ORDER BY incident_id = :s DESC, fingerprint"), {"s": survivor}).mappings().all()
        merged = conn.execute(sa.text(
            "SELECT id, status, resolved_by, merged_into, resolved_at IS NOT NULL AS has_end FROM incidents WHERE id <> :s "
            "ORDER BY id"), {"s": survivor}).mappings().all()
        timeline = conn.execute(sa.text(
            "SELECT incident_id, kind, actor, details FROM incident_timeline WHERE kind <> 'opened' "
            "ORDER BY incident_id, kind, details->>'fingerprint'")).mappings().all()
        events = conn.execute(sa.text(
            "SELECT subject, type, data->>'merged_into' AS merged_into, data->>'status' AS status, "
            "data->>'priority' AS priority FROM event_outbox ORDER BY subject, type")).mappings().all()
        priority = conn.execute(sa.text("SELECT priority FROM incidents WHERE id = :s"), {"s": survivor}).scalar()
    assert priority == "P0"
    assert [dict(m) for m in members] == sorted(
        [{"incident_id": survivor, "fingerprint": root.fingerprint, "alert_name": "KubeNodeNotReady", "is_root": True,
          "correlation_reason": "root", "status": "firing"}]
        + [{"incident_id": survivor, "fingerprint": fp, "alert_name": "KubePodNotReady", "is_root": False,
            "correlation_reason": f"{reason[fp]} (was KubePodNotReady of incident {by_fp[fp]})", "status": "firing"}
           for fp in by_fp], key=lambda m: m["fingerprint"])
    assert [dict(m) for m in merged] == [
        {"id": i, "status": "resolved", "resolved_by": "merged", "merged_into": survivor, "has_end": True}
        for i in sorted(by_fp.values())]
    expected = [{"incident_id": survivor, "kind": "alert_joined", "actor": "alertmanager",
                 "details": {"fingerprint": fp, "alert_name": "KubePodNotReady", "reason": reason[fp], "merged_from": by_fp[fp]}}
                for fp in by_fp]
    expected += [{"incident_id": survivor, "kind": "priority_raised", "actor": "alertmanager",
                  "details": {"to": "P0", "reason": "a member's priority"}}]
    expected += [{"incident_id": by_fp[fp], "kind": "merged", "actor": "alertmanager",
                  "details": {"into": survivor, "reason": reason[fp], "members": 1}} for fp in by_fp]
    key = lambda t: (t["incident_id"], t["kind"], t["details"].get("fingerprint") or "")  # noqa: E731
    assert sorted((dict(t) for t in timeline), key=key) == sorted(expected, key=key)
    assert [dict(e) for e in events] == sorted(
        [{"subject": i, "type": "io.incidentresponse.incident.resolved", "merged_into": survivor, "status": "resolved",
          "priority": "P0" if i == by_fp[items[2].fingerprint] else "P1"} for i in by_fp.values()]
        + [{"subject": survivor, "type": "io.incidentresponse.incident.opened", "merged_into": None, "status": "open",
            "priority": "P1"},
           {"subject": survivor, "type": "io.incidentresponse.incident.opened", "merged_into": None, "status": "open",
            "priority": "P0"}],
        key=lambda e: (e["subject"], e["type"]))


@pytest.mark.parametrize("count", [2, 6])
def test_a_merge_sends_as_many_statements_for_six_incidents_as_for_two(clean_db, kube, count):
    """The merge moves the members and resolves the merged incidents in one
    statement each, for all of them: a node merging thousands of pod
    incidents holds their locks for as long as one merge takes, not
    thousands."""
    corr = correlator(kube)
    items, root = pods_then_node(kube, f"cost{count}", count)
    for i in items:
        record(clean_db, corr, [i])
    sent: list[str] = []

    def seen(conn, cursor, statement, *args):
        sent.append(statement)

    sa.event.listen(clean_db, "before_cursor_execute", seen)
    try:
        outcome = record(clean_db, corr, [root]).outcomes[0]
    finally:
        sa.event.remove(clean_db, "before_cursor_execute", seen)
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incidents WHERE merged_into = :s"),
                            {"s": outcome.incident_id}).scalar() == count
    moves = [s for s in sent if s.lstrip().startswith("UPDATE incident_members") and "was" in s]
    resolves = [s for s in sent if "resolved_by = 'merged'" in s]
    assert (len(moves), len(resolves)) == (1, 1), sent


def test_merged_incidents_of_several_members_each_move_every_member_with_its_own_history(clean_db, kube):
    """A workload's incident (its root and two pods) and two lone pod
    incidents of another workload merge into the node's late root at once:
    every member of each moves, its reason naming its alert and the
    incident it came from; each merged incident's ``merged`` entry counts
    its own members, and the survivor notes one ``alert_joined`` per member
    with the incident it came from."""
    corr = correlator(kube)
    c = Cluster(kube, "several")
    node = c.node("ip-10-0-80-1")
    web, api = c.deployment("web", [node, node]), c.deployment("api", [node, node])
    workload = record(clean_db, corr, [kp("KubeDeploymentReplicasMismatch", "m", namespace="several", deployment="web")])
    joined = record(clean_db, corr, [kp("KubePodNotReady", "m", namespace="several", pod=p) for p in web]).outcomes
    lone = [record(clean_db, corr, [kp("KubePodNotReady", "m", namespace="several", pod=p)]).outcomes[0] for p in api]
    assert {o.incident_id for o in joined} == {workload.outcomes[0].incident_id}
    assert [o.action for o in lone] == ["created"] * 2
    with clean_db.connect() as conn:
        before = conn.execute(sa.text("SELECT incident_id, fingerprint, alert_name FROM incident_members")).mappings().all()
    olds = sorted({m["incident_id"] for m in before})
    survivor = record(clean_db, corr, [kp("KubeNodeNotReady", "m", node=node)]).outcomes[0].incident_id
    with clean_db.connect() as conn:
        after = {m["fingerprint"]: m for m in conn.execute(sa.text(
            "SELECT incident_id, fingerprint, is_root, correlation_reason FROM incident_members")).mappings()}
        merged = {t["incident_id"]: t["details"] for t in conn.execute(sa.text(
            "SELECT incident_id, details FROM incident_timeline WHERE kind = 'merged'")).mappings()}
        moves = conn.execute(sa.text(
            "SELECT details FROM incident_timeline WHERE incident_id = :s AND kind = 'alert_joined'"), {"s": survivor}).scalars().all()
        resolved = conn.execute(sa.text(
            "SELECT subject, data->>'merged_into' FROM event_outbox WHERE type LIKE '%.resolved' ORDER BY subject")).all()
    assert sorted(merged) == olds
    for m in before:
        moved, reason = after[m["fingerprint"]], merged[m["incident_id"]]["reason"]
        assert (moved["incident_id"], moved["is_root"]) == (survivor, False)
        assert moved["correlation_reason"] == f"{reason} (was {m['alert_name']} of incident {m['incident_id']})"
    assert {i: d["members"] for i, d in merged.items()} == {i: sum(m["incident_id"] == i for m in before) for i in olds}
    assert all(d["into"] == survivor for d in merged.values())
    assert sorted((d["fingerprint"], d["alert_name"], d["merged_from"], d["reason"]) for d in moves) == sorted(
        (m["fingerprint"], m["alert_name"], m["incident_id"], merged[m["incident_id"]]["reason"]) for m in before)
    assert [tuple(r) for r in resolved] == [(i, survivor) for i in olds]


def _incident(conn, incident_id: str, fingerprint: str, members: list[str]) -> None:
    """An open incident whose member rows are written in the order given."""
    conn.execute(sa.text(
        "INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics, remediation_actions, "
        "fingerprint, labels, annotations, source) VALUES (:i, 'N', 'P2', 'open', 's', 'd', '{}'::json, '[]'::json, :f, "
        "'{}'::jsonb, '{}'::jsonb, 'alertmanager')"), {"i": incident_id, "f": fingerprint})
    for m in members:
        conn.execute(sa.text(
            "INSERT INTO incident_members (incident_id, fingerprint, alert_name, labels, priority, status, last_seen_at, "
            "joined_at, is_root, rank, correlation_reason) VALUES (:i, :f, :n, '{}'::jsonb, 'P2', 'firing', now(), now(), "
            ":r, 0, 'x')"), {"i": incident_id, "f": m, "n": "alert-" + m, "r": m == fingerprint})


def test_a_merged_incident_s_members_are_told_joined_in_fingerprint_order(clean_db):
    """The one statement moving every merged incident's members returns them
    in the table's order, not the fingerprints': each merged incident's
    ``alert_joined`` entries on the survivor still come in fingerprint
    order, as they did when each incident was merged on its own. A chain
    (A into B, B into the incident the batch's root opens, C) ends in C."""
    from shared.correlation import store

    a, b, c = ("a0000000-0000-4000-8000-000000000000", "b0000000-0000-4000-8000-000000000000",
               "c0000000-0000-4000-8000-000000000000")
    with clean_db.begin() as conn:
        _incident(conn, a, "fa", ["fa", "fa2", "fa1"])
        _incident(conn, b, "fb", ["fb"])
        _incident(conn, c, "fc", ["fc"])
        decision = store.Decision(merges={a: (b, "ra"), b: ("new:fc", "rb")})
        applied = store.apply(conn, decision, [], {}, {"fc": c}, "t", SOURCE)
        homes = conn.execute(sa.text("SELECT DISTINCT incident_id FROM incident_members")).scalars().all()
    joined = [(t["details"]["merged_from"], t["details"]["fingerprint"]) for t in applied.timeline
              if t["kind"] == "alert_joined"]
    assert homes == [c]
    assert all(t["incident_id"] == c for t in applied.timeline if t["kind"] == "alert_joined")
    assert joined == [(a, "fa"), (a, "fa1"), (a, "fa2"), (b, "fb")]
