"""A hostile pass over the noise-control, proposal and diagnosis paths:
malformed input answers 4xx, regexes cannot stall the intake, and secrets
in what Kubernetes reports are masked before they are stored."""

from __future__ import annotations

import re
import time
import uuid

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess
from tests.conftest import TEST_TOKEN

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
Z = str(uuid.uuid4())


@pytest.fixture(scope="module")
def query(base_env):
    proc = FunctionProcess("query", {**base_env, "ALERTMANAGER_URL": "http://127.0.0.1:9"}).start()
    yield proc
    proc.stop()


MALFORMED = [
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "duration_minutes": 10, "reason": "x", "starts_at": "9999-12-31T23:59:59Z"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "duration_minutes": 10, "reason": "x", "starts_at": "0001-01-01T00:00:00Z"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "ends_at": "9999-12-31T23:59:59Z", "reason": "x"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "duration_minutes": 10, "reason": "x", "starts_at": "2026-13-01T00:00:00Z"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=~\"\ud800\""], "duration_minutes": 10, "reason": "x"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": [{"a": 1}], "duration_minutes": 10, "reason": "x"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": "a=\"b\"", "duration_minutes": 10, "reason": "x"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "duration_minutes": 1e308, "reason": "x"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "duration_minutes": 10, "reason": ["x"]}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "duration_minutes": 10, "reason": "x\u0000"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=~\"(\""], "duration_minutes": 10, "reason": "x"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=~\"x{1000}{1000}\""], "duration_minutes": 10, "reason": "x"}}),
    ("POST", "/maintenance-windows", {"json": {"matchers": ["a=\"b\""], "duration_minutes": 10, "reason": "x", "starts_at": 5}}),
    ("POST", "/maintenance-windows", {"json": [1, 2]}),
    ("POST", "/maintenance-windows", {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}),
    ("GET", "/maintenance-windows/not-a-uuid", {}),
    ("GET", f"/maintenance-windows/{Z}", {}),
    ("GET", "/maintenance-windows/%00", {}),
    ("POST", f"/maintenance-windows/{Z}/end", {}),
    ("DELETE", f"/maintenance-windows/{Z}", {}),
    ("POST", f"/incidents/{Z}/acknowledge", {}),
    ("POST", f"/incidents/{Z}/acknowledge", {"json": {"note": 5}}),
    ("POST", "/incidents/zzz/acknowledge", {}),
    ("GET", f"/incidents/{Z}/silences", {}),
    ("POST", f"/incidents/{Z}/silences", {"json": {"duration_minutes": 10}}),
    ("POST", f"/incidents/{Z}/silences", {"json": {"duration_minutes": "10"}}),
    ("DELETE", f"/incidents/{Z}/silences/not-an-id", {}),
    ("DELETE", f"/incidents/{Z}/silences/{Z}", {}),
    ("GET", f"/incidents/{Z}/proposals", {}),
    ("GET", f"/incidents/{Z}/proposals/bad", {}),
    ("GET", f"/incidents/{Z}/proposals/{Z}", {}),
    ("POST", f"/incidents/{Z}/proposals/{Z}/approve", {}),
    ("POST", f"/incidents/{Z}/proposals/{Z}/approve", {"json": {"hash": 5}}),
    ("POST", f"/incidents/{Z}/proposals/{Z}/approve", {"json": {"hash": "a" * 64, "x": 1}}),
    ("POST", f"/incidents/{Z}/proposals/{Z}/approve", {"data": b"null", "headers": {"Content-Type": "application/json"}}),
    ("POST", f"/incidents/{Z}/proposals/{Z}/reject", {"data": b"x" * 10000, "headers": {"Content-Type": "application/json"}}),
    ("POST", f"/incidents/{Z}/proposals/{Z}/approve", {"headers": {"X-Actor": "al\u00e9ice".encode().decode("latin-1")}}),
    ("GET", "/suppressed-alerts?x=1", {}),
]


@pytest.mark.parametrize("method,path,kwargs", MALFORMED, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(MALFORMED)])
def test_malformed_requests_are_4xx(query, clean_db, method, path, kwargs):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    r = requests.request(method, query.url + path, headers=headers, timeout=30, **kwargs)
    assert 400 <= r.status_code < 500 or r.status_code in (502, 503), (r.status_code, r.text[:300])


@pytest.mark.parametrize("method,path", sorted({(m, p) for m, p, _ in MALFORMED}))
def test_new_routes_need_the_token(query, clean_db, method, path):
    r = requests.request(method, query.url + path, timeout=30)
    assert r.status_code == 401, (r.status_code, r.text[:200])


# ------------------------------------------------------------------ regexes (RE2, as AlertManager)

