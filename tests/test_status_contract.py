"""The 503 contract outside the intake: every function that touches the
database answers ``503`` with ``Retry-After`` while the database is away
(a TCP proxy in front of PostgreSQL, cut), never ``500``, and serves again
once it is back."""

from __future__ import annotations

import uuid

import pytest
import requests
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from shared import events
from shared import incidents as svc
from tests.conftest import TEST_TOKEN, proxied_database
from tests.factories import alert
from loopback.processes import functions_running, wait_until

FUNCTIONS = ("query", "diagnostics", "remediation", "escalation", "deadletter")


@pytest.fixture(scope="module")
def db_proxy(database_url):
    with proxied_database(database_url) as proxied:
        yield proxied


@pytest.fixture(scope="module")
def functions(base_env, db_proxy):
    _, url = db_proxy
    env = {**base_env, "DATABASE_URL": url, "DB_TIMEOUT_SECONDS": "2", "REMEDIATION_MODE": "off"}
    with functions_running(FUNCTIONS, env) as started:
        yield started


@pytest.fixture
def outage(db_proxy):
    proxy, _ = db_proxy
    proxy.cut()
    yield proxy
    proxy.restore()


def _event(event_type: str, row: dict) -> tuple[dict, bytes]:
    spec = events.incident_event(event_type, row, "/test")
    attributes = {"id": spec["id"] + "." + uuid.uuid4().hex[:6], "type": spec["type"], "source": "/test", "subject": row["id"], **spec["extensions"]}
    return to_binary(CloudEvent(attributes, spec["data"]))


def _request(functions, name: str, row: dict) -> requests.Response:
    url = functions[name].url
    if name == "query":
        return requests.get(url + "/incidents", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=30)
    event_type = {
        "diagnostics": events.INCIDENT_OPENED,
        "remediation": events.INCIDENT_DIAGNOSED,
        "escalation": events.INCIDENT_OPENED,
        "deadletter": events.INCIDENT_OPENED,
    }[name]
    headers, body = _event(event_type, row)
    if name == "deadletter":
        headers = {**headers, "ce-knativeerrordest": "http://diagnostics.production.svc", "ce-knativeerrorcode": "503"}
    return requests.post(url + "/", data=body, headers=headers, timeout=30)


@pytest.fixture
def incident(clean_db):
    a = alert("ContractProbe", priority="P0", service="email", namespace="production")
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [a], "/test", "test").outcomes[0].incident_id
        return svc.get_incident(conn, incident_id)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_database_outage_is_503_with_retry_after_never_500(functions, incident, outage, name):
    response = _request(functions, name, incident)
    assert response.status_code == 503, (response.status_code, response.text, functions[name].logs()[-2000:])
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["error"] == "unavailable"
    health = requests.get(functions[name].url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["database"] == "disconnected"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_after_the_outage_the_same_request_succeeds(functions, incident, db_proxy, name):
    proxy, _ = db_proxy
    proxy.cut()
    try:
        assert _request(functions, name, incident).status_code == 503
    finally:
        proxy.restore()
    # The sender's retry, once the database is back: no 5xx any more.
    wait_until(lambda: _request(functions, name, incident).status_code < 500, 20, message=f"{name} to serve again")
