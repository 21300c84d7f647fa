"""Noise control over the query function's real HTTP API: acknowledge (and
the one PagerDuty acknowledge it causes), maintenance windows, and
AlertManager silences on the real AlertManager binary."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from functions.escalation.handler import EscalationHandler
from shared import events
from shared import incidents as svc
from shared.config import load_settings
from tests.alertmanager import AlertManager
from tests.conftest import TEST_TOKEN
from tests.factories import alert, raw_alert, webhook
from loopback.processes import FunctionProcess, wait_until
from loopback.servers import RecordingServer
from loopback.trickle import HEADERS_THEN_BODY, STATUS_LINE, Trickler, run_bounded

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"


@pytest.fixture(scope="module")
def alertmanager():
    # The webhook receiver is never reached here: these tests only use the silences API.
    am = AlertManager("http://127.0.0.1:9/unused", TEST_TOKEN).start()
    yield am
    am.stop()


@pytest.fixture(scope="module")
def query(base_env, alertmanager):
    proc = FunctionProcess("query", {**base_env, "ALERTMANAGER_URL": alertmanager.url}).start()
    yield proc
    proc.stop()


def call(query, method, path, **kwargs):
    return requests.request(method, query.url + path, headers={**AUTH, **kwargs.pop("headers", {})}, timeout=30, **kwargs)


def open_incident(engine, name="EmailServiceDown", **labels):
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, service="email", namespace="production", **labels)], "/t", "t").outcomes[0].incident_id
        return svc.get_incident(conn, incident_id)


# ------------------------------------------------------------------ acknowledge


@pytest.fixture
def paged(database_url, clean_db):
    """An incident paged through escalation (its handler in process) to
    loopback PagerDuty and Slack: (pd, slack, incident, deliver), deliver
    handing the handler an event of the incident by id and type."""
    pd, slack = RecordingServer(lambda r: (202, {}, b'{"status":"success"}')).start(), RecordingServer(lambda r: (200, {}, b"ok")).start()
    try:
        handler = EscalationHandler(load_settings({
            "DATABASE_URL": database_url, "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
            "SLACK_WEBHOOK_URL": slack.url + "/services/T/B/X", "NOTIFY_TIMEOUT_SECONDS": "2", "NOTIFY_MAX_ATTEMPTS": "1"}))
        row = open_incident(clean_db)
        deliver = lambda event_id, event_type: handler.handle(CloudEvent(  # noqa: E731
            {"id": event_id, "type": event_type, "source": "/test", "subject": row["id"], "incidentid": row["id"]}, {"incident_id": row["id"]}))
        assert deliver(f"{row['id']}.opened.0", events.INCIDENT_OPENED).status_code == 202
        yield pd, slack, row, deliver
    finally:
        pd.stop(), slack.stop()


def acknowledged_twice(query, engine, row) -> tuple[list[str], list[dict]]:
    """Alice takes the incident with a note, then Bob: only Alice's
    acknowledges it. (the acknowledged event ids, the timeline's entries of it)"""
    first = call(query, "POST", f"/incidents/{row['id']}/acknowledge", headers={"X-Actor": "alice"}, json={"note": "on it"})
    again = call(query, "POST", f"/incidents/{row['id']}/acknowledge", headers={"X-Actor": "bob"})
    assert (first.status_code, again.status_code) == (200, 200), (first.text, again.text)
    assert (first.json()["acknowledged"], first.json()["status"]) == (True, "investigating")
    assert (again.json()["acknowledged"], again.json()["status"]) == (False, "investigating")
    with engine.connect() as conn:
        acks = conn.execute(sa.text("SELECT id FROM event_outbox WHERE type = :t"), {"t": events.INCIDENT_ACKNOWLEDGED}).scalars().all()
        timeline = svc.get_timeline(conn, row["id"])
    assert acks == [f"{row['id']}.acknowledged.0"]
    return acks, timeline


def test_acknowledge_twice_sends_exactly_one_pagerduty_acknowledge_and_names_the_actor(query, paged, clean_db):
    pd, slack, row, deliver = paged
    acks, timeline = acknowledged_twice(query, clean_db, row)
    entries = [t for t in timeline if t["details"].get("acknowledged")]
    assert [(e["actor"], e["details"]["note"]) for e in entries] == [("api:alice", "on it")]
    for _ in range(2):  # the Broker redelivers: still one acknowledge
        assert deliver(acks[0], events.INCIDENT_ACKNOWLEDGED).status_code == 202
    bodies = [r.json() for r in pd.received()]
    assert [b["event_action"] for b in bodies] == ["trigger", "acknowledge"]
    assert bodies[1] == {"routing_key": ROUTING_KEY, "event_action": "acknowledge", "dedup_key": row["id"]}
    notes = [r.json() for r in slack.received()]
    assert len(notes) == 2 and "api:alice" in str(notes[1])


def test_a_person_taking_an_incident_diagnostics_already_moved_acknowledges_its_page(query, base_env, paged, clean_db):
    """The normal pipeline: diagnostics moves the incident to investigating
    before anyone looks. That is no acknowledgement, so the first person to
    take it still acknowledges it: PagerDuty's page is acknowledged and the
    timeline names who."""
    pd, slack, row, deliver = paged
    diagnostics = FunctionProcess("diagnostics", {**base_env, "KUBECONFIG": "/nonexistent/kubeconfig"}).start()
    try:
        spec = events.incident_event(events.INCIDENT_OPENED, row, "/test")
        headers, body = to_binary(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", **spec["extensions"]}, spec["data"]))
        assert requests.post(diagnostics.url + "/", data=body, headers=headers, timeout=60).status_code == 200
    finally:
        diagnostics.stop()
    assert call(query, "GET", f"/incidents/{row['id']}").json()["status"] == "investigating"
    acks, timeline = acknowledged_twice(query, clean_db, row)
    entries = [t for t in timeline if t["details"].get("acknowledged")]
    assert [(e["kind"], e["actor"], e["details"]["note"]) for e in entries] == [("acknowledged", "api:alice", "on it")]
    # No status changed: no investigating -> investigating on the timeline.
    assert [t["details"] for t in timeline if t["kind"] == "status_changed" and t["details"].get("from") == t["details"].get("to")] == []
    assert deliver(acks[0], events.INCIDENT_ACKNOWLEDGED).status_code == 202
    bodies = [r.json() for r in pd.received()]
    assert [b["event_action"] for b in bodies] == ["trigger", "acknowledge"]
    assert "api:alice" in str(slack.received()[-1].json())


def test_a_reopened_incident_is_acknowledged_anew(query, clean_db):
    """Acknowledgement belongs to a generation: after a reopening, the
    first person to take the incident again acknowledges it again."""
    row = open_incident(clean_db)
    assert call(query, "POST", f"/incidents/{row['id']}/acknowledge", headers={"X-Actor": "alice"}).json()["acknowledged"] is True
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "t", "/t")
        svc.transition(conn, row["id"], "investigating", "carol", "/t")  # reopened: generation 1, unacknowledged
    first = call(query, "POST", f"/incidents/{row['id']}/acknowledge", headers={"X-Actor": "bob"})
    again = call(query, "POST", f"/incidents/{row['id']}/acknowledge", headers={"X-Actor": "dave"})
    assert (first.json()["acknowledged"], again.json()["acknowledged"]) == (True, False)
    with clean_db.connect() as conn:
        acks = conn.execute(sa.text("SELECT id FROM event_outbox WHERE type = :t ORDER BY id"), {"t": events.INCIDENT_ACKNOWLEDGED}).scalars().all()
    assert acks == [f"{row['id']}.acknowledged.0", f"{row['id']}.acknowledged.1"]


def test_acknowledge_refuses_what_it_cannot_do(query, clean_db):
    row = open_incident(clean_db)
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "t", "/t")
    assert call(query, "POST", f"/incidents/{row['id']}/acknowledge").status_code == 409
    assert call(query, "POST", f"/incidents/{uuid.uuid4()}/acknowledge").status_code == 404
    assert call(query, "POST", "/incidents/not-a-uuid/acknowledge").status_code == 400
    assert requests.post(query.url + f"/incidents/{row['id']}/acknowledge", timeout=10).status_code == 401
    assert call(query, "POST", f"/incidents/{row['id']}/acknowledge", json={"status": "x"}).status_code == 400


