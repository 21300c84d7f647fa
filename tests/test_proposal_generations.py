"""A proposal is of its incident's generation and root: every reopen (a
person's, the intake's after a fix that did not hold, the flapping re-page)
and every take-over by a new root supersedes the pending proposals it
leaves behind, in its own transaction, so nobody is offered an action
planned for what the incident no longer is. A run or an approval of the
old root acts on nothing and resolves nothing. Real PostgreSQL; the
remediation handler in process (its Kubernetes client is not configured,
and nothing there reaches it), and a remediation process with the loopback
Kubernetes API for a run interrupted between its steps."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from cloudevents.http import CloudEvent
import sqlalchemy as sa

from functions.remediation import playbooks as pb
from functions.remediation.handler import RemediationHandler
from functions.remediation.result import Result
from loopback.kube import deployment
from loopback.processes import FunctionProcess, wait_until
from shared import claims, events, outbox, proposals
from shared import incidents as svc
from shared.correlation.plan import Correlator
from shared.errors import BadRequest
from shared.correlation.rules import parse
from shared.publisher import Publisher
from tests.factories import alert
from tests.storms import kp
from tests.test_correlation_pipeline import SAME_SERVICE
from tests.test_remediation import _env, deliver, reply_of
from tests.test_remediation import incident as remediation_incident
from tests.test_noise_control import at, flips, settings, sweep  # noqa: F401 (at: the injected clock)

ACTIONS = [{"action": "restart_deployment", "target": "production/email-service", "params": {}}]


def propose(engine, incident_id: str, incident: dict | None = None) -> dict:
    """A proposal planned on ``incident`` as remediation read it (now, unless given)."""
    with engine.begin() as conn:
        return proposals.create(conn, incident or svc.get_incident(conn, incident_id), "restart", ACTIONS, [], 600)


def stored(engine, incident_id: str, proposal_id: str) -> tuple[str, str | None]:
    with engine.connect() as conn:
        p = proposals.get(conn, incident_id, proposal_id)
    return p["status"], p["reason"]


def kinds(engine, incident_id: str) -> list[str]:
    with engine.connect() as conn:
        return [t["kind"] for t in svc.get_timeline(conn, incident_id)]


def incident(engine, incident_id: str) -> dict:
    with engine.connect() as conn:
        return svc.get_incident(conn, incident_id)


# ------------------------------------------------------------------ reopens


def test_the_intake_reopening_the_incident_supersedes_its_pending_proposals_at_once(clean_db):
    """The alert fires again after remediation resolved the incident: the
    intake's reopen (generation 1) ends generation 0's pending proposal in
    the same transaction, stored and on the timeline after the reopen, not
    only when someone next tries to decide on it."""
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("KafkaConsumerLagHigh", namespace="production")], "/t",
                                        "alertmanager").outcomes[0].incident_id
    proposal = propose(clean_db, incident_id)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "remediation", "/t", resolved_by="remediation")
        # Still pending across the resolve, as the previous release (which
        # superseded nothing at a resolve) left proposals.
        conn.execute(sa.text("UPDATE remediation_proposals SET status = 'pending', reason = NULL, finished_at = NULL "
                             "WHERE id = :id"), {"id": proposal["id"]})
        again = svc.record_alerts(conn, [alert("KafkaConsumerLagHigh", namespace="production")], "/t", "alertmanager",
                                  reopen_window_seconds=1800)
    assert again.outcomes[0].action == "reopened" and incident(clean_db, incident_id)["generation"] == 1
    assert stored(clean_db, incident_id, proposal["id"]) == (
        "superseded", "the incident was reopened (generation 1) since it was proposed for generation 0")
    assert kinds(clean_db, incident_id)[-2:] == ["reopened", "remediation_proposal_superseded"]


def test_a_flapping_re_page_supersedes_the_pending_proposals_of_the_generation_it_leaves(database_url, clean_db, at):  # noqa: F811
    """Reopened silently while it flapped, still firing once it settled:
    the sweep pages it again as generation 1, and generation 0's pending
    proposal ends with that reopen."""
    config = settings(database_url, FLAP_THRESHOLD="2", FLAP_QUIET_SECONDS="900")
    a = alert("Flappy")
    incident_id = flips(clean_db, config, a, 4)[0].incident_id
    proposal = propose(clean_db, incident_id)
    assert incident(clean_db, incident_id)["generation"] == 0
    at.advance(901)
    assert [e.rsplit(".opened.", 1)[0] for e in sweep(clean_db, config)] == [incident_id]
    assert incident(clean_db, incident_id)["generation"] == 1
    assert stored(clean_db, incident_id, proposal["id"]) == (
        "superseded", "the incident was reopened (generation 1) since it was proposed for generation 0")
    assert kinds(clean_db, incident_id)[-1] == "remediation_proposal_superseded"


# ------------------------------------------------------------------ take-overs


def take_over(engine):
    """KubeHpaMaxedOut opens the incident; TargetDown of the same service
    joins it and takes over as root (root generation 1) when ``then`` is
    called. Returns the incident id, the incident as it stood under the
    first root, and ``then``."""
    corr = Correlator(parse("rules:" + SAME_SERVICE, "test"))
    hpa = kp("KubeHpaMaxedOut", "s", namespace="props", horizontalpodautoscaler="svc", service="svc").alert()
    target = kp("TargetDown", "s", namespace="props", job="svc-metrics", service="svc").alert()
    with engine.begin() as conn:
        (first,) = svc.record_alerts(conn, [hpa], "/t", "alertmanager", plan=corr.plan([hpa])).outcomes
        old_root = svc.get_incident(conn, first.incident_id)

    def then():
        with engine.begin() as conn:
            svc.record_alerts(conn, [target], "/t", "alertmanager", plan=corr.plan([target]))
        assert incident(engine, first.incident_id)["root_generation"] == 1

    return first.incident_id, old_root, then


def test_a_take_over_supersedes_the_proposals_planned_on_the_old_root(clean_db):
    """Proposed on KubeHpaMaxedOut's diagnosis; TargetDown takes over. The
    proposal is superseded in the take-over's transaction, after its
    root_changed entry: the board and the API no longer offer it, and a
    decision on it is refused as superseded."""
    incident_id, _, then = take_over(clean_db)
    proposal = propose(clean_db, incident_id)
    then()
    reason = "another alert took over as the incident's root (root generation 1) since it was proposed for root generation 0"
    assert stored(clean_db, incident_id, proposal["id"]) == ("superseded", reason)
    assert kinds(clean_db, incident_id)[-2:] == ["root_changed", "remediation_proposal_superseded"]
    with clean_db.begin() as conn:
        decision = proposals.decide(conn, incident_id, proposal["id"], True, "api:alice", (), None, "/t")
        shown = proposals.present(proposals.get(conn, incident_id, proposal["id"]), svc.get_incident(conn, incident_id)["generation"])
    assert decision.refusal == "conflict" and not decision.event_ids and "superseded" in decision.message
    assert shown["status"] == "superseded"


def test_a_proposal_planned_on_a_root_taken_over_since_is_stored_superseded(clean_db):
    """Remediation read the incident under the first root and planned
    slowly; meanwhile TargetDown took over. The late proposal is stored
    superseded at once and offered to nobody."""
    incident_id, old_root, then = take_over(clean_db)
    then()
    late = propose(clean_db, incident_id, old_root)
    assert (late["status"], late["reason"]) == (
        "superseded", "another alert took over as the incident's root (root generation 1) since it was proposed for root generation 0")
    current = propose(clean_db, incident_id)
    assert current["status"] == "pending"


# ------------------------------------------------------------------ runs and approvals of the old root


def handler(settings_obj) -> RemediationHandler:
    config = replace(settings_obj, remediation_mode="live", k_sink=None)  # events stay in the outbox
    return RemediationHandler(config, pb.load(), Publisher(config))


def test_a_run_on_the_old_roots_diagnosis_finishing_after_a_take_over_does_not_resolve_the_incident(clean_db, settings_obj):
    """The run began under KubeHpaMaxedOut (root 0) and succeeded after
    TargetDown took over: it acted on the old root's diagnosis, so the
    incident is not its to resolve. Its result is recorded as root 0's."""
    incident_id, old_root, then = take_over(clean_db)
    then()
    remediation = handler(settings_obj)
    remediation._finish(old_root, claims.step_key("remediation", old_root), Result("remediated", "scaled out"))
    after = incident(clean_db, incident_id)
    assert after["status"] in ("open", "investigating") and after["resolved_by"] is None
    with clean_db.connect() as conn:
        (result,) = [t["details"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "remediation_result"]
    assert (result["generation"], result["root_generation"], result["root"]) == (0, 0, "KubeHpaMaxedOut")


def test_a_run_on_the_current_roots_diagnosis_still_resolves(clean_db, settings_obj):
    incident_id, _, then = take_over(clean_db)
    then()
    handler(settings_obj)._finish(incident(clean_db, incident_id), "remediation:test", Result("remediated", "scaled out"))
    assert incident(clean_db, incident_id)["resolved_by"] == "remediation"


def approval_event(engine, event_id: str):
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM event_outbox WHERE id = :id"), {"id": event_id}).mappings().one()
    return outbox.to_cloudevent(row)


def test_an_approval_given_under_the_old_root_is_not_executed_after_a_take_over(clean_db, settings_obj):
    """Approved under KubeHpaMaxedOut (root 0), its event arriving after
    TargetDown took over: nothing runs (it was planned on the old root's
    diagnosis), the outcome is recorded and replied as root 0's, and the
    incident is left to the new root's diagnosis and remediation."""
    incident_id, old_root, then = take_over(clean_db)
    remediation = handler(settings_obj)
    # A playbook that renders the same actions under either root (the
    # service's namespace): the hash alone would let it run.
    (playbook,) = [p for p in remediation.playbooks if p.name == "email-service-down-restart"]
    planned = remediation._planned(old_root, playbook)
    with clean_db.begin() as conn:
        proposal = proposals.create(conn, old_root, playbook.name, planned, [], 600)
        decision = proposals.decide(conn, incident_id, proposal["id"], True, "api:alice", (), None, "/t")
    assert decision.refusal is None
    then()
    assert remediation._planned(incident(clean_db, incident_id), playbook) == planned
    reply = remediation.handle(approval_event(clean_db, decision.event_ids[0]))
    assert reply.status_code == 200 and reply.headers["ce-id"] == f"{incident_id}.remediation_failed.0.{proposal['id']}"
    with clean_db.connect() as conn:
        p = proposals.get(conn, incident_id, proposal["id"])
        (result,) = [t["details"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "remediation_result"]
        actions = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "remediation_action"]
    assert p["status"] == "failed" and p["reason"] == (
        "not executed: another alert took over as the incident's root (root generation 1) since the approval (root generation 0)")
    assert not actions
    assert (result["generation"], result["root_generation"]) == (0, 0)
    assert incident(clean_db, incident_id)["status"] in ("open", "investigating")


# ------------------------------------------------------------------ a run between its steps

TWO_STEPS = """
playbooks:
  - name: restart-then-scale
    match:
      alertname: TwoSteps
    actions:
      - action: rollout_restart
        params: {namespace: "{{ namespace }}", name: email-service}
      - action: scale_deployment
        params: {namespace: "{{ namespace }}", name: email-service, replicas: 3}
"""


@pytest.fixture
def held_cluster(kube):
    """The first step's PATCH is held at the API server until released."""
    kube.deployments.clear(), kube.pods.clear(), kube.failures.clear(), kube.requests.clear(), kube.replicasets.clear()
    kube.rollout_delay = 0.0
    kube.released.clear()
    kube.add_deployment(deployment("email-service", 1))
    kube.failures.append(("PATCH", r"/deployments/email-service$", "hold"))
    yield kube
    kube.released.set()
    kube.failures.clear()


@pytest.fixture(scope="module")
def two_steps(base_env, kube, database_url, tmp_path_factory):
    path = tmp_path_factory.mktemp("playbooks") / "playbooks.yaml"
    path.write_text(TWO_STEPS)
    proc = FunctionProcess("remediation", _env(base_env, kube, database_url, REMEDIATION_MODE="live",
                                               PLAYBOOKS_FILE=str(path))).start()
    yield proc
    proc.stop()


def test_a_run_takes_no_further_step_once_the_incident_is_resolved_under_it(two_steps, held_cluster, clean_db):
    """The first step's rollout is under way when a person resolves the
    incident (the alert stopped). The run was judged on an active incident
    when it began; the second step is not taken on a resolved one."""
    row = remediation_incident(clean_db, "TwoSteps", namespace="production")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(deliver, two_steps, row)
        wait_until(lambda: held_cluster.calls("PATCH", "/deployments/email-service"), 30, message="the first step's PATCH arrived")
        with clean_db.begin() as conn:
            svc.transition(conn, row["id"], "resolved", "api:alice", "/t")
        held_cluster.released.set()
        reply = reply_of(running.result(timeout=60))
    assert reply["type"] == events.INCIDENT_REMEDIATION_FAILED
    assert reply.data["remediation"]["reason"] == (
        "stopped before scale_deployment: the incident is resolved since the run began; the actions before it are on the timeline")
    assert not held_cluster.calls("PATCH", "/scale")
    assert [a["action"] for a in reply.data["remediation"]["actions"]] == ["rollout_restart"]


def test_an_approval_event_naming_a_root_the_incident_never_had_is_400_and_leaves_the_approval(clean_db, settings_obj):
    """Forged, or from another database: refused for good before the
    proposal is claimed, so it cannot end a real approval as not executed."""
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("Forged")], "/t", "alertmanager").outcomes[0].incident_id
    proposal = propose(clean_db, incident_id)
    with clean_db.begin() as conn:
        decision = proposals.decide(conn, incident_id, proposal["id"], True, "api:alice", (), None, "/t")
    event = approval_event(clean_db, decision.event_ids[0])
    forged = CloudEvent(dict(event.get_attributes()), {**event.get_data(), "root_generation": 3})
    with pytest.raises(BadRequest, match="data.root_generation 3 is above the incident's root generation 0"):
        handler(settings_obj).handle(forged)  # shared.http answers it 400
    assert stored(clean_db, incident_id, proposal["id"])[0] == "approved"


