"""The real AlertManager delivers to the intake: the seed's Test 2, repeats,
resolution, and a database outage that AlertManager's own retries outlast."""

import json
from urllib.parse import urlsplit, urlunsplit

import requests

import pytest
import sqlalchemy as sa

from tests.alertmanager import AlertManager
from tests.conftest import TEST_TOKEN
from tests.factories import raw_alert, webhook
from loopback.servers import TcpProxy
from loopback.processes import FunctionProcess, wait_until

SEED_TEST2 = (
    {"alertname": "TestIncident", "severity": "critical", "service": "email"},
    {"summary": "Test incident creation", "description": "This is a test"},
)


@pytest.fixture(scope="module")
def db_proxy(database_url):
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    yield proxy, urlunsplit(parts._replace(netloc=f"{parts.username}{':' + parts.password if parts.password else ''}@127.0.0.1:{proxy.port}"))
    proxy.stop()


@pytest.fixture(scope="module")
def stack(base_env, db_proxy):
    proxy, proxied_url = db_proxy
    intake = FunctionProcess("intake", {**base_env, "DATABASE_URL": proxied_url, "DB_TIMEOUT_SECONDS": "2"}).start()
    am = AlertManager(intake.url + "/webhook/alert", TEST_TOKEN).start()
    yield intake, am, proxy
    am.stop()
    intake.stop()


def rows(engine, alert_name):
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT id, alert_name, priority, status, repeat_count FROM incidents WHERE alert_name = :n"),
            {"n": alert_name},
        ).mappings().all()


def test_seed_test2_through_alertmanager_then_repeat_then_resolve(stack, clean_db):
    intake, am, _ = stack
    am.fire(*SEED_TEST2)
    (row,) = wait_until(lambda: rows(clean_db, "TestIncident"), 10, message="incident row from AlertManager")
    assert (row["priority"], row["status"]) == ("P0", "open")
    wait_until(lambda: rows(clean_db, "TestIncident")[0]["repeat_count"] >= 1, 15, message="AlertManager repeat")
    assert len(rows(clean_db, "TestIncident")) == 1
    am.resolve(*SEED_TEST2)
    wait_until(lambda: rows(clean_db, "TestIncident")[0]["status"] == "resolved", 15, message="resolution")
    assert len(rows(clean_db, "TestIncident")) == 1
    assert "Received webhook" in intake.logs()


def test_database_outage_is_503_and_alertmanager_retry_stores_the_alert(stack, clean_db):
    intake, am, proxy = stack
    labels = {"alertname": "OutageProbe", "severity": "critical", "service": "billing"}
    proxy.cut()
    try:
        am.fire(labels, {"summary": "fired while the database was away"})
        wait_until(lambda: "Error creating incident" in intake.logs(), 15, message="intake to report the outage")
        wait_until(lambda: "503" in am.logs(), 15, message="AlertManager to see the 503")
        direct = requests.post(
            intake.url + "/webhook/alert",
            data=json.dumps(webhook([raw_alert("Direct")])),
            headers={"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert direct.status_code == 503 and direct.headers["Retry-After"]
        health = requests.get(intake.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["database"] == "disconnected"
        assert rows(clean_db, "OutageProbe") == []
    finally:
        proxy.restore()
    (row,) = wait_until(lambda: rows(clean_db, "OutageProbe"), 30, message="AlertManager's retry after the outage")
    assert row["status"] == "open"


def test_an_alert_name_over_100_characters_from_alertmanager_is_stored(stack, clean_db):
    """Prometheus allows any length; AlertManager never retries the 400 this used to get."""
    intake, am, _ = stack
    long_name = "PrometheusRuleWithAVeryLongDescriptiveNameThatTeamsReallyUseInProduction" * 2
    am.fire({"alertname": long_name, "severity": "critical", "service": "billing"}, {"summary": "long"})
    bounded = long_name[:99] + "\u2026"
    (row,) = wait_until(lambda: rows(clean_db, bounded), 15, message="the long-named alert stored")
    assert (row["priority"], row["status"]) == ("P0", "open")
    with clean_db.connect() as conn:
        labels = conn.execute(sa.text("SELECT labels FROM incidents WHERE id = :id"), {"id": row["id"]}).scalar()
    assert labels["alertname"] == long_name
