"""The query function over real HTTP: filters, pagination, lifecycle,
health, metrics."""

import json
import math
from datetime import datetime, timedelta

import pytest
import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from shared import filters
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert
from loopback.processes import FunctionProcess, wait_until

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture(scope="module")
def query(base_env, broker):
    proc = FunctionProcess("query", {**base_env, "K_SINK": broker.url + "/default/default"}).start()
    yield proc
    proc.stop()


def seed(engine, *alerts):
    with engine.begin() as conn:
        return [o.incident_id for o in svc.record_alerts(conn, list(alerts), "/test", "test").outcomes]


def get(query, path, **params):
    return requests.get(query.url + path, params=params, headers=AUTH, timeout=30)


def ids(response):
    assert response.status_code == 200, response.text
    return [i["id"] for i in response.json()]


@pytest.fixture
def sample(clean_db):
    """Six incidents across priorities, statuses and services."""
    made = {}
    for name, priority, service in [
        ("EmailServiceDown", "P0", "email"), ("KafkaConsumerLagHigh", "P1", "email"), ("DiskSpaceLow", "P2", "logs"),
        ("KubePodCrashLooping", "P1", "billing"), ("HighErrorRate", "P0", "billing"), ("TestIncident", "P0", "email"),
    ]:
        made[name] = seed(clean_db, alert(name, priority=priority, service=service))[0]
    with clean_db.begin() as conn:
        svc.transition(conn, made["KafkaConsumerLagHigh"], "investigating", "t", "/test")
        svc.transition(conn, made["DiskSpaceLow"], "resolved", "t", "/test")
        svc.transition(conn, made["HighErrorRate"], "resolved", "t", "/test")
        svc.transition(conn, made["HighErrorRate"], "closed", "t", "/test")
    return made


def test_health_is_the_seed_answer(query):
    response = requests.get(query.url + "/health", timeout=5)
    assert response.json() == {"status": "healthy", "database": "connected"}


def test_list_is_an_array_newest_first(query, sample):
    assert ids(get(query, "/incidents")) == list(reversed(list(sample.values())))


FILTER_CASES = [
    ({"status": "open"}, {"EmailServiceDown", "KubePodCrashLooping", "TestIncident"}),
    ({"status": "open,investigating"}, {"EmailServiceDown", "KubePodCrashLooping", "TestIncident", "KafkaConsumerLagHigh"}),
    ({"status": ["resolved", "closed"]}, {"DiskSpaceLow", "HighErrorRate"}),
    ({"priority": "P0"}, {"EmailServiceDown", "HighErrorRate", "TestIncident"}),
    ({"priority": "p2"}, {"DiskSpaceLow"}),
    ({"service": "billing"}, {"KubePodCrashLooping", "HighErrorRate"}),
    ({"alert_name": "TestIncident,DiskSpaceLow"}, {"TestIncident", "DiskSpaceLow"}),
    ({"priority": "P0", "status": "open", "service": "email"}, {"EmailServiceDown", "TestIncident"}),
    ({"since": "2000-01-01T00:00:00Z"}, None),
    ({"since": "2999-01-01T00:00:00+02:00"}, set()),
    ({"until": "2000-01-01"}, set()),
    ({"until": "2999-01-01T00:00:00"}, None),
]


@pytest.mark.parametrize("params, expected", FILTER_CASES)
def test_filters(query, sample, params, expected):
    expected = set(sample) if expected is None else expected
    by_id = {v: k for k, v in sample.items()}
    assert {by_id[i] for i in ids(get(query, "/incidents", **params))} == expected


def test_fingerprint_filter(query, sample, clean_db):
    with clean_db.connect() as conn:
        fingerprint = svc.get_incident(conn, sample["DiskSpaceLow"])["fingerprint"]
    assert ids(get(query, "/incidents", fingerprint=fingerprint)) == [sample["DiskSpaceLow"]]


def test_every_declared_filter_is_tried_over_http():
    # A filter added to shared/filters.py needs a case in FILTER_CASES (or
    # its own test, like fingerprint's above).
    tried = {name for params, _ in FILTER_CASES for name in params} | {"fingerprint"}
    assert {f.name for f in filters.FILTERS} <= tried