def test_a_flapping_incident_says_so_in_the_api(query, database_url, clean_db):
    from dataclasses import replace

    config = load_settings({"DATABASE_URL": database_url, "FLAP_THRESHOLD": "2"})
    a = alert("Flappy", service="email")
    for status in ("firing", "resolved", "firing"):
        with clean_db.begin() as conn:
            outcome = svc.record_alerts(conn, [replace(a, status=status)], "/t", "t", config=config).outcomes[0]
    body = call(query, "GET", f"/incidents/{outcome.incident_id}").json()
    assert body["flapping_since"] is not None and body["status"] == "open"
    assert "flapping" in [t["kind"] for t in body["timeline"]]
    quiet = open_incident(clean_db, name="Quiet")
    assert call(query, "GET", f"/incidents/{quiet['id']}").json()["flapping_since"] is None


def test_the_intake_records_the_watchdog_and_its_sweep_opens_and_resolves_the_silent_pipeline_incident(base_env, clean_db):
    intake = FunctionProcess("intake", {**base_env, "HEARTBEAT_TIMEOUT_SECONDS": "1"}).start()
    ping = {"ce-id": "ping", "ce-source": "/apis/v1/namespaces/default/pingsources/outbox-sweep",
            "ce-type": "dev.knative.sources.ping", "ce-specversion": "1.0", "Content-Type": "application/json", **AUTH}
    watchdog = webhook([raw_alert("Watchdog", severity="none", prometheus="monitoring/k8s")])

    def silent_incidents():
        requests.post(intake.url + "/", data=b"{}", headers={**ping, "ce-id": f"ping-{uuid.uuid4()}"}, timeout=30).raise_for_status()
        with clean_db.connect() as conn:
            return conn.execute(sa.text("SELECT status, priority FROM incidents WHERE alert_name = 'AlertingPipelineSilent'")).all()
    try:
        assert silent_incidents() == []  # never seen: off
        result = requests.post(intake.url + "/webhook/alert", json=watchdog, headers=AUTH, timeout=10).json()
        assert result["results"][0]["action"] == "ignored"
        wait_until(lambda: [tuple(r) for r in silent_incidents()] == [("open", "P0")], 20, message="pipeline-silent incident")
        requests.post(intake.url + "/webhook/alert", json=watchdog, headers=AUTH, timeout=10).raise_for_status()
        with clean_db.connect() as conn:
            assert conn.execute(sa.text("SELECT status FROM incidents")).scalars().all() == ["resolved"]
    finally:
        intake.stop()