PATHOLOGICAL = ["(a+)+b", "(a|a)*b", "(.*)*x"]


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_a_window_regex_matches_in_linear_time(pattern):
    # Python's backtracking re takes seconds at 28 characters and hours at
    # 40; every firing alert is matched against every active window.
    from shared import matchers

    matcher = matchers.parse(f'service=~"{pattern}"')
    started = time.perf_counter()
    assert not matcher.matches({"service": "a" * 28})
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_a_silence_regex_from_alertmanager_matches_in_linear_time(pattern):
    from shared import silences

    silence = {"matchers": [{"name": "service", "value": pattern, "isRegex": True, "isEqual": True}]}
    started = time.perf_counter()
    assert not silences.silences_labels(silence, {"service": "a" * 28})
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("pattern", ["a++", "x\\\\Z", "(?>a)"])
def test_a_window_regex_re2_refuses_is_refused(pattern):
    from shared import matchers
    from shared.errors import BadRequest

    with pytest.raises(BadRequest):
        matchers.parse(f'service=~"{pattern}"')


def test_window_regexes_keep_their_meaning():
    from shared import matchers

    assert matchers.parse('service=~"db.*"').matches({"service": "db-primary"})
    assert not matchers.parse('service=~"db.*"').matches({"service": "mydb"})
    assert matchers.parse('service!~"a|b"').matches({"service": "c"})
    assert matchers.parse('service=~"\\\\d+"').matches({"service": "42"})


# ------------------------------------------------------------------ secrets in what Kubernetes reports

SECRET = "hunter2hunter2"
LEAKY = f"panic: cannot connect to postgres://app:{SECRET}@db:5432/app (DB_PASSWORD={SECRET})"


def test_a_container_termination_message_is_redacted():
    # terminationMessagePolicy FallbackToLogsOnError makes this the tail of
    # the container's log, which the log facts redact.
    from functions.diagnostics import facts

    pod = {"metadata": {"name": "api-1"}, "status": {
        "message": LEAKY,
        "containerStatuses": [{"name": "api", "restartCount": 3, "state": {"terminated": {"reason": "Error", "exitCode": 1, "message": LEAKY}}}]}}
    fact = facts.pod_fact(pod)
    assert SECRET not in repr(fact)
    assert "DB_PASSWORD=" in fact["containers"][0]["message"]


def test_a_rollout_change_cause_is_redacted():
    # kubectl --record writes the command line, secrets and all.
    from datetime import datetime, timedelta, timezone

    from functions.diagnostics import facts

    now = datetime.now(timezone.utc)
    rs = {"metadata": {"name": "api-7f", "creationTimestamp": now.isoformat(),
                       "ownerReferences": [{"kind": "Deployment", "name": "api"}],
                       "annotations": {"deployment.kubernetes.io/revision": "2",
                                       "kubernetes.io/change-cause": f"kubectl set env deployment/api DB_PASSWORD={SECRET} --record=true"}},
          "spec": {"replicas": 1}, "status": {}}
    revisions, _ = facts.rollout_facts([rs], "api", facts.Window(now - timedelta(hours=1), now + timedelta(minutes=1)), 5)
    assert revisions and SECRET not in repr(revisions)


# ------------------------------------------------------------------ secret shapes in container logs

