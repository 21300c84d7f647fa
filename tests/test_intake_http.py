"""The intake over real HTTP: the AlertManager webhook contract."""

import json

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import FIXTURES, TEST_TOKEN
from tests.factories import fixture_payload, raw_alert, webhook
from loopback.processes import FunctionProcess, wait_until

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture(scope="module")
def intake(base_env):
    proc = FunctionProcess("intake", {**base_env, "MAX_BODY_BYTES": str(2 * 1024 * 1024)}).start()
    yield proc
    proc.stop()


def post(intake, payload, headers=None, raw=None):
    return requests.post(
        intake.url + "/webhook/alert",
        data=raw if raw is not None else json.dumps(payload),
        headers={"Content-Type": "application/json", **AUTH, **(headers or {})},
        timeout=30,
    )


def incidents_rows(engine, **where):
    clause = " AND ".join(f"{k} = :{k}" for k in where) or "true"
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT * FROM incidents WHERE {clause} ORDER BY created_at"), where).mappings().all()


def test_health_needs_no_token(intake):
    response = requests.get(intake.url + "/health", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "database": "connected"}


def test_seed_test2_alert_creates_p0_open_incident(intake, clean_db):
    response = post(intake, fixture_payload("testincident-firing.json"))
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["action"] == "created" and result["fingerprint"] == "77984e54887cc579"
    (row,) = incidents_rows(clean_db, alert_name="TestIncident")
    assert (row["id"], row["priority"], row["status"]) == (result["incident_id"], "P0", "open")
    assert row["summary"] == "Test incident creation" and row["description"] == "This is a test"
    assert row["labels"] == {"alertname": "TestIncident", "service": "email", "severity": "critical"}
    assert row["source"] == "alertmanager" and row["starts_at"] is not None
    assert "Received webhook" in intake.logs()


def test_repeat_and_resolve_follow_the_fingerprint(intake, clean_db):
    first = post(intake, fixture_payload("testincident-firing.json")).json()["results"][0]
    repeat = post(intake, fixture_payload("testincident-firing.json")).json()["results"][0]
    assert repeat == {**first, "action": "refreshed"}
    resolved = post(intake, fixture_payload("testincident-resolved.json")).json()["results"][0]
    assert resolved["action"] == "resolved" and resolved["incident_id"] == first["incident_id"]
    (row,) = incidents_rows(clean_db)
    assert row["status"] == "resolved" and row["resolved_at"].isoformat() == "2026-11-27T21:54:14"
    again = post(intake, fixture_payload("testincident-resolved.json")).json()["results"][0]
    assert again["action"] == "ignored" and again["incident_id"] is None


def test_each_alert_is_handled_by_its_own_status_not_the_groups(intake, clean_db):
    post(intake, webhook([raw_alert("A", instance="1"), raw_alert("A", instance="2")]))
    mixed = webhook([raw_alert("A", instance="1", status="resolved"), raw_alert("A", instance="2")], status="firing")
    actions = [r["action"] for r in post(intake, mixed).json()["results"]]
    assert actions == ["resolved", "refreshed"]


def test_priority_label_wins_over_severity_and_low_priorities_are_ignored(intake, clean_db):
    payload = webhook([
        raw_alert("Explicit", severity="info", priority="p0"),
        raw_alert("Warn", severity="warning"),
        raw_alert("Info", severity="info"),
        raw_alert("Watchdog", severity="none"),
        raw_alert("NoSeverity", severity=""),
    ])
    results = post(intake, payload).json()["results"]
    assert [r["action"] for r in results] == ["created", "created", "ignored", "ignored", "ignored"]
    assert "MIN_INCIDENT_PRIORITY" in results[2]["reason"]
    assert "Watchdog" in results[3]["reason"]
    rows = {r["alert_name"]: r["priority"] for r in incidents_rows(clean_db)}
    assert rows == {"Explicit": "P0", "Warn": "P1"}
    with clean_db.connect() as conn:
        counted = dict(conn.execute(sa.text("SELECT alert_name, count FROM ignored_alerts")).all())
    assert counted == {"Info": 1, "Watchdog": 1, "NoSeverity": 1}


