"""Personal API tokens (INCIDENT_API_USERS, shared/users.py): a person's own
token proves who acts; the shared INCIDENT_API_TOKEN keeps working, its actor
the caller's word. The query function served as in production."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import subprocess
import sys

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import ROOT, FunctionProcess, wait_until
from shared import incidents as svc
from shared.config import ConfigError, load_settings
from shared.users import UsersError, UsersSource, hash_token, new_token
from shared.users import parse as parse_users
from tests.conftest import PERSONAL_TOKENS, TEST_TOKEN, api_users
from tests.factories import alert, raw_alert, webhook

BASE = {"DATABASE_URL": "postgresql+pg8000://postgres@127.0.0.1:5432/app"}


# --- the setting -----------------------------------------------------------------

def test_the_list_holds_names_and_hashes_and_identifies_a_token():
    users = parse_users(f"# on-call\nalice:sha256:{hash_token('a-token')}\n\nbob:sha256:{hash_token('b-token').upper()}  # lead\n")
    assert users.names == ("alice", "bob")
    assert users.identify("a-token") == "alice" and users.identify("b-token") == "bob"
    assert users.identify("c-token") is None and users.identify("") is None
    assert users.stamp("alice") != users.stamp("bob") and users.stamp("carol") is None


def test_new_tokens_are_long_and_random():
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20 and all(len(t) >= 40 for t in tokens)


def test_the_list_from_a_file_and_from_the_variable(tmp_path):
    listing = tmp_path / "users"
    listing.write_text(api_users("alice", "bob").replace(",", "\n") + "\n")
    from_file = load_settings({**BASE, "INCIDENT_API_USERS_FILE": str(listing)})
    assert from_file.api_users.load().names == ("alice", "bob")
    assert load_settings({**BASE, "INCIDENT_API_USERS": api_users("carol")}).api_users.load().names == ("carol",)
    assert not load_settings(BASE).api_users.load()


@pytest.mark.parametrize("value, phrase", [
    ("alice:PLAINTEXT-TOKEN", "entry 1: expected name:sha256:<64 hex digits>"),
    ("alice:sha256:abc", "expected name:sha256"),
    (f"alice:md5:{'0' * 64}", "expected name:sha256"),
    (f"-x:sha256:{'0' * 64}", "a name is"),
    (f"alice:sha256:{'0' * 64},alice:sha256:{'1' * 64}", "alice is listed twice"),
    (f"alice:sha256:{'0' * 64},bob:sha256:{'0' * 64}", "bob has the same token as alice"),
])
def test_a_bad_list_is_refused_naming_the_variable_and_never_the_text(value, phrase):
    users = load_settings({**BASE, "INCIDENT_API_USERS": value}).api_users  # read by the query function alone
    with pytest.raises(UsersError) as refused:
        users.load()
    assert str(refused.value).startswith("INCIDENT_API_USERS:") and phrase in str(refused.value)
    assert "PLAINTEXT-TOKEN" not in str(refused.value)


def test_a_bad_list_stops_the_query_function_and_no_other(base_env):
    env = {**os.environ, **base_env, "PYTHONPATH": str(ROOT), "INCIDENT_API_USERS": "alice:PLAINTEXT-TOKEN"}
    started = {}
    for name in ("query", "intake"):
        started[name] = subprocess.run([sys.executable, "-c", "import functions_framework\n"
                                        f"functions_framework.create_app('{name}', 'functions/{name}/main.py')"],
                                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert started["query"].returncode == 2 and "PLAINTEXT-TOKEN" not in started["query"].stderr
    assert started["query"].stderr.strip().endswith("query: configuration error: INCIDENT_API_USERS: entry 1: expected "
                                                    "name:sha256:<64 hex digits> (python -m shared.users NAME makes one)")
    assert started["intake"].returncode == 0, started["intake"].stderr


def test_a_personal_token_cannot_be_the_shared_one():
    users = load_settings({**BASE, "INCIDENT_API_TOKEN": "same-token",
                           "INCIDENT_API_USERS": f"alice:sha256:{hash_token('same-token')}"}).api_users
    with pytest.raises(UsersError, match="entry 1: a personal token equals INCIDENT_API_TOKEN"):
        users.load()


def test_the_file_is_read_again_when_it_changes_and_a_bad_new_list_keeps_the_old(tmp_path, caplog):
    listing = tmp_path / "users"
    listing.write_text(api_users("alice", "bob").replace(",", "\n"))
    now = [0.0]
    users = UsersSource(path=str(listing), check_seconds=5, clock=lambda: now[0])
    assert users.current().identify(PERSONAL_TOKENS["alice"]) == "alice"
    listing.write_text(api_users("bob") + "\n")
    now[0] = 4.9
    assert users.current().identify(PERSONAL_TOKENS["alice"]) == "alice"  # not looked at yet
    now[0] = 5.0
    assert users.current().identify(PERSONAL_TOKENS["alice"]) is None and users.current().names == ("bob",)
    # A Kubernetes Secret update: a new file swapped in; this one holds a token pasted by mistake.
    replacement = tmp_path / "users.new"
    replacement.write_text(api_users("bob") + "\ncarol:" + PERSONAL_TOKENS["carol"] + "\n")
    os.replace(replacement, listing)
    now[0] = 10.0
    with caplog.at_level("ERROR", logger="users"):
        assert users.current().names == ("bob",)
    (record,) = [r for r in caplog.records if r.name == "users"]
    assert "entry 2" in record.error and PERSONAL_TOKENS["carol"] not in record.error + record.getMessage()
    # Fixed: taken at the next look.
    listing.write_text(api_users("bob", "carol"))
    now[0] = 15.0
    assert users.current().names == ("bob", "carol")


def test_a_list_file_that_is_gone_refuses_every_personal_token_until_it_is_back(tmp_path, caplog):
    """Its key deleted from the Secret: the file leaves the volume. Keeping
    the last list would keep every token it held valid for as long as the
    process runs."""
    listing = tmp_path / "users"
    listing.write_text(api_users("alice"))
    now = [0.0]
    users = UsersSource(path=str(listing), check_seconds=5, clock=lambda: now[0])
    assert users.load().names == ("alice",)
    listing.unlink()
    with caplog.at_level("ERROR", logger="users"):
        for now[0] in (5.0, 10.0, 15.0):
            assert not users.current() and users.current().identify(PERSONAL_TOKENS["alice"]) is None
    (gone,) = [r for r in caplog.records if r.name == "users"]  # said once, not at every look
    assert gone.levelname == "ERROR" and gone.path == str(listing) and "no personal token is accepted" in gone.getMessage()
    listing.write_text(api_users("bob"))
    now[0] = 20.0
    assert users.current().names == ("bob",)
    # At the start, a file that is not there is a wrong path: the query does not start.
    with pytest.raises(UsersError, match="cannot read"):
        UsersSource(path=str(tmp_path / "nowhere")).load()


def test_one_request_reads_one_list_even_when_the_file_is_reloaded_meanwhile(tmp_path):
    """A sign-in identifies the token and stamps its session from the same
    list: read twice, a rotation landing in between stamped a session made
    with the old token with the new token's stamp, and it outlived the
    rotation by 12 hours."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from shared.errors import Unauthorized
    from shared.http import check_bearer, request_users

    old, new = new_token(), new_token()
    listing = tmp_path / "users"
    listing.write_text(f"alice:sha256:{hash_token(old)}\n")
    now = [0.0]
    users = UsersSource(path=str(listing), check_seconds=5, clock=lambda: now[0])
    users.load()
    signing_in = Request(EnvironBuilder(headers=bearer(old)).get_environ())
    assert check_bearer(signing_in, None, users) == "alice"
    stamp = request_users(signing_in, users).stamp("alice")
    listing.write_text(f"alice:sha256:{hash_token(new)}\n")  # the leaked token rotated while the request runs
    now[0] = 5.0
    assert request_users(signing_in, users).stamp("alice") == stamp
    later = Request(EnvironBuilder(headers=bearer(old)).get_environ())
    with pytest.raises(Unauthorized):
        check_bearer(later, None, users)
    assert request_users(later, users).stamp("alice") != stamp


