"""The Kubernetes client's calls are bounded as whole exchanges.

The official client hands its timeout to urllib3, which bounds each socket
read, not the exchange: an API server (or a proxy in front of it) that sends
its status line and then a byte every 0.2 s, of headers or of body, held a
diagnostics probe or a remediation action (and the claim that guards it) for
as long as it went on. Each call path the functions use is run here against
such a peer (loopback.trickle), in a thread waited on for a few seconds, so
a call that outlives its timeout fails the test instead of hanging it: the
raw-JSON reads of diagnostics (shared/kuberaw.py), the Deployment calls of
the actions (kuberaw too), the generated API classes (cordon, delete pods,
jobs, topology), directly and through an HTTP proxy."""

from __future__ import annotations

import dataclasses
import json

import pytest

from functions.diagnostics.collector import Collector, load_probes
from functions.diagnostics.facts import Reader
from functions.remediation import actions as act
from functions.remediation.actions import ActionContext, ActionFailed
from loopback.kube import cluster_at
from loopback.trickle import HEADERS_THEN_BODY, STATUS_LINE, Answers, OneAnswer, Trickler, run_bounded
from shared import kube
from shared.config import load_settings
from shared.deadline_core import within
from tests.diagnosis_cases import PROBES, load_cases

TIMEOUT = 0.5
# Long enough for any bounded call here to have ended many times over.
WAIT = 8

STARTS = pytest.mark.parametrize("start", [STATUS_LINE, HEADERS_THEN_BODY], ids=["headers", "body"])


def action_context() -> ActionContext:
    config = load_settings({"DATABASE_URL": "postgresql+pg8000://u@127.0.0.1/db", "PROBE_TIMEOUT_SECONDS": str(TIMEOUT)})
    return ActionContext(config, {"id": "11111111-2222-4333-8444-555555555555"}, False, 1.0, poll_interval=0.02)


def read_deployment():
    return Reader(kube.api_client(), TIMEOUT).deployment("production", "checkout")


def scale():
    return act.scale_deployment(action_context(), act.ScaleParams(namespace="production", name="checkout", replicas=3))


def cordon():
    return act.cordon_node(action_context(), act.NodeParams(node="node-1"))


def delete_pods():
    return act.delete_pods(action_context(), act.DeletePodsParams(namespace="production", selector="app=checkout"))


