"""Failed board sign-ins are limited (shared/login_throttle.py): per address,
for all new browsers together, and per browser that signed in before; a
client held back gets 429 with Retry-After and its token is not looked at,
except a person's own token, which nobody guesses and which always signs in.
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
    # A person's own token signs in even from the held address: 256 random bits are not guessed.
    assert sign_in(query, PERSONAL_TOKENS["alice"]).status_code == 303
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
    # /metrics shows the attack: the failures counted, and the overall budget spent.
    metrics = requests.get(query.url + "/metrics", headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=10).text
    assert f"board_sign_in_failures {float(OVERALL)}" in metrics and "board_sign_in_limits_reached 1.0" in metrics
    # Everyone's own token still signs in.
    assert sign_in(query, PERSONAL_TOKENS["alice"], client="192.0.2.77").status_code == 303


def test_an_ipv6_host_is_one_address_for_all_of_its_slash_64(query, clean_db):
    assert [sign_in(query, "guess", client=f"2001:db8:1:2::{n}").status_code for n in (1, 2, 3)] == [401] * PER_CLIENT
    assert sign_in(query, TEST_TOKEN, client="2001:db8:1:2:ffff::9").status_code == 429
    assert sign_in(query, TEST_TOKEN, client="2001:db8:1:3::1").status_code == 303


def budgets(clean_db) -> dict[str, int]:
    with clean_db.connect() as conn:
        return dict(conn.execute(sa.text("SELECT client, failures FROM login_failures")).all())


def test_ipv4_clients_named_by_a_dual_stack_proxy_are_each_their_own_address(query, clean_db):
    """A dual-stack proxy writes an IPv4 client as ``::ffff:192.0.2.20``:
    that is the client 192.0.2.20, not an IPv6 /64 every IPv4 client shares
    (waitress read it as ``::ffff``: one guesser held back all of them)."""
    assert [sign_in(query, "guess", client="::ffff:192.0.2.20").status_code for _ in range(PER_CLIENT)] == [401] * PER_CLIENT
    assert sign_in(query, TEST_TOKEN, client="::ffff:192.0.2.21").status_code == 303
    # The same client however it is written, from the header or the socket.
    for written in ("::ffff:192.0.2.20", "192.0.2.20", "[::ffff:192.0.2.20]:443", "::ffff:c000:214"):
        assert sign_in(query, TEST_TOKEN, client=written).status_code == 429, written
    assert budgets(clean_db) == {"address:192.0.2.20": PER_CLIENT, "all": PER_CLIENT}


def test_an_ipv6_address_with_a_zone_or_in_brackets_with_a_port_is_its_slash_64(query, clean_db):
    """Neither fails the request nor escapes the limit: ``[2001:db8:7::1]:443``
    was no address to waitress (the request counted as the proxy's), and a
    zone (``%eth0``) is no part of the host."""
    for client in ("[2001:db8:7::1]:443", "2001:db8:7::2%eth0", "[2001:db8:7::3%eth0.5]"):
        assert sign_in(query, "guess", client=client).status_code == 401, client
    assert sign_in(query, TEST_TOKEN, client="2001:db8:7::4").status_code == 429
    assert budgets(clean_db) == {"address:2001:db8:7::/64": PER_CLIENT, "all": PER_CLIENT}


@pytest.mark.parametrize("written, counted", [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("::FFFF:c000:201", "192.0.2.1"),
    ("[::ffff:192.0.2.1]:8443", "192.0.2.1"),
    ("192.0.2.1:8443", "192.0.2.1"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::9]", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("2001:db8::192.0.2.1", "2001:db8::/64"),
    (None, "unknown"),
    ("u" * 200, "u" * 80),
])
def test_the_address_failures_are_counted_by(written, counted):
    from shared.login_throttle import client_address

    assert client_address(written) == counted


@pytest.mark.parametrize("written, read", [
    ("192.0.2.1:65535", "192.0.2.1"),
    ("192.0.2.1:00443", "192.0.2.1"),
    ("192.0.2.1:065535", None),
    ("192.0.2.1:65536", None),
    ("192.0.2.1:" + "9" * 5000, None),  # past int()'s digit limit: no address, not a ValueError
    ("[2001:db8::1]:" + "9" * 5000, None),
    ("[2001:db8::1]:443", "2001:db8::1"),
])
def test_a_port_is_at_most_five_digits_and_a_longer_one_is_no_address(written, read):
    from shared import addresses

    parsed = addresses.parse(written)
    assert (None if parsed is None else str(parsed)) == read


def test_a_client_held_by_its_own_address_does_not_queue_on_the_budget_every_new_browser_shares(query, clean_db):
    """A guesser held back and trying on at full speed is answered from its
    own address's row: it takes no lock on the overall budget's row, which
    every other new browser's sign-in needs (it waited on it, or for the
    lock timeout and a 503, while another attempt held it)."""
    for _ in range(PER_CLIENT):
        assert sign_in(query, "guess", client="198.51.100.66").status_code == 401
    with clean_db.connect() as other:
        with other.begin():
            other.execute(sa.text("SELECT 1 FROM login_failures WHERE client = 'all' FOR UPDATE"))
            held = sign_in(query, "guess", client="198.51.100.66")
    assert held.status_code == 429 and 0 < int(held.headers["Retry-After"]) <= WINDOW


def test_concurrent_guesses_from_one_address_are_judged_no_more_than_the_limit(query, clean_db):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda n: sign_in(query, f"guess-{n}", client="198.51.100.7").status_code, range(32)))
    assert sorted(codes) == [401] * PER_CLIENT + [429] * (32 - PER_CLIENT)
    with clean_db.connect() as conn:
        assert dict(conn.execute(sa.text("SELECT client, failures FROM login_failures")).all()) == {
            "address:198.51.100.7": PER_CLIENT, "all": PER_CLIENT}


def test_a_browser_that_signed_in_before_keeps_its_own_budget_during_an_attack(query, clean_db):
    operator = requests.Session()
    assert sign_in(query, TEST_TOKEN, client="192.0.2.30", session=operator).status_code == 303
    device = next(c for c in operator.cookies if c.name == "ir_device")
    assert device.path == "/ui/login" and device.has_nonstandard_attr("HttpOnly")
    # An attacker exhausts the overall budget from other addresses: new browsers are held.
    for n in range(OVERALL + 3):
        sign_in(query, f"guess-{n}", client=f"203.0.113.{n}")
    assert sign_in(query, TEST_TOKEN, client="192.0.2.31").status_code == 429
    # The operator's browser still signs in with the shared token.
    assert sign_in(query, TEST_TOKEN, client="192.0.2.30", session=operator).status_code == 303
    # Its own mistakes count against it, wherever it goes.
    for n in range(PER_CLIENT):
        assert sign_in(query, "typo", client=f"192.0.2.{40 + n}", session=operator).status_code == 401
    assert sign_in(query, TEST_TOKEN, client="192.0.2.50", session=operator).status_code == 429
    # A forged device cookie is no device: it counts as a new browser (held by the overall limit).
    forged = requests.Session()
    forged.cookies.set("ir_device", "forged.value.here", path="/ui/login")
    assert sign_in(query, TEST_TOKEN, client="192.0.2.200", session=forged).status_code == 429


def test_device_cookies_minted_by_signing_in_buy_no_guesses_beyond_the_address_budget(query, clean_db):
    """Anyone who can sign in gets a new device cookie at each cookie-less
    sign-in; each has its own budget, but its failures count against its
    address's too."""
    browsers = []
    for _ in range(4):
        browser = requests.Session()
        assert sign_in(query, PERSONAL_TOKENS["alice"], client="198.51.100.5", session=browser).status_code == 303
        browsers.append(browser)
    assert len({b.cookies.get("ir_device", path="/ui/login") for b in browsers}) == 4
    codes = [sign_in(query, f"guess-{n}", client="198.51.100.5", session=b).status_code for b in browsers for n in range(5)]
    assert codes.count(401) == PER_CLIENT, codes
    # A device held by its address is held whatever the token, the shared one too.
    assert sign_in(query, TEST_TOKEN, client="198.51.100.5", session=browsers[0]).status_code == 429