# ------------------------------------------------------------------ one statement per batch


@pytest.fixture
def statements(clean_db):
    """The statements sent to the database while the block runs."""
    sent: list[str] = []

    def seen(conn, cursor, statement, *args):
        sent.append(statement)

    sa.event.listen(clean_db, "before_cursor_execute", seen)
    yield sent
    sa.event.remove(clean_db, "before_cursor_execute", seen)


def left_pending(conn, proposal_id: str) -> None:
    """Still pending across a resolve, as the previous release (which
    superseded nothing at a resolve) left proposals."""
    conn.execute(sa.text("UPDATE remediation_proposals SET status = 'pending', reason = NULL, finished_at = NULL WHERE id = :id"),
                 {"id": proposal_id})


def test_a_batch_of_reopens_supersedes_their_proposals_in_one_statement(clean_db, statements):
    """Twenty alerts fire again after remediation resolved their incidents:
    one statement ends the pending proposals of every incident the batch
    reopened, not one lookup per reopened incident (the intake's hot path)."""
    firing = [alert(f"Batch{n}", namespace="production") for n in range(20)]
    with clean_db.begin() as conn:
        ids = [o.incident_id for o in svc.record_alerts(conn, firing, "/t", "alertmanager").outcomes]
    proposal = propose(clean_db, ids[3])
    with clean_db.begin() as conn:
        for incident_id in ids:
            svc.transition(conn, incident_id, "resolved", "remediation", "/t", resolved_by="remediation")
        left_pending(conn, proposal["id"])
    statements.clear()
    with clean_db.begin() as conn:
        again = svc.record_alerts(conn, firing, "/t", "alertmanager", reopen_window_seconds=1800)
    assert {o.action for o in again.outcomes} == {"reopened"}
    assert sum("remediation_proposals" in s for s in statements) == 1
    assert stored(clean_db, ids[3], proposal["id"]) == (
        "superseded", "the incident was reopened (generation 1) since it was proposed for generation 0")
    assert kinds(clean_db, ids[3])[-2:] == ["reopened", "remediation_proposal_superseded"]