def test_thousand_alert_webhook_in_one_request(intake, clean_db):
    payload = webhook([raw_alert("Storm", pod=f"pod-{i}") for i in range(1000)])
    response = post(intake, payload)
    assert response.status_code == 200
    assert response.json()["counts"] == {"created": 1000}
    assert len(incidents_rows(clean_db)) == 1000
    again = post(intake, payload)
    assert again.json()["counts"] == {"refreshed": 1000}


def test_unicode_labels_and_nul_characters_are_kept(intake, clean_db):
    payload = webhook([raw_alert("Ünïcödé", service="почта", team="日本", note="a\u0000b")])
    assert post(intake, payload).status_code == 200
    (row,) = incidents_rows(clean_db)
    assert row["alert_name"] == "Ünïcödé" and row["labels"]["service"] == "почта"
    assert row["labels"]["note"] == "a\ufffdb"


def test_truncated_alerts_are_logged(intake, clean_db):
    response = post(intake, webhook([raw_alert("Trunc")], truncatedAlerts=7))
    assert response.status_code == 200 and response.json()["truncated_alerts"] == 7
    wait_until(lambda: '"truncated_alerts": 7' in intake.logs(), message="truncation log line")


def test_missing_fingerprint_is_derived_like_alertmanager(intake, clean_db):
    alert = raw_alert("TestIncident", fingerprint=False, service="email")
    (result,) = post(intake, webhook([alert])).json()["results"]
    assert result["fingerprint"] == "77984e54887cc579"


def test_duplicate_alerts_inside_one_payload_make_one_incident(intake, clean_db):
    results = post(intake, webhook([raw_alert("Dup"), raw_alert("Dup")])).json()["results"]
    assert len(results) == 2 and results[0]["incident_id"] == results[1]["incident_id"]
    assert len(incidents_rows(clean_db)) == 1




@pytest.mark.parametrize("version", [4, 3])
def test_a_version_written_as_a_number_is_the_same_version(intake, clean_db, version):
    """A relay re-marshalling AlertManager's group may write "4" as 4: a 400
    is never retried, and the group would be lost."""
    response = post(intake, {**webhook([raw_alert("NumericVersion")]), "version": version})
    assert response.status_code == 200, response.text
    assert len(incidents_rows(clean_db, alert_name="NumericVersion")) == 1

def test_a_firing_and_its_resolution_within_one_payload_end_as_the_resolution(intake, clean_db):
    """The last word on a fingerprint wins (AlertManager never sends two in
    one group): a firing its resolution follows opens nothing, and both
    answers say so."""
    post(intake, webhook([raw_alert("Blip")]))
    results = post(intake, webhook([raw_alert("Blip"), raw_alert("Blip", status="resolved")])).json()["results"]
    assert [r["action"] for r in results] == ["resolved", "resolved"]
    (row,) = incidents_rows(clean_db)
    assert row["status"] == "resolved"


def test_a_resolution_followed_by_a_firing_within_one_payload_keeps_the_incident_open(intake, clean_db):
    post(intake, webhook([raw_alert("Bounce")]))
    results = post(intake, webhook([raw_alert("Bounce", status="resolved"), raw_alert("Bounce")])).json()["results"]
    assert [r["action"] for r in results] == ["refreshed", "refreshed"]
    (row,) = incidents_rows(clean_db)
    assert row["status"] == "open"

