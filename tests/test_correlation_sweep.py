"""Alerts the noise-control sweep replays are correlated like fresh ones:
pod alerts held by a maintenance window join their node's incident when
the window ends, through the intake processes over HTTP."""

from __future__ import annotations

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess
from shared import clock, maintenance
from shared.members import members_of
from tests.conftest import TEST_TOKEN
from tests.factories import webhook
from tests.storms import Cluster, kp

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture(scope="module")
def replicas(base_env, kube):
    env = {**base_env, "KUBECONFIG": str(kube.kubeconfig_path)}
    one, two = FunctionProcess("intake", env).start(), FunctionProcess("intake", env).start()
    yield one, two
    one.stop(), two.stop()


def post(intake, items) -> list[dict]:
    response = requests.post(intake.url + "/webhook/alert", json=webhook([i.raw() for i in items]), headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_alerts_released_by_the_sweep_join_their_node_incident(clean_db, kube, replicas):
    holder, sweeper = replicas
    c = Cluster(kube, "held")
    node = c.node("ip-10-0-50-1")
    pods = c.deployment("billing", [node, node])
    (root,) = post(holder, [kp("KubeNodeNotReady", "n", node=node)])
    assert root["action"] == "created"
    with clean_db.begin() as conn:
        window = maintenance.create(conn, ['namespace="held"'], clock.now(), clock.now().replace(year=2100), "upgrade", "api:test")
    held = [kp("KubePodNotReady", "n", namespace="held", pod=p) for p in pods]
    assert [r["action"] for r in post(holder, held)] == ["suppressed", "suppressed"]
    with clean_db.begin() as conn:
        maintenance.end(conn, window["id"], "api:test")
    # Another replica sweeps: it never saw these pods, so it looks their
    # topology up before its sweep's transaction.
    before = len(kube.calls("GET", f"/pods/{pods[0]}"))
    response = requests.post(sweeper.url + "/outbox/sweep", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    assert len(kube.calls("GET", f"/pods/{pods[0]}")) == before + 1
    with clean_db.connect() as conn:
        members = members_of(conn, root["incident_id"])
        released = conn.execute(sa.text("SELECT fingerprint, incident_id FROM suppressed_alerts WHERE released_at IS NOT NULL")).all()
        opened = conn.execute(sa.text("SELECT count(*) FROM incidents")).scalar()
    assert sorted(released) == sorted((i.fingerprint, root["incident_id"]) for i in held)
    assert sorted(m["correlation_reason"] for m in members[1:]) == [
        f"KubePodNotReady held/{p} joined: pod runs on node {node}, where KubeNodeNotReady fires" for p in sorted(pods)]
    assert opened == 1


def test_the_sweeps_look_up_stops_at_its_budget_so_missed_pages_are_not_held_up(clean_db, kube):
    """A slow API: what is not looked up in time replays on label rules;
    the sweep goes on to republish the outbox."""
    from shared.correlation import replay
    from tests.test_correlation import correlator

    c = Cluster(kube, "budget")
    node = c.node("ip-10-0-51-1")
    pods = c.deployment("ledger", [node] * (replay.CHUNK + 5))
    with clean_db.begin() as conn:
        window = maintenance.create(conn, ['namespace="budget"'], clock.now(), clock.now().replace(year=2100), "upgrade", "api:test")
        maintenance.hold(conn, [kp("KubePodNotReady", "n", namespace="budget", pod=p).alert() for p in pods], clock.now())
        maintenance.end(conn, window["id"], "api:test")
    corr = correlator(kube)
    assert replay.look_up_topology(clean_db, corr, budget=0) == 0
    assert not kube.calls("GET", "/namespaces/budget/pods/")
    assert replay.look_up_topology(clean_db, corr) == len(pods)
    assert len({r.path for r in kube.calls("GET", "/namespaces/budget/pods/")}) == len(pods)