# ------------------------------------------------------------------ resolves


def shown(engine, incident_id: str, proposal_id: str) -> tuple[str, str | None]:
    """The proposal as the API and the board show it, judged against the incident."""
    with engine.connect() as conn:
        now = svc.get_incident(conn, incident_id)
        p = proposals.present(proposals.get(conn, incident_id, proposal_id), now["generation"], now["root_generation"] or 0,
                              now["status"])
    return p["status"], p["reason"]


def approve(engine, incident_id: str, proposal_id: str) -> proposals.Decision:
    with engine.begin() as conn:
        return proposals.decide(conn, incident_id, proposal_id, True, "api:alice", (), None, "/t")


RESOLVED = ("superseded", "the incident resolved before anyone approved")


def test_a_batch_of_resolutions_stores_no_supersede_and_its_proposals_are_offered_to_nobody(clean_db, statements):
    """The alerts stopped: the intake's resolve writes nothing about the
    incidents' proposals (a resolve is not final: a flapping alert fires
    again at the same generation). Every reader judges the status: shown
    superseded, an approval refused, nothing approved or stored."""
    firing = [alert(f"Stops{n}", namespace="production") for n in range(5)]
    with clean_db.begin() as conn:
        ids = [o.incident_id for o in svc.record_alerts(conn, firing, "/t", "alertmanager").outcomes]
    waiting = [propose(clean_db, incident_id) for incident_id in ids[:2]]
    statements.clear()
    with clean_db.begin() as conn:
        outcomes = svc.record_alerts(conn, [replace(a, status="resolved") for a in firing], "/t", "alertmanager").outcomes
    assert {o.action for o in outcomes} == {"resolved"}
    assert not any("remediation_proposals" in s for s in statements)
    for incident_id, proposal in zip(ids, waiting, strict=False):
        assert stored(clean_db, incident_id, proposal["id"]) == ("pending", None)
        assert shown(clean_db, incident_id, proposal["id"]) == RESOLVED
        decision = approve(clean_db, incident_id, proposal["id"])
        assert decision.refusal == "conflict" and not decision.event_ids and RESOLVED[1] in decision.message
        assert decision.proposal["status"] == "superseded"
        assert stored(clean_db, incident_id, proposal["id"]) == ("pending", None)
        assert kinds(clean_db, incident_id)[-1] == "resolved"