@pytest.mark.parametrize(
    "raw, field",
    [
        (b"{not json", None),
        (b"\xff\xfe", None),
        (json.dumps([1, 2]).encode(), None),
        (json.dumps({**webhook([]), "version": "5"}).encode(), "version"),
        (json.dumps({**webhook([]), "version": 1}).encode(), "version"),
        (json.dumps({**webhook([]), "alerts": {"a": 1}}).encode(), "alerts"),
        (json.dumps(webhook(["x"])).encode(), "alerts[0]"),
        (json.dumps(webhook([{**raw_alert(), "labels": {"severity": "critical"}}])).encode(), "alerts[0].labels.alertname"),
        (json.dumps(webhook([{k: v for k, v in raw_alert().items() if k != "status"}])).encode(), "alerts[0].status"),
        (json.dumps(webhook([{**raw_alert(), "status": "pending"}])).encode(), "alerts[0].status"),
        (json.dumps(webhook([{**raw_alert(), "startsAt": "yesterday"}])).encode(), "alerts[0].startsAt"),
        (json.dumps(webhook([{**raw_alert(), "labels": None}])).encode(), "alerts[0].labels"),
        (json.dumps(webhook([{**raw_alert(), "labels": {"alertname": "A", "team": {"a": 1}}}])).encode(), "alerts[0].labels.team"),
        (json.dumps(webhook([{**raw_alert(), "fingerprint": "f" * 129}])).encode(), "alerts[0].fingerprint"),
        (json.dumps(webhook(["x", {**raw_alert(), "status": None}])).encode(), "alerts[0]"),
    ],
)
def test_payload_that_can_never_succeed_is_400_naming_the_field(intake, clean_db, raw, field):
    response = post(intake, None, raw=raw)
    assert response.status_code == 400, response.text
    body = response.json()
    if field:
        assert body["field"] == field and body["message"].startswith(field)
    if field and field.startswith("alerts["):
        # Every alert was rejected: each one is named, with its reason.
        assert [r["action"] for r in body["rejected"]] == ["rejected"] * len(json.loads(raw)["alerts"])
    assert incidents_rows(clean_db) == []


def test_oversized_body_is_413(intake):
    response = post(intake, None, raw=b"{" + b" " * (2 * 1024 * 1024 + 10) + b"}")
    assert response.status_code == 413


def test_non_json_content_type_is_415(intake):
    response = post(intake, None, raw=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_with_allow(intake, method):
    response = requests.request(method, intake.url + "/webhook/alert", headers=AUTH, timeout=5)
    assert response.status_code == 405 and response.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TEST_TOKEN}, {"Authorization": "Basic " + TEST_TOKEN}],
)
def test_missing_or_wrong_token_is_401_and_logged_without_the_token(intake, clean_db, headers):
    response = requests.post(
        intake.url + "/webhook/alert",
        data=json.dumps(fixture_payload("testincident-firing.json")),
        headers={"Content-Type": "application/json", **headers},
        timeout=5,
    )
    assert response.status_code == 401
    assert incidents_rows(clean_db) == []
    logs = intake.logs()
    assert "Unauthorized" in logs and TEST_TOKEN not in logs


def test_unknown_path_is_404(intake):
    assert requests.post(intake.url + "/nope", headers=AUTH, timeout=5).status_code == 404


def test_lone_surrogates_and_control_character_names_are_stored_not_refused(intake, clean_db):
    raw = json.dumps(webhook([raw_alert("\u001d", note="x")])).replace('"x"', '"\\udb69"').encode()
    response = post(intake, None, raw=raw)
    assert response.status_code == 200, response.text
    (row,) = incidents_rows(clean_db)
    assert row["alert_name"] == "\u001d" and row["labels"]["note"] == "\ufffd"


# --------------------------------------------------------------------------- one bad alert never costs the group

LONG_NAME = "KubePersistentVolumeFillingUpInTheDataNamespaceOfTheBillingClusterBecauseTheRetentionJobStoppedRunning" + "X" * 40


