"""Every alert-derived value on the board is text, never markup: each field
carries its own HTML payload, and the list page and the incident page must
show each one escaped (present, so the check cannot pass by omission) and
never raw. Rendering any of them with ``|safe`` fails a test."""

from __future__ import annotations

from pathlib import Path

import functions_framework
import pytest
from markupsafe import escape

from shared import incidents as svc
from shared.alerts import Alert, label_fingerprint
from tests.conftest import TEST_TOKEN

ROOT = Path(__file__).resolve().parent.parent


def payload(field: str) -> str:
    return f'<i data-xss="{field}">{field}</i>'


@pytest.fixture(scope="module")
def app(_settings_env):
    return functions_framework.create_app("query", str(ROOT / "functions" / "query" / "main.py"))


@pytest.fixture
def board(app):
    client = app.test_client()
    assert client.post("/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}).status_code == 303
    return client


def hostile_alert() -> Alert:
    labels = {
        "alertname": payload("alert_name"),
        "service": payload("service"),
        "namespace": payload("label_value"),
        payload("label_key"): "x",
    }
    return Alert(
        fingerprint=label_fingerprint(labels), status="firing", alert_name=payload("alert_name"), priority="P1",
        summary=payload("summary"), description=payload("description"), labels=labels,
        annotations={"summary": payload("summary"), "runbook_url": payload("annotation")},
        starts_at=None, ends_at=None, source="alertmanager",
    )


DIAGNOSTICS = {
    "pods": {payload("pod_name"): {"ready": payload("pod_ready"), "status": payload("pod_status"), "restarts": payload("pod_restarts"),
                                    "waiting_reasons": [payload("waiting_reason")], "last_terminated_reasons": [payload("terminated_reason")]}},
    "metrics": {payload("metric_name"): payload("metric_value"), "broken": {"error": payload("metric_error")}},
    "dependencies": {payload("dependency_name"): payload("dependency_state"), "db": {"error": payload("dependency_error")}},
    "collected_at": payload("collected_at"),
}
POD_ERROR = {"pods": {"error": payload("pods_error")}, "metrics": payload("metrics_text"), "dependencies": payload("dependencies_text")}
ACTION = {"action": payload("action"), "target": payload("action_target"), "from": payload("action_from"), "to": payload("action_to"),
          "success": False, "dry_run": False, "error": payload("action_error"), "timestamp": payload("action_time")}
NOTIFICATION = {"channel": payload("channel"), "action": payload("notify_action"), "transition": payload("notify_transition"),
                "outcome": payload("notify_outcome"), "error": payload("notify_error")}


def seed(engine, diagnostics) -> str:
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [hostile_alert()], "/t", "t").outcomes[0].incident_id
        svc.transition(conn, incident_id, "investigating", payload("actor"), "/t", note=payload("timeline_note"))
        svc.store_diagnostics(conn, incident_id, diagnostics)
        svc.append_remediation_action(conn, incident_id, ACTION)
        svc.add_timeline(conn, incident_id, "notification", NOTIFICATION, "escalation")
    return incident_id


def check(html: str, fields: list[str]) -> None:
    raw = [f for f in fields if f'data-xss="{f}"' in html]
    assert not raw, f"rendered as markup: {raw}"
    missing = [f for f in fields if str(escape(payload(f))) not in html]
    assert not missing, f"not shown (escaped) at all: {missing}"
    assert "data-xss=" not in html.replace("data-xss=&#34;", "")


def test_list_page_escapes_every_alert_value(board, clean_db):
    seed(clean_db, DIAGNOSTICS)
    check(board.get("/ui").get_data(as_text=True), ["alert_name", "service", "summary"])


def test_incident_page_escapes_every_alert_value(board, clean_db):
    incident_id = seed(clean_db, DIAGNOSTICS)
    html = board.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    check(html, [
        "alert_name", "service", "summary", "description", "label_key", "label_value", "actor", "timeline_note",
        "pod_name", "pod_ready", "pod_status", "pod_restarts", "waiting_reason", "terminated_reason",
        "metric_name", "metric_value", "metric_error", "dependency_name", "dependency_state", "dependency_error", "collected_at",
        "action", "action_target", "action_from", "action_to", "action_error", "action_time",
        "channel", "notify_action", "notify_transition", "notify_outcome", "notify_error",
    ])
    # Annotations other than the summary are not shown; if they ever are, as text.
    assert 'data-xss="annotation"' not in html