def test_a_resolve_by_hand_leaves_the_proposal_refused_while_the_incident_stays_resolved(clean_db):
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("ByHand")], "/t", "alertmanager").outcomes[0].incident_id
    proposal = propose(clean_db, incident_id)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "api:alice", "/t")
    assert stored(clean_db, incident_id, proposal["id"]) == ("pending", None)
    assert kinds(clean_db, incident_id)[-1] == "status_changed"
    assert shown(clean_db, incident_id, proposal["id"]) == RESOLVED
    decision = approve(clean_db, incident_id, proposal["id"])
    assert decision.refusal == "conflict" and not decision.event_ids


def test_a_flapping_incident_resolved_and_reopened_silently_offers_its_proposal_again(database_url, clean_db, at):  # noqa: F811
    """The alert flaps: its resolve and its firing again reopen the incident
    silently at the same generation and root. The proposal planned before
    is still the one to approve: refused while resolved, approvable again."""
    config = settings(database_url, FLAP_THRESHOLD="2", FLAP_QUIET_SECONDS="900")
    a = alert("Flappy2")
    incident_id = flips(clean_db, config, a, 0)[0].incident_id
    proposal = propose(clean_db, incident_id)
    flips(clean_db, config, a, 1)  # the same firing, then resolved
    assert incident(clean_db, incident_id)["status"] == "resolved"
    assert shown(clean_db, incident_id, proposal["id"]) == RESOLVED
    assert approve(clean_db, incident_id, proposal["id"]).refusal == "conflict"
    at.advance(60)
    flips(clean_db, config, a, 0)  # firing again while it flaps: reopened silently
    now = incident(clean_db, incident_id)
    assert now["status"] in ("open", "investigating") and (now["generation"], now["root_generation"] or 0) == (0, 0)
    assert stored(clean_db, incident_id, proposal["id"]) == ("pending", None)
    assert shown(clean_db, incident_id, proposal["id"]) == ("pending", None)
    decision = approve(clean_db, incident_id, proposal["id"])
    assert decision.refusal is None and decision.event_ids
    assert stored(clean_db, incident_id, proposal["id"])[0] == "approved"


