"""Secrets never reach a log line, even where a line would carry them: each
test puts a secret exactly there (in a path, an error text, an echoed
response) and reads the captured log of a real function process."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from shared import events
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert
from loopback.servers import RecordingServer
from loopback.processes import FunctionProcess, free_port, wait_until

ROUTING_KEY = "Rk9SRVNFQ1JFVHJvdXRpbmdrZXkxMjM0"
SLACK_TOKEN = "xoxSlackWebhookSecretPart0123456789"
SLACK_PATH = f"/services/T0SECRET01/B0SECRET02/{SLACK_TOKEN}"
DB_PASSWORD = "db-Pa55word-never-logged"


def assert_no_secret(text: str, *secrets: str) -> None:
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"secrets in the log: {leaked}\n{text[-3000:]}"


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{host}"))


def lines(proc: FunctionProcess) -> list[dict]:
    """Every line must be JSON (a plain-text line would escape the masking)."""
    parsed = []
    for line in proc.logs().splitlines():
        if line.startswith("{"):
            parsed.append(json.loads(line))
    return parsed


@pytest.fixture
def echoing_pagerduty():
    """A PagerDuty stand-in that refuses the event and echoes the routing key,
    as an error body may."""
    def refuse(req):
        key = req.json().get("routing_key")
        return 400, {"Content-Type": "application/json"}, json.dumps(
            {"status": "invalid event", "message": f"routing key {key} is not a known integration"}).encode()

    server = RecordingServer(refuse).start()
    yield server
    server.stop()


def test_api_token_in_a_request_path_is_masked(base_env):
    proc = FunctionProcess("query", base_env, threads=2).start()
    try:
        response = requests.get(f"{proc.url}/incidents/{TEST_TOKEN}", timeout=10)
        assert response.status_code == 401
        wait_until(lambda: any(e["message"] == "Unauthorized" for e in lines(proc)), 10, message="the Unauthorized line")
        entry = next(e for e in lines(proc) if e["message"] == "Unauthorized")
        assert entry["path"].startswith("/incidents/") and "****" in entry["path"]
        assert_no_secret(proc.logs(), TEST_TOKEN)
    finally:
        proc.stop()


@pytest.fixture
def failed_notification(base_env, echoing_pagerduty, clean_db):
    """An escalation whose PagerDuty refuses (echoing the key) and whose Slack
    URL cannot be reached (the client's error names the URL's path)."""
    dead_port = free_port()
    env = {
        **base_env,
        "PAGERDUTY_EVENTS_URL": echoing_pagerduty.url + "/v2/enqueue",
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": f"http://127.0.0.1:{dead_port}{SLACK_PATH}",
        "NOTIFY_TIMEOUT_SECONDS": "1",
        "NOTIFY_MAX_ATTEMPTS": "1",
    }
    proc = FunctionProcess("escalation", env, threads=2).start()
    try:
        with clean_db.begin() as conn:
            incident_id = svc.record_alerts(conn, [alert("MaskProbe", priority="P0")], "/test", "test").outcomes[0].incident_id
            row = svc.get_incident(conn, incident_id)
        spec = events.incident_event(events.INCIDENT_OPENED, row, "/test")
        headers, body = to_binary(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", **spec["extensions"]}, spec["data"]))
        response = requests.post(proc.url + "/", data=body, headers=headers, timeout=30)
        assert response.status_code >= 500 and echoing_pagerduty.requests
        wait_until(lambda: "Notification refused" in proc.logs() and "Notification failed" in proc.logs(), 10,
                   message="both notification failures in the log")
        with clean_db.connect() as conn:
            stored = json.dumps(svc.get_timeline(conn, incident_id), default=str)
        yield proc, response, stored
    finally:
        proc.stop()


def test_notification_errors_do_not_show_the_routing_key_or_the_slack_url(failed_notification):
    proc, _, _ = failed_notification
    assert_no_secret(proc.logs(), ROUTING_KEY, SLACK_TOKEN, SLACK_PATH)


def test_notification_errors_do_not_carry_the_slack_url_to_the_broker_or_the_timeline(failed_notification):
    _, response, stored = failed_notification
    assert_no_secret(response.text, ROUTING_KEY, SLACK_TOKEN)
    assert_no_secret(stored, ROUTING_KEY, SLACK_TOKEN)


def test_a_database_password_in_an_error_text_is_masked(base_env, database_url):
    """The Broker hands the dead-letter sink the failed subscriber's error
    body, which may quote a connection string."""
    env = {**base_env, "DATABASE_URL": with_password(database_url, DB_PASSWORD)}
    proc = FunctionProcess("deadletter", env, threads=2).start()
    try:
        error = f"connection to postgresql://app:{DB_PASSWORD}@db:5432/incidents failed"
        headers, body = to_binary(CloudEvent({"id": "mask-1", "type": events.INCIDENT_OPENED, "source": "/test"}, {"note": "x"}))
        headers = {**headers, "ce-knativeerrordest": "http://diagnostics", "ce-knativeerrorcode": "500",
                   "ce-knativeerrordata": base64.b64encode(error.encode()).decode()}
        assert requests.post(proc.url + "/", data=body, headers=headers, timeout=30).status_code == 202
        wait_until(lambda: "Dead-lettered event" in proc.logs(), 10, message="the dead-letter line")
        (entry,) = [e for e in lines(proc) if e["message"] == "Dead-lettered event"]
        assert "connection to postgresql://app:" in entry["error"]
        assert_no_secret(proc.logs(), DB_PASSWORD)
    finally:
        proc.stop()