# --- over HTTP ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def query(base_env):
    proc = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS": api_users("alice", "bob")}).start()
    yield proc
    proc.stop()


def incident(engine):
    with engine.begin() as conn:
        return svc.record_alerts(conn, [alert("KafkaConsumerLagHigh", priority="P1")], "/t", "t").outcomes[0].incident_id


def bearer(token, **headers):
    return {"Authorization": f"Bearer {token}", **headers}


def actors(engine, incident_id):
    with engine.connect() as conn:
        return [t["actor"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == "status_changed"]


def test_a_personal_token_acts_as_its_owner(query, clean_db):
    incident_id = incident(clean_db)
    listed = requests.get(query.url + "/incidents", headers=bearer(PERSONAL_TOKENS["alice"]), timeout=10)
    assert listed.status_code == 200 and [i["id"] for i in listed.json()] == [incident_id]
    moved = requests.patch(f"{query.url}/incidents/{incident_id}", json={"status": "investigating"},
                           headers=bearer(PERSONAL_TOKENS["alice"]), timeout=10)
    assert moved.status_code == 200, moved.text
    assert actors(clean_db, incident_id)[-1] == "user:alice"
    metrics = requests.get(query.url + "/metrics", headers=bearer(PERSONAL_TOKENS["bob"]), timeout=10)
    assert metrics.status_code == 200
    assert PERSONAL_TOKENS["alice"] not in query.logs() and PERSONAL_TOKENS["bob"] not in query.logs()


def test_the_shared_token_still_works_and_its_actor_is_the_callers_word(query, clean_db):
    incident_id = incident(clean_db)
    moved = requests.patch(f"{query.url}/incidents/{incident_id}", json={"status": "investigating"},
                           headers=bearer(TEST_TOKEN, **{"X-Actor": "alice"}), timeout=10)
    assert moved.status_code == 200
    assert actors(clean_db, incident_id)[-1] == "api:alice"


def test_x_actor_naming_someone_else_than_the_tokens_owner_is_refused(query, clean_db):
    incident_id = incident(clean_db)
    refused = requests.patch(f"{query.url}/incidents/{incident_id}", json={"status": "investigating"},
                             headers=bearer(PERSONAL_TOKENS["bob"], **{"X-Actor": "alice"}), timeout=10)
    assert refused.status_code == 400 and refused.json()["header"] == "X-Actor"
    assert "bob's personal token" in refused.json()["message"]
    assert actors(clean_db, incident_id) == []
    same = requests.patch(f"{query.url}/incidents/{incident_id}", json={"status": "investigating"},
                          headers=bearer(PERSONAL_TOKENS["bob"], **{"X-Actor": "bob"}), timeout=10)
    assert same.status_code == 200 and actors(clean_db, incident_id) == ["user:bob"]


@pytest.mark.parametrize("token", [PERSONAL_TOKENS["carol"], PERSONAL_TOKENS["alice"] + "x", hash_token(PERSONAL_TOKENS["alice"])])
def test_an_unlisted_token_or_the_hash_itself_is_401(query, token):
    refused = requests.get(query.url + "/incidents", headers=bearer(token), timeout=10)
    assert refused.status_code == 401


def board_session(url, token):
    browser = requests.Session()
    signed = browser.post(url + "/ui/login", data={"token": token, "next": "/ui"}, allow_redirects=False, timeout=10)
    assert signed.status_code == 303, signed.status_code
    return browser


def test_a_board_session_signed_in_with_a_personal_token_acts_as_that_person(query, clean_db):
    incident_id = incident(clean_db)
    alice = board_session(query.url, PERSONAL_TOKENS["alice"])
    page = alice.get(f"{query.url}/ui/incidents/{incident_id}", timeout=10).text
    assert 'id="signed-in-as">Signed in as <strong>alice</strong>' in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    moved = alice.post(f"{query.url}/ui/incidents/{incident_id}/status", data={"status": "investigating", "csrf": csrf, "actor": "bob"},
                       allow_redirects=False, timeout=10)
    assert moved.status_code == 303
    assert actors(clean_db, incident_id) == ["user:alice"]
    # The shared token's session keeps the typed name, as before.
    shared = board_session(query.url, TEST_TOKEN)
    page = shared.get(f"{query.url}/ui/maintenance", timeout=10).text
    assert 'id="window-actor"' in page and "signed-in-as" not in page


def test_a_session_ends_when_its_persons_token_is_changed_or_removed(base_env, query, clean_db):
    alice = board_session(query.url, PERSONAL_TOKENS["alice"])
    assert alice.get(query.url + "/ui", allow_redirects=False, timeout=10).status_code == 200
    # Another replica whose list gives alice a new token, and one whose list no longer has her.
    rotated = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS": f"alice:sha256:{hash_token('alices-new-token')},"
                                                                        + api_users("bob")}).start()
    removed = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS": api_users("bob")}).start()
    try:
        for replica in (rotated, removed):
            moved = alice.get(replica.url + "/ui", allow_redirects=False, timeout=10)
            assert moved.status_code == 303 and moved.headers["Location"].startswith("/ui/login")
        bob = board_session(query.url, PERSONAL_TOKENS["bob"])
        assert bob.get(rotated.url + "/ui", allow_redirects=False, timeout=10).status_code == 200
        assert bob.get(removed.url + "/ui", allow_redirects=False, timeout=10).status_code == 200
    finally:
        rotated.stop(), removed.stop()


