"""The query function as a demanding outside client uses it, over real HTTP:
more filter values than a statement can carry, time ranges that hold
nothing, the forms of RFC 3339 the standard allows, query parameters an
endpoint does not take, and connections the database drops under a request."""

from __future__ import annotations

import itertools
import os
import re
import threading
import uuid
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess, wait_until
from shared import incidents as svc
from tests.conftest import TEST_TOKEN, needs_own_backend
from tests.factories import alert

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
Z = str(uuid.uuid4())
# The distinct values one filter may name (shared/filters.py MAX_VALUES, as openapi.yaml says).
MAX_VALUES = 1000
# The longest query string the query function reads (shared/http.py, as openapi.yaml says), and
# the longest a list endpoint's query may be as its next page's Link repeats it, leaving room for
# the cursor (functions/query/api.py).
MAX_QUERY_STRING = 16 * 1024
MAX_LINK_QUERY = MAX_QUERY_STRING - 2048


@pytest.fixture(scope="module")
def query(base_env):
    proc = FunctionProcess("query", dict(base_env), threads=2).start()
    yield proc
    proc.stop()


@pytest.fixture
def query_on_one_connection(base_env):
    # One pooled connection: the one the database terminates is the one the
    # next request gets. Its own process, so no other test's requests have
    # already replaced or pre-pinged that connection.
    proc = FunctionProcess("query", {**base_env, "DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "0"}, threads=2).start()
    yield proc
    proc.stop()


def get(query, path: str, **kwargs) -> requests.Response:
    return requests.get(query.url + path, headers=AUTH, timeout=60, **kwargs)


def seed(engine, name: str = "Hostile") -> str:
    with engine.begin() as conn:
        return svc.record_alerts(conn, [alert(name, service="email")], "/test", "test").outcomes[0].incident_id


# ------------------------------------------------------------------ how many values one filter may name

@pytest.mark.parametrize("path, parameter, value", [
    # Each fingerprint is bound twice (root and member alerts): 33,000 of
    # them passed the protocol's 65,535 parameters and answered 500.
    ("/incidents", "fingerprint", lambda i: f"f{i}"),
    ("/incidents", "alert_name", lambda i: f"Alert{i}"),
    ("/incidents", "service", lambda i: f"svc{i}"),
    ("/dead-letters", "destination", lambda i: f"d{i}"),
    ("/outbox/parked", "event_type", lambda i: f"type.{i}"),
])
def test_more_distinct_values_than_the_bound_is_400_naming_the_parameter(query, clean_db, path, parameter, value):
    values = ",".join(value(i) for i in range(MAX_VALUES + 1))
    response = get(query, f"{path}?{parameter}={values}")
    assert response.status_code == 400, (response.status_code, response.text[:200])
    assert response.json()["parameter"] == parameter and str(MAX_VALUES) in response.json()["message"]


def test_values_that_differ_only_in_case_count_as_one_value_of_an_enum(query, clean_db):
    incident_id = seed(clean_db)
    spellings = ["".join(s) for s in itertools.islice(itertools.product(*((c, c.upper()) for c in "investigating")), MAX_VALUES + 1)]
    response = get(query, "/incidents?status=open," + ",".join(spellings))
    assert response.status_code == 200, (response.status_code, response.text[:200])
    assert [i["id"] for i in response.json()] == [incident_id]


# ------------------------------------------------------------------ how long a query may be

@pytest.mark.parametrize("path", ["/incidents", "/dead-letters", "/outbox/parked", "/maintenance-windows"])
def test_a_query_string_past_the_bound_is_400_naming_the_bound(query, clean_db, path):
    # 1000 distinct 80-character names: within the distinct-value bound, and
    # a 74 KB next-page Link that http.client refuses to read (LineTooLong).
    names = ",".join(f"{i:04d}" + "n" * 76 for i in range(MAX_VALUES))
    parameter = "event_type" if path != "/incidents" else "alert_name"
    response = get(query, f"{path}?{parameter}={names}")
    assert response.status_code == 400, (response.status_code, response.text[:200])
    assert str(MAX_QUERY_STRING) in response.json()["message"] and len(response.content) < 1000


def _names_query(length: int, prefix: str = "limit=1&alert_name=HostileA,HostileB") -> str:
    """``prefix`` and distinct 80-character names (characters a query carries
    unencoded, and one non-ASCII letter percent-encoded), ``length`` bytes."""
    query_string, i = prefix, 0
    while len(query_string) + 92 <= length:
        query_string += f",{i:04d}%C3%A9" + "!$'()*:@/" * 9
        i += 1
    return query_string + "z" * (length - len(query_string))


@pytest.mark.parametrize("path, prefix", [
    ("/incidents", "limit=1&alert_name=HostileA,HostileB"),
    ("/dead-letters", "limit=1&destination=x"),
    ("/outbox/parked", "limit=1&event_type=x"),
])
def test_the_next_link_of_the_longest_allowed_query_can_be_followed(query, clean_db, path, prefix):
    seed(clean_db, "HostileA"), seed(clean_db, "HostileB")
    query_string = _names_query(MAX_LINK_QUERY, prefix)
    response = get(query, f"{path}?{query_string}")
    assert response.status_code == 200, (response.status_code, response.text[:200])
    if path == "/incidents":
        link = response.headers["Link"]
        assert MAX_LINK_QUERY < len(link) < MAX_QUERY_STRING + 200, len(link)
        following = requests.get(response.links["next"]["url"], headers=AUTH, timeout=30)
        assert following.status_code == 200 and len(following.json()) == 1, following.text[:200]


@pytest.mark.parametrize("path, prefix", [
    ("/incidents", "limit=1&alert_name=HostileA,HostileB"),
    ("/dead-letters", "limit=1&destination=x"),
    ("/outbox/parked", "limit=1&event_type=x"),
])
def test_a_query_its_next_link_could_not_repeat_with_a_cursor_is_400(query, clean_db, path, prefix):
    # Within the query string's bound, but the Link adds a cursor to it.
    response = get(query, f"{path}?{_names_query(MAX_LINK_QUERY + 1, prefix)}")
    assert response.status_code == 400, (response.status_code, response.text[:200])
    assert str(MAX_LINK_QUERY) in response.json()["message"] and len(response.content) < 1000


def test_a_value_named_many_times_counts_once(query, clean_db):
    incident_id = seed(clean_db)
    response = get(query, "/incidents?" + "status=open&" * 300 + "alert_name=" + "Hostile," * 1100 + "Hostile")
    assert response.status_code == 200 and [i["id"] for i in response.json()] == [incident_id]


def test_the_next_link_names_each_value_once(query, clean_db):
    # Echoed as they came, repetitions made the Link header as long as the
    # query (20,000 of them: a 100 KB line http.client refuses to read).
    seed(clean_db, "HostileA"), seed(clean_db, "HostileB")
    response = get(query, "/incidents?limit=1&status=" + ",".join(["open"] * 3000) + "&status=open&alert_name=HostileA,HostileB")
    assert response.status_code == 200, response.text[:200]
    link = response.headers["Link"]
    assert len(link) < 500 and "?limit=1&status=open&alert_name=HostileA,HostileB&cursor=" in link, link[:300]
    assert len(requests.get(response.links["next"]["url"], headers=AUTH, timeout=30).json()) == 1


def board_session(query) -> requests.Session:
    board = requests.Session()
    assert board.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, timeout=10).status_code == 200
    return board


@pytest.mark.parametrize("path", ["/ui", "/ui/backlog", "/ui/maintenance"])
@pytest.mark.parametrize("signed_in", [True, False], ids=["signed-in", "signed-out"])
def test_a_board_query_string_past_the_bound_is_the_boards_html_error_page(query, clean_db, path, signed_in):
    # The JSON 400 of the API was shown to a person as raw JSON.
    names = ",".join(f"{i:04d}" + "n" * 76 for i in range(MAX_VALUES))
    client = board_session(query) if signed_in else requests.Session()
    page = client.get(f"{query.url}{path}?alert_name={names}", timeout=30, allow_redirects=False)
    assert page.status_code == 400 and page.headers["Content-Type"].startswith("text/html"), (page.status_code, page.text[:200])
    assert "Something is wrong" in page.text and str(MAX_QUERY_STRING) in page.text and len(page.content) < 4000
    assert "default-src 'none'" in page.headers["Content-Security-Policy"] and page.headers["Cache-Control"] == "no-store"
    # The API's own answer is still its JSON.
    assert get(query, f"/incidents?alert_name={names}").headers["Content-Type"].startswith("application/json")


def _pager(html: str) -> str:
    return re.search(r'href="([^"]+)" rel="next"', html).group(1).replace("&amp;", "&")


def test_the_boards_next_page_link_names_each_value_once_as_the_apis_link_does(query, clean_db):
    seed(clean_db, "HostileA"), seed(clean_db, "HostileB")
    board = board_session(query)
    page = board.get(query.url + "/ui?limit=1&status=" + ",".join(["open"] * 3000) + "&status=open&service=&alert_name=HostileA,HostileB"
                     "&alert_name=HostileB", timeout=30)
    assert page.status_code == 200, page.text[:200]
    following = _pager(page.text)
    assert following.startswith("/ui?limit=1&status=open&alert_name=HostileA,HostileB&cursor="), following[:300]
    api_link = get(query, "/incidents?limit=1&status=open&alert_name=HostileA,HostileB").links["next"]["url"]
    assert following.split("?", 1)[1] == api_link.split("?", 1)[1]
    assert board.get(query.url + following, timeout=30).text.count('href="/ui/incidents/') == 1


def test_the_backlogs_next_page_link_names_each_value_once(query, clean_db):
    from shared import dead_letters

    with clean_db.begin() as conn:
        for n in range(2):
            dead_letters.record(conn, dead_letters.Letter(f"ev-{n}", "/test", "io.incidentresponse.incident.opened", "http://escalation",
                                                          "502", "pagerduty: 500", {}, b"{}"))
    board = board_session(query)
    page = board.get(query.url + "/ui/backlog?limit=1&destination=" + ",".join(["http://escalation"] * 500)
                     + "&destination=http://escalation&event_type=", timeout=30)
    assert page.status_code == 200, page.text[:200]
    following = _pager(page.text)
    assert following.startswith("/ui/backlog?limit=1&destination=http://escalation&cursor="), following[:300]
    assert board.get(query.url + following, timeout=30).status_code == 200


# ------------------------------------------------------------------ time ranges

@pytest.mark.parametrize("path", ["/incidents", "/dead-letters", "/outbox/parked"])
@pytest.mark.parametrize("since, until", [
    ("2030-01-01T00:00:00Z", "2020-01-01T00:00:00Z"),
    # Before since by half a microsecond: compared as written, not as stored.
    ("2026-11-27T10:00:00.0000005Z", "2026-11-27T10:00:00Z"),
])
def test_an_until_before_since_is_400_naming_until(query, clean_db, path, since, until):
    response = get(query, path, params={"since": since, "until": until})
    assert response.status_code == 400, (response.status_code, response.text[:200])
    assert response.json()["parameter"] == "until" and "since" in response.json()["message"]


@pytest.mark.parametrize("path", ["/incidents", "/dead-letters", "/outbox/parked"])
@pytest.mark.parametrize("until", [
    "2026-11-27T10:00:00Z",
    "2026-11-27T12:00:00+02:00",  # the same instant
])
def test_an_until_equal_to_since_is_an_empty_page(query, clean_db, path, until):
    # A poller asking for whole seconds asks twice within one second.
    incident_id = seed(clean_db)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET created_at = '2026-11-27 10:00:00' WHERE id = :id"), {"id": incident_id})
    response = get(query, path, params={"since": "2026-11-27T10:00:00Z", "until": until})
    assert response.status_code == 200 and response.json() == [], (response.status_code, response.text[:200])


def test_an_until_half_a_microsecond_after_since_holds_the_instant_at_since(query, clean_db):
    incident_id = seed(clean_db)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET created_at = '2026-11-27 10:00:00' WHERE id = :id"), {"id": incident_id})
    response = get(query, "/incidents", params={"since": "2026-11-27T10:00:00Z", "until": "2026-11-27T10:00:00.0000005Z"})
    assert response.status_code == 200, (response.status_code, response.text[:200])
    assert [i["id"] for i in response.json()] == [incident_id]


def test_the_board_shows_a_swapped_range_as_its_error(query, clean_db):
    board = requests.Session()
    board.post(query.url + "/ui/login", data={"token": TEST_TOKEN, "next": "/ui"}, timeout=10)
    page = board.get(query.url + "/ui", params={"since": "2030-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"}, timeout=10)
    assert page.status_code == 200 and "until: must not be before since" in page.text


# ------------------------------------------------------------------ RFC 3339 as the standard writes it

# The incident is created at 2026-11-27 23:59:59.5 UTC.
RFC3339_FORMS = [
    # Lower-case t and z (RFC 3339 5.6, note).
    ({"since": "2026-11-27t23:59:59z"}, True),
    ({"since": "2026-11-27t23:59:59.6z"}, False),
    # A space for the T (same note).
    ({"since": "2026-11-27 23:59:59Z"}, True),
    # The + of an offset sent unencoded arrives as a space, with either separator.
    ({"since": "2026-11-28 01:59:59 02:00"}, True),
    ({"until": "2026-11-28T01:59:59 02:00"}, False),
    # A leap second (time-second 60) is the instant after :59.
    ({"since": "2026-11-27T23:59:60Z"}, False),
    ({"until": "2026-11-27T23:59:60Z"}, True),
    ({"until": "2026-11-28T00:59:60+01:00"}, True),
]


@pytest.mark.parametrize("params, found", RFC3339_FORMS, ids=[str(p) for p, _ in RFC3339_FORMS])
def test_every_rfc3339_form_is_read_as_the_instant_it_names(query, clean_db, params, found):
    incident_id = seed(clean_db)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET created_at = '2026-11-27 23:59:59.5' WHERE id = :id"), {"id": incident_id})
    response = get(query, "/incidents", params=params)
    assert response.status_code == 200, (response.status_code, response.text[:200])
    assert [i["id"] for i in response.json()] == ([incident_id] if found else [])


@pytest.mark.parametrize("params, found", [
    ({"since": "2026-11-27T23:59:60.5Z"}, True),
    ({"until": "2026-11-27T23:59:60.5Z"}, False),
    ({"since": "2026-11-28T00:59:60.999999+01:00"}, True),
])
def test_a_leap_second_with_a_fraction_is_the_instant_after_its_minute(query, clean_db, params, found):
    # PostgreSQL reads 23:59:60.5 as 00:00:00: the fraction of a second that
    # does not exist is dropped, not carried into the next minute.
    incident_id = seed(clean_db)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET created_at = '2026-11-28 00:00:00.2' WHERE id = :id"), {"id": incident_id})
    response = get(query, "/incidents", params=params)
    assert response.status_code == 200, (response.status_code, response.text[:200])
    assert [i["id"] for i in response.json()] == ([incident_id] if found else [])


@pytest.mark.parametrize("value", ["2026-11-27T24:00:00Z", "2026-11-27T23:59:61Z", "9999-12-31T23:59:60Z", "2026-11-27T10:00:00 Z"])
def test_what_rfc3339_does_not_allow_is_still_400(query, clean_db, value):
    response = get(query, "/incidents", params={"since": value})
    assert response.status_code == 400 and response.json()["parameter"] == "since", response.text[:200]


# ------------------------------------------------------------------ query parameters an endpoint does not take

@pytest.mark.parametrize("method, path", [
    ("GET", "/incidents/{id}?include=everything"),
    ("PATCH", "/incidents/{id}?dry_run=true"),
    ("GET", "/incidents/{id}/proposals?status=pending"),
    ("GET", f"/incidents/{{id}}/proposals/{Z}?verbose=1"),
    ("POST", f"/incidents/{{id}}/proposals/{Z}/approve?force=true"),
    ("POST", f"/incidents/{{id}}/proposals/{Z}/reject?force=true"),
])
def test_a_parameter_the_endpoint_does_not_take_is_400_naming_it(query, clean_db, method, path):
    incident_id = seed(clean_db)
    response = requests.request(method, query.url + path.format(id=incident_id), headers=AUTH, timeout=30,
                                json={"status": "resolved"} if method == "PATCH" else None)
    assert response.status_code == 400, (response.status_code, response.text[:200])
    name = path.split("?")[1].split("=")[0]
    assert response.json()["parameter"] == name and name in response.json()["message"]
    with clean_db.connect() as conn:
        assert svc.get_incident(conn, incident_id)["status"] == "open"  # the refused PATCH changed nothing


def test_an_unknown_parameter_name_is_echoed_bounded(query, clean_db):
    response = get(query, "/incidents?" + "x" * 15_000 + "=1")
    assert response.status_code == 400 and len(response.content) < 1000, len(response.content)


def test_an_unknown_patch_field_is_echoed_bounded(query, clean_db):
    incident_id = seed(clean_db)
    response = requests.patch(query.url + f"/incidents/{incident_id}", headers=AUTH, timeout=30,
                              json={"x" * 30_000: 1, "status": "resolved"})
    assert response.status_code == 400 and len(response.content) < 1000, len(response.content)
    assert response.json()["field"] == "x" * 60


# ------------------------------------------------------------------ connections the database drops

def _local_ports(pid: int) -> list[int]:
    """The local TCP ports of ``pid``'s sockets (Linux /proc): how the
    database tells the function's connections from the test's own."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _terminate(engine, query, condition: str) -> int:
    """Terminate the function's backends that meet ``condition``; how many."""
    with engine.connect() as conn:
        return len(conn.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            f"AND client_port = ANY(:ports) AND {condition}"), {"ports": _local_ports(query.process.pid)}).all())