def test_a_merge_into_another_incident_leaves_the_proposals_of_the_one_it_resolves_offered_to_nobody(clean_db, kube):
    """Two pods' incidents, then their node's alert: the pods' incidents are
    merged into the node's and resolved; their proposals are shown
    superseded (nothing stored by the merge) and refused."""
    from tests.test_correlation import Cluster, correlator, record

    c = Cluster(kube, "mrg")
    node = c.node("ip-10-0-31-1")
    pods = c.deployment("orders", [node, node])
    corr = correlator(kube)
    early = [record(clean_db, corr, [kp("KubePodNotReady", "n", namespace="mrg", pod=p)]).outcomes[0] for p in pods]
    waiting = propose(clean_db, early[0].incident_id)
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    merged = incident(clean_db, early[0].incident_id)
    assert (merged["status"], merged["merged_into"]) == ("resolved", root.incident_id)
    assert stored(clean_db, early[0].incident_id, waiting["id"]) == ("pending", None)
    assert shown(clean_db, early[0].incident_id, waiting["id"]) == RESOLVED
    assert approve(clean_db, early[0].incident_id, waiting["id"]).refusal == "conflict"


# ------------------------------------------------------------------ the proposal's root


def test_a_proposal_records_its_root_and_a_decision_refuses_one_of_another_root(clean_db):
    """A replica of the previous release decided nothing about roots, and a
    proposal may have been left pending from before take-overs superseded
    them: a decision judges the proposal's own root against the
    incident's, under the incident's lock."""
    incident_id, _, then = take_over(clean_db)
    then()
    proposal = propose(clean_db, incident_id)
    assert proposal["root_generation"] == 1
    with clean_db.begin() as conn:  # as if planned on the first root and never superseded
        conn.execute(sa.text("UPDATE remediation_proposals SET root_generation = 0 WHERE id = :id"), {"id": proposal["id"]})
        decision = proposals.decide(conn, incident_id, proposal["id"], True, "api:alice", (), None, "/t")
    assert decision.refusal == "conflict" and not decision.event_ids
    assert stored(clean_db, incident_id, proposal["id"]) == (
        "superseded", "another alert took over as the incident's root (root generation 1) since it was proposed for root generation 0")