# ------------------------------------------------------------------ maintenance windows


def test_maintenance_windows_are_created_listed_ended_deleted_and_audited(query, clean_db):
    created = call(query, "POST", "/maintenance-windows", headers={"X-Actor": "alice"},
                   json={"matchers": ['namespace="db"', 'alertname=~"Postgres.*"'], "duration_minutes": 60, "reason": "upgrade"})
    assert created.status_code == 201, created.text
    window = created.json()
    assert created.headers["Location"] == f"/maintenance-windows/{window['id']}"
    assert (window["state"], window["created_by"], window["matchers"]) == ("active", "api:alice", ['namespace="db"', 'alertname=~"Postgres.*"'])
    assert [w["id"] for w in call(query, "GET", "/maintenance-windows").json()] == [window["id"]]

    with clean_db.begin() as conn:
        outcome = svc.record_alerts(conn, [alert("PostgresDown", namespace="db")], "/t", "t").outcomes[0]
    assert outcome.action == "suppressed"
    detail = call(query, "GET", f"/maintenance-windows/{window['id']}").json()
    assert detail["suppressed_count"] == 1 and detail["suppressed"][0]["alert_name"] == "PostgresDown"
    assert [s["alert_name"] for s in call(query, "GET", "/suppressed-alerts").json()] == ["PostgresDown"]

    ended = call(query, "POST", f"/maintenance-windows/{window['id']}/end", headers={"X-Actor": "bob"})
    assert ended.status_code == 200 and ended.json()["state"] == "ended" and ended.json()["ended_by"] == "api:bob"
    assert call(query, "DELETE", f"/maintenance-windows/{window['id']}").status_code == 204
    assert call(query, "GET", f"/maintenance-windows/{window['id']}").status_code == 404
    with clean_db.connect() as conn:
        audit = conn.execute(sa.text("SELECT action, actor FROM maintenance_audit WHERE window_id = :w ORDER BY id"),
                             {"w": window["id"]}).all()
    assert [tuple(a) for a in audit] == [("created", "api:alice"), ("ended", "api:bob"), ("deleted", "api")]


