"""The local Broker keeps the Knative data-plane contract the functions rely on."""

import base64
import json
import re
import threading
import time
from pathlib import Path

import pytest
import requests
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from local.broker import BrokerStopped, LocalBroker, ManifestError, load_brokers, parse_duration, parse_event
from loopback.servers import RecordingServer
from loopback.processes import stays, wait_until
from loopback.trickle import HEADERS_THEN_BODY, STATUS_LINE, Trickler

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    (tmp_path / "manifests.yaml").write_text(text)
    return tmp_path


BROKER = """
apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {{name: incidents}}
spec:
  delivery:
    retry: 2
    backoffPolicy: {policy}
    backoffDelay: PT0.1S
    timeout: PT1S
    deadLetterSink: {{ref: {{apiVersion: serving.knative.dev/v1, kind: Service, name: dls}}}}
"""


def trigger(name, subscriber, body):
    return f"""---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: {name}}}
spec:
  broker: incidents
{body}
  subscriber: {{ref: {{apiVersion: serving.knative.dev/v1, kind: Service, name: {subscriber}}}}}
"""


@pytest.fixture
def servers():
    made = {name: RecordingServer().start() for name in ("a", "b", "dls")}
    yield made
    for s in made.values():
        s.stop()


def start(tmp_path, servers, manifests, duplicates=1, backoff_scale=1.0):
    brokers = load_brokers(write(tmp_path, manifests), {n: s.url for n, s in servers.items()})
    broker = LocalBroker(brokers, port=0, duplicates=duplicates, backoff_scale=backoff_scale).start()
    return broker


def send(broker, event_type="t.x", structured=False, **extensions):
    event = CloudEvent({"type": event_type, "source": "/test", "id": f"id-{time.monotonic_ns()}", **extensions}, {"k": "v"})
    headers, body = (to_structured if structured else to_binary)(event)
    return requests.post(broker.ingress_url("default", "incidents"), data=body, headers=headers, timeout=5)


def test_the_shipped_manifests_load(servers):
    services = {n: "http://127.0.0.1:1" for n in ("intake", "intake-events", "diagnostics", "remediation", "escalation", "deadletter")}
    brokers = load_brokers(ROOT / "knative" / "base", services)
    (spec,) = brokers.values()
    assert spec.delivery.dead_letter == "http://127.0.0.1:1"
    assert {t.name for t in spec.triggers} >= {"diagnose-opened-incidents", "escalate-opened-incidents", "remediate-diagnosed-incidents"}
    escalate = next(t for t in spec.triggers if t.name == "escalate-opened-incidents")
    # Every priority reaches escalation; PAGE_ON_OPEN_PRIORITIES decides who is paged.
    for priority in ("p0", "p1", "p2"):
        assert escalate.matches({"type": "io.incidentresponse.incident.opened", "priority": priority})


@pytest.mark.parametrize(
    "body, event, expected",
    [
        ("  filter: {attributes: {type: t.x, priority: p0}}", {"type": "t.x", "priority": "p0"}, True),
        ("  filter: {attributes: {type: t.x, priority: p0}}", {"type": "t.x", "priority": "p1"}, False),
        ("  filters: [{exact: {type: t.x}}]", {"type": "t.x"}, True),
        ("  filters: [{prefix: {type: io.incident}}]", {"type": "io.incidentresponse.incident.opened"}, True),
        ("  filters: [{prefix: {type: io.incident}}]", {"type": "t.x"}, False),
        ("  filters: [{suffix: {type: .opened}}]", {"type": "a.opened"}, True),
        ("  filters: [{all: [{exact: {type: t.x}}, {exact: {priority: p0}}]}]", {"type": "t.x", "priority": "p1"}, False),
        ("  filters: [{any: [{exact: {priority: p0}}, {exact: {priority: p1}}]}]", {"type": "t.x", "priority": "p1"}, True),
        ("  filters: [{not: {exact: {priority: p2}}}]", {"type": "t.x", "priority": "p2"}, False),
        ("  filters: [{not: {exact: {priority: p2}}}]", {"type": "t.x", "priority": "p0"}, True),
        ("  filter: {attributes: {type: t.other}}\n  filters: [{exact: {type: t.x}}]", {"type": "t.x"}, True),
    ],
)
def test_filters(tmp_path, servers, body, event, expected):
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", body))
    try:
        assert send(broker, **event).status_code == 202
        if expected:
            wait_until(lambda: servers["a"].requests, 5, message="delivery")
        else:
            stays(lambda: servers["a"].requests == [], 0.3, message="no delivery to a filtered-out trigger")
    finally:
        broker.stop()