def test_removing_a_person_from_the_mounted_file_takes_effect_without_a_restart(base_env, tmp_path, clean_db):
    """Kubernetes rewrites a mounted Secret in place and restarts nothing."""
    listing = tmp_path / "users"
    listing.write_text(api_users("alice", "bob").replace(",", "\n"))
    proc = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS_FILE": str(listing)}).start()
    try:
        alice = board_session(proc.url, PERSONAL_TOKENS["alice"])
        assert requests.get(proc.url + "/incidents", headers=bearer(PERSONAL_TOKENS["alice"]), timeout=10).status_code == 200
        listing.write_text(api_users("bob"))
        wait_until(lambda: requests.get(proc.url + "/incidents", headers=bearer(PERSONAL_TOKENS["alice"]),
                                        timeout=10).status_code == 401, timeout=20, message="alice's token refused")
        assert alice.get(proc.url + "/ui", allow_redirects=False, timeout=10).status_code == 303
        assert requests.get(proc.url + "/incidents", headers=bearer(PERSONAL_TOKENS["bob"]), timeout=10).status_code == 200
        assert "Personal token list reloaded" in proc.logs()
    finally:
        proc.stop()


def test_a_personal_session_is_a_row_that_sign_out_deletes(query, clean_db):
    alice = board_session(query.url, PERSONAL_TOKENS["alice"])
    cookie = alice.cookies.get("ir_session", path="/ui")
    with clean_db.connect() as conn:
        rows = conn.execute(sa.text("SELECT id_hash, user_name, expires_at - created_at AS lasts FROM board_sessions")).all()
    # The cookie holds the id, the table only its hash.
    assert [(r.id_hash, r.user_name) for r in rows] == [(hashlib.sha256(cookie[2:].encode()).hexdigest(), "alice")]
    assert rows[0].lasts.total_seconds() == 12 * 3600 and cookie[2:] not in query.logs()
    page = alice.get(query.url + "/ui", timeout=10).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert alice.post(query.url + "/ui/logout", data={"csrf": csrf}, allow_redirects=False, timeout=10).status_code == 303
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM board_sessions")).scalar() == 0
    copy = requests.Session()
    copy.cookies.set("ir_session", cookie, path="/ui")
    assert copy.get(query.url + "/ui", allow_redirects=False, timeout=10).status_code == 303
    # An expired row is no session, and the next sign-in deletes it.
    other = board_session(query.url, PERSONAL_TOKENS["bob"])
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE board_sessions SET expires_at = timezone('utc', now()) - interval '1 second'"))
    assert other.get(query.url + "/ui", allow_redirects=False, timeout=10).status_code == 303
    board_session(query.url, PERSONAL_TOKENS["alice"])
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT user_name FROM board_sessions")).scalars().all() == ["alice"]