@pytest.mark.parametrize("body, field", [
    ({"matchers": ['a="b"'], "duration_minutes": 60}, "reason"),
    ({"matchers": [], "duration_minutes": 60, "reason": "r"}, "matchers"),
    ({"matchers": ['a=~"("'], "duration_minutes": 60, "reason": "r"}, "matchers"),
    ({"matchers": ['a=~".*"'], "duration_minutes": 60, "reason": "r"}, "matchers"),
    ({"matchers": ['a="b"'], "reason": "r"}, "ends_at"),
    ({"matchers": ['a="b"'], "duration_minutes": 0, "reason": "r"}, "duration_minutes"),
    ({"matchers": ['a="b"'], "ends_at": "2020-01-01T00:00:00Z", "reason": "r"}, "ends_at"),
    ({"matchers": ['a="b"'], "duration_minutes": 5, "reason": "r", "owner": "x"}, "owner"),
])
def test_a_bad_window_is_refused_with_the_field_named(query, clean_db, body, field):
    response = call(query, "POST", "/maintenance-windows", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert call(query, "GET", "/maintenance-windows").json() == []


def test_a_window_time_read_from_the_body_keeps_its_spaces(query, clean_db):
    # A "+" sent unencoded in a query string arrives as a space, so the query
    # filters read " 02:00" as "+02:00"; a JSON body carries its "+" as sent.
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).astimezone(timezone(timedelta(hours=2)))
    written = tomorrow.strftime("%Y-%m-%dT%H:%M:%S") + " 02:00"
    response = call(query, "POST", "/maintenance-windows", json={"matchers": ['a="b"'], "ends_at": written, "reason": "r"})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "ends_at"
    assert call(query, "GET", "/maintenance-windows").json() == []


# ------------------------------------------------------------------ silences on the real AlertManager