def run_job():
    return act.run_job(action_context(), act.RunJobParams(
        namespace="ops", name_prefix="clean",
        template={"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "clean", "image": "registry.local/clean:1"}]}}}))


def placement():
    from shared.correlation.topology import Topology

    return Topology(kube.api_client, timeout=TIMEOUT, configured=lambda: True).placement("production", "checkout-1")


# name -> (the call, whether it is an action: a failure is an ActionFailed)
CALLS = {
    "diagnostics read (kuberaw GET)": (read_deployment, False),
    "scale_deployment (kuberaw GET)": (scale, True),
    "cordon_node (CoreV1Api GET)": (cordon, True),
    "delete_pods (CoreV1Api list)": (delete_pods, True),
    "run_job (BatchV1Api POST)": (run_job, True),
}


@STARTS
@pytest.mark.parametrize("name", CALLS)
def test_a_call_to_an_api_server_that_trickles_its_answer_fails_at_its_timeout(tmp_path, start, name):
    call, is_action = CALLS[name]
    with Trickler(start) as server, cluster_at(server.url, tmp_path):
        ended, outcome, _ = run_bounded(call, WAIT)
        asked = server.requests
    assert ended, f"{name} still reading a trickled answer after {WAIT} s"
    assert isinstance(outcome, ActionFailed if is_action else Exception), outcome
    assert "timed out" in str(outcome), outcome  # a timeout, said so (not a connect to a server that answered)
    # The bound is the whole call's: a GET retried once it is spent asks no more.
    assert asked == 1, asked


@STARTS
def test_an_answer_trickled_by_a_proxy_in_front_of_the_api_server_fails_at_the_timeout(tmp_path, start):
    # The kubeconfig's proxy-url: the client's pools are the proxy's then.
    with Trickler(start) as proxy, cluster_at("http://kubernetes.invalid:6443", tmp_path, proxy_url=proxy.url):
        ended, outcome, _ = run_bounded(read_deployment, WAIT)
        asked = proxy.requests
    assert ended, f"a read through a trickling proxy still going after {WAIT} s"
    assert isinstance(outcome, Exception) and asked == 1, (outcome, asked)


def test_a_topology_lookup_from_a_trickling_api_server_is_no_placement_at_its_timeout(tmp_path):
    with Trickler(HEADERS_THEN_BODY) as server, cluster_at(server.url, tmp_path):
        ended, outcome, _ = run_bounded(placement, WAIT)
    assert ended, f"a topology lookup still reading a trickled answer after {WAIT} s"
    assert outcome is None  # best effort: no placement, the label rules still apply


def retry_later(status: int, seconds: int) -> bytes:
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "slow down",
                       "reason": "TooManyRequests", "code": status}).encode()
    return (f"HTTP/1.1 {status} Too Many Requests\r\nRetry-After: {seconds}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_an_answer_asking_to_retry_later_is_the_answer_not_a_wait_past_the_timeout(tmp_path):
    # urllib3 retries a GET answered 429 or 503 with a Retry-After after
    # sleeping what it says (up to six hours, three times): no socket wait,
    # so no socket timeout shortens it.
    with OneAnswer(retry_later(429, 60)) as server, cluster_at(server.url, tmp_path):
        ended, read, _ = run_bounded(read_deployment, WAIT)
        ended_action, scaled, _ = run_bounded(scale, WAIT)
    assert ended and ended_action, "a call slept on the server's Retry-After"
    assert getattr(read, "status", None) == 429, read
    assert isinstance(scaled, ActionFailed) and str(scaled).startswith("Kubernetes API 429"), scaled


def answer(status: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data


NODE = answer("200 OK", {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-1"}})


@pytest.mark.parametrize("status", [429, 503])
def test_a_read_asked_to_retry_later_within_its_timeout_is_asked_again(tmp_path, status):
    # kube-apiserver's priority and fairness answers 429 with Retry-After: 1
    # under load, when diagnostics probe: a wait that fits the timeout is made.
    with Answers(retry_later(status, 1), NODE) as server, cluster_at(server.url, tmp_path):
        ended, node, _ = run_bounded(lambda: Reader(kube.api_client(), 3.0).node("node-1"), WAIT)
        asked = server.requests
    assert ended, f"a read asked to retry after 1 s still going after {WAIT} s"
    assert node == {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-1"}}, node
    assert asked == 2, asked


@pytest.mark.parametrize("method", ["PATCH", "POST"])
def test_a_write_asked_to_retry_later_is_not_sent_again(tmp_path, method):
    # A PATCH or POST may have been applied: urllib3 retries only the methods
    # it deems idempotent, and the bounded client keeps that.
    from shared import kuberaw

    def write():
        return kuberaw.request(kube.api_client(), method, "/apis/apps/v1/namespaces/production/deployments",
                               body={"spec": {"replicas": 3}}, content_type="application/merge-patch+json", timeout=3.0)

    with Answers(retry_later(429, 1), NODE) as server, cluster_at(server.url, tmp_path):
        ended, written, _ = run_bounded(write, WAIT)
        asked = server.requests
        retries = kube.api_client().rest_client.pool_manager.connection_pool_kw["retries"]
    assert ended and getattr(written, "status", None) == 429, written
    assert asked == 1, asked
    assert method not in retries.allowed_methods, retries.allowed_methods


def test_a_calls_own_timeout_does_not_outlast_the_bound_it_is_made_within(tmp_path):
    # A caller within(0.5 s) whose call names 30 s: the call ends with the caller's bound.
    def read():
        with within(TIMEOUT):
            return Reader(kube.api_client(), 30.0).deployment("production", "checkout")

    with Trickler(HEADERS_THEN_BODY) as server, cluster_at(server.url, tmp_path):
        ended, outcome, _ = run_bounded(read, WAIT)
    assert ended, f"a call within a {TIMEOUT} s bound still reading after {WAIT} s"
    assert isinstance(outcome, Exception) and "timed out" in str(outcome), outcome


def test_a_call_without_a_timeout_is_refused(tmp_path):
    from shared import kuberaw

    with OneAnswer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") as server, cluster_at(server.url, tmp_path):
        with pytest.raises(TypeError, match="timeout"):
            kuberaw.call(kube.api_client(), "GET", "/api/v1/nodes/{name}", {"name": "node-1"})
        assert server.requests == 0


def test_a_kubeconfig_whose_proxy_is_socks_turns_the_integration_off_loudly(tmp_path):
    # A SOCKS proxy's connection connects in its own way: the bound cannot
    # keep it, and bounding it would go straight to the API server past it.
    with cluster_at("http://kubernetes.invalid:6443", tmp_path, proxy_url="socks5://127.0.0.1:1080"):
        assert kube.api_client() is None
        assert "SOCKS" in kube.not_configured_reason()


@STARTS
def test_a_probe_whose_api_server_trickles_is_a_failed_probe_in_the_diagnosis(tmp_path, settings_obj, start):
    # Each probe fails at its own timeout and says so; before, the reads
    # went on until the diagnosis deadline gave up on them (and past it:
    # their threads kept reading).
    (case,) = [c for c in load_cases() if c.name == "liveness-deadlock"]
    config = dataclasses.replace(settings_obj, prometheus_url="", probe_timeout_seconds=TIMEOUT, diagnostics_deadline_seconds=6.0)
    with Trickler(start) as server, cluster_at(server.url, tmp_path):
        ended, diagnosis, _ = run_bounded(lambda: Collector(config, load_probes(str(PROBES))).collect(case.incident()), WAIT)
    assert ended and isinstance(diagnosis, dict), diagnosis
    sources = {s["name"]: s for s in diagnosis["sources"]}
    for name in ("pods", "events"):
        assert sources[name]["state"] == "error", sources[name]
        assert "deadline" not in sources[name]["error"] and "time" in sources[name]["error"].lower(), sources[name]


def test_the_loopback_cluster_still_answers_through_the_bounded_client(tmp_path):
    from loopback.kube import FakeKubernetes, deployment

    server = FakeKubernetes().start()
    try:
        server.add_deployment(deployment("checkout", 2))
        with server.as_cluster(tmp_path):
            first, second = read_deployment(), read_deployment()  # the second on the kept-alive connection
    finally:
        server.stop()
    assert first["spec"]["replicas"] == second["spec"]["replicas"] == 2



def test_the_clients_own_client_go_retries_are_refused():
    # They sleep between attempts in the client, outside urllib3, past any bound.
    from kubernetes import client

    from shared.kubebound import api_client

    configuration = client.Configuration()
    configuration.client_go_retries = True
    with pytest.raises(TypeError, match="client_go_retries"):
        api_client(configuration)


# --------------------------------------------------------------------------- lists read in pages
# A timeout bounds one answer: a namespace's pods (megabytes every hundred)
# are read a page at a time, each page within its own timeout, so a large
# list flowing steadily is read rather than timed out whole.


@pytest.fixture
def paged_cluster(tmp_path, monkeypatch):
    """A loopback API server whose namespace holds five checkout pods (the
    fourth crash-looping), read in pages of two."""
    from loopback.kube import FakeKubernetes, pod
    from shared import kuberaw

    monkeypatch.setattr(kuberaw, "LIST_PAGE_SIZE", 2)
    server = FakeKubernetes().start()
    for i in range(5):
        server.add(pod(f"checkout-{i}", {"app": "checkout"}, **({"ready": False, "restarts": 4, "waiting": "CrashLoopBackOff"} if i == 3 else {})))
    try:
        with server.as_cluster(tmp_path):
            yield server
    finally:
        server.stop()


def pod_lists(server) -> list[str]:
    return [r.path for r in server.calls("GET", "/namespaces/production/pods")]


def test_a_diagnosis_reads_a_namespaces_pods_a_page_at_a_time(paged_cluster):
    pods = Reader(kube.api_client(), TIMEOUT).pods("production", "app=checkout")
    assert [p["metadata"]["name"] for p in pods] == [f"checkout-{i}" for i in range(5)]
    lists = pod_lists(paged_cluster)
    assert len(lists) == 3 and all("limit=2" in path for path in lists), lists
    assert "continue=2" in lists[1] and "continue=4" in lists[2], lists


def test_delete_pods_judges_the_whole_population_read_a_page_at_a_time(paged_cluster):
    outcome = delete_pods()
    assert outcome.details == {"pods": ["checkout-3"]}, outcome
    assert len(pod_lists(paged_cluster)) == 3
    assert [r.path for r in paged_cluster.calls("DELETE")] == ["/api/v1/namespaces/production/pods/checkout-3"]


def test_a_list_longer_than_its_pages_allow_is_refused_not_cut(paged_cluster, monkeypatch):
    # A ready count or a workload's share deleted judged on part of the pods would be wrong.
    from shared import kuberaw

    monkeypatch.setattr(kuberaw, "LIST_MAX_PAGES", 2)
    with pytest.raises(kuberaw.ListTooLong, match="more than 4 pods in production match app=checkout"):
        Reader(kube.api_client(), TIMEOUT).pods("production", "app=checkout")
    with pytest.raises(ActionFailed, match="more than 4 pods"):
        delete_pods()
    assert not paged_cluster.calls("DELETE")
    assert len(pod_lists(paged_cluster)) == 4  # two pages each, no more