def session_rows(engine, user="alice") -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM board_sessions WHERE user_name = :u"), {"u": user}).scalar()


def live(url, browser) -> bool:
    return browser.get(url + "/ui", allow_redirects=False, timeout=10).status_code == 200


def test_a_person_keeps_at_most_ten_sessions_the_newest(query, clean_db):
    """Anyone with the token signing in in a loop (a personal token is never
    held back) made one row per attempt; now a sign-in ends the person's
    oldest sessions beyond ten."""
    from shared.board_sessions import KEEP_PER_USER

    browsers = [board_session(query.url, PERSONAL_TOKENS["alice"]) for _ in range(KEEP_PER_USER + 5)]
    board_session(query.url, PERSONAL_TOKENS["bob"])
    assert session_rows(clean_db) == KEEP_PER_USER == 10 and session_rows(clean_db, "bob") == 1
    assert [live(query.url, b) for b in browsers] == [False] * 5 + [True] * KEEP_PER_USER


def test_signing_in_again_ends_the_browsers_earlier_session(query, clean_db):
    browser = board_session(query.url, PERSONAL_TOKENS["alice"])
    earlier = browser.cookies.get("ir_session", path="/ui")
    assert browser.post(query.url + "/ui/login", data={"token": PERSONAL_TOKENS["bob"]}, allow_redirects=False,
                        timeout=10).status_code == 303
    copy = requests.Session()
    copy.cookies.set("ir_session", earlier, path="/ui")
    assert not live(query.url, copy) and session_rows(clean_db) == 0 and live(query.url, browser)
    # Signing in with the shared token ends a personal session too.
    assert browser.post(query.url + "/ui/login", data={"token": TEST_TOKEN}, allow_redirects=False, timeout=10).status_code == 303
    assert session_rows(clean_db, "bob") == 0 and live(query.url, browser)


