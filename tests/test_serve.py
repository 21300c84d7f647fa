"""The entry point every function runs in (shared/serve.py): one process;
SIGTERM answers what is in hand, then exits; without its two variables, one
line naming what is missing, no traceback, exit status 2."""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("given, absent", [
    ({}, ["FUNCTION_SOURCE", "FUNCTION_TARGET"]),
    ({"FUNCTION_SOURCE": "functions/intake/main.py"}, ["FUNCTION_TARGET"]),
    ({"FUNCTION_TARGET": "intake", "FUNCTION_SOURCE": "  "}, ["FUNCTION_SOURCE"]),
])
def test_a_missing_function_variable_is_named_in_one_line(given, absent):
    env = {k: v for k, v in os.environ.items() if k not in ("FUNCTION_SOURCE", "FUNCTION_TARGET")}
    env.update(given, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "shared.serve"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(name in lines[0] for name in absent)
    assert all(name not in lines[0].split("(")[0] for name in {"FUNCTION_SOURCE", "FUNCTION_TARGET"} - set(absent))


# --------------------------------------------------------------------------- one process, drained on SIGTERM

SLOW = ROOT / "tests" / "fixtures" / "serve" / "main.py"


def serve(**extra: str):
    from loopback.processes import free_port, wait_until

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FUNCTION_SOURCE": str(SLOW), "FUNCTION_TARGET": "slow",
           "HOST": "127.0.0.1", "PORT": str(port), "THREADS": "2", **extra}
    process = subprocess.Popen([sys.executable, "-m", "shared.serve"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(url + "/", timeout=1).ok, 30, message="the served function")
    return process, url


@pytest.fixture
def served():
    from loopback.processes import terminate

    process, url = serve()
    yield process, url
    terminate(process)


def test_one_process_serves_with_no_worker_forked(served):
    process, _ = served
    assert Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split() == []


def test_sigterm_answers_the_request_in_hand_then_exits(served):
    process, url = served
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(requests.get, url + "/?sleep=1.5", timeout=30)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert answer.result().status_code == 200
    assert process.wait(10) == 0
    assert "Traceback" not in process.stderr.read()


def test_sigterm_with_nothing_in_hand_exits_at_once(served):
    process, url = served
    session = requests.Session()
    assert session.get(url + "/").ok  # a kept-alive connection, idle
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert time.monotonic() - started < 3


def test_only_the_loopback_proxy_may_say_the_request_came_over_tls(served):
    _, url = served
    # Knative's queue-proxy connects from 127.0.0.1 and forwards the scheme.
    assert requests.get(url + "/", headers={"X-Forwarded-Proto": "https"}, timeout=10).json()["scheme"] == "https"
    assert requests.get(url + "/", timeout=10).json()["scheme"] == "http"


def test_an_x_forwarded_for_whose_client_entry_is_no_address_is_served_as_the_connections():
    """Never refused for its X-Forwarded-For (AlertManager does not retry a
    4xx), and never a 500: waitress failed with an IndexError on ``:.``. An
    entry read as the client that is no address is dropped, with a warning;
    every entry that is one is waitress's as before."""
    from loopback.processes import terminate

    process, url = serve(TRUSTED_PROXY_HOPS="2")
    try:
        def remote(forwarded: str):
            answer = requests.get(url + "/", headers={"X-Forwarded-For": forwarded}, timeout=10)
            return answer.json().get("remote") if answer.ok else answer.status_code

        assert remote(":., 203.0.113.7, 10.0.0.9") == "203.0.113.7"  # entries further left are never read
        assert remote("[2001:db8::7], 10.0.0.9") == "2001:db8::7" and remote("203.0.113.7:5000, 10.0.0.9") == "203.0.113.7"
        # waitress makes an address of these (the port it splits off is not read): left to it.
        assert remote("203.0.113.7:, 10.0.0.9") == "203.0.113.7" and remote("1.2.3.4:x, 10.0.0.9") == "1.2.3.4"
        assert remote(", 10.0.0.9") == "127.0.0.1"
        # An address waitress alone misread: an IPv4 client of a dual-stack
        # proxy was the client "::ffff", the same for every one; [IPv6]:port no address.
        assert remote("::ffff:203.0.113.9, 10.0.0.9") == "203.0.113.9" and remote('"::ffff:203.0.113.9", 10.0.0.9') == "203.0.113.9"
        assert remote("[2001:db8::7]:443, 10.0.0.9") == "2001:db8::7" and remote("fe80::7%eth0.5, 10.0.0.9") == "fe80::7"
        assert remote("2001:db8::203.0.113.9, 10.0.0.9") == "2001:db8::cb00:7109"
        # A zone is free text (up to the header's limit) and no part of the
        # host: left out, so a log line's remote is never the client's prose.
        assert remote("fe80::7%" + "z" * 5000 + ", 10.0.0.9") == "fe80::7"
        assert remote("[fe80::7%" + "z" * 5000 + ".5]:x, 10.0.0.9") == "127.0.0.1"  # no address of ours; waitress kept the zone
        # What the client writes left of the proxies' entries is not read, however it is quoted.
        for own in ('"x', 'x"', '"a\\"', ":.", "u" * 5000):
            assert remote(f"{own}, 203.0.113.7, 10.0.0.9") == "203.0.113.7", own
        for bad in (":., 10.0.0.9", ":.", "x, 10.0.0.9", "[::1]:x, 10.0.0.9", "[::1]:99999, 10.0.0.9", "unknown, 10.0.0.9",
                    '"unbalanced, 10.0.0.9', "", "u" * 5000 + ", 10.0.0.9"):
            assert remote(bad) == "127.0.0.1", bad
        assert remote("203.0.113.8, 10.0.0.9") == "203.0.113.8"
    finally:
        terminate(process)
    logged = process.stderr.read()
    assert "Traceback" not in logged and "X-Forwarded-For ignored" in logged
    assert "u" * 200 not in logged  # a long header is not logged whole


def test_warnings_of_ignored_x_forwarded_for_are_bounded():
    from shared.login_throttle import LogBudget
    from shared.serve import checked_forwarded_for

    seen = []

    def app(environ, start_response):
        seen.append((environ["REMOTE_ADDR"], environ.get("HTTP_X_FORWARDED_FOR")))
        return []

    budget = LogBudget(per_window=2, window=60, clock=lambda: 0.0)
    guarded = checked_forwarded_for(app, 2, budget=budget)
    for _ in range(5):
        guarded({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "unknown, 10.0.0.9"}, None)
    assert seen == [("127.0.0.1", None)] * 5 and budget.take() is None


def test_threads_take_turns_every_millisecond_and_the_start_is_kept_out_of_collections(served):
    from shared.serve import SWITCH_INTERVAL_SECONDS

    _, url = served
    runtime = requests.get(url + "/", timeout=10).json()
    # The group commit's writer waits at most this long for the interpreter
    # after each round trip to the database (CPython's default is 5 ms).
    assert runtime["switch_interval"] == pytest.approx(SWITCH_INTERVAL_SECONDS) and SWITCH_INTERVAL_SECONDS < 0.005
    # Flask, functions-framework and the function's module, frozen once built.
    assert runtime["frozen"] > 10_000


def test_only_loopback_is_trusted_and_bodies_and_answers_stay_in_memory():
    from shared.serve import server_settings

    settings = server_settings({"THREADS": "4"}, body_cap=1024)
    assert settings["trusted_proxy"] == "127.0.0.1" and settings["trusted_proxy_headers"] == "x-forwarded-proto"
    # Room for a chunked body's framing; the function's own check is exact.
    assert 2 * 1024 <= settings["max_request_body_size"] == settings["inbuf_overflow"] <= 128 * 1024
    # An answer is not spooled to the small in-memory /tmp.
    assert settings["outbuf_overflow"] >= 16 * 1024 * 1024


def test_trusted_proxy_hops_let_the_loopback_proxy_name_the_client():
    from shared.serve import server_settings

    settings = server_settings({"THREADS": "4", "TRUSTED_PROXY_HOPS": "2"}, body_cap=1024)
    assert settings["trusted_proxy"] == "127.0.0.1" and settings["trusted_proxy_count"] == 2
    assert settings["trusted_proxy_headers"] == "x-forwarded-proto x-forwarded-for"


@pytest.mark.parametrize("raw, hops", [("+1", 1), (" 3 ", 3), ("", 0), ("0", 0)])
def test_the_server_reads_trusted_proxy_hops_as_the_settings_do(raw, hops):
    from shared.config import load_settings
    from shared.serve import server_settings

    env = {"THREADS": "4", "TRUSTED_PROXY_HOPS": raw}
    assert load_settings({"DATABASE_URL": "postgresql+pg8000://u@h/d", **env}).trusted_proxy_hops == hops
    assert server_settings(env, body_cap=1024)["trusted_proxy_count"] == max(hops, 1)
    assert ("x-forwarded-for" in server_settings(env, body_cap=1024)["trusted_proxy_headers"]) == bool(hops)


def test_a_body_still_arriving_at_sigterm_is_read_and_answered(served):
    process, url = served
    port = int(url.rsplit(":", 1)[1])
    body = b'{"x": "' + b"y" * 4000 + b'"}'
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /?sleep=0.2 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:100])
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        sock.sendall(body[100:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert process.wait(10) == 0


def test_a_stopping_process_refuses_new_connections_at_once(served):
    process, url = served
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(requests.get, url + "/?sleep=2", timeout=30)
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Still answering the first request, but no longer listening: a new
        # client is refused and goes elsewhere, instead of a reset later.
        with pytest.raises(requests.ConnectionError) as refused:
            requests.get(url + "/", timeout=5)
        assert "refused" in str(refused.value).lower()
        assert answer.result().status_code == 200
    assert process.wait(10) == 0


def test_a_drain_cut_short_by_its_bound_says_so():
    from waitress.server import create_server

    from shared.serve import run_until_stopped

    def slow(environ, start_response):
        time.sleep(3)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late"]

    server = create_server(slow, host="127.0.0.1", port=0, threads=1)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        loop = pool.submit(run_until_stopped, server, stop, 0.5)
        pool.submit(lambda: requests.get(f"http://127.0.0.1:{server.effective_port}/", timeout=10))
        time.sleep(0.5)
        stop.set()
        assert loop.result(timeout=10) is False


def test_many_idle_connections_do_not_stall_a_new_one(served):
    # A Broker keeps a pool of kept-alive connections, idle between
    # deliveries; with a limit of 32 the next delivery waited until the
    # server closed idle ones, two minutes later.
    _, url = served
    sessions = []
    try:
        for _ in range(40):
            session = requests.Session()
            assert session.get(url + "/", timeout=10).ok
            sessions.append(session)
        assert requests.get(url + "/", timeout=5).ok
    finally:
        for session in sessions:
            session.close()