def test_one_bad_alert_never_costs_the_group(intake, clean_db):
    payload = webhook(
        [
            raw_alert("CriticalGood", service="billing"),
            raw_alert(LONG_NAME, service="billing"),
            {**raw_alert("OverflowingStart"), "startsAt": "9999-12-31T23:59:59-05:00"},
            "not an alert",
            {**raw_alert("NoLabels"), "labels": None},
            {**raw_alert("BadStatus"), "status": "pending"},
        ],
        commonAnnotations=None,
        groupLabels=None,
        commonLabels=None,
    )
    response = post(intake, payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["action"] for r in body["results"]] == ["created", "created", "rejected", "rejected", "rejected", "rejected"]
    assert body["counts"] == {"created": 2, "rejected": 4}
    rejected = body["results"][2:]
    assert [(r["index"], r["field"]) for r in rejected] == [
        (2, "alerts[2].startsAt"), (3, "alerts[3]"), (4, "alerts[4].labels"), (5, "alerts[5].status"),
    ]
    assert "out of range" in rejected[0]["reason"] and rejected[0]["incident_id"] is None
    assert rejected[0]["alert_name"] == "OverflowingStart" and "alert_name" not in rejected[1]
    stored = {r["labels"]["alertname"]: r for r in incidents_rows(clean_db)}
    assert set(stored) == {"CriticalGood", LONG_NAME}
    long_row = stored[LONG_NAME]
    assert len(long_row["alert_name"]) == 100 and long_row["alert_name"] == LONG_NAME[:99] + "\u2026"
    assert long_row["priority"] == "P0" and long_row["fingerprint"] == body["results"][1]["fingerprint"]
    wait_until(lambda: '"Alerts rejected"' in intake.logs() and '"rejected": 4' in intake.logs(), message="rejection log line")


def test_long_names_are_bounded_the_same_way_on_repeat(intake, clean_db):
    first = post(intake, webhook([raw_alert(LONG_NAME)])).json()["results"][0]
    again = post(intake, webhook([raw_alert(LONG_NAME)])).json()["results"][0]
    assert again == {**first, "action": "refreshed"}
    (row,) = incidents_rows(clean_db)
    assert row["repeat_count"] == 1 and row["labels"]["alertname"] == LONG_NAME


def test_liberal_envelope_nulls_numbers_and_extra_fields(intake, clean_db):
    alert = {
        **raw_alert("Liberal", fingerprint=False),
        "labels": {"alertname": "Liberal", "severity": "critical", "replicas": 3, "ready": False, "gone": None},
        "annotations": {"summary": "s", "values": {"B0": 97.5}, "runbook_url": None},
        "endsAt": None,
        "generatorURL": None,
        "silenceURL": "http://grafana/alerting/silence/new",
        "valueString": "[ var='B0' value=97.5 ]",
    }
    payload = {**webhook([alert]), "truncatedAlerts": "3", "groupKey": 5615590933959184469, "receiver": None,
               "externalURL": None, "numFiring": 1, "orgId": 1, "commonAnnotations": None, "status": None}
    response = post(intake, payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][0]["action"] == "created" and body["truncated_alerts"] == 3
    (row,) = incidents_rows(clean_db)
    assert row["labels"] == {"alertname": "Liberal", "severity": "critical", "replicas": "3", "ready": "false"}
    assert row["annotations"]["values"] == '{"B0": 97.5}' and "runbook_url" not in row["annotations"]


def test_malformed_envelope_fields_are_ignored_and_reported(intake, clean_db):
    payload = {**webhook([raw_alert("EnvelopeOdd")]), "truncatedAlerts": "many", "receiver": {"a": 1}, "status": "pending"}
    response = post(intake, payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][0]["action"] == "created" and body["truncated_alerts"] == 0
    assert [w.split(":")[0] for w in body["warnings"]] == ["truncatedAlerts", "status", "receiver"]