def test_a_sign_in_is_logged_with_who_and_from_where_never_the_token(query, clean_db):
    board_session(query.url, PERSONAL_TOKENS["alice"])
    board_session(query.url, TEST_TOKEN)
    lines = [line for line in query.logs().splitlines() if '"Signed in"' in line]
    assert any('"user": "alice"' in line and '"token": "personal"' in line and '"client": "127.0.0.1"' in line for line in lines)
    assert any('"user": null' in line and '"token": "shared"' in line for line in lines)
    assert PERSONAL_TOKENS["alice"] not in query.logs() and TEST_TOKEN not in query.logs()


def test_a_session_ended_by_a_removal_stays_ended_when_the_person_is_put_back(base_env, tmp_path, clean_db):
    listing = tmp_path / "users"
    listing.write_text(api_users("alice", "bob").replace(",", "\n"))
    proc = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS_FILE": str(listing)}).start()
    try:
        alice = board_session(proc.url, PERSONAL_TOKENS["alice"])
        listing.write_text(api_users("bob"))
        wait_until(lambda: not live(proc.url, alice), timeout=20, message="alice's session ended")
        assert session_rows(clean_db) == 0
        listing.write_text(api_users("alice", "bob").replace(",", "\n"))
        wait_until(lambda: requests.get(proc.url + "/incidents", headers=bearer(PERSONAL_TOKENS["alice"]), timeout=10).ok,
                   timeout=20, message="alice listed again")
        assert not live(proc.url, alice)
    finally:
        proc.stop()