def _unavailable_or_served(answer: requests.Response) -> bool:
    if answer.status_code == 503:
        return int(answer.headers["Retry-After"]) > 0 and answer.json()["error"] == "unavailable"
    return answer.status_code == 200


@needs_own_backend
def test_a_pooled_connection_the_server_terminated_is_at_most_one_503_then_served_without_a_restart(query_on_one_connection, clean_db):
    query = query_on_one_connection
    seed(clean_db)
    assert get(query, "/incidents").status_code == 200
    assert _terminate(clean_db, query, "state = 'idle'") >= 1
    # 503 with Retry-After, or 200 when the pool finds the dead connection
    # before using it; either way served again by the next request.
    answers = [get(query, "/incidents") for _ in range(3)]
    assert _unavailable_or_served(answers[0]), (answers[0].status_code, answers[0].text[:200])
    assert [a.status_code for a in answers[1:]] == [200, 200], [a.text[:200] for a in answers]


@needs_own_backend
def test_a_connection_terminated_mid_request_is_503_with_retry_after_then_served(query_on_one_connection, clean_db):
    query = query_on_one_connection
    seed(clean_db)
    answer = {}
    with clean_db.connect() as locker:
        locker.execute(sa.text("LOCK TABLE incidents IN ACCESS EXCLUSIVE MODE"))
        request = threading.Thread(target=lambda: answer.update(r=get(query, "/incidents")))
        request.start()
        wait_until(lambda: _terminate(clean_db, query, "wait_event_type = 'Lock'"), 10,
                   message="the list request to wait on the lock, and its backend to be terminated")
        request.join(30)
        locker.rollback()
    # Terminated while the statement ran: no pre-ping can hide that one.
    assert answer["r"].status_code == 503, answer["r"].text[:200]
    assert _unavailable_or_served(answer["r"])
    assert get(query, "/incidents").status_code == 200


def test_a_backlog_query_the_board_refused_is_not_carried_by_the_next_page_link(query, clean_db):
    # The page lists the default page and says why; its "Older" link carried
    # the refused query with the cursor, refused again: the first page again.
    from shared import dead_letters

    with clean_db.begin() as conn:
        for n in range(51):
            dead_letters.record(conn, dead_letters.Letter(f"ev-{n:02d}", "/test", "io.incidentresponse.incident.opened",
                                                          "http://escalation", "502", "pagerduty: 500", {}, b"{}"))
    board = board_session(query)
    page = board.get(query.url + "/ui/backlog?limit=many", timeout=30)
    assert page.status_code == 200 and "limit" in page.text, page.text[:200]
    following = _pager(page.text)
    assert "limit" not in following, following
    second = board.get(query.url + following, timeout=30).text
    shown = set(re.findall(r"ev-\d\d", page.text)) | set(re.findall(r"ev-\d\d", second))
    assert len(shown) == 51 and not set(re.findall(r"ev-\d\d", page.text)) & set(re.findall(r"ev-\d\d", second))
