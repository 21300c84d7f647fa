"""Grafana-managed alerting webhooks over real HTTP into the real intake:
``POST /webhook/grafana`` with the payload Grafana 9-12 sends (version "1").

Grafana does not retry a 4xx, so a group is validated alert by alert and
refused only when nothing in it is usable."""

import json
from datetime import datetime

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import FIXTURES, TEST_TOKEN
from loopback.processes import FunctionProcess

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture(scope="module")
def intake(base_env):
    proc = FunctionProcess("intake", base_env).start()
    yield proc
    proc.stop()


def grafana(name: str) -> dict:
    return json.loads((FIXTURES / "grafana" / name).read_text())


def post(intake, payload, headers=None):
    return requests.post(
        intake.url + "/webhook/grafana",
        data=json.dumps(payload),
        headers={"Content-Type": "application/json", **AUTH, **(headers or {})},
        timeout=30,
    )


def rows(engine):
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT * FROM incidents ORDER BY alert_name")).mappings().all()
    return {row["alert_name"]: row for row in found}


def test_firing_group_opens_an_incident_per_alert_with_grafanas_links(intake, clean_db):
    response = post(intake, grafana("firing.json"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["counts"] == {"created": 2} and body["receiver"] == "incident-response"
    assert [r["fingerprint"] for r in body["results"]] == ["3b0f2c4de1a9e875", "9c1e77aa02b4f351"]
    found = rows(clean_db)
    latency, errors = found["CheckoutLatencyHigh"], found["CheckoutErrorRate"]
    assert (latency["source"], latency["priority"], latency["status"]) == ("grafana", "P0", "open")
    assert errors["priority"] == "P1"
    assert latency["summary"] == "Checkout p99 latency above 2s"
    assert latency["description"] == "p99 latency of checkout is above 2s for 5 minutes"
    assert latency["starts_at"] == datetime(2026, 11, 28, 9, 15, 0, 123456)
    assert latency["labels"]["service"] == "checkout" and latency["labels"]["grafana_folder"] == "Payments"
    annotations = latency["annotations"]
    assert annotations["dashboard_url"] == "https://grafana.example.test/d/checkout01?orgId=1"
    assert annotations["panel_url"].endswith("viewPanel=4")
    assert annotations["silence_url"].startswith("https://grafana.example.test/alerting/silence/new")
    assert annotations["generator_url"] == "https://grafana.example.test/alerting/grafana/dd1f2a7c/view?orgId=1"
    assert annotations["image_url"].endswith("checkout01.png")
    assert json.loads(annotations["values"]) == {"A": 2.4187, "C": 1}
    assert annotations["value_string"].startswith("[ var='A'")
    assert annotations["runbook_url"] == "https://runbooks.example.test/checkout-latency"
    # Empty links are not kept as empty annotations.
    assert "dashboard_url" not in errors["annotations"] and "panel_url" not in errors["annotations"]


def test_resolved_alert_resolves_its_incident(intake, clean_db):
    created = post(intake, grafana("firing.json")).json()["results"][0]
    response = post(intake, grafana("resolved.json"))
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result == {**created, "action": "resolved"}
    latency = rows(clean_db)["CheckoutLatencyHigh"]
    assert latency["status"] == "resolved" and latency["resolved_at"] == datetime(2026, 11, 28, 9, 42, 10)
    assert rows(clean_db)["CheckoutErrorRate"]["status"] == "open"


def test_repeat_of_a_group_refreshes_the_same_incidents(intake, clean_db):
    first = post(intake, grafana("firing.json")).json()["results"]
    again = post(intake, grafana("firing.json")).json()
    assert again["counts"] == {"refreshed": 2}
    assert [r["incident_id"] for r in again["results"]] == [r["incident_id"] for r in first]
    assert len(rows(clean_db)) == 2
    assert rows(clean_db)["CheckoutLatencyHigh"]["repeat_count"] == 1


def test_one_bad_alert_is_rejected_and_the_others_are_stored(intake, clean_db):
    payload = grafana("firing.json")
    payload["alerts"][0]["startsAt"] = "yesterday"
    response = post(intake, payload)
    assert response.status_code == 200, response.text
    rejected, created = response.json()["results"]
    assert rejected["action"] == "rejected" and rejected["field"] == "alerts[0].startsAt"
    assert rejected["alert_name"] == "CheckoutLatencyHigh" and rejected["fingerprint"] == "3b0f2c4de1a9e875"
    assert created["action"] == "created"
    assert set(rows(clean_db)) == {"CheckoutErrorRate"}
    assert "Alerts rejected" in intake.logs()


def test_a_group_with_nothing_usable_is_refused_naming_every_alert(intake, clean_db):
    payload = grafana("firing.json")
    for raw in payload["alerts"]:
        raw["status"] = "pending"
    response = post(intake, payload)
    assert response.status_code == 400
    error = response.json()
    assert error["error"] == "invalid_payload" and "alerts[0].status" in error["message"]
    assert [r["index"] for r in error["rejected"]] == [0, 1]
    assert rows(clean_db) == {}


def test_alertmanager_payload_is_refused_with_the_right_route(intake, clean_db):
    payload = grafana("firing.json")
    payload["version"] = "4"
    response = post(intake, payload)
    assert response.status_code == 400 and "/webhook/alert" in response.json()["message"]


def test_a_grafana_payload_posted_to_the_alertmanager_route_is_refused_naming_the_grafana_route(intake, clean_db):
    response = requests.post(intake.url + "/webhook/alert", json=grafana("firing.json"), headers=AUTH, timeout=10)
    assert response.status_code == 400 and "/webhook/grafana" in response.json()["message"]
    assert rows(clean_db) == {}


def test_missing_alertname_falls_back_to_the_groups_name(intake, clean_db):
    payload = grafana("resolved.json")
    payload["alerts"][0]["status"] = "firing"
    payload["alerts"][0]["endsAt"] = "0001-01-01T00:00:00Z"
    del payload["alerts"][0]["labels"]["alertname"]
    assert post(intake, payload).status_code == 200
    assert set(rows(clean_db)) == {"CheckoutLatencyHigh"}
    del payload["commonLabels"]["alertname"]
    payload["alerts"][0]["fingerprint"] = "0123456789abcdef"
    payload["title"] = "[FIRING:1] DiskAlmostFull (db-1)"
    assert post(intake, payload).status_code == 200
    assert set(rows(clean_db)) == {"CheckoutLatencyHigh", "DiskAlmostFull (db-1)"}


def test_extras_are_bounded_and_only_web_links_are_kept(intake, clean_db):
    payload = grafana("firing.json")
    raw = payload["alerts"][0]
    raw["dashboardURL"] = "javascript:alert(document.cookie)"
    raw["panelURL"] = "https://grafana.example.test/" + "p" * 3000
    raw["values"] = {f"Q{i:03d}": i * 1.5 for i in range(500)} | {"bad": "text", "nan": None}
    raw["valueString"] = "v" * 5000
    payload["alerts"] = [raw]
    assert post(intake, payload).status_code == 200
    annotations = rows(clean_db)["CheckoutLatencyHigh"]["annotations"]
    assert "dashboard_url" not in annotations and "panel_url" not in annotations
    values = json.loads(annotations["values"])
    assert len(annotations["values"]) <= 1000 and values["Q000"] == 0.0 and "bad" not in values
    assert len(annotations["value_string"]) == 1000 and annotations["value_string"].endswith("\u2026")


@pytest.mark.parametrize("headers", [{"Authorization": ""}, {"Authorization": "Bearer wrong-token"}])
def test_without_the_token_nothing_is_stored(intake, clean_db, headers):
    response = post(intake, grafana("firing.json"), headers=headers)
    assert response.status_code == 401
    assert rows(clean_db) == {}