def test_a_session_unused_for_the_idle_timeout_ends(base_env, clean_db):
    proc = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS": api_users("alice", "bob"),
                                     "BOARD_IDLE_TIMEOUT_MINUTES": "5"}).start()
    try:
        alice, bob = board_session(proc.url, PERSONAL_TOKENS["alice"]), board_session(proc.url, PERSONAL_TOKENS["bob"])
        with clean_db.begin() as conn:
            conn.execute(sa.text("UPDATE board_sessions SET last_seen = last_seen - interval '6 minutes' WHERE user_name = 'alice'"))
            conn.execute(sa.text("UPDATE board_sessions SET last_seen = last_seen - interval '4 minutes' WHERE user_name = 'bob'"))
        assert not live(proc.url, alice)
        # Used within the timeout: it goes on, and the use is written down.
        assert live(proc.url, bob)
        with clean_db.connect() as conn:
            idle = conn.execute(sa.text("SELECT timezone('utc', now()) - last_seen FROM board_sessions WHERE user_name = 'bob'")).scalar()
        assert idle.total_seconds() < 60
    finally:
        proc.stop()


def test_the_idle_timeout_setting():
    assert load_settings(BASE).board_idle_timeout_minutes == 0
    assert load_settings({**BASE, "BOARD_IDLE_TIMEOUT_MINUTES": "30"}).board_idle_timeout_minutes == 30
    for wrong in ("2", "721", "x"):
        with pytest.raises(ConfigError, match="BOARD_IDLE_TIMEOUT_MINUTES"):
            load_settings({**BASE, "BOARD_IDLE_TIMEOUT_MINUTES": wrong})
        with pytest.raises(ConfigError, match="BOARD_IDLE_TIMEOUT_MINUTES"):
            load_settings({**BASE, "FUNCTION_TARGET": "query", "BOARD_IDLE_TIMEOUT_MINUTES": wrong})


def test_a_wrong_idle_timeout_in_the_shared_config_map_does_not_stop_paging(base_env, clean_db, caplog):
    """The intake reads it only for its retention sweep: a wrong value there
    is warned and left out (expired sessions are still deleted), the
    intake starts and stores the alert."""
    with caplog.at_level("WARNING", logger="config"):
        config = load_settings({**BASE, "FUNCTION_TARGET": "intake", "BOARD_IDLE_TIMEOUT_MINUTES": "2"})
    assert config.board_idle_timeout_minutes == 0 and "BOARD_IDLE_TIMEOUT_MINUTES ignored here" in caplog.text
    proc = FunctionProcess("intake", {**base_env, "BOARD_IDLE_TIMEOUT_MINUTES": "2"}).start()
    try:
        stored = requests.post(proc.url + "/webhook/alert", json=webhook([raw_alert("IdleTimeoutTypo")]),
                               headers=bearer(TEST_TOKEN), timeout=30)
        assert stored.status_code == 200, stored.text
    finally:
        proc.stop()


def test_a_short_shared_token_is_named_at_start(base_env):
    proc = FunctionProcess("query", {**base_env, "INCIDENT_API_TOKEN": "short-token-" + "x" * 19}).start()
    long = FunctionProcess("query", {**base_env, "INCIDENT_API_TOKEN": "long-token-" + "x" * 21}).start()
    try:
        assert "INCIDENT_API_TOKEN is shorter than 32 characters" in proc.logs()
        assert "INCIDENT_API_TOKEN is shorter" not in long.logs()
        assert "short-token-" not in proc.logs()
    finally:
        proc.stop(), long.stop()


def forged(key_material: str, **claims) -> str:
    """A board cookie signed the way shared-token sessions are, saying what the forger wants."""
    import time

    from itsdangerous import URLSafeTimedSerializer

    key = hmac.new(key_material.encode(), b"board-session", hashlib.sha256).digest()
    return URLSafeTimedSerializer(key, salt="incident-board").dumps(
        {"sid": "s" * 32, "csrf": "c", "since": "x", "exp": int(time.time()) + 3600, **claims})


