"""What the query function shows of correlation: members on the detail,
counts on the list, lookup by any member's fingerprint, merged_into, and the
noise reduction on /metrics."""

import pytest
import requests

from loopback.processes import FunctionProcess
from loopback.servers import RecordingServer
from tests import storms
from tests.conftest import TEST_TOKEN
from tests.storms import Cluster, kp
from tests.test_board import app, client  # noqa: F401 - the board's fixtures
from tests.test_correlation import correlator, record
from tests.test_query_http import scrape

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture(scope="module")
def query(base_env):
    broker = RecordingServer().start()
    proc = FunctionProcess("query", {**base_env, "K_SINK": broker.url + "/default/default"}).start()
    yield proc
    proc.stop()
    broker.stop()


def get(query, path, **params):
    response = requests.get(query.url + path, params=params, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_members_counts_lookup_merge_and_metrics(query, clean_db, kube):
    c = Cluster(kube, "http")
    node = c.node("ip-10-0-30-1")
    pods = c.deployment("shop", [node, node, node])
    corr = correlator(kube)
    early = record(clean_db, corr, [kp("KubePodNotReady", "n", namespace="http", pod=pods[0])]).outcomes[0]
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node)]).outcomes[0]
    joined = [kp("KubePodNotReady", "n", namespace="http", pod=p) for p in pods[1:]]
    record(clean_db, corr, joined)
    record(clean_db, corr, [storms.Item({**joined[0].labels}, "n", "resolved")])
    record(clean_db, corr, [storms.Item({"alertname": "TestIncident", "severity": "critical", "service": "x"}, "t")])

    detail = get(query, f"/incidents/{root.incident_id}")
    assert detail["alert_count"] == 4 and detail["merged_into"] is None
    assert (detail["alerts"][0]["alert_name"], detail["alerts"][0]["is_root"]) == ("KubeNodeNotReady", True)
    assert sorted((a["alert_name"], a["status"], a["is_root"]) for a in detail["alerts"][1:]) == [
        ("KubePodNotReady", "firing", False), ("KubePodNotReady", "firing", False), ("KubePodNotReady", "resolved", False)]
    (member,) = [a for a in detail["alerts"] if a["fingerprint"] == joined[0].fingerprint]
    assert member["labels"]["pod"] == pods[1] and member["status"] == "resolved"
    assert member["correlation_reason"].endswith(f"pod runs on node {node}, where KubeNodeNotReady fires")
    assert member["ends_at"] and member["joined_at"].endswith("Z")

    merged = get(query, f"/incidents/{early.incident_id}")
    assert (merged["status"], merged["resolved_by"], merged["merged_into"]) == ("resolved", "merged", root.incident_id)
    assert merged["alerts"] == [] and merged["timeline"][-1]["kind"] == "merged"

    listed = {i["alert_name"]: i["alert_count"] for i in get(query, "/incidents", status="open")}
    assert listed == {"KubeNodeNotReady": 4, "TestIncident": 1}
    found = get(query, "/incidents", fingerprint=joined[1].fingerprint, status="open")
    assert [i["id"] for i in found] == [root.incident_id]

    samples = scrape(query)
    assert samples[("alerts_received_total", ())] == 5
    assert samples[("incidents_opened_total", ())] == 3
    assert samples[("incidents_merged_total", ())] == 1
    assert samples[("alerts_per_incident", ())] == pytest.approx(5 / 3)


@pytest.fixture
def board(client):  # noqa: F811 - the board's fixture
    response = client.post("/ui/login", data={"token": TEST_TOKEN, "next": "/ui"})
    assert response.status_code == 303
    return client


def test_board_shows_members_with_reasons_and_counts(clean_db, kube, board):
    signed_in = board
    c = Cluster(kube, "board")
    node = c.node("ip-10-0-31-1")
    pods = c.deployment("cart", [node, node])
    corr = correlator(kube)
    early = record(clean_db, corr, [kp("KubePodNotReady", "n", namespace="board", pod=pods[0])]).outcomes[0]
    root = record(clean_db, corr, [kp("KubeNodeNotReady", "n", node=node),
                                   kp("KubePodNotReady", "n", namespace="board", pod=pods[1])]).outcomes[0]
    page = signed_in.get(f"/ui/incidents/{root.incident_id}").get_data(as_text=True)
    assert '<dd id="alert-count">3</dd>' in page
    assert f"pod runs on node {node}, where KubeNodeNotReady fires" in page
    assert page.count('class="member-firing"') == 3 and "(root)" in page
    merged = signed_in.get(f"/ui/incidents/{early.incident_id}").get_data(as_text=True)
    assert f'<a id="merged-into" href="/ui/incidents/{root.incident_id}">' in merged
    listing = signed_in.get("/ui?status=open").get_data(as_text=True)
    assert '<td class="alert-count">3</td>' in listing