def test_cesql_is_refused_at_load(tmp_path, servers):
    with pytest.raises(ManifestError, match="cesql"):
        load_brokers(write(tmp_path, BROKER.format(policy="linear") + trigger("t", "a", "  filters: [{cesql: \"type = 'x'\"}]")),
                     {n: s.url for n, s in servers.items()})


def test_unknown_subscriber_service_is_refused_at_load(tmp_path, servers):
    with pytest.raises(ManifestError, match="no local address for Service 'zzz'"):
        load_brokers(write(tmp_path, BROKER.format(policy="linear") + trigger("t", "zzz", "  filter: {}")), {n: s.url for n, s in servers.items()})


@pytest.mark.parametrize("policy", ["linear", "exponential"])
def test_retries_then_success(tmp_path, servers, policy):
    answers = iter([(500, {}, b"no"), (503, {}, b"no")])
    servers["a"].responder = lambda r: next(answers, (202, {}, b""))
    broker = start(tmp_path, servers, BROKER.format(policy=policy) + trigger("t", "a", "  filter: {attributes: {type: t.x}}"))
    try:
        send(broker)
        wait_until(lambda: len(broker.delivered) == 3, 5, message="three attempts")
        assert [s for (_, _, s) in broker.delivered] == [500, 503, 202]
        assert servers["dls"].requests == []
    finally:
        broker.stop()


def test_backoff_gaps_are_respected(tmp_path, servers):
    times = []

    def fail(req):
        times.append(time.monotonic())
        return 500, {}, b"down"

    servers["a"].responder = fail
    broker = start(tmp_path, servers, BROKER.format(policy="exponential") + trigger("t", "a", "  filter: {}"))
    try:
        send(broker)
        wait_until(lambda: servers["dls"].requests, 5, message="dead letter")
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert len(times) == 3 and gaps[0] >= 0.2 and gaps[1] >= 0.4
    finally:
        broker.stop()


@pytest.mark.parametrize("status, attempts", [(400, 1), (401, 1), (404, 3), (409, 3), (429, 3), (500, 3)])
def test_which_statuses_are_retried(tmp_path, servers, status, attempts):
    servers["a"].responder = lambda r: (status, {}, b'{"error": "nope"}')
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {}"))
    try:
        send(broker)
        (dead,) = wait_until(lambda: servers["dls"].requests, 5, message="dead letter")
        assert len(servers["a"].requests) == attempts
        assert dead.headers["ce-knativeerrorcode"] == str(status)
        assert dead.headers["ce-knativeerrordest"] == servers["a"].url
        assert base64.b64decode(dead.headers["ce-knativeerrordata"]) == b'{"error": "nope"}'
        assert dead.headers["ce-type"] == "t.x" and dead.json() == {"k": "v"}
    finally:
        broker.stop()


def test_a_subscriber_that_hangs_times_out_and_is_dead_lettered(tmp_path, servers):
    def hang(req):
        time.sleep(3)
        return 202, {}, b""

    servers["a"].responder = hang
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {}"))
    try:
        send(broker)
        (dead,) = wait_until(lambda: servers["dls"].requests, 10, message="dead letter after timeouts")
        assert dead.headers["ce-knativeerrorcode"] == "0"
    finally:
        broker.stop()


def test_a_200_reply_event_reenters_the_broker(tmp_path, servers):
    reply = CloudEvent({"type": "t.reply", "source": "/a", "id": "r1", "priority": "p0"}, {"from": "a"})
    headers, body = to_binary(reply)
    servers["a"].responder = lambda r: (200, dict(headers), body)
    manifests = BROKER.format(policy="linear") + trigger("first", "a", "  filter: {attributes: {type: t.x}}") + \
        trigger("second", "b", "  filter: {attributes: {type: t.reply, priority: p0}}")
    broker = start(tmp_path, servers, manifests)
    try:
        send(broker)
        (got,) = wait_until(lambda: servers["b"].requests, 5, message="reply delivered to the second trigger")
        assert got.headers["ce-id"] == "r1" and got.json() == {"from": "a"}
        assert got.headers["prefer"] == "reply"
    finally:
        broker.stop()