def test_personal_tokens_alone_sign_in_on_every_replica_and_the_public_list_signs_nobody_in(base_env, clean_db):
    """Without a shared token, sessions are rows every replica reads; the
    list of hashes, which is no secret, gives no key to sign a cookie with."""
    listing = api_users("alice")
    env = {**base_env, "INCIDENT_API_TOKEN": "", "INCIDENT_API_USERS": listing}
    first, second = FunctionProcess("query", dict(env)).start(), FunctionProcess("query", dict(env)).start()
    try:
        alice = board_session(first.url, PERSONAL_TOKENS["alice"])
        assert alice.get(second.url + "/ui", allow_redirects=False, timeout=10).status_code == 200
        assert requests.get(second.url + "/incidents", headers=bearer(PERSONAL_TOKENS["alice"]), timeout=10).status_code == 200
        assert requests.get(second.url + "/incidents", headers=bearer(TEST_TOKEN), timeout=10).status_code == 401
        alice_hash = listing.split(":")[2]
        stamp = hashlib.sha256(b"board-session:" + alice_hash.encode()).hexdigest()[:32]
        for cookie in (forged("users:" + alice_hash, user="alice", stamp=stamp), forged("users:" + alice_hash)):
            attacker = requests.Session()
            attacker.cookies.set("ir_session", cookie, path="/ui")
            refused = attacker.get(second.url + "/ui", allow_redirects=False, timeout=10)
            assert refused.status_code == 303 and refused.headers["Location"].startswith("/ui/login")
    finally:
        first.stop(), second.stop()


def test_an_approver_without_a_personal_token_is_named_at_start(base_env):
    proc = FunctionProcess("query", {**base_env, "REMEDIATION_APPROVERS": "alice,dave", "INCIDENT_API_USERS": api_users("alice")}).start()
    try:
        warning = next(line for line in proc.logs().splitlines() if "REMEDIATION_APPROVERS names people without" in line)
        assert '"approvers_without_token": ["dave"]' in warning
    finally:
        proc.stop()


def test_a_replica_whose_list_is_older_than_a_session_refuses_it_and_leaves_it_to_the_others(base_env, tmp_path, clean_db):
    """During the kubelet's sync one replica has the new list (alice just
    added), another still the old one. The session alice makes on the first
    is refused by the second, which read its list before the session was
    made, and not deleted: back on the first, it still works. A replica that
    read its list after the session was made ends it for good."""
    new, old = tmp_path / "new", tmp_path / "old"
    new.write_text(api_users("alice", "bob").replace(",", "\n"))
    old.write_text(api_users("bob"))
    ahead = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS_FILE": str(new)}).start()
    behind = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS_FILE": str(old)}).start()
    try:
        alice = board_session(ahead.url, PERSONAL_TOKENS["alice"])
        refused = alice.get(behind.url + "/ui", allow_redirects=False, timeout=10)
        assert refused.status_code == 303 and refused.headers["Location"].startswith("/ui/login")
        assert session_rows(clean_db) == 1 and live(ahead.url, alice)
        later = FunctionProcess("query", {**base_env, "INCIDENT_API_USERS": api_users("bob")}).start()
        try:
            assert not live(later.url, alice)
        finally:
            later.stop()
        assert session_rows(clean_db) == 0 and not live(ahead.url, alice)
    finally:
        ahead.stop(), behind.stop()


def test_a_list_read_again_unchanged_keeps_the_time_it_was_first_read(tmp_path):
    listing = tmp_path / "users"
    listing.write_text(api_users("alice"))
    now = [0.0]
    users = UsersSource(path=str(listing), check_seconds=5, clock=lambda: now[0])
    first = users.load()
    listing.write_text(api_users("alice") + "\n")  # another status, the same list
    now[0] += 5
    assert users.current() is first
    listing.write_text(api_users("bob"))
    now[0] += 5
    again = users.current()
    assert again.names == ("bob",) and again.loaded_at > first.loaded_at