def test_incident_page_escapes_diagnostics_errors(board, clean_db):
    incident_id = seed(clean_db, POD_ERROR)
    html = board.get(f"/ui/incidents/{incident_id}").get_data(as_text=True)
    check(html, ["pods_error", "metrics_text", "dependencies_text"])


def test_a_filter_value_is_escaped_in_the_form(board, clean_db):
    html = board.get("/ui", query_string={"service": payload("filter_service"), "alert_name": payload("filter_alert")}).get_data(as_text=True)
    check(html, ["filter_service", "filter_alert"])


# Characters that reorder or hide text ("trojan source"): stored as they
# came, shown on every page as ‹U+XXXX›.
HIDDEN = "\u202e\u2066\u2069\u200b\u200c\u200d\u200e\ufeff\u2060"
HIDDEN_SHOWN = "‹U+202E›‹U+2066›‹U+2069›‹U+200B›‹U+200C›‹U+200D›‹U+200E›‹U+FEFF›‹U+2060›"


def spoofed(field: str) -> str:
    return f"{field}{HIDDEN}tail"


def spoofed_alert() -> Alert:
    labels = {"alertname": spoofed("alert_name"), "service": spoofed("service"), "namespace": spoofed("label_value"),
              spoofed("label_key"): "x"}
    return Alert(
        fingerprint=label_fingerprint(labels), status="firing", alert_name=spoofed("alert_name"), priority="P1",
        summary=spoofed("summary"), description=spoofed("description"), labels=labels,
        annotations={"summary": spoofed("summary")}, starts_at=None, ends_at=None, source="alertmanager",
    )


def hidden_in(text: str) -> list[str]:
    return sorted({f"U+{ord(c):04X}" for c in text if c in HIDDEN})


def test_bidi_controls_and_zero_width_characters_are_shown_on_the_board_and_kept_in_the_record(board, clean_db):
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [spoofed_alert()], "/t", "t").outcomes[0].incident_id
        svc.transition(conn, incident_id, "investigating", spoofed("actor"), "/t", note=spoofed("timeline_note"))
        svc.store_diagnostics(conn, incident_id, {"pods": {spoofed("pod_name"): {"ready": "1/1", "status": spoofed("pod_status"),
                                                                                "restarts": 0}}})
        svc.append_remediation_action(conn, incident_id, {**ACTION, "target": spoofed("action_target"), "error": spoofed("action_error")})
    pages = {
        "list": (board.get("/ui").get_data(as_text=True), ["alert_name", "service", "summary"]),
        "incident": (board.get(f"/ui/incidents/{incident_id}").get_data(as_text=True), [
            "alert_name", "service", "summary", "description", "label_key", "label_value", "actor", "timeline_note",
            "pod_name", "pod_status", "action_target", "action_error"]),
    }
    for page, (html, fields) in pages.items():
        assert hidden_in(html) == [], page
        missing = [f for f in fields if f"{f}{HIDDEN_SHOWN}tail" not in html]
        assert not missing, (page, missing)
    report = board.get(f"/ui/incidents/{incident_id}/report.md").get_data(as_text=True)
    assert hidden_in(report) == [] and report.count(HIDDEN_SHOWN) >= 4
    # The record (and the API, which serves it) keeps what the alert said.
    stored = board.get(f"/incidents/{incident_id}", headers={"Authorization": f"Bearer {TEST_TOKEN}"}).get_json()
    assert stored["alert_name"] == spoofed("alert_name") and stored["summary"] == spoofed("summary")


def test_a_filter_value_with_hidden_characters_stays_as_typed_in_the_form(board, clean_db):
    html = board.get("/ui", query_string={"alert_name": spoofed("filter")}).get_data(as_text=True)
    # Sent again, the form must search for what was typed.
    assert f'value="{spoofed("filter")}"' in html
