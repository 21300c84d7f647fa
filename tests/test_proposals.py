"""Approval before acting: remediation records a proposal, an engineer
approves or rejects it through the query API, and the approval reaches
remediation as ``incident.remediation_approved`` (the query function's
outbox publishes to the remediation function), which executes it once with
the rails judged again. Real processes, real PostgreSQL, the loopback
Kubernetes API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import sqlalchemy as sa

from loopback.kube import deployment
from loopback.processes import FunctionProcess, wait_until
from shared import claims, events, proposals
from shared import incidents as svc
from tests.conftest import PERSONAL_TOKENS, TEST_TOKEN, api_users
from tests.factories import alert
from tests.test_remediation import _env, deliver, incident, reply_of

FAILED = events.INCIDENT_REMEDIATION_FAILED


@pytest.fixture
def cluster(kube):
    kube.deployments.clear(), kube.pods.clear(), kube.failures.clear(), kube.requests.clear(), kube.replicasets.clear()
    kube.rollout_delay = 0.0
    kube.add_deployment(deployment("email-service", 1))
    kube.add_deployment(deployment("email-service", 1, namespace="staging"))
    return kube


@pytest.fixture(scope="module")
def remediation(base_env, kube, database_url):
    proc = FunctionProcess("remediation", _env(base_env, kube, database_url, REMEDIATION_MODE="approve")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def query(base_env, remediation):
    # The outbox publishes straight to remediation, as the Broker's trigger would.
    proc = FunctionProcess("query", {**base_env, "K_SINK": remediation.url, "REMEDIATION_APPROVERS": "alice,bob",
                                     "INCIDENT_API_USERS": api_users("alice", "bob", "carol"),
                                     "REMEDIATION_APPROVAL_TTL_SECONDS": "600"}).start()
    yield proc
    proc.stop()


def post(query, path, actor="alice", json=None):
    """As ``actor`` with their personal token; a name without one (or
    ``claimed``) goes with the shared token, in X-Actor, as a script would."""
    return requests.post(query.url + path, headers=as_person(actor), json=json, timeout=30)


def as_person(actor):
    if actor in PERSONAL_TOKENS:
        return {"Authorization": f"Bearer {PERSONAL_TOKENS[actor]}"}
    return claimed(actor)


def claimed(actor):
    return {"Authorization": f"Bearer {TEST_TOKEN}", "X-Actor": actor}


def proposed(engine, remediation, name="KafkaConsumerLagHigh", **labels):
    row = incident(engine, name, **{"namespace": "production", **labels})
    event = reply_of(deliver(remediation, row))
    assert event["type"] == FAILED
    result = event.data["remediation"]
    assert result["reason"].startswith("awaiting approval: scale_deployment production/email-service")
    return row, result["proposal"]


def proposal_row(engine, incident_id, proposal_id):
    with engine.connect() as conn:
        return proposals.get(conn, incident_id, proposal_id)


def kinds(engine, incident_id):
    with engine.connect() as conn:
        return [t["kind"] for t in svc.get_timeline(conn, incident_id)]


def settled(engine, incident_id, proposal_id):
    wait_until(lambda: proposal_row(engine, incident_id, proposal_id)["status"] in ("executed", "failed"), 30,
               message="the approved proposal ran")
    return proposal_row(engine, incident_id, proposal_id)


def test_proposal_records_the_exact_actions_and_a_preview_and_changes_nothing(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    assert summary["url"].endswith(f"/ui/incidents/{row['id']}#proposal-{summary['id']}")
    p = proposal_row(clean_db, row["id"], summary["id"])
    assert p["status"] == "pending" and p["playbook"] == "kafka-consumer-lag-scale-out"
    assert p["actions"] == [{"action": "scale_deployment", "target": "production/email-service",
                             "params": {"namespace": "production", "name": "email-service", "replicas": 6}}]
    assert {k: p["preview"][0][k] for k in ("action", "from", "to", "dry_run")} == {"action": "scale_deployment", "from": 1, "to": 6, "dry_run": True}
    assert p["hash"] == proposals.fingerprint(row["id"], p["actions"]) == summary["hash"]
    assert not cluster.calls("PATCH")
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, row["id"])["status"] == "investigating"
    listed = requests.get(f"{query.url}/incidents/{row['id']}/proposals", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10)
    assert listed.status_code == 200 and [x["id"] for x in listed.json()["items"]] == [summary["id"]]


def test_approve_executes_once_through_the_event_and_resolves(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    response = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve", json={"hash": summary["hash"]})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "approved" and response.json()["decided_by"] == "user:alice"
    p = settled(clean_db, row["id"], summary["id"])
    assert p["status"] == "executed"
    (patch,) = cluster.calls("PATCH", "/scale")
    assert patch.json() == {"spec": {"replicas": 6}}
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, row["id"])["status"] == "resolved"
        timeline = svc.get_timeline(conn, row["id"])
    approved = next(t for t in timeline if t["kind"] == "remediation_approved")
    assert approved["actor"] == "user:alice" and approved["details"]["proposal_id"] == summary["id"]
    assert [k for k in (t["kind"] for t in timeline) if k.startswith("remediation_")][-3:] == [
        "remediation_approved", "remediation_action", "remediation_result"]
    # Approving again is refused, naming the state.
    again = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve")
    assert again.status_code == 409 and again.json()["proposal_status"] == "executed"


def test_reject_records_the_actor_and_a_later_approval_is_409_rejected(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    rejected = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/reject", actor="bob")
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected" and rejected.json()["decided_by"] == "user:bob"
    late = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve")
    assert late.status_code == 409 and late.json()["proposal_status"] == "rejected" and "rejected" in late.json()["message"]
    assert not cluster.calls("PATCH")


def test_an_expired_proposal_is_refused_with_409_expired(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE remediation_proposals SET expires_at = timezone('utc', now()) - interval '1 second' WHERE id = :id"),
                     {"id": summary["id"]})
    late = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve")
    assert late.status_code == 409 and late.json()["proposal_status"] == "expired"
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "expired"
    assert "remediation_proposal_expired" in kinds(clean_db, row["id"])
    assert not cluster.calls("PATCH")


def test_an_approver_not_on_the_list_gets_403_and_an_audit_entry(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    for actor in ("mallory", "", "carol"):  # carol: a verified person, but not an approver
        refused = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve", actor=actor)
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    with clean_db.connect() as conn:
        audit = [t for t in svc.get_timeline(conn, row["id"]) if t["kind"] == "remediation_approval_refused"]
    assert [(a["actor"], a["details"]["verified"]) for a in audit] == [("api:mallory", False), ("api", False), ("user:carol", True)]
    assert audit[2]["details"]["reason"] == "not in REMEDIATION_APPROVERS"
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "pending"
    assert not cluster.calls("PATCH")


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_the_shared_token_naming_an_approver_is_refused_with_the_reason_on_the_timeline(remediation, query, cluster, clean_db, decision):
    """Anyone with the shared token can write X-Actor: alice; with approvers
    listed, only alice's own token decides."""
    row, summary = proposed(clean_db, remediation)
    path = f"/incidents/{row['id']}/proposals/{summary['id']}/{decision}"
    forged = requests.post(query.url + path, headers=claimed("alice"), json={"hash": summary["hash"]}, timeout=30)
    assert forged.status_code == 403 and forged.json()["error"] == "forbidden", forged.text
    assert "personal token" in forged.json()["message"]
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "pending"
    with clean_db.connect() as conn:
        (audit,) = [t for t in svc.get_timeline(conn, row["id"]) if t["kind"] == "remediation_approval_refused"]
    assert audit["actor"] == "api:alice" and audit["details"]["verified"] is False
    assert audit["details"]["reason"].startswith("unverified: alice is named by the caller, not proven")
    assert audit["details"]["decision"] == decision
    # Alice's own token decides.
    assert post(query, path, actor="alice", json={"hash": summary["hash"]}).status_code == 200
    if decision == "approve":
        settled(clean_db, row["id"], summary["id"])
        assert [p.json() for p in cluster.calls("PATCH", "/scale")] == [{"spec": {"replicas": 6}}]
    else:
        assert not cluster.calls("PATCH")