@pytest.mark.parametrize(
    "name, created",
    [
        # Shaped like Grafana OnCall's example of AlertManager's webhook (numFiring/numResolved extras).
        ("grafana-oncall-alertmanager-v2-example.json", 3),
        # Shaped like Grafana OnCall's demo alert: no fingerprint, no truncatedAlerts, an extra per-alert field.
        ("grafana-oncall-alertmanager-demo.json", 0),
        # Shaped like Alerta's test payload: webhook version 3, numeric groupKey, a +03:00 startsAt.
        ("alerta-prometheus-webhook.json", 1),
    ],
)
def test_payloads_of_other_projects_are_accepted(intake, clean_db, name, created):
    payload = json.loads((FIXTURES / "senders" / name).read_text())
    response = post(intake, payload)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(payload["alerts"]) and "rejected" not in {r["action"] for r in results}
    assert len(incidents_rows(clean_db)) == created


def test_a_webhook_is_written_while_another_transaction_waits_for_the_database(intake, clean_db):
    """The intake keeps two transactions in flight: a webhook whose
    transaction waits (here for a row lock; in production for its commit or
    a slow statement) does not hold back the next one."""
    import threading

    assert post(intake, webhook([raw_alert("Held", fingerprint="held-1")])).json()["counts"] == {"created": 1}
    blocked: dict = {}
    with clean_db.connect() as holder:
        holder.execute(sa.text("SELECT id FROM incidents WHERE fingerprint = 'held-1' FOR UPDATE"))
        waiting = threading.Thread(target=lambda: blocked.update(answer=post(intake, webhook([raw_alert("Held", fingerprint="held-1")]))),
                                   daemon=True)
        waiting.start()
        def lock_waiters() -> int:
            # Each look on a connection of its own: within one transaction
            # pg_stat_activity keeps the backends it listed first.
            with clean_db.connect() as look:
                return look.execute(sa.text("SELECT count(*) FROM pg_stat_activity "
                                            "WHERE datname = current_database() AND wait_event_type = 'Lock'")).scalar()

        wait_until(lambda: lock_waiters() >= 1, 10, message="the first webhook's transaction waiting for the row lock")
        # With one transaction at a time this webhook would wait for the lock too.
        answer = requests.post(intake.url + "/webhook/alert", data=json.dumps(webhook([raw_alert("Free", fingerprint="free-1")])),
                               headers={"Content-Type": "application/json", **AUTH}, timeout=5)
        assert answer.status_code == 200 and answer.json()["counts"] == {"created": 1}
        assert "answer" not in blocked
        holder.rollback()
    waiting.join(10)
    assert blocked["answer"].status_code == 200 and blocked["answer"].json()["counts"] == {"refreshed": 1}


def test_behind_proxies_an_x_forwarded_for_that_names_no_client_address_never_costs_a_page(base_env, clean_db):
    """With TRUSTED_PROXY_HOPS, the entry read as the client may be no
    address (a proxy writing ``unknown``, a port, an empty entry, nothing at
    all). AlertManager does not retry a 4xx: each webhook is stored, served
    with the connection's own address, and the header is named in a warning."""
    proc = FunctionProcess("intake", {**base_env, "TRUSTED_PROXY_HOPS": "2"}).start()
    headers = ("unknown, 10.0.0.5", "[2001:db8::1]:443, 10.0.0.5", ", 10.0.0.5", "203.0.113.7:, 10.0.0.5", "",
               ":., 10.0.0.5", '"unbalanced, 10.0.0.5')
    try:
        for n, forwarded in enumerate(headers):
            answer = post(proc, webhook([raw_alert(f"ForwardedFor{n}", fingerprint=f"ff{n:014d}")]),
                          headers={"X-Forwarded-For": forwarded})
            assert answer.status_code == 200, (forwarded, answer.status_code, answer.text)
        assert requests.get(proc.url + "/health", headers={"X-Forwarded-For": "unknown, 10.0.0.5"}, timeout=10).ok
        logs = proc.logs()
    finally:
        proc.stop()
    assert len(incidents_rows(clean_db)) == len(headers)
    assert "X-Forwarded-For ignored" in logs and "Traceback" not in logs