LOG_SECRETS = [
    ("Authorization: Token 0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    ("psql --password hunter2hunter2 -h db", "hunter2hunter2"),
    ('secretKey: "abcdEFGH12345678"', "abcdEFGH12345678"),
    ('private_key: "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"', "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"),
    ("passphrase=correcthorsebattery", "correcthorsebattery"),
    ("POST https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/abcdefghijklmnopqrstuvwx failed",
     "abcdefghijklmnopqrstuvwx"),
    ("using glpat-AbCdEfGhIjKlMnOpQrSt", "glpat-AbCdEfGhIjKlMnOpQrSt"),
    ("npm token npm_abcdefghijklmnopqrstuvwxyz0123456789", "npm_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("OPENAI key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD", "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"),
]


@pytest.mark.parametrize("line,secret", LOG_SECRETS, ids=[s[:20] for _, s in LOG_SECRETS])
def test_common_secret_shapes_in_log_lines_are_masked(line, secret):
    from shared.log import redact_patterns

    assert secret not in redact_patterns(line)


def test_ordinary_log_lines_are_left_alone():
    from shared.log import redact_patterns

    for line in ("GET /healthz 200 in 3ms", "connection refused: db:5432", "retrying task-sk-1 in 5s",
                 "token bucket refilled", "user password reset email sent"):
        assert redact_patterns(line) == line


# ------------------------------------------------------------------ an AlertManager URL that answers something else

@pytest.fixture(scope="module")
def not_alertmanager():
    # What a wrong ALERTMANAGER_URL finds at 3 a.m.: a proxy's login page.
    from loopback.servers import RecordingServer

    server = RecordingServer(lambda r: (200, {"Content-Type": "text/html"}, b"<html>Sign in</html>")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def misdirected_query(base_env, not_alertmanager):
    proc = FunctionProcess("query", {**base_env, "ALERTMANAGER_URL": not_alertmanager.url}).start()
    yield proc
    proc.stop()


def _incident_with_labels(engine):
    from shared import incidents as svc
    from tests.factories import alert

    with engine.begin() as conn:
        return svc.record_alerts(conn, [alert("EmailServiceDown", service="email", namespace="production")], "/t", "t").outcomes[0].incident_id


def test_an_alertmanager_answering_html_is_a_502_not_a_500(misdirected_query, clean_db):
    incident_id = _incident_with_labels(clean_db)
    listed = requests.get(f"{misdirected_query.url}/incidents/{incident_id}/silences", headers=AUTH, timeout=30)
    assert listed.status_code == 502, (listed.status_code, listed.text[:200])
    created = requests.post(f"{misdirected_query.url}/incidents/{incident_id}/silences", headers=AUTH, timeout=30,
                            json={"duration_minutes": 30})
    assert created.status_code == 502, (created.status_code, created.text[:200])


def test_the_incident_page_survives_an_alertmanager_answering_html(misdirected_query, clean_db):
    incident_id = _incident_with_labels(clean_db)
    board = requests.Session()
    assert board.post(misdirected_query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"},
                      allow_redirects=False, timeout=10).status_code == 303
    page = board.get(f"{misdirected_query.url}/ui/incidents/{incident_id}", timeout=30)
    assert page.status_code == 200, (page.status_code, page.text[:200])
    assert "AlertManager" in page.text


def test_a_stored_window_whose_regex_no_longer_compiles_holds_nothing_and_breaks_no_intake(clean_db):
    # Written before regexes were RE2's (Python accepted a possessive a++):
    # such a window must not turn every alert of the intake into an error.
    import json as _json
    from datetime import timedelta

    from shared import clock, maintenance
    from tests.factories import alert

    now = clock.now()
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO maintenance_windows (id, matchers, starts_at, ends_at, reason, created_by, created_at) "
                             "VALUES (:id, CAST(:m AS jsonb), :s, :e, 'old', 'api', :s)"),
                     {"id": str(uuid.uuid4()), "m": _json.dumps(['service=~"a++"']), "s": now - timedelta(minutes=5),
                      "e": now + timedelta(hours=1)})
        assert maintenance.hold(conn, [alert("EmailServiceDown", service="aaa")], now) == {}


def _chunked(data: bytes):
    yield data


def test_a_chunked_acknowledge_keeps_its_note(query, clean_db):
    # No Content-Length (Transfer-Encoding: chunked): the note is still read.
    from shared import incidents as svc

    incident_id = _incident_with_labels(clean_db)
    r = requests.post(f"{query.url}/incidents/{incident_id}/acknowledge", timeout=30,
                      headers={**AUTH, "Content-Type": "application/json"}, data=_chunked(b'{"note": "on it, chunked"}'))
    assert r.status_code == 200, r.text
    with clean_db.connect() as conn:
        notes = [t["details"].get("note") for t in svc.get_timeline(conn, incident_id)]
    assert "on it, chunked" in notes


def test_a_chunked_approval_body_is_read(query, clean_db):
    incident_id = _incident_with_labels(clean_db)
    r = requests.post(f"{query.url}/incidents/{incident_id}/proposals/{Z}/approve", timeout=30,
                      headers={**AUTH, "Content-Type": "application/json"}, data=_chunked(b'{"hash": 5}'))
    # The body is read and refused for its bad hash, not taken as empty or as invalid JSON.
    assert r.status_code == 400 and "hash" in r.json()["message"], r.text


@pytest.fixture
def board(query):
    session = requests.Session()
    assert session.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, allow_redirects=False,
                        timeout=10).status_code == 303
    page = session.get(query.url + "/ui/maintenance", timeout=10)
    session.csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return session


HUGE = "9" * 5000  # int() refuses more than 4300 digits with ValueError


def test_a_huge_window_duration_on_the_board_is_refused_not_a_500(query, board, clean_db):
    r = board.post(query.url + "/ui/maintenance", allow_redirects=False, timeout=30,
                   data={"csrf": board.csrf, "matchers": 'service="email"', "reason": "r", "duration_minutes": HUGE})
    assert r.status_code == 303 and "error=" in r.headers["Location"], (r.status_code, r.text[:200])


def test_a_huge_silence_duration_on_the_board_is_refused_not_a_500(query, board, clean_db):
    incident_id = _incident_with_labels(clean_db)
    r = board.post(f"{query.url}/ui/incidents/{incident_id}/silences", allow_redirects=False, timeout=30,
                   data={"csrf": board.csrf, "duration_minutes": HUGE})
    assert r.status_code == 303 and "error=" in r.headers["Location"], (r.status_code, r.text[:200])


def test_a_huge_backlog_limit_is_400(query, clean_db):
    r = requests.get(f"{query.url}/dead-letters?limit={HUGE}", headers=AUTH, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:200])


@pytest.mark.parametrize("raw", ["%0d%0aSet-Cookie:%20x=1", "%00", "not-a-uuid"])
def test_a_bad_incident_id_on_the_proposal_buttons_is_4xx_or_a_redirect_never_a_500(query, board, clean_db, raw):
    r = board.post(f"{query.url}/ui/incidents/{raw}/proposals/{Z}/approve", allow_redirects=False, timeout=30,
                   data={"csrf": board.csrf})
    assert r.status_code in (303, 400, 404), (r.status_code, r.text[:200])
    assert "x=1" not in r.headers.get("Set-Cookie", "")