def test_202_is_a_plain_acknowledgement(tmp_path, servers):
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {}") + trigger("u", "b", "  filter: {attributes: {type: never}}"))
    try:
        send(broker)
        wait_until(lambda: servers["a"].requests, 5, message="delivery")
        stays(lambda: servers["b"].requests == [] and servers["dls"].requests == [], 0.3, message="no other delivery, no dead letter")
    finally:
        broker.stop()


@pytest.mark.parametrize("missing", ["id", "source", "specversion", "type"])
def test_ingress_names_the_missing_attribute(tmp_path, servers, missing):
    broker = start(tmp_path, servers, BROKER.format(policy="linear"))
    try:
        headers = {"ce-id": "1", "ce-source": "/s", "ce-specversion": "1.0", "ce-type": "t", "Content-Type": "application/json"}
        del headers[f"ce-{missing}"]
        response = requests.post(broker.ingress_url("default", "incidents"), data=b"{}", headers=headers, timeout=5)
        assert response.status_code == 400 and missing in response.json()["error"]
        structured = {"id": "1", "source": "/s", "specversion": "1.0", "type": "t"}
        del structured[missing]
        response = requests.post(broker.ingress_url("default", "incidents"), data=json.dumps(structured),
                                 headers={"Content-Type": "application/cloudevents+json"}, timeout=5)
        assert response.status_code == 400 and missing in response.json()["error"]
    finally:
        broker.stop()


def test_structured_events_are_delivered_in_binary_mode(tmp_path, servers):
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {}"))
    try:
        assert send(broker, structured=True, priority="p1").status_code == 202
        (got,) = wait_until(lambda: servers["a"].requests, 5, message="delivery")
        assert got.headers["ce-type"] == "t.x" and got.headers["ce-priority"] == "p1"
        assert got.json() == {"k": "v"}
    finally:
        broker.stop()


def test_duplicates_switch_delivers_every_event_n_times(tmp_path, servers):
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {}"), duplicates=3)
    try:
        send(broker)
        wait_until(lambda: len(servers["a"].requests) == 3, 5, message="three deliveries")
        assert len({r.headers["ce-id"] for r in servers["a"].requests}) == 1
    finally:
        broker.stop()


def test_iso_durations():
    assert parse_duration("PT0.2S", 0) == 0.2
    assert parse_duration("PT1M30S", 0) == 90
    assert parse_duration("P1DT1H", 0) == 90000
    with pytest.raises(ManifestError):
        parse_duration("soon", 0)


# --------------------------------------------------------------------------- strict like Knative


@pytest.mark.parametrize(
    "answer",
    [
        (200, {"Content-Type": "text/html; charset=utf-8"}, b"<p>done</p>"),
        (200, {"Content-Type": "application/json"}, b'{"status": "ok"}'),
        (202, {"Content-Type": "text/plain"}, b"accepted"),
        # Looks like a binary-mode event but is not one: no ce-id, ce-source.
        (200, {"ce-specversion": "1.0", "ce-type": "t.reply", "Content-Type": "application/json"}, b"{}"),
        (200, {"Content-Type": "application/cloudevents+json"}, b'{"specversion": "1.0"}'),
    ],
)
def test_a_2xx_whose_body_is_not_a_cloudevent_is_a_failed_delivery(tmp_path, servers, answer):
    """Knative's broker filter answers 502 for a non-empty answer that is not a
    valid CloudEvent, so the delivery is retried and finally dead-lettered."""
    servers["a"].responder = lambda r: answer
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {attributes: {type: t.x}}"))
    try:
        send(broker)
        (dead,) = wait_until(lambda: servers["dls"].requests, 5, message="dead letter")
        assert len(servers["a"].requests) == 3
        assert dead.headers["ce-knativeerrorcode"] == "502"
        assert [s for (_, _, s) in broker.delivered] == [502, 502, 502]
    finally:
        broker.stop()