def test_a_device_earned_with_a_personal_token_counts_apart_only_while_that_token_is_listed(query, base_env, clean_db):
    """A device cookie lasts 90 days; the person who earned it may be
    removed long before. Another replica (same database, same shared
    token) whose list no longer has alice stands for the removal."""
    removed = FunctionProcess("query", {**base_env, "LOGIN_MAX_FAILURES": str(PER_CLIENT), "LOGIN_MAX_FAILURES_TOTAL": str(OVERALL),
                                        "LOGIN_FAILURE_WINDOW_SECONDS": str(WINDOW), "TRUSTED_PROXY_HOPS": "1",
                                        "INCIDENT_API_USERS": api_users("bob")}).start()
    try:
        browser = requests.Session()
        assert sign_in(query, PERSONAL_TOKENS["alice"], client="192.0.2.60", session=browser).status_code == 303
        for n in range(OVERALL + 3):
            sign_in(query, f"guess-{n}", client=f"203.0.113.{n}")
        # Without alice, her device is no device: a new browser, held by the overall limit.
        assert sign_in(removed, TEST_TOKEN, client="192.0.2.60", session=browser).status_code == 429
        assert sign_in(query, TEST_TOKEN, client="192.0.2.60", session=browser).status_code == 303
    finally:
        removed.stop()


