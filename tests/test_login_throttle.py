"""Failed board sign-ins are limited (shared/login_throttle.py): per address,
for all new browsers together, and per browser that signed in before; a
client held back gets 429 with Retry-After and its token is not looked at.
The query function is served as in production, its counts in PostgreSQL."""

from __future__ import annotations

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess
from tests.conftest import PERSONAL_TOKENS, TEST_TOKEN, api_users

PER_CLIENT = 3
OVERALL = 7
WINDOW = 600


@pytest.fixture(scope="module")
def query(base_env):
    # One trusted proxy hop: the test plays the ingress and names the client in X-Forwarded-For.
    proc = FunctionProcess("query", {**base_env, "LOGIN_MAX_FAILURES": str(PER_CLIENT), "LOGIN_MAX_FAILURES_TOTAL": str(OVERALL),
                                     "LOGIN_FAILURE_WINDOW_SECONDS": str(WINDOW), "TRUSTED_PROXY_HOPS": "1",
                                     "INCIDENT_API_USERS": api_users("alice")}).start()
    yield proc
    proc.stop()


def sign_in(query, token, client="192.0.2.10", session=None):
    return (session or requests).post(query.url + "/ui/login", data={"token": token, "next": "/ui"},
                                      headers={"X-Forwarded-For": client}, allow_redirects=False, timeout=10)


def test_wrong_tokens_from_one_address_are_held_back_with_429_and_retry_after(query, clean_db):
    for _ in range(PER_CLIENT):
        assert sign_in(query, "wrong-token").status_code == 401
    held = sign_in(query, "wrong-token")
    assert held.status_code == 429, held.status_code
    assert 0 < int(held.headers["Retry-After"]) <= WINDOW
    assert "Too many failed sign-ins" in held.text and 'id="login-held"' in held.text and 'id="token"' in held.text
    # While held, even the right token is not looked at: a right guess learns nothing.
    right = sign_in(query, TEST_TOKEN)
    assert right.status_code == 429 and "ir_session" not in right.cookies
    # Another address is not held by this one's failures.
    assert sign_in(query, TEST_TOKEN, client="192.0.2.11").status_code == 303
    # Nothing printed the tokens tried.
    assert "wrong-token" not in query.logs() and TEST_TOKEN not in query.logs()


def test_failures_below_the_limit_do_not_delay_a_right_sign_in(query, clean_db):
    for _ in range(PER_CLIENT - 1):
        assert sign_in(query, "wrong-token").status_code == 401
    assert sign_in(query, PERSONAL_TOKENS["alice"]).status_code == 303


def test_a_held_address_may_try_again_once_its_window_has_passed(query, clean_db):
    for _ in range(PER_CLIENT + 1):
        sign_in(query, "wrong-token")
    assert sign_in(query, TEST_TOKEN).status_code == 429
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE login_failures SET window_start = window_start - make_interval(secs => :w)"), {"w": WINDOW})
    assert sign_in(query, TEST_TOKEN).status_code == 303
    # The next failure clears the windows that have passed.
    assert sign_in(query, "wrong-token", client="192.0.2.99").status_code == 401
    with clean_db.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT client FROM login_failures")).scalars()) == ["address:192.0.2.99", "all"]


def test_guesses_spread_over_many_addresses_meet_the_overall_limit_and_the_table_stays_bounded(query, clean_db):
    codes = [sign_in(query, f"guess-{n}", client=f"198.51.100.{n}").status_code for n in range(OVERALL + 20)]
    assert codes == [401] * OVERALL + [429] * 20
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM login_failures")).scalar() == OVERALL + 1  # the addresses and "all"
    # An IPv6 host is one address for all of its /64.
    assert sign_in(query, TEST_TOKEN, client="2001:db8:1:2::5").status_code == 429
    # /metrics shows the attack: the failures counted, and the overall budget spent.
    metrics = requests.get(query.url + "/metrics", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10).text
    assert f"board_sign_in_failures {float(OVERALL)}" in metrics and "board_sign_in_limits_reached 1.0" in metrics


def test_a_browser_that_signed_in_before_keeps_its_own_budget_during_an_attack(query, clean_db):
    alice = requests.Session()
    assert sign_in(query, PERSONAL_TOKENS["alice"], session=alice).status_code == 303
    device = next(c for c in alice.cookies if c.name == "ir_device")
    assert device.path == "/ui/login" and device.has_nonstandard_attr("HttpOnly")
    # An attacker exhausts the address's budget and the overall one (the same address as alice's, too).
    for n in range(OVERALL + 3):
        sign_in(query, f"guess-{n}", client=f"203.0.113.{n % 3}")
    assert sign_in(query, TEST_TOKEN, client="203.0.113.200").status_code == 429
    assert sign_in(query, TEST_TOKEN, client="203.0.113.0").status_code == 429
    # Alice's browser still signs in, from the attacker's own address.
    assert sign_in(query, PERSONAL_TOKENS["alice"], client="203.0.113.0", session=alice).status_code == 303
    # Its own mistakes count against it alone.
    for _ in range(PER_CLIENT):
        assert sign_in(query, "typo", session=alice).status_code == 401
    assert sign_in(query, PERSONAL_TOKENS["alice"], session=alice).status_code == 429
    # A forged device cookie is no device: it counts as a new browser (held by the overall limit).
    forged = requests.Session()
    forged.cookies.set("ir_device", "forged.value.here", path="/ui/login")
    assert sign_in(query, TEST_TOKEN, client="192.0.2.200", session=forged).status_code == 429


def test_only_the_proxies_entry_names_the_client(query, clean_db):
    """With one trusted hop, what the client itself wrote further left in
    X-Forwarded-For does not make it a new address."""
    for n in range(PER_CLIENT):
        sign_in(query, "wrong-token", client=f"10.9.9.{n}, 192.0.2.50")
    assert sign_in(query, TEST_TOKEN, client="10.9.9.77, 192.0.2.50").status_code == 429