def test_an_empty_2xx_is_an_acknowledgement_whatever_its_content_type(tmp_path, servers):
    servers["a"].responder = lambda r: (200, {"Content-Type": "text/html"}, b"")
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {}"))
    try:
        send(broker)
        wait_until(lambda: broker.delivered, 5, message="delivery")
        # No redelivery and no dead letter follows the acknowledgement.
        stays(lambda: [s for (_, _, s) in broker.delivered] == [200] and servers["dls"].requests == [], 0.3,
              message="one acknowledged delivery, nothing dead-lettered")
    finally:
        broker.stop()


NAMES = ["ДискЗаполнен", "DiskFull€", "Überlast – Kafka", "line\nbreak", 'with space "quoted" 100%', "Euro € 😀"]


@pytest.mark.parametrize("name", NAMES)
def test_filters_match_decoded_attribute_values_and_deliveries_stay_encoded(tmp_path, servers, name):
    from shared.eventio import encode_header_value, parse_event

    body = f"  filters: [{{exact: {{alertname: {json.dumps(name, ensure_ascii=False)}}}}}]"
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", body))
    try:
        event = CloudEvent({"type": "t.x", "source": "/test", "id": "e1", "alertname": name}, {"k": "v"})
        headers, data = to_binary(event)
        headers["ce-alertname"] = encode_header_value(name)
        assert requests.post(broker.ingress_url("default", "incidents"), data=data, headers=headers, timeout=5).status_code == 202
        (got,) = wait_until(lambda: servers["a"].requests, 5, message="delivery to the filtered trigger")
        assert got.headers["ce-alertname"] == encode_header_value(name)
        assert parse_event(got.headers, got.body)["alertname"] == name
    finally:
        broker.stop()


def test_an_attribute_header_that_is_not_utf8_is_refused_at_ingress(tmp_path, servers):
    broker = start(tmp_path, servers, BROKER.format(policy="linear"))
    try:
        headers = {"ce-id": "1", "ce-source": "/s", "ce-specversion": "1.0", "ce-type": "t", "ce-alertname": "%C0%A0",
                   "Content-Type": "application/json"}
        response = requests.post(broker.ingress_url("default", "incidents"), data=b"{}", headers=headers, timeout=5)
        assert response.status_code == 400 and "UTF-8" in response.json()["error"]
    finally:
        broker.stop()


def test_pending_counts_a_delivery_until_it_is_answered_and_health_reports_it(tmp_path, servers):
    held, release = threading.Event(), threading.Event()

    def hold(_request):
        held.set()
        assert release.wait(10), "the test never released the delivery"
        return 202, {}, b""

    servers["a"].responder = hold
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {attributes: {type: t.x}}"))
    try:
        assert broker.pending == 0
        send(broker)
        assert held.wait(5), "the delivery never reached the subscriber"
        # Being sent: accepted and not finished, whatever the executor's queue says.
        assert broker.pending == 1
        assert requests.get(broker.url + "/health", timeout=5).json()["pending_deliveries"] == 1
        release.set()
        wait_until(lambda: broker.pending == 0, 5, message="the delivery to finish")
        assert [s for (_, _, s) in broker.delivered] == [202]
        assert requests.get(broker.url + "/health", timeout=5).json() == {"status": "healthy", "pending_deliveries": 0}
    finally:
        release.set()
        broker.stop()