def test_a_proposal_naming_no_root_is_refused_once_the_incident_was_taken_over(clean_db):
    """NULL: made before migration 0028, or by the previous release during
    a rollout. Under the generation's first root it can only be that
    root's; after a take-over it may be of any root: refused."""
    incident_id, _, then = take_over(clean_db)
    first = propose(clean_db, incident_id)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE remediation_proposals SET root_generation = NULL WHERE id = :id"), {"id": first["id"]})
        assert proposals.decide(conn, incident_id, first["id"], False, "api:alice", (), None, "/t").refusal is None
    then()
    second = propose(clean_db, incident_id)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE remediation_proposals SET root_generation = NULL WHERE id = :id"), {"id": second["id"]})
        decision = proposals.decide(conn, incident_id, second["id"], True, "api:alice", (), None, "/t")
    assert decision.refusal == "conflict" and not decision.event_ids
    assert stored(clean_db, incident_id, second["id"]) == ("superseded", proposals.unknown_root_reason(1))


def test_a_take_over_names_each_proposals_own_root(clean_db):
    """A proposal naming no root (the previous release's) superseded by a
    take-over says so, not that it was the root just before."""
    incident_id, _, then = take_over(clean_db)
    proposal = propose(clean_db, incident_id)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE remediation_proposals SET root_generation = NULL WHERE id = :id"), {"id": proposal["id"]})
    then()
    assert stored(clean_db, incident_id, proposal["id"]) == ("superseded", proposals.unknown_root_reason(1))