def test_a_personal_token_with_x_actor_naming_someone_else_is_400_and_decides_nothing(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    path = f"{query.url}/incidents/{row['id']}/proposals/{summary['id']}/approve"
    headers = {"Authorization": f"Bearer {PERSONAL_TOKENS['carol']}", "X-Actor": "alice"}
    confused = requests.post(path, headers=headers, timeout=30)
    assert confused.status_code == 400 and confused.json()["header"] == "X-Actor", confused.text
    assert "carol's personal token" in confused.json()["message"]
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "pending"
    # Naming oneself is allowed (a script that always sends X-Actor).
    same = requests.post(path, headers={"Authorization": f"Bearer {PERSONAL_TOKENS['alice']}", "X-Actor": "alice"}, timeout=30)
    assert same.status_code == 200 and same.json()["decided_by"] == "user:alice"
    settled(clean_db, row["id"], summary["id"])


def test_a_hash_that_is_not_the_proposals_is_409(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    stale = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve", json={"hash": "0" * 64})
    assert stale.status_code == 409 and stale.json()["hash"] == summary["hash"]
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "pending"


def test_changed_parameters_invalidate_the_approval_and_propose_anew(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    # The incident's labels changed after the proposal: the actions now
    # render for another namespace, which the approval did not cover.
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET labels = labels || '{\"namespace\": \"staging\"}'::jsonb WHERE id = :id"), {"id": row["id"]})
    assert post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve").status_code == 200
    p = settled(clean_db, row["id"], summary["id"])
    assert p["status"] == "failed" and "changed since the approval" in p["reason"]
    assert not cluster.calls("PATCH")
    with clean_db.connect() as conn:
        fresh = [x for x in proposals.of_incident(conn, row["id"]) if x["id"] != summary["id"]]
    assert [x["status"] for x in fresh] == ["pending"] and fresh[0]["actions"][0]["target"] == "staging/email-service"


def test_a_hundred_concurrent_approvals_execute_once(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    path = f"/incidents/{row['id']}/proposals/{summary['id']}/approve"
    with ThreadPoolExecutor(max_workers=32) as pool:
        codes = list(pool.map(lambda i: post(query, path, actor="alice" if i % 2 else "bob").status_code, range(100)))
    assert codes.count(200) == 1 and codes.count(409) == 99
    assert settled(clean_db, row["id"], summary["id"])["status"] == "executed"
    assert len(cluster.calls("PATCH", "/scale")) == 1
    with clean_db.connect() as conn:
        runs = conn.execute(sa.text("SELECT count(*) FROM remediation_runs WHERE incident_id = :i AND NOT dry_run"), {"i": row["id"]}).scalar()
        results = [t for t in svc.get_timeline(conn, row["id"]) if t["kind"] == "remediation_result" and t["details"].get("approved_proposal")]
    assert runs == 1 and len(results) == 1


def test_a_rail_that_tripped_since_the_proposal_still_blocks(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    # Another incident's live scale of the same target, after the proposal:
    # the cooldown now holds.
    other = incident(clean_db, "KafkaConsumerLagHigh", namespace="production", instance="other")
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO remediation_runs (incident_id, action, target, dry_run, success) "
                             "VALUES (:i, 'scale_deployment', 'production/email-service', false, true)"), {"i": other["id"]})
    assert post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve").status_code == 200
    p = settled(clean_db, row["id"], summary["id"])
    assert p["status"] == "failed" and "blocked by cooldown" in p["reason"]
    assert not cluster.calls("PATCH")
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, row["id"])["status"] == "investigating"


def test_unknown_proposal_and_bad_ids(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    missing = post(query, f"/incidents/{row['id']}/proposals/00000000-0000-4000-8000-000000000000/approve")
    assert missing.status_code == 404
    assert post(query, f"/incidents/{row['id']}/proposals/nope/approve").status_code == 400
    assert post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve", json={"hash": 3}).status_code == 400
    assert post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve", json={"force": True}).status_code == 400
    unauthenticated = requests.post(f"{query.url}/incidents/{row['id']}/proposals/{summary['id']}/approve", timeout=10)
    assert unauthenticated.status_code == 401


def test_the_board_buttons_need_the_forms_csrf_token_and_a_listed_approver(remediation, query, cluster, clean_db):
    import re as _re

    row, summary = proposed(clean_db, remediation)
    base = f"{query.url}/ui/incidents/{row['id']}/proposals/{summary['id']}"
    anonymous = requests.post(base + "/approve", data={"actor": "alice"}, allow_redirects=False, timeout=10)
    assert anonymous.status_code == 303 and anonymous.headers["Location"].startswith("/ui/login")
    browser = requests.Session()
    assert browser.post(query.url + "/ui/login", data={"token": TEST_TOKEN}, allow_redirects=False, timeout=10).status_code == 303
    page = browser.get(f"{query.url}/ui/incidents/{row['id']}", timeout=10).text
    csrf = _re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert f'id="approve-{summary["id"]}"' in page and summary["hash"] in page
    assert f'id="actor-{summary["id"]}"' in page  # a shared session types a name
    forged = browser.post(base + "/approve", data={"actor": "alice", "csrf": "forged"}, allow_redirects=False, timeout=10)
    assert forged.status_code == 403
    for name in ("mallory", "bob"):  # a shared session naming an approver is not that approver
        refused = browser.post(base + "/approve", data={"actor": name, "csrf": csrf}, allow_redirects=False, timeout=10)
        assert refused.status_code == 303 and "error=" in refused.headers["Location"]
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "pending"
    with clean_db.connect() as conn:
        refusals = [t for t in svc.get_timeline(conn, row["id"]) if t["kind"] == "remediation_approval_refused"]
    assert [t["actor"] for t in refusals] == ["board:mallory", "board:bob"]
    assert refusals[1]["details"]["reason"].startswith("unverified: bob is named by the caller")
    shown = browser.get(f"{query.url}/ui/incidents/{row['id']}", timeout=10).text
    assert _re.search(r"by board:bob\s+— approve refused: unverified: bob is named by the caller, not proven", shown), shown[-800:]
    # Bob signs in with his own token: the page shows who he is instead of a name field.
    bob = requests.Session()
    assert bob.post(query.url + "/ui/login", data={"token": PERSONAL_TOKENS["bob"]}, allow_redirects=False, timeout=10).status_code == 303
    page = bob.get(f"{query.url}/ui/incidents/{row['id']}", timeout=10).text
    assert f'id="actor-{summary["id"]}"' not in page and "Deciding as <strong>bob</strong>" in page
    assert 'id="signed-in-as">Signed in as <strong>bob</strong>' in page
    csrf = _re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    # A name sent anyway is not read: the session says who decides.
    rejected = bob.post(base + "/reject", data={"actor": "alice", "csrf": csrf, "hash": summary["hash"]}, allow_redirects=False, timeout=10)
    assert rejected.status_code == 303 and "notice=" in rejected.headers["Location"]
    assert proposal_row(clean_db, row["id"], summary["id"])["decided_by"] == "user:bob"
    assert not cluster.calls("PATCH")


def test_a_proposal_past_its_ttl_shows_as_expired_before_anyone_decides(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE remediation_proposals SET expires_at = timezone('utc', now()) - interval '1 second' WHERE id = :id"),
                     {"id": summary["id"]})
    shown = requests.get(f"{query.url}/incidents/{row['id']}/proposals/{summary['id']}", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10)
    assert shown.status_code == 200 and shown.json()["status"] == "expired"
    browser = requests.Session()
    browser.post(query.url + "/ui/login", data={"token": TEST_TOKEN}, timeout=10)
    page = browser.get(f"{query.url}/ui/incidents/{row['id']}", timeout=10).text
    assert f'id="proposal-status-{summary["id"]}">expired<' in page and f'id="approve-{summary["id"]}"' not in page


def test_an_incident_resolved_before_anyone_approved_shows_the_proposal_superseded_and_a_decision_is_409(
        remediation, query, cluster, clean_db):
    """Resolved by hand while the proposal waited: the resolve stores
    nothing (a flapping alert's incident may go on at the same generation),
    but nothing is left to approve while it is resolved: the list, the
    proposal and the board show it superseded, and an approval is 409."""
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "test", "/test")
    p = proposal_row(clean_db, row["id"], summary["id"])
    assert (p["status"], p["reason"]) == ("pending", None)
    assert kinds(clean_db, row["id"])[-1] == "status_changed"
    auth = {"Authorization": f"Bearer {TEST_TOKEN}"}
    listed = requests.get(f"{query.url}/incidents/{row['id']}/proposals", headers=auth, timeout=10).json()["items"]
    one = requests.get(f"{query.url}/incidents/{row['id']}/proposals/{summary['id']}", headers=auth, timeout=10).json()
    for shown in ([item for item in listed if item["id"] == summary["id"]][0], one):
        assert (shown["status"], shown["reason"]) == ("superseded", "the incident resolved before anyone approved")
    browser = requests.Session()
    browser.post(query.url + "/ui/login", data={"token": TEST_TOKEN}, timeout=10)
    page = browser.get(f"{query.url}/ui/incidents/{row['id']}", timeout=10).text
    assert f'id="proposal-status-{summary["id"]}">superseded<' in page and f'id="approve-{summary["id"]}"' not in page
    refused = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve")
    assert refused.status_code == 409 and refused.json()["proposal_status"] == "superseded", refused.text
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "pending"
    assert not cluster.calls("PATCH")


def test_an_incident_resolved_before_the_approval_runs_is_not_remediated(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:  # approved; its event not delivered yet
        conn.execute(sa.text("UPDATE remediation_proposals SET status = 'approved', decided_by = 'api:alice' WHERE id = :id"),
                     {"id": summary["id"]})
        svc.transition(conn, row["id"], "resolved", "test", "/test")
    assert deliver_approval(remediation, row, summary["id"]).status_code == 200
    p = settled(clean_db, row["id"], summary["id"])
    assert p["status"] == "failed" and p["reason"].startswith("not executed: the incident is resolved")
    assert not cluster.calls("PATCH")


def deliver_approval(remediation, row, proposal_id):
    from cloudevents.conversion import to_binary
    from cloudevents.http import CloudEvent

    spec = events.incident_event(events.INCIDENT_REMEDIATION_APPROVED, row, "/test", {"proposal_id": proposal_id})
    headers, body = to_binary(CloudEvent({"id": f"{row['id']}.remediation_approved.{proposal_id}", "type": spec["type"],
                                          "source": "/test", **spec["extensions"]}, spec["data"]))
    return requests.post(remediation.url + "/", data=body, headers=headers, timeout=60)


@pytest.mark.parametrize("proposal_id", ["a\x00b", "\ud800", "not-a-proposal"])
def test_an_approval_event_naming_a_malformed_proposal_id_is_400(remediation, clean_db, proposal_id):
    # A NUL or a lone surrogate reached the driver, which failed on it: 500,
    # retried by the Broker until dead-lettered.
    from cloudevents.conversion import to_binary
    from cloudevents.http import CloudEvent

    with clean_db.begin() as conn:
        row = svc.get_incident(conn, svc.record_alerts(conn, [alert("KafkaConsumerLagHigh")], "/t", "t").outcomes[0].incident_id)
    spec = events.incident_event(events.INCIDENT_REMEDIATION_APPROVED, row, "/test", {"proposal_id": proposal_id})
    headers, body = to_binary(CloudEvent({"id": "malformed-approval", "type": spec["type"], "source": "/test", **spec["extensions"]},
                                         spec["data"]))
    response = requests.post(remediation.url + "/", data=body, headers=headers, timeout=60)
    assert response.status_code == 400 and "proposal_id" in response.json()["message"], response.text


def test_an_execution_whose_process_died_is_taken_over_only_after_the_worst_case(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)

    def executing_since(interval):
        with clean_db.begin() as conn:
            conn.execute(sa.text("UPDATE remediation_proposals SET status = 'executing', decided_by = 'api:alice', "
                                 f"started_at = timezone('utc', now()) - interval '{interval}' WHERE id = :id"), {"id": summary["id"]})

    executing_since("1 second")
    busy = deliver_approval(remediation, row, summary["id"])
    assert busy.status_code == 409 and "executing" in busy.json()["message"]
    assert not cluster.calls("PATCH")
    executing_since("1 day")
    taken = deliver_approval(remediation, row, summary["id"])
    assert taken.status_code == 200 and taken.headers["ce-type"] == events.INCIDENT_REMEDIATED
    assert taken.headers["ce-id"] == f"{row['id']}.remediated.0.{summary['id']}"
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "executed"
    assert len(cluster.calls("PATCH", "/scale")) == 1
    # A redelivery now replies the recorded result, without acting.
    again = deliver_approval(remediation, row, summary["id"])
    assert again.status_code == 200 and again.headers["ce-id"] == taken.headers["ce-id"]
    assert len(cluster.calls("PATCH", "/scale")) == 1


ONE_SHOT_FAULT = (
    "CREATE SEQUENCE approval_fault_once",
    # A sequence is not rolled back with the transaction the fault aborts, so
    # only the first remediation_result entry is refused.
    "CREATE FUNCTION approval_fault_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF NEW.kind = 'remediation_result' AND nextval('approval_fault_once') = 1 THEN RAISE EXCEPTION 'injected fault'; END IF; "
    "RETURN NEW; END $$",
    "CREATE TRIGGER approval_fault_once BEFORE INSERT ON incident_timeline FOR EACH ROW EXECUTE FUNCTION approval_fault_once()",
)


def test_a_crash_after_acting_is_a_recorded_failure_that_reaches_a_human_and_never_acts_twice(remediation, query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE remediation_proposals SET status = 'approved', decided_by = 'api:alice' WHERE id = :id"),
                     {"id": summary["id"]})
        for statement in ONE_SHOT_FAULT:
            conn.exec_driver_sql(statement)
    try:
        crashed = deliver_approval(remediation, row, summary["id"])
        again = deliver_approval(remediation, row, summary["id"])
    finally:
        with clean_db.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER approval_fault_once ON incident_timeline")
            conn.exec_driver_sql("DROP FUNCTION approval_fault_once()")
            conn.exec_driver_sql("DROP SEQUENCE approval_fault_once")
    # The scale ran, then recording its result failed: running the playbook
    # again could act twice, so the run is a failure that escalation pages on.
    assert crashed.status_code == 200, crashed.text
    assert crashed.headers["ce-type"] == FAILED
    assert "crashed" in reply_of(crashed).data["remediation"]["reason"]
    # Marked so (what it ran is on the timeline, not in the result): an old
    # root's crashed run is told by escalation, as one that acted.
    assert reply_of(crashed).data["remediation"]["crashed"] is True
    with clean_db.connect() as conn:
        (result,) = [t["details"] for t in svc.get_timeline(conn, row["id"])
                     if t["kind"] == "remediation_result" and t["details"].get("approved_proposal") == summary["id"]]
    assert result["crashed"] is True
    assert len(cluster.calls("PATCH", "/scale")) == 1
    p = proposal_row(clean_db, row["id"], summary["id"])
    assert p["status"] == "failed" and "crashed" in p["reason"]
    # A redelivery replies the recorded failure instead of 409 until the dead letter.
    assert again.status_code == 200 and again.headers["ce-id"] == crashed.headers["ce-id"]
    assert reply_of(again).data["remediation"]["crashed"] is True
    assert len(cluster.calls("PATCH", "/scale")) == 1


def forged_session(key_material: str, **claims) -> str:
    """A board cookie signed as the board signs shared-token sessions, with what the forger wants in it."""
    import hashlib
    import hmac
    import secrets
    import time

    from itsdangerous import URLSafeTimedSerializer

    key = hmac.new(key_material.encode(), b"board-session", hashlib.sha256).digest()
    return URLSafeTimedSerializer(key, salt="incident-board").dumps(
        {"sid": secrets.token_urlsafe(24), "csrf": "c", "since": "x", "exp": int(time.time()) + 3600, **claims})


def test_a_cookie_signed_with_the_shared_token_cannot_name_an_approver(remediation, query, cluster, clean_db):
    """The shared token signs board cookies, and the list of token hashes is
    no secret: a cookie that said who signed in would let any holder of the
    shared token approve as alice. Only a session row made by alice's own
    token names her."""
    import hashlib

    row, summary = proposed(clean_db, remediation)
    alice_hash = api_users("alice").split(":")[2]
    stamp = hashlib.sha256(b"board-session:" + alice_hash.encode()).hexdigest()[:32]
    attacker = requests.Session()
    attacker.cookies.set("ir_session", forged_session(TEST_TOKEN, user="alice", stamp=stamp), path="/ui")
    approved = attacker.post(f"{query.url}/ui/incidents/{row['id']}/proposals/{summary['id']}/approve",
                             data={"csrf": "c", "hash": summary["hash"]}, allow_redirects=False, timeout=30)
    assert approved.status_code == 303 and approved.headers["Location"].startswith("/ui/login"), approved.headers
    # A made-up personal session id is no session either.
    attacker.cookies.set("ir_session", "p." + "A" * 43, path="/ui")
    assert attacker.get(f"{query.url}/ui", allow_redirects=False, timeout=10).status_code == 303
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "pending"
    assert not cluster.calls("PATCH")


@pytest.fixture(scope="module")
def open_query(base_env, remediation):
    """No REMEDIATION_APPROVERS: who decides is the caller's word, as before personal tokens."""
    proc = FunctionProcess("query", {**base_env, "K_SINK": remediation.url, "INCIDENT_API_USERS": api_users("alice")}).start()
    yield proc
    proc.stop()


def test_without_an_approver_list_the_shared_token_and_x_actor_still_decide(remediation, open_query, cluster, clean_db):
    row, summary = proposed(clean_db, remediation)
    decided = requests.post(f"{open_query.url}/incidents/{row['id']}/proposals/{summary['id']}/approve",
                            headers={"Authorization": f"Bearer {TEST_TOKEN}", "X-Actor": "ops-script"},
                            json={"hash": summary["hash"]}, timeout=30)
    assert decided.status_code == 200 and decided.json()["decided_by"] == "api:ops-script", decided.text
    assert settled(clean_db, row["id"], summary["id"])["status"] == "executed"
    assert [c.json() for c in cluster.calls("PATCH", "/scale")] == [{"spec": {"replicas": 6}}]


def reopen(engine, incident_id, left_pending: str | None = None):
    """A person reopens the incident: generation 1, first root.
    ``left_pending``: a proposal still pending across the resolve, as the
    previous release (which superseded nothing at a resolve) left them."""
    with engine.begin() as conn:
        if svc.get_incident(conn, incident_id)["status"] != "resolved":
            svc.transition(conn, incident_id, "resolved", "test", "/test")
        if left_pending:
            still_pending(conn, left_pending)
        svc.transition(conn, incident_id, "investigating", "test", "/test")
        return svc.get_incident(conn, incident_id)


def still_pending(conn, proposal_id):
    conn.execute(sa.text("UPDATE remediation_proposals SET status = 'pending', reason = NULL, finished_at = NULL WHERE id = :id"),
                 {"id": proposal_id})


def test_a_proposal_of_a_generation_a_person_reopened_since_is_superseded_and_refused_with_409(remediation, query, cluster, clean_db):
    """The proposal is generation 0's; a person reopens the incident
    (generation 1). Its actions were planned for a generation the incident
    has left: the reopen supersedes it, the board no longer offers it, and
    an approval or a rejection is 409 naming why. Nothing runs."""
    row, summary = proposed(clean_db, remediation)
    assert reopen(clean_db, row["id"], left_pending=summary["id"])["generation"] == 1
    for verb in ("approve", "reject"):
        refused = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/{verb}")
        assert refused.status_code == 409, refused.text
        assert refused.json()["proposal_status"] == "superseded"
        assert "reopened (generation 1) since it was proposed for generation 0" in refused.json()["message"]
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "superseded"
    assert "remediation_proposal_superseded" in kinds(clean_db, row["id"])
    browser = requests.Session()
    browser.post(query.url + "/ui/login", data={"token": TEST_TOKEN}, timeout=10)
    page = browser.get(f"{query.url}/ui/incidents/{row['id']}", timeout=10).text
    assert f'id="proposal-status-{summary["id"]}">superseded<' in page and f'id="approve-{summary["id"]}"' not in page
    assert not cluster.calls("PATCH")


def test_a_pending_proposal_of_a_generation_the_intake_reopened_since_is_refused_with_409(remediation, query, cluster, clean_db):
    """The intake's reopen (the alert fired again after remediation
    resolved the incident) moves the generation too: the proposal shows as
    superseded, and the first decision on it records that and is 409."""
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "remediation", "/test", resolved_by="remediation")
        still_pending(conn, summary["id"])  # as the previous release left it across the resolve
        again = svc.record_alerts(conn, [alert("KafkaConsumerLagHigh", namespace="production")], "/test", "test",
                                  reopen_window_seconds=1800)
        assert again.outcomes[0].action == "reopened"
    shown = requests.get(f"{query.url}/incidents/{row['id']}/proposals/{summary['id']}",
                         headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10)
    assert shown.status_code == 200 and shown.json()["status"] == "superseded"
    refused = post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve")
    assert refused.status_code == 409 and refused.json()["proposal_status"] == "superseded", refused.text
    assert "since it was proposed for generation 0" in refused.json()["message"]
    assert proposal_row(clean_db, row["id"], summary["id"])["status"] == "superseded"
    assert not cluster.calls("PATCH")


def test_an_approval_still_in_flight_when_a_person_reopens_is_not_executed_and_its_outcome_is_of_its_own_generation(
        remediation, query, cluster, clean_db):
    """Approved at generation 0, its event still on its way when a person
    reopens the incident (generation 1). Nothing runs, and the outcome is
    recorded and replied as generation 0's: stale to escalation, not a
    remediation failure of generation 1 to page about."""
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:  # approved; its event not delivered yet
        conn.execute(sa.text("UPDATE remediation_proposals SET status = 'approved', decided_by = 'api:alice' WHERE id = :id"),
                     {"id": summary["id"]})
    current = reopen(clean_db, row["id"])
    assert current["generation"] == 1
    assert deliver_approval(remediation, row, summary["id"]).status_code == 200
    p = settled(clean_db, row["id"], summary["id"])
    assert p["status"] == "failed" and p["reason"].startswith("not executed: the incident is investigating (generation 1)")
    assert not cluster.calls("PATCH")
    with clean_db.connect() as conn:
        (result,) = [t["details"] for t in svc.get_timeline(conn, row["id"])
                     if t["kind"] == "remediation_result" and t["details"].get("approved_proposal") == summary["id"]]
    assert (result["generation"], result["root_generation"]) == (0, 0)
    replayed = reply_of(deliver_approval(remediation, row, summary["id"]))
    assert (replayed.data["generation"], replayed.data["root_generation"]) == (0, 0)
    assert claims.judge_event(current, replayed.data["generation"], replayed.data["root_generation"]).startswith(
        "the event is of generation 0; the incident is at generation 1")


def test_an_approved_outcome_redelivered_after_a_reopen_is_stale_not_forged(remediation, query, cluster, clean_db):
    """Executed at generation 0 under its second root, then reopened by a
    person (generation 1, first root): the approval redelivered replies the
    outcome as generation 0's, root 1, a pair that existed, so escalation
    acknowledges it with nothing told. Stamped with the incident's new
    generation it was (1, root 1), a pair that never existed: 400, a dead
    letter no re-drive could deliver."""
    row, summary = proposed(clean_db, remediation)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET root_generation = 1 WHERE id = :id"), {"id": row["id"]})
        conn.execute(sa.text("UPDATE remediation_proposals SET root_generation = 1 WHERE id = :id"), {"id": summary["id"]})
    assert post(query, f"/incidents/{row['id']}/proposals/{summary['id']}/approve").status_code == 200
    assert settled(clean_db, row["id"], summary["id"])["status"] == "executed"
    current = reopen(clean_db, row["id"])
    assert (current["generation"], current["root_generation"]) == (1, 0)
    replayed = reply_of(deliver_approval(remediation, row, summary["id"]))
    assert replayed["id"] == f"{row['id']}.remediated.0.{summary['id']}"
    assert (replayed.data["generation"], replayed.data["root_generation"]) == (0, 1)
    assert claims.judge_event(current, replayed.data["generation"], replayed.data["root_generation"]) is not None