def test_since_in_the_last_day_like_the_seed(query, sample):
    since = (datetime.utcnow() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(ids(get(query, "/incidents", since=since))) == 6


@pytest.mark.parametrize(
    "params, parameter",
    [
        ({"status": "banana"}, "status"),
        ({"priority": "P7"}, "priority"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-45"}, "until"),
        ({"limit": "0"}, "limit"),
        ({"limit": "10000"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "garbage!!"}, "cursor"),
        ({"colour": "red"}, "colour"),
        ({"since": ["2026-01-01", "2026-01-02"]}, "since"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(query, params, parameter):
    response = get(query, "/incidents", **params)
    assert response.status_code == 400
    assert response.json()["parameter"] == parameter
    assert parameter in response.json()["message"]


def test_status_error_lists_the_allowed_values(query):
    body = get(query, "/incidents", status="banana").json()
    assert body["allowed"] == ["open", "investigating", "resolved", "closed"]


def test_pagination_walks_1234_incidents_with_no_gap_or_duplicate_while_new_ones_arrive(query, clean_db):
    original = set(seed(clean_db, *[alert("Page", instance=str(i)) for i in range(1234)]))
    seen, url, pages = [], query.url + "/incidents?limit=100&status=open", 0
    while url:
        response = requests.get(url, headers=AUTH, timeout=30)
        seen += ids(response)
        pages += 1
        seed(clean_db, alert("Arrival", instance=str(pages)))
        url = response.links.get("next", {}).get("url")
    original_seen = [i for i in seen if i in original]
    assert len(original_seen) == len(set(original_seen)) == 1234
    assert pages == 13


def test_get_one_incident_with_timeline(query, sample):
    body = get(query, f"/incidents/{sample['HighErrorRate']}").json()
    assert body["alert_name"] == "HighErrorRate" and body["status"] == "closed"
    assert body["diagnostics"] == {} and body["remediation_actions"] == []
    assert [t["kind"] for t in body["timeline"]] == ["opened", "status_changed", "status_changed"]
    assert body["created_at"].endswith("Z") and body["labels"]["service"] == "billing"


def test_malformed_id_is_400_unknown_is_404(query):
    assert get(query, "/incidents/not-a-uuid").status_code == 400
    assert get(query, "/incidents/00000000-0000-4000-8000-000000000000").status_code == 404


def patch(query, incident_id, body, headers=None):
    return requests.patch(
        query.url + f"/incidents/{incident_id}",
        data=body if isinstance(body, (bytes, str)) else json.dumps(body),
        headers={**AUTH, "Content-Type": "application/json", **(headers or {})},
        timeout=10,
    )


def test_acknowledge_resolve_close_with_notes_and_actor(query, clean_db, broker):
    (incident_id,) = seed(clean_db, alert("Lifecycle"))
    ack = patch(query, incident_id, {"status": "investigating", "note": "looking"}, {"X-Actor": "alice"})
    assert ack.status_code == 200 and ack.json()["status"] == "investigating"
    resolved = patch(query, incident_id, {"status": "resolved", "note": "rolled back"}, {"X-Actor": "alice"})
    assert resolved.json()["resolved_at"] is not None
    assert patch(query, incident_id, {"status": "closed"}).status_code == 200
    timeline = get(query, f"/incidents/{incident_id}").json()["timeline"]
    assert [(t["actor"], t["details"].get("to"), t["details"].get("note")) for t in timeline[1:]] == [
        ("api:alice", "investigating", "looking"), ("api:alice", "resolved", "rolled back"), ("api", "closed", None)
    ]
    wait_until(lambda: broker.received(lambda r: r.headers.get("ce-id") == f"{incident_id}.resolved.0"), 10, message="resolved event published")


def test_invalid_transition_is_409_naming_current_and_allowed(query, clean_db):
    (incident_id,) = seed(clean_db, alert("Refused"))
    response = patch(query, incident_id, {"status": "closed"})
    assert response.status_code == 409
    body = response.json()
    assert body["current_status"] == "open" and body["allowed"] == ["investigating", "resolved"]
    assert "open" in body["message"] and "closed" in body["message"]
    patch(query, incident_id, {"status": "resolved"})
    patch(query, incident_id, {"status": "closed"})
    final = patch(query, incident_id, {"status": "investigating"})
    assert final.status_code == 409 and final.json()["allowed"] == []


@pytest.mark.parametrize(
    "body, status",
    [
        ({"status": "banana"}, 400),
        ({}, 400),
        ({"status": "resolved", "colour": "red"}, 400),
        ({"status": "resolved", "note": 5}, 400),
        ({"status": "resolved", "note": "x" * 5000}, 400),
        ([1, 2], 400),
        (b"{broken", 400),
    ],
)
def test_bad_patch_bodies_are_400(query, clean_db, body, status):
    (incident_id,) = seed(clean_db, alert("BadPatch"))
    assert patch(query, incident_id, body).status_code == status


def test_patch_unknown_incident_is_404(query, clean_db):
    assert patch(query, "00000000-0000-4000-8000-000000000000", {"status": "resolved"}).status_code == 404


def test_every_endpoint_but_health_needs_the_token(query, clean_db):
    for method, path in [("GET", "/incidents"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("GET", "/incidents/00000000-0000-4000-8000-000000000000"),
                         ("PATCH", "/incidents/00000000-0000-4000-8000-000000000000")]:
        assert requests.request(method, query.url + path, timeout=5).status_code == 401, path
    assert "Unauthorized" in query.logs() and TEST_TOKEN not in query.logs()


def scrape(query):
    response = get(query, "/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_match_the_database(query, sample, clean_db):
    live_ok = {"action": "scale_deployment", "target": "email-service", "from": 1, "to": 6, "success": True, "dry_run": False}
    with clean_db.begin() as conn:
        svc.append_remediation_action(conn, sample["KafkaConsumerLagHigh"], live_ok)
        svc.append_remediation_action(conn, sample["KafkaConsumerLagHigh"], {**live_ok, "action": "rollout_restart", "success": False})
        svc.append_remediation_action(conn, sample["TestIncident"], {**live_ok, "dry_run": True})
        svc.add_timeline(conn, sample["TestIncident"], "notification", {"channel": "pagerduty", "outcome": "sent"})
        conn.execute(sa.text("UPDATE incidents SET created_at = resolved_at - interval '10 minutes' WHERE id = :id"), {"id": sample["DiskSpaceLow"]})
    samples = scrape(query)
    assert samples[("incidents_total", (("priority", "P0"), ("status", "open")))] == 2
    assert samples[("incidents_total", (("priority", "P0"), ("status", "closed")))] == 1
    assert samples[("incidents_open", (("priority", "P1"),))] == 2
    assert samples[("remediation_actions_total", (("action", "scale_deployment"), ("dry_run", "false"), ("success", "true")))] == 1
    assert samples[("remediation_success_rate", ())] == 0.5
    assert samples[("escalations_total", (("channel", "pagerduty"), ("outcome", "sent")))] == 1
    assert samples[("incident_time_to_resolve_seconds_count", ())] == 2
    assert samples[("incident_time_to_resolve_seconds_bucket", (("le", "900.0"),))] == 2
    assert samples[("incident_time_to_resolve_seconds_bucket", (("le", "300.0"),))] == 1
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)


def test_success_rate_is_nan_before_any_live_action(query, clean_db):
    assert math.isnan(scrape(query)[("remediation_success_rate", ())])


def test_seed_dashboard_grep_finds_the_success_rate(query, clean_db):
    assert "remediation_success_rate" in get(query, "/metrics").text


@pytest.mark.parametrize(
    "raw_query",
    [
        "status=open'%20OR%201=1--",
        "alert_name=x');DROP%20TABLE%20incidents;--",
        "service=%ff%fe%00",
        "status=%ff",
        "since=%00",
        "priority=" + "P0," * 5000,
        "alert_name=" + "a" * 60000,
    ],
)
def test_hostile_query_strings_are_4xx_or_empty_never_5xx(query, clean_db, raw_query):
    response = requests.get(query.url + "/incidents?" + raw_query, headers=AUTH, timeout=30)
    assert response.status_code < 500
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('incidents')")).scalar() == "incidents"


def test_openapi_is_served(query):
    spec = get(query, "/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/incidents/{id}" in spec["paths"]