def test_a_take_over_names_a_reopen_for_a_proposal_of_an_earlier_generation(clean_db):
    """A proposal of generation 0 left pending by the previous release's
    reopen (generation 1) is superseded by a take-over for the reason a
    decision gives first: the reopen, not the root."""
    incident_id, _, then = take_over(clean_db)
    proposal = propose(clean_db, incident_id)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET generation = 1 WHERE id = :id"), {"id": incident_id})
    then()
    assert stored(clean_db, incident_id, proposal["id"]) == (
        "superseded", "the incident was reopened (generation 1) since it was proposed for generation 0")
    assert stored(clean_db, incident_id, proposal["id"])[1] == proposals.stale_reason(proposal, 1, 1)


def test_a_batch_of_take_overs_supersedes_their_proposals_in_one_statement(clean_db, statements):
    """Three services' TargetDown take over their incidents in one batch:
    one statement ends the old roots' pending proposals of all of them."""
    corr = Correlator(parse("rules:" + SAME_SERVICE, "test"))
    services = [f"svc{n}" for n in range(3)]
    hpas = [kp("KubeHpaMaxedOut", "s", namespace="props", horizontalpodautoscaler=s, service=s).alert() for s in services]
    targets = [kp("TargetDown", "s", namespace="props", job=f"{s}-metrics", service=s).alert() for s in services]
    with clean_db.begin() as conn:
        ids = [o.incident_id for o in svc.record_alerts(conn, hpas, "/t", "alertmanager", plan=corr.plan(hpas)).outcomes]
    waiting = [propose(clean_db, incident_id) for incident_id in ids]
    statements.clear()
    with clean_db.begin() as conn:
        svc.record_alerts(conn, targets, "/t", "alertmanager", plan=corr.plan(targets))
    assert [incident(clean_db, i)["root_generation"] for i in ids] == [1, 1, 1]
    assert sum("remediation_proposals" in s for s in statements) == 1
    for incident_id, proposal in zip(ids, waiting, strict=True):
        assert stored(clean_db, incident_id, proposal["id"]) == (
            "superseded", "another alert took over as the incident's root (root generation 1) since it was proposed for root generation 0")
        assert kinds(clean_db, incident_id)[-2:] == ["root_changed", "remediation_proposal_superseded"]


def test_a_proposal_planned_on_an_incident_resolved_since_is_stored_superseded(clean_db):
    """Remediation read the incident while it fired and planned slowly;
    meanwhile the alert resolved it. The late proposal is offered to nobody."""
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("LatePlan")], "/t", "alertmanager").outcomes[0].incident_id
    firing = incident(clean_db, incident_id)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "api:alice", "/t")
    late = propose(clean_db, incident_id, firing)
    assert (late["status"], late["reason"]) == ("superseded", "the incident resolved before anyone approved")


def test_an_approval_of_a_proposal_naming_no_root_is_not_executed_after_a_take_over(clean_db, settings_obj):
    """Approved by a replica of the previous release, which judged no root,
    on a row that names none: remediation does not run it under the root
    the incident has now."""
    incident_id, _, then = take_over(clean_db)
    then()
    remediation = handler(settings_obj)
    (playbook,) = [p for p in remediation.playbooks if p.name == "email-service-down-restart"]
    current = incident(clean_db, incident_id)
    with clean_db.begin() as conn:
        proposal = proposals.create(conn, current, playbook.name, remediation._planned(current, playbook), [], 600)
        decision = proposals.decide(conn, incident_id, proposal["id"], True, "api:alice", (), None, "/t")
        conn.execute(sa.text("UPDATE remediation_proposals SET root_generation = NULL WHERE id = :id"), {"id": proposal["id"]})
    assert decision.refusal is None
    reply = remediation.handle(approval_event(clean_db, decision.event_ids[0]))
    assert reply.status_code == 200
    with clean_db.connect() as conn:
        p = proposals.get(conn, incident_id, proposal["id"])
        actions = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "remediation_action"]
    assert not actions and p["status"] == "failed"
    assert p["reason"] == "not executed: " + proposals.unknown_root_reason(1)