def test_pending_includes_retries_and_the_dead_letter(tmp_path, servers):
    servers["a"].responder = lambda r: (500, {}, b"no")
    dead, release = threading.Event(), threading.Event()

    def hold_dead_letter(_request):
        dead.set()
        assert release.wait(10), "the test never released the dead letter"
        return 202, {}, b""

    servers["dls"].responder = hold_dead_letter
    broker = start(tmp_path, servers, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {attributes: {type: t.x}}"))
    try:
        send(broker)
        assert dead.wait(5), "the failed delivery was never dead-lettered"
        assert broker.pending == 1, "a delivery being dead-lettered is not finished"
        release.set()
        wait_until(lambda: broker.pending == 0, 5, message="the dead letter to be sent")
        assert len(servers["dls"].requests) == 1 and [s for (_, _, s) in broker.delivered] == [500, 500, 500]
    finally:
        release.set()
        broker.stop()


def test_stopping_ends_deliveries_waiting_to_retry_so_the_process_can_exit(tmp_path, servers):
    servers["a"].responder = lambda r: (500, {}, b"no")
    slow_retries = BROKER.format(policy="linear").replace("PT0.1S", "PT60S")
    broker = start(tmp_path, servers, slow_retries + trigger("t", "a", "  filter: {attributes: {type: t.x}}"))
    try:
        send(broker)
        wait_until(lambda: broker.delivered, 5, message="the first attempt")
    finally:
        broker.stop()
    # The delivery thread would otherwise sleep a minute before each retry,
    # and the interpreter joins it at exit.
    wait_until(lambda: broker.pending == 0, 5, message="the waiting delivery to end")
    assert len(servers["a"].requests) == 1 and servers["dls"].requests == []


def test_a_stopped_broker_takes_no_event_and_deliveries_it_cancelled_are_not_left_pending(tmp_path, servers):
    held, release = threading.Event(), threading.Event()

    def hold(_request):
        held.set()
        release.wait(10)
        return 202, {}, b""

    servers["a"].responder = hold
    brokers = load_brokers(write(tmp_path, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {attributes: {type: t.x}}")),
                           {n: s.url for n, s in servers.items()})
    broker = LocalBroker(brokers, port=0, workers=1).start()
    try:
        for _ in range(3):
            assert send(broker).status_code == 202
        assert held.wait(5), "the first delivery never reached the subscriber"
        assert broker.pending == 3  # one being sent, two queued behind it
    finally:
        broker.stop()
        release.set()
    # The two queued deliveries were cancelled; the one being sent ends.
    broker.wait_idle(5)
    event = parse_event({"ce-specversion": "1.0", "ce-type": "t.x", "ce-source": "/test", "ce-id": "late"}, b"{}")
    with pytest.raises(BrokerStopped):
        broker.accept("default", "incidents", event)
    assert broker.pending == 0


def test_backoff_scale_shortens_every_pause_and_outstanding_names_the_waiting_retry(tmp_path, servers):
    answers = iter([(409, {}, b"busy"), (202, {}, b"")])
    servers["a"].responder = lambda r: next(answers)
    minute_retries = BROKER.format(policy="linear").replace("PT0.1S", "PT60S")
    broker = start(tmp_path, servers, minute_retries + trigger("t", "a", "  filter: {attributes: {type: t.x}}"), backoff_scale=0.05)
    try:
        send(broker)
        waiting = wait_until(lambda: [o for o in broker.outstanding if "retry" in o], 5, message="the retry to wait")
        assert len(waiting) == 1 and re.fullmatch(r"t id-\d+: retry 1 in 3 s after 409", waiting[0])
        broker.wait_idle(10)  # 60 s of back-off at a twentieth
        assert [s for (_, _, s) in broker.delivered] == [409, 202] and broker.outstanding == []
    finally:
        broker.stop()


def test_wait_idle_names_what_is_still_outstanding(tmp_path, servers):
    servers["a"].responder = lambda r: (500, {}, b"no")
    slow_retries = BROKER.format(policy="linear").replace("PT0.1S", "PT60S")
    broker = start(tmp_path, servers, slow_retries + trigger("t", "a", "  filter: {attributes: {type: t.x}}"))
    try:
        send(broker)
        with pytest.raises(TimeoutError, match=r"1 deliveries after 0.5 s: t id-\d+: retry 1 in 60 s after 500"):
            broker.wait_idle(0.5)
    finally:
        broker.stop()


@pytest.mark.parametrize("start_of_answer", [STATUS_LINE, HEADERS_THEN_BODY], ids=["headers", "body"])
def test_a_subscriber_that_trickles_its_answer_times_out_and_is_dead_lettered(tmp_path, servers, start_of_answer):
    # requests' timeout bounds each read: a byte every 0.2 s would hold each
    # delivery (and a thread of the broker) for good, never dead-lettered.
    with Trickler(start_of_answer) as subscriber:
        urls = {"a": subscriber.url, "b": servers["b"].url, "dls": servers["dls"].url}
        brokers = load_brokers(write(tmp_path, BROKER.format(policy="linear") + trigger("t", "a", "  filter: {}")), urls)
        broker = LocalBroker(brokers, port=0).start()
        try:
            send(broker)
            # Three attempts of at most 1 s each, and the backoff between them.
            (dead,) = wait_until(lambda: servers["dls"].requests, 8, message="dead letter after three timed-out attempts")
            assert dead.headers["ce-knativeerrorcode"] == "0" and subscriber.requests == 3
        finally:
            broker.stop()