def when(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def am_silences(alertmanager):
    return {s["id"]: s for s in requests.get(alertmanager.url + "/api/v2/silences", timeout=5).json()}


def test_silences_are_created_shown_and_expired_on_the_real_alertmanager(query, alertmanager, clean_db):
    row = open_incident(clean_db, pod="email-7f9c")
    created = call(query, "POST", f"/incidents/{row['id']}/silences", headers={"X-Actor": "alice"},
                   json={"duration_minutes": 120, "comment": "known, fix rolling out"})
    assert created.status_code == 201, created.text
    silence = created.json()
    stored = am_silences(alertmanager)[silence["id"]]
    assert stored["status"]["state"] == "active" and stored["createdBy"] == "api:alice"
    assert {m["name"]: (m["value"], m["isRegex"], m["isEqual"]) for m in stored["matchers"]} == {
        k: (v, False, True) for k, v in row["labels"].items()}
    assert "known, fix rolling out" in stored["comment"]

    shown = call(query, "GET", f"/incidents/{row['id']}/silences").json()
    assert [(s["id"], s["state"], s["created_by"]) for s in shown] == [(silence["id"], "active", "api:alice")]
    assert abs(when(shown[0]["ends_at"]) - when(silence["ends_at"])) < timedelta(seconds=1)
    assert timedelta(minutes=119) < when(shown[0]["ends_at"]) - datetime.now(timezone.utc) <= timedelta(minutes=120)
    other = open_incident(clean_db, name="WebDown")
    assert call(query, "GET", f"/incidents/{other['id']}/silences").json() == []  # exact labels: nothing broader

    assert call(query, "DELETE", f"/incidents/{row['id']}/silences/{silence['id']}", headers={"X-Actor": "bob"}).status_code == 204
    assert am_silences(alertmanager)[silence["id"]]["status"]["state"] == "expired"
    assert call(query, "GET", f"/incidents/{row['id']}/silences").json() == []
    assert call(query, "DELETE", f"/incidents/{row['id']}/silences/{silence['id']}").status_code == 404
    with clean_db.connect() as conn:
        kinds = [(t["kind"], t["actor"]) for t in svc.get_timeline(conn, row["id"]) if t["kind"].startswith("silence")]
    assert kinds == [("silenced", "api:alice"), ("silence_expired", "api:bob")]


def test_silence_input_is_checked_and_an_unset_alertmanager_is_named(query, base_env, clean_db):
    row = open_incident(clean_db)
    for body in ({"duration_minutes": 0}, {"duration_minutes": "60"}, {"duration_minutes": 60, "comment": 5}, {"minutes": 5}):
        assert call(query, "POST", f"/incidents/{row['id']}/silences", json=body).status_code == 400
    assert call(query, "DELETE", f"/incidents/{row['id']}/silences/nope").status_code == 400
    bare = FunctionProcess("query", dict(base_env)).start()
    try:
        response = call(bare, "POST", f"/incidents/{row['id']}/silences", json={"duration_minutes": 60})
        assert response.status_code == 409 and "ALERTMANAGER_URL" in response.json()["message"]
    finally:
        bare.stop()


# ------------------------------------------------------------------ /metrics


def test_metrics_show_what_noise_control_keeps_from_a_human_now(query, clean_db):
    from prometheus_client.parser import text_string_to_metric_families

    with clean_db.begin() as conn:
        for fingerprint, released in (("held-1", "NULL"), ("held-2", "NULL"), ("released", "timezone('utc', now())")):
            conn.execute(sa.text(
                "INSERT INTO suppressed_alerts (fingerprint, alert_name, status, alert, first_suppressed_at, last_seen_at, released_at) "
                f"VALUES (:f, 'NodeDown', 'firing', '{{}}', timezone('utc', now()), timezone('utc', now()), {released})"), {"f": fingerprint})
        for fingerprint, since in (("flapping", "timezone('utc', now())"), ("calm", "NULL")):
            conn.execute(sa.text("INSERT INTO alert_flaps (fingerprint, last_status, flapping_since) "
                                 f"VALUES (:f, 'firing', {since})"), {"f": fingerprint})
        for starts, ends in (("- interval '1 hour'", "+ interval '1 hour'"), ("- interval '2 hours'", "- interval '1 hour'"),
                             ("+ interval '1 hour'", "+ interval '2 hours'")):
            conn.execute(sa.text(
                "INSERT INTO maintenance_windows (id, matchers, starts_at, ends_at, reason, created_by) "
                f"VALUES (:id, '[\"env=staging\"]', timezone('utc', now()) {starts}, timezone('utc', now()) {ends}, 'upgrade', 'api:alice')"),
                {"id": str(uuid.uuid4())})
        conn.execute(sa.text("INSERT INTO heartbeats (key, labels, source, first_seen_at, last_seen_at) VALUES "
                             "('alertmanager|prometheus=monitoring/k8s', '{}', 'alertmanager', timezone('utc', now()) - interval '1 day', "
                             "timezone('utc', now()) - interval '120 seconds')"))
    response = call(query, "GET", "/metrics")
    assert response.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples[("alerts_held_by_maintenance", ())] == 2
    assert samples[("alerts_flapping", ())] == 1
    assert samples[("maintenance_windows_active", ())] == 1
    age = samples[("alerting_pipeline_heartbeat_age_seconds", (("pipeline", "alertmanager|prometheus=monitoring/k8s"),))]
    assert 120 <= age < 180


@pytest.mark.parametrize("start", [STATUS_LINE, HEADERS_THEN_BODY], ids=["headers", "body"])
def test_an_alertmanager_that_trickles_its_answer_did_not_answer_within_the_timeout(start):
    # requests' timeout bounds each read: a byte every 0.2 s would hold the
    # engineer's request (and a worker of the query function) open for good.
    from shared import silences
    from shared.errors import ServiceUnavailable

    with Trickler(start) as alertmanager:
        ended, outcome, took = run_bounded(lambda: silences.AlertManager(alertmanager.url, 0.5).for_labels({"alertname": "A"}), 6)
    assert ended, "the call to AlertManager outlived its timeout"
    assert took < 2.5
    assert isinstance(outcome, ServiceUnavailable) and "AlertManager did not answer: ReadTimeout" in str(outcome), outcome


def test_an_alertmanager_whose_connection_drops_inside_its_answer_did_not_answer():
    # A dropped body is requests' ChunkedEncodingError: an AlertManager that
    # did not answer (503), never an error of ours (500).
    import socket
    import threading

    from shared import silences
    from shared.errors import ServiceUnavailable

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[")

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(ServiceUnavailable, match="AlertManager did not answer: ChunkedEncodingError"):
            silences.AlertManager(f"http://127.0.0.1:{listener.getsockname()[1]}", 2.0).for_labels({"alertname": "A"})
    finally:
        listener.close()


@pytest.mark.parametrize("url", ["http://" + "a" * 64 + ".example:9093", "alertmanager.example:9093"], ids=["label-over-63", "no-scheme"])
def test_an_alertmanager_url_no_request_can_be_made_to_is_a_bad_gateway_that_names_the_setting(url):
    # urllib3's LocationParseError is no requests error: it was a 500.
    from shared import silences
    from shared.errors import BadGateway

    with pytest.raises(BadGateway, match="ALERTMANAGER_URL"):
        silences.AlertManager(url, 1.0).for_labels({"alertname": "A"})


def test_an_alertmanager_answer_that_cannot_be_decoded_is_a_bad_gateway_like_any_unreadable_answer(base_env, clean_db):
    # A broken gzip answer is requests' ContentDecodingError: it was a 500,
    # while an answer that is not JSON was already a 502.
    from loopback.servers import RecordingServer

    answers = {"broken gzip": (200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, b"[not gzip at all]"),
               "not JSON": (200, {"Content-Type": "text/html"}, b"<html>Sign in</html>")}
    answer = {"now": answers["broken gzip"]}
    alertmanager = RecordingServer(lambda request: answer["now"]).start()
    query = FunctionProcess("query", {**base_env, "ALERTMANAGER_URL": alertmanager.url}).start()
    try:
        row = open_incident(clean_db)
        for name, answer["now"] in answers.items():
            for method, path, kwargs in (("GET", f"/incidents/{row['id']}/silences", {}),
                                         ("POST", f"/incidents/{row['id']}/silences", {"json": {"duration_minutes": 60}})):
                response = call(query, method, path, **kwargs)
                assert (response.status_code, response.json()["error"]) == (502, "bad_gateway"), (name, method, response.text)
                assert "ALERTMANAGER_URL" in response.json()["message"], (name, response.text)
    finally:
        query.stop(), alertmanager.stop()


@pytest.mark.parametrize("charset", ["idna", "punycode"])
def test_an_alertmanager_answer_in_a_host_name_charset_is_read_never_a_500(charset):
    # requests' .json() and .text raised a bare UnicodeError for these.
    from loopback.servers import RecordingServer
    from shared import silences
    from shared.errors import BadGateway

    answer = {"now": (200, {"Content-Type": f"application/json; charset={charset}"}, b'[{"id": "s1", "matchers": []}]')}
    alertmanager = RecordingServer(lambda request: answer["now"]).start()
    try:
        manager = silences.AlertManager(alertmanager.url, 2.0)
        assert manager.for_labels({"alertname": "A"}) == []  # read; no matcher mutes anything
        answer["now"] = (400, {"Content-Type": f"text/plain; charset={charset}"}, b"bad matcher \xff")
        with pytest.raises(BadGateway, match="refused the request \\(400\\): bad matcher \ufffd"):
            manager.for_labels({"alertname": "A"})
    finally:
        alertmanager.stop()


def test_a_request_to_alertmanager_that_could_not_be_made_does_not_blame_its_answer():
    # requests refuses to send a header with a line break (InvalidHeader)
    # before anything is sent: no answer was read, so none is blamed.
    from shared import silences
    import socket

    from shared.errors import BadGateway

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        manager = silences.AlertManager(f"http://127.0.0.1:{listener.getsockname()[1]}", 1.0)
        with pytest.raises(BadGateway, match="was not called: the request could not be made \\(InvalidHeader\\)"):
            manager._call("GET", "/api/v2/silences", headers={"X-Trace": "a\nb"})
    finally:
        listener.close()