def test_held_back_sign_ins_are_logged_a_bounded_number_of_times(base_env, clean_db):
    quiet = FunctionProcess("query", {**base_env, "LOGIN_MAX_FAILURES": str(PER_CLIENT), "TRUSTED_PROXY_HOPS": "1"}).start()
    try:
        codes = [sign_in(quiet, "wrong-token").status_code for _ in range(PER_CLIENT + 30)]
        assert codes == [401] * PER_CLIENT + [429] * 30
        held = [line for line in quiet.logs().splitlines() if "Sign-in held back" in line]
        assert len(held) == 10
    finally:
        quiet.stop()


def test_only_the_proxies_entry_names_the_client(query, clean_db):
    """With one trusted hop, what the client itself wrote further left in
    X-Forwarded-For does not make it a new address."""
    for n in range(PER_CLIENT):
        sign_in(query, "wrong-token", client=f"10.9.9.{n}, 192.0.2.50")
    assert sign_in(query, TEST_TOKEN, client="10.9.9.77, 192.0.2.50").status_code == 429


def test_quoting_the_client_breaks_in_its_own_entries_moves_it_to_no_other_budget(query, clean_db):
    """waitress unquotes every entry, the client's own too: an unbalanced
    quote the client wrote left of the proxy's entry failed the whole
    header, and the attempt counted as the queue-proxy's (a fresh budget for
    a held guesser, and a spent one for every request without the header)."""
    for _ in range(PER_CLIENT):
        assert sign_in(query, "guess", client="192.0.2.50").status_code == 401
    for client in ('"x, 192.0.2.50', 'x", 192.0.2.50', '"a\\", 192.0.2.50'):
        assert sign_in(query, "guess", client=client).status_code == 429, client
    assert budgets(clean_db) == {"address:192.0.2.50": PER_CLIENT, "all": PER_CLIENT}


def test_concurrent_failures_over_expired_rows_all_get_answers_and_the_expired_rows_go(query, clean_db):
    """Each failure deletes expired rows while other attempts lock the same
    rows to start their windows again: every attempt gets its answer (no
    deadlock, no 500), the overall budget is exact, and the expired row
    nobody touched is gone."""
    from concurrent.futures import ThreadPoolExecutor

    addresses = [f"198.51.100.{n}" for n in range(24)]
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO login_failures (client, window_start, failures) SELECT 'address:' || a, "
                             "timezone('utc', now()) - make_interval(secs => :w + 1), 1 FROM unnest(CAST(:a AS text[])) a"),
                     {"w": WINDOW, "a": addresses})
        conn.execute(sa.text("INSERT INTO login_failures (client, window_start, failures) VALUES ('address:192.0.2.250', "
                             "timezone('utc', now()) - make_interval(secs => :w + 1), 1)"), {"w": WINDOW})
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda n: sign_in(query, f"guess-{n}", client=addresses[n % len(addresses)]).status_code,
                              range(48)))
    assert set(codes) <= {401, 429} and codes.count(401) == OVERALL, codes
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM login_failures WHERE client = 'address:192.0.2.250'")).scalar() == 0


def test_an_x_forwarded_for_that_names_no_address_signs_in_by_the_connections_address(query, clean_db):
    """``:.`` made waitress fail (a 500), and was then refused (400): the
    board is served, and the attempt counts against the connection's own
    address, as without the header."""
    assert requests.get(query.url + "/ui/login", headers={"X-Forwarded-For": ":."}, timeout=10).status_code == 200
    for _ in range(PER_CLIENT):
        assert sign_in(query, "wrong-token", client=":.").status_code == 401
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT failures FROM login_failures WHERE client = 'address:127.0.0.1'")).scalar() == PER_CLIENT
    assert sign_in(query, TEST_TOKEN, client="unknown").status_code == 429
    assert sign_in(query, TEST_TOKEN).status_code == 303  # another client, by its address
    assert "Traceback" not in query.logs()
