"""Sending one notification, in-process against a loopback receiver that
answers from a script and notes when each attempt arrived: retries, back-off,
Retry-After, no retry on other 4xx. (No database: the mutation run uses it
with ``--noconftest``.)"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
import requests

from urllib3.exceptions import MaxRetryError, NameResolutionError

from functions.escalation.answer import Answer, accept_any_2xx
from functions.escalation.channels import pagerduty
from functions.escalation.channels.teams import Teams
from functions.escalation.channels.webhook import Webhook
from functions.escalation.delivery import ANSWER_MAX_BYTES, Delivery, describe_failure, send, worst_case_seconds
from loopback.servers import RecordingServer
from loopback.trickle import OneAnswer, run_bounded
from shared.deadline import bounded
from loopback.processes import free_port


class Receiver:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.times: list[float] = []
        self.server = RecordingServer(self._answer)

    def _answer(self, req):
        self.times.append(time.monotonic())
        answer = self.answers.pop(0) if self.answers else (202, {}, b"ok")
        if answer == "hang":
            time.sleep(2)
            return 202, {}, b"late"
        return answer

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


@pytest.fixture
def receiver():
    made = []

    def make(*answers):
        r = Receiver(*answers)
        r.server.start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.server.stop()


def waits(caplog) -> list[float]:
    """The back-offs send() chose, as its retry log lines name them: what
    it waits is checked exactly, without timing a loaded machine (the gaps
    between attempts are only checked to be at least as long)."""
    return [rec.wait_s for rec in caplog.records if rec.getMessage() == "Notification failed, retrying"]


def deliver(url, attempts=4, base_delay=0.05, max_retry_after=1.0, timeout=2.0, accept=accept_any_2xx):
    with bounded(requests.Session()) as http:
        return send(http, url, {"text": "hi"}, "slack", timeout, attempts, max_retry_after, base_delay, accept=accept)


@pytest.mark.parametrize("status", [202, 299])
def test_any_2xx_is_success(receiver, status):
    r = receiver((status, {}, b""))
    assert deliver(r.server.url, attempts=1).ok


def test_the_default_back_off_starts_at_half_a_second(receiver, caplog):
    r = receiver((500, {}, b""), (202, {}, b"ok"))
    with bounded(requests.Session()) as http, caplog.at_level(logging.WARNING, logger="delivery"):
        assert send(http, r.server.url, {}, "slack", 2.0, 2, 1.0).ok
    assert waits(caplog) == [0.5] and r.gaps()[0] >= 0.5


def test_a_transport_error_names_the_kind_of_failure_never_the_url():
    # A Slack webhook URL is the secret itself; requests quotes it in its message.
    secret_path = "services/T0001/B0002/" + "s" * 24
    result = deliver(f"http://127.0.0.1:{free_port()}/{secret_path}", attempts=1)
    assert result.error == "ConnectionError: connection refused"


@pytest.mark.parametrize("url, kind", [
    ("http://" + "h" * 64 + ".slack.example/services/T0001/B0002/secret", "InvalidURL"),  # a label over 63 characters
    ("http://hooks..example/services/T0001/B0002/secret", "InvalidURL"),  # an empty label
    ("ftp://hooks.example/services/T0001/B0002/secret", "InvalidSchema"),
    ("hooks.example/services/T0001/B0002/secret", "InvalidSchema"),  # no scheme
])
def test_a_url_no_request_can_be_made_to_fails_at_once_logged_and_never_named(url, kind, caplog):
    # A setting to fix: no retry makes it better, and it must not crash the send.
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = deliver(url, attempts=3)
    assert result == Delivery(False, None, 1, f"{kind}: the configured URL cannot be used (check the channel's setting)")
    assert [(r.levelname, r.getMessage(), r.error) for r in caplog.records] == [
        ("ERROR", "Notification not sent: the channel's URL cannot be used", result.error)]
    assert "secret" not in caplog.text


def test_a_proxy_url_no_request_can_be_made_to_names_the_proxy_setting_not_the_channels():
    with bounded(requests.Session()) as http:
        http.proxies = {"http": "http://"}
        result = send(http, "http://hooks.example/services/T0001/B0002/secret", {"text": "hi"}, "slack", 1.0, 3, 1.0, 0.01)
    assert result == Delivery(False, None, 1, "InvalidProxyURL: the proxy URL cannot be used (check HTTP_PROXY/HTTPS_PROXY)")


def test_success_at_once(receiver):
    r = receiver((200, {}, b"ok"))
    assert deliver(r.server.url) == Delivery(True, 200, 1, None, "ok")
    assert r.server.requests[0].json() == {"text": "hi"}


def test_5xx_is_retried_with_doubling_back_off(receiver, caplog):
    r = receiver((500, {}, b"down"), (503, {}, b"down"), (502, {}, b"down"), (202, {}, b"ok"))
    # The Retry-After cap is for 429 only: it must not shorten a 5xx back-off.
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = deliver(r.server.url, attempts=4, base_delay=0.1, max_retry_after=0.3)
    assert (result.ok, result.status, result.attempts) == (True, 202, 4)
    assert waits(caplog) == [0.1, 0.2, 0.4]
    g = r.gaps()
    assert g[0] >= 0.1 and g[1] >= 0.2 and g[2] >= 0.4, g


def test_attempts_are_bounded_and_the_last_failure_is_reported(receiver, caplog):
    r = receiver(*[(500, {}, b"x" * 600)] * 5)
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = deliver(r.server.url, attempts=3, base_delay=0.1)
    assert len(r.server.requests) == 3
    assert (result.ok, result.status, result.attempts) == (False, 500, 3)
    assert result.error == "HTTP 500: " + "x" * 200 and result.body == "x" * 500
    # No wait after the last attempt: two back-offs for three attempts.
    assert waits(caplog) == [0.1, 0.2]
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages.count("Notification failed, retrying") == 2 and messages[-1] == "Notification failed after retries"
    assert caplog.records[-1].error == result.error and caplog.records[-1].attempts == 3


def test_429_honours_retry_after(receiver, caplog):
    r = receiver((429, {"Retry-After": "0.4"}, b"slow down"), (202, {}, b"ok"))
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = deliver(r.server.url, base_delay=0.01)
    assert result.ok and result.attempts == 2
    assert waits(caplog) == [0.4] and r.gaps()[0] >= 0.4


def test_429_retry_after_is_capped(receiver, caplog):
    r = receiver((429, {"Retry-After": "3600"}, b""), (202, {}, b"ok"))
    with caplog.at_level(logging.WARNING, logger="delivery"):
        assert deliver(r.server.url, base_delay=0.01, max_retry_after=0.2).ok
    assert waits(caplog) == [0.2] and r.gaps()[0] >= 0.2


@pytest.mark.parametrize("header, wait", [("soon", 0.15), ("-5", 0.0), ("nan", 0.15), ("NaN", 0.15)])
def test_429_with_an_unusable_retry_after_waits_the_back_off_or_not_at_all(receiver, caplog, header, wait):
    r = receiver((429, {"Retry-After": header}, b""), (202, {}, b"ok"))
    with caplog.at_level(logging.WARNING, logger="delivery"):
        assert deliver(r.server.url, base_delay=0.15).ok
    assert waits(caplog) == [wait] and r.gaps()[0] >= wait


def test_429_without_retry_after_is_capped_too(receiver, caplog):
    r = receiver((429, {}, b""), (202, {}, b"ok"))
    with caplog.at_level(logging.WARNING, logger="delivery"):
        assert deliver(r.server.url, base_delay=5, max_retry_after=0.1).ok
    assert waits(caplog) == [0.1]


@pytest.mark.parametrize("status", [400, 403, 404, 499])
def test_other_4xx_is_not_retried(receiver, caplog, status):
    r = receiver((status, {}, b"invalid_payload"))
    with caplog.at_level(logging.ERROR, logger="delivery"):
        result = deliver(r.server.url)
    assert result == Delivery(False, status, 1, f"HTTP {status}: invalid_payload", "invalid_payload")
    assert len(r.server.requests) == 1
    (record,) = [rec for rec in caplog.records if rec.getMessage() == "Notification refused"]
    assert (record.channel, record.status, record.response) == ("slack", status, "invalid_payload")


@pytest.mark.parametrize("status", [300, 304])
def test_3xx_is_not_a_success(receiver, status):
    r = receiver((status, {}, b""))
    result = deliver(r.server.url, attempts=1)
    assert not result.ok and result.status == status


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_answer_never_followed_into_a_success(receiver, status):
    # Followed, a 302 turned the POST into a GET whose 200 (a proxy's sign-in
    # page) counted as the page accepted, and a 307 re-posted the payload
    # (PagerDuty's routing key is in it) to wherever Location pointed.
    r = receiver((status, {"Location": "/elsewhere"}, b""), (200, {}, b"<html>Sign in</html>"))
    result = deliver(r.server.url, attempts=1)
    assert not result.ok and result.status == status
    assert [(req.method, req.path) for req in r.server.received()] == [("POST", "/")]


def test_a_refusal_logs_at_most_200_characters_of_the_answer(receiver, caplog):
    r = receiver((400, {}, b"y" * 300))
    with caplog.at_level(logging.ERROR, logger="delivery"):
        result = deliver(r.server.url)
    (record,) = [rec for rec in caplog.records if rec.getMessage() == "Notification refused"]
    # Cut to 200 characters in all, the last one marking the cut.
    assert record.response == "y" * 199 + "…" and result.body == "y" * 300


def test_transport_errors_are_retried_then_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = deliver(f"http://127.0.0.1:{free_port()}/hook", attempts=3, base_delay=0.1)
    assert (result.ok, result.status, result.attempts) == (False, None, 3)
    assert result.error.startswith("ConnectionError: ") and len(result.error) <= len("ConnectionError: ") + 200
    assert waits(caplog) == [0.1, 0.2]


def test_a_hanging_receiver_is_bounded_by_the_timeout(receiver):
    r = receiver("hang")  # answers after 2 s
    result = deliver(r.server.url, attempts=1, timeout=0.3)
    assert not result.ok and "Timeout" in result.error


@pytest.mark.parametrize("timeout, attempts, base_delay, seconds", [
    (2.0, 1, 0.5, 2.0),              # one attempt: no back-off at all
    (2.0, 3, 0.5, 6.0 + 0.5 + 1.0),  # backs off twice, doubling
    (1.0, 4, 0.25, 4.0 + 0.25 + 0.5 + 1.0),
    (3.0, 2, 0.5, 6.0 + 0.5),
])
def test_the_worst_case_is_every_attempt_timing_out_plus_every_back_off(timeout, attempts, base_delay, seconds):
    assert worst_case_seconds(timeout, attempts, base_delay) == seconds


def test_no_attempt_allowed_sends_nothing_and_says_so(receiver):
    r = receiver()
    with bounded(requests.Session()) as http:
        result = send(http, r.server.url, {}, "slack", 2.0, 0, 1.0)
    assert result == Delivery(False, None, 0, "not attempted") and r.server.requests == []


def test_a_1xx_final_answer_is_not_a_success(receiver):
    r = receiver((199, {}, b""))
    result = deliver(r.server.url, attempts=1)
    assert not result.ok and result.status == 199


def test_a_retry_after_is_honoured_on_429_only(receiver, caplog):
    # A webhook retries a 408 too; its Retry-After is not the rate limit's
    # and must not replace the back-off.
    r = receiver((408, {"Retry-After": "0.6"}, b""), (202, {}, b"ok"))
    with bounded(requests.Session()) as http, caplog.at_level(logging.WARNING, logger="delivery"):
        result = send(http, r.server.url, {}, "webhook", 2.0, 2, 1.0, 0.05, retry=lambda s: s == 408)
    assert result.ok and result.attempts == 2
    assert waits(caplog) == [0.05]


# The budget below: two attempts of 0.5 s and one back-off of 0.05 s, so after
# a quick first answer 0.55 s less what the answer took remain for the wait.
def budget_send(url):
    """Two attempts of at most 2 s: 4.05 s in all, so once the first answer
    is in (well under a second, even on a loaded machine) about 2 s remain
    for a wait before the last attempt."""
    with bounded(requests.Session()) as http:
        return send(http, url, {}, "slack", 2.0, 2, 5.0, 0.05)


def test_a_retry_after_longer_than_the_budget_left_ends_the_attempts(receiver, caplog):
    r = receiver((429, {"Retry-After": "3"}, b"slow down"), (202, {}, b"ok"))
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = budget_send(r.server.url)
    assert result == Delivery(False, 429, 1, "HTTP 429: slow down", "slow down")
    assert len(r.server.requests) == 1 and waits(caplog) == []
    (record,) = [rec for rec in caplog.records if rec.getMessage() == "Notification retry would exceed its time budget"]
    assert (record.attempt, record.wait_s) == (1, 3.0)


def test_a_retry_after_within_the_budget_left_is_waited(receiver, caplog):
    r = receiver((429, {"Retry-After": "0.3"}, b""), (202, {}, b"ok"))
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = budget_send(r.server.url)
    assert result.ok and result.attempts == 2
    assert waits(caplog) == [0.3] and r.gaps()[0] >= 0.3


def test_the_last_attempt_neither_waits_nor_warns_of_the_budget(receiver, caplog):
    r = receiver((503, {}, b"down"))
    with caplog.at_level(logging.DEBUG, logger="delivery"):
        result = deliver(r.server.url, attempts=1, base_delay=0.3)
    assert (result.status, result.attempts) == (503, 1)
    assert [rec.getMessage() for rec in caplog.records] == ["Notification failed after retries"]


def resetting_receiver() -> int:
    """A port whose server reads the request, then resets the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_a_reset_connection_is_named():
    result = deliver(f"http://127.0.0.1:{resetting_receiver()}/hook", attempts=1)
    assert result.error == "ConnectionError: connection reset"


def test_a_tls_failure_is_named_without_the_url(receiver):
    r = receiver()  # speaks plain HTTP to a TLS client
    result = deliver(f"https://127.0.0.1:{r.server.port}/hook", attempts=1)
    assert result.error == "SSLError: TLS handshake failed"


def chained(exc: BaseException, cause: BaseException | None = None, context: BaseException | None = None) -> BaseException:
    exc.__cause__, exc.__context__ = cause, context
    return exc


def unresolved() -> BaseException:
    # How requests wraps urllib3's failure to resolve a host name.
    lookup = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return requests.ConnectionError(MaxRetryError(None, "/hook", NameResolutionError("hooks.example", None, lookup)))


@pytest.mark.parametrize("exc, described", [
    (unresolved(), "ConnectionError: the host name did not resolve"),
    # urllib3's error, named so, without the socket error below it.
    (requests.ConnectionError(NameResolutionError("hooks.example", None, None)), "ConnectionError: the host name did not resolve"),
    (requests.ConnectionError(OSError(errno.EHOSTUNREACH, "No route to host")), "ConnectionError: No route to host"),
    (requests.ConnectionError(OSError(errno.EIO, "e" * 150)), "ConnectionError: " + "e" * 99 + "…"),
    (requests.ConnectionError(OSError(errno.EIO, "see https://hooks.example/T0/B0/secret")), "ConnectionError: see <url>"),
    # No errno: nothing better to say than the kind of the deepest error.
    (requests.ConnectionError(OSError("boom")), "ConnectionError: OSError"),
    (requests.ConnectionError(), "ConnectionError: ConnectionError"),
    # A cause comes before a context (`raise ... from` over the error being handled).
    (chained(requests.ConnectionError("x"), cause=ConnectionResetError()), "ConnectionError: connection reset"),
    (chained(requests.ConnectionError("x"), context=ConnectionRefusedError()), "ConnectionError: connection refused"),
    (chained(requests.ConnectionError("x"), ConnectionRefusedError(), ConnectionResetError()), "ConnectionError: connection refused"),
    # The wrapped error is the first argument (requests passes it so).
    (RuntimeError(ConnectionResetError(), "detail"), "RuntimeError: connection reset"),
])
def test_a_failure_is_described_by_its_kind(exc, described):
    assert describe_failure(exc, 2.0) == described


def test_an_errno_without_its_text_falls_back_to_the_kind():
    root = OSError()
    root.errno = errno.EIO
    assert describe_failure(requests.ConnectionError(root), 2.0) == "ConnectionError: OSError"


def test_a_cycle_of_causes_ends():
    outer = requests.ConnectionError("x")
    inner = chained(ValueError("y"), context=outer)
    outer.__context__ = inner
    assert describe_failure(outer, 2.0) == "ConnectionError: ValueError"


# --------------------------------------------------------------------------- a total bound on every attempt
# requests' timeout bounds each socket read, not the answer: a peer that
# trickles a byte now and then kept a POST open for as long as it liked.


def read_request(conn: socket.socket) -> None:
    """Read one whole request (headers, then Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


@pytest.fixture
def trickler():
    """A receiver that answers the start of an answer at once, then one
    byte every 50 ms for as long as the client listens (or the test ends)."""
    stop = threading.Event()
    listeners = []

    def make(start: bytes, byte: bytes = b"a", pause: float = 0.05, tls: ssl.SSLContext | None = None) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def answer(conn):
            if tls is not None:
                try:
                    conn = tls.wrap_socket(conn, server_side=True)
                except OSError:
                    conn.close()
                    return
            with conn:
                read_request(conn)
                try:
                    conn.sendall(start)
                    while not stop.wait(pause):
                        conn.sendall(byte)
                except OSError:
                    return  # the client gave up

        def serve():
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return f"{'https' if tls else 'http'}://127.0.0.1:{listener.getsockname()[1]}/hook"

    yield make
    stop.set()
    for listener in listeners:
        listener.close()


def send_bounded(url, wait: float, **kwargs) -> tuple[Delivery | None, float]:
    """send() in a thread, waited for at most ``wait`` seconds: a send that
    never ends fails the test instead of hanging it."""
    ended, outcome, took = run_bounded(lambda: deliver(url, **kwargs), wait)
    if isinstance(outcome, BaseException):
        raise outcome
    return (outcome if ended else None), took


TRICKLED_BODY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n"
TRICKLED_HEADERS = b"HTTP/1.1 200 OK\r\nX-Trickle: "


@pytest.mark.parametrize("start", [TRICKLED_BODY, TRICKLED_HEADERS], ids=["body", "headers"])
def test_an_answer_trickled_byte_by_byte_ends_at_the_attempts_timeout(trickler, start):
    url = trickler(start)
    # Judged by its body: what arrived of it ("aaa…") is no acceptance.
    result, took = send_bounded(url, 10, attempts=1, timeout=0.5, accept=pagerduty.judge)
    assert result is not None, "send() still reading a trickled answer after 10 s"
    assert not result.ok and result.attempts == 1
    assert result.error.endswith(": answer not complete within 0.5s"), result.error
    # The bound is the timeout; a loaded machine gets a generous margin.
    assert took < 0.5 + 1.5, took


def test_a_trickled_answer_is_retried_like_a_timeout_within_the_budget(trickler, caplog):
    url = trickler(TRICKLED_BODY)
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result, took = send_bounded(url, 15, attempts=2, timeout=0.5, base_delay=0.05, accept=pagerduty.judge)
    assert result is not None, "send() still reading a trickled answer after 15 s"
    assert (result.ok, result.attempts) == (False, 2)
    # The last attempt may be a little shorter: the first overran its bound
    # by a few milliseconds, and the two must fit the budget.
    assert re.search(r": answer not complete within 0\.(5|4\d)s$", result.error), result.error
    assert waits(caplog) == [0.05]
    assert took < worst_case_seconds(0.5, 2, 0.05) + 1.5, took


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a certificate")
def test_an_answer_trickled_over_tls_ends_at_the_attempts_timeout(trickler, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    url = trickler(TRICKLED_BODY, tls=server_tls)

    def run():
        with bounded(requests.Session()) as http:
            # Not REQUESTS_CA_BUNDLE: it would take precedence over verify.
            http.trust_env, http.verify = False, str(cert)
            return send(http, url, {"text": "hi"}, "slack", 0.5, 1, 1.0, accept=pagerduty.judge)

    ended, result, took = run_bounded(run, 10)
    assert ended, "send() still reading a trickled answer over TLS after 10 s"
    assert not result.ok and result.error.endswith(": answer not complete within 0.5s"), result.error
    assert took < 2.0


def test_an_answer_trickled_by_a_proxy_ends_at_the_attempts_timeout(trickler):
    proxy = trickler(TRICKLED_BODY).rsplit("/", 1)[0]

    def run():
        with bounded(requests.Session()) as http:
            http.trust_env, http.proxies = False, {"http": proxy}
            return send(http, "http://hooks.example.test/services/T/B/X", {"text": "hi"}, "slack", 0.5, 1, 1.0,
                        accept=pagerduty.judge)

    ended, result, took = run_bounded(run, 10)
    assert ended, "send() still reading an answer a proxy trickles after 10 s"
    assert not result.ok and result.error.endswith(": answer not complete within 0.5s"), result.error
    assert took < 2.0


@pytest.mark.parametrize("channel", [Teams, Webhook])
def test_a_2xx_whose_body_is_still_coming_at_the_timeout_is_accepted_by_a_channel_judged_by_the_status(trickler, channel):
    # The receiver said 200 and took the card or the event: trying again
    # would post it twice. What arrived of the body is handed to the judge.
    url = trickler(TRICKLED_BODY)
    seen: list = []

    def accept(status, body):
        seen.append((status, body))
        return channel.accept(object.__new__(channel), status, body)

    result, took = send_bounded(url, 15, attempts=3, timeout=0.5, accept=accept)
    assert result is not None, "send() still reading a trickled answer after 15 s"
    assert (result.ok, result.status, result.attempts, result.error) == (True, 200, 1, None)
    assert len(seen) == 1 and seen[0][0] == 200 and set(seen[0][1]) <= {"a"}
    assert took < 0.5 + 1.5, took


def test_a_2xx_cut_off_at_the_timeout_that_its_judge_does_not_accept_is_a_timeout(trickler, caplog):
    url = trickler(TRICKLED_BODY)
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result, _ = send_bounded(url, 15, attempts=2, timeout=0.5, base_delay=0.05, accept=pagerduty.judge)
    assert result is not None
    assert (result.ok, result.status, result.attempts) == (False, None, 2)
    assert re.search(r"^ReadTimeout: answer not complete within 0\.(5|4\d)s$", result.error), result.error


def test_a_non_2xx_cut_off_at_the_timeout_is_never_judged(trickler):
    url = trickler(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100000\r\n\r\n")
    seen: list = []
    result, _ = send_bounded(url, 10, attempts=1, timeout=0.5, accept=lambda status, body: seen.append(status) or Answer.ACCEPTED)
    assert result is not None and not result.ok and seen == []
    assert result.error.endswith(": answer not complete within 0.5s"), result.error


def test_an_endless_answer_is_read_only_up_to_its_bound(trickler):
    # A 2xx whose body never ends (a misbehaving proxy streaming a page):
    # what is read is bounded, and the status still decides.
    url = trickler(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 1000000000\r\n\r\n", b"x" * 65536, pause=0.001)
    result, took = send_bounded(url, 10, attempts=1, timeout=3.0)
    assert result is not None, "send() still reading an endless answer after 10 s"
    assert result.ok and result.body == "x" * 500
    assert took < 3.0, took


def test_an_endless_redirect_is_read_only_up_to_its_bound_too(trickler):
    # requests reads a redirect's whole body itself (to release the
    # connection), even when it does not follow it.
    url = trickler(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 1000000000\r\n\r\n", b"x" * 65536, pause=0.001)
    result, took = send_bounded(url, 10, attempts=1, timeout=3.0)
    assert result is not None, "send() still reading an endless redirect after 10 s"
    assert (result.ok, result.status, result.body) == (False, 302, "x" * 500)
    assert took < 2.0, took


def test_a_silent_peer_is_still_named_as_giving_no_answer(receiver):
    r = receiver("hang")  # answers after 2 s
    result = deliver(r.server.url, attempts=1, timeout=0.3)
    assert not result.ok and result.error == "ReadTimeout: no answer within 0.3s"


# --------------------------------------------------------------------------- a 2xx judged by the channel


def judged(url, verdict: Answer, attempts=3, seen: list | None = None):
    def accept(status, body):
        if seen is not None:
            seen.append((status, body))
        return verdict

    with bounded(requests.Session()) as http:
        return send(http, url, {"text": "hi"}, "slack", 2.0, attempts, 1.0, 0.01, accept=accept)


def test_the_channel_judges_a_2xx_and_sees_the_whole_answer(receiver):
    r = receiver((200, {"Content-Type": "text/plain"}, b"ok"))
    seen: list = []
    assert judged(r.server.url, Answer.ACCEPTED, seen=seen) == Delivery(True, 200, 1, None, "ok")
    assert seen == [(200, "ok")]


def test_a_2xx_that_is_not_the_services_answer_is_retried_then_reported(receiver, caplog):
    r = receiver(*[(200, {}, b"<html>portal</html>")] * 3)
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = judged(r.server.url, Answer.UNRECOGNISED)
    assert result == Delivery(False, 200, 3, "HTTP 200, not accepted: <html>portal</html>", "<html>portal</html>")
    assert len(r.server.requests) == 3 and waits(caplog) == [0.01, 0.02]
    assert "Notification refused" not in [rec.getMessage() for rec in caplog.records]


def test_a_2xx_the_service_says_no_in_is_a_refusal_not_retried(receiver, caplog):
    r = receiver((200, {}, b'{"ok":false,"error":"channel_not_found"}'))
    with caplog.at_level(logging.ERROR, logger="delivery"):
        result = judged(r.server.url, Answer.REFUSED)
    assert (result.ok, result.status, result.attempts) == (False, 200, 1)
    assert result.error == 'HTTP 200: {"ok":false,"error":"channel_not_found"}'
    (record,) = [rec for rec in caplog.records if rec.getMessage() == "Notification refused"]
    assert (record.status, record.response) == (200, '{"ok":false,"error":"channel_not_found"}')


def test_only_a_2xx_is_judged(receiver):
    r = receiver((500, {}, b"down"), (404, {}, b"no_service"))
    seen: list = []
    result = judged(r.server.url, Answer.ACCEPTED, attempts=2, seen=seen)
    assert (result.ok, result.status, result.attempts) == (False, 404, 2) and seen == []


def test_the_channel_judges_at_most_the_answers_bound(receiver):
    r = receiver((200, {}, b"y" * (ANSWER_MAX_BYTES * 3)))
    seen: list = []
    assert judged(r.server.url, Answer.ACCEPTED, seen=seen).ok
    assert seen == [(200, "y" * ANSWER_MAX_BYTES)]


@pytest.mark.parametrize("failure", [RecursionError("maximum recursion depth exceeded"), TypeError("unhashable type: 'list'"),
                                     ValueError("x")])
def test_a_judge_that_fails_on_an_answer_makes_it_unrecognised_never_an_error(receiver, caplog, failure):
    # Whatever a receiver answers, its judge must not turn it into our own
    # 4xx (the Broker drops the event: a page lost) or 5xx without a record.
    r = receiver(*[(200, {}, b"[[[[")] * 3)

    def accept(status, body):
        raise failure

    with caplog.at_level(logging.WARNING, logger="delivery"):
        with bounded(requests.Session()) as http:
            result = send(http, r.server.url, {"text": "hi"}, "slack", 2.0, 3, 1.0, 0.01, accept=accept)
    assert result == Delivery(False, 200, 3, "HTTP 200, not accepted: [[[[", "[[[[")
    assert len(r.server.requests) == 3
    judged_badly = [rec for rec in caplog.records if rec.getMessage() == "Notification answer could not be judged"]
    assert [rec.error for rec in judged_badly] == [type(failure).__name__] * 3


def test_an_answer_in_an_unknown_charset_is_still_read(receiver):
    r = receiver((200, {"Content-Type": "text/plain; charset=no-such-charset"}, b"ok \xff"))
    assert deliver(r.server.url, attempts=1) == Delivery(True, 200, 1, None, "ok \ufffd")


@pytest.mark.parametrize("charset", ["idna", "punycode", "IDNA"])
def test_a_2xx_in_a_host_name_charset_is_accepted_once_never_a_crash(receiver, charset):
    # requests' .text raised a bare UnicodeError on these after the receiver
    # had said 200: out of send, the handler released the claim and answered
    # 500, and every redelivery by the Broker posted the page again.
    r = receiver((200, {"Content-Type": f"text/plain; charset={charset}"}, b"ok \xff"))
    assert deliver(r.server.url, attempts=3) == Delivery(True, 200, 1, None, "ok \ufffd")
    assert len(r.server.received()) == 1


@pytest.mark.parametrize("charset", ["idna", "punycode"])
def test_slacks_yes_in_a_host_name_charset_is_read_as_its_words(receiver, charset):
    # punycode "decodes" the ASCII "ok" into other letters: read as UTF-8.
    from functions.escalation.channels.slack import judge

    r = receiver((200, {"Content-Type": f"text/plain; charset={charset}"}, b"ok"))
    assert deliver(r.server.url, attempts=3, accept=judge) == Delivery(True, 200, 1, None, "ok")


# --------------------------------------------------------------------------- a 2xx cut off before its body
# A receiver judged by its status that said 2xx has acted on the POST:
# whatever goes wrong after the status line (headers that trickle past
# the bound, a connection closed before the body's end), sending it again
# would post it twice.


@pytest.fixture
def closer():
    """A receiver that answers ``answer`` and closes the connection;
    ``closer.count()``: the requests it read."""
    servers: list[OneAnswer] = []

    def make(answer: bytes) -> str:
        servers.append(OneAnswer(answer))
        return servers[-1].url + "/hook"

    make.count = lambda: sum(server.requests for server in servers)
    yield make
    for server in servers:
        server.close()


def counting_trickler(trickler, start: bytes) -> tuple[str, list]:
    """The trickler's URL behind a counter of the connections made to it."""
    url = trickler(start)
    host, port = url.split("//")[1].split("/")[0].split(":")
    counter = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []

    def relay():
        while True:
            try:
                conn, _ = counter.accept()
            except OSError:
                return
            seen.append(1)
            upstream = socket.create_connection((host, int(port)))

            def pipe(a, b):
                try:
                    while chunk := a.recv(65536):
                        b.sendall(chunk)
                except OSError:
                    pass
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()

    threading.Thread(target=relay, daemon=True).start()
    return f"http://127.0.0.1:{counter.getsockname()[1]}/hook", seen


@pytest.mark.parametrize("channel", [Teams, Webhook])
def test_a_2xx_whose_headers_are_still_coming_at_the_timeout_is_accepted_by_a_channel_judged_by_the_status(trickler, channel):
    url, posts = counting_trickler(trickler, TRICKLED_HEADERS)
    result, took = send_bounded(url, 15, attempts=3, timeout=0.5,
                                accept=lambda status, body: channel.accept(object.__new__(channel), status, body))
    assert result is not None, "send() still reading trickled headers after 15 s"
    assert (result.ok, result.status, result.attempts, result.error) == (True, 200, 1, None)
    assert len(posts) == 1
    assert took < 0.5 + 1.5, took


def test_a_2xx_whose_headers_are_still_coming_at_the_timeout_is_retried_by_a_channel_judged_by_the_body(trickler):
    result, _ = send_bounded(trickler(TRICKLED_HEADERS), 15, attempts=2, timeout=0.5, base_delay=0.05, accept=pagerduty.judge)
    assert result is not None
    assert (result.ok, result.status, result.attempts) == (False, None, 2)
    assert result.error.startswith("ReadTimeout: "), result.error


@pytest.mark.parametrize("channel", [Teams, Webhook])
@pytest.mark.parametrize("answer, body", [
    # The connection closes before the body ends.
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nok", "ok"),
    # The body cannot be decoded.
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot gzip!", ""),
])
def test_a_2xx_whose_body_is_broken_is_accepted_by_a_channel_judged_by_the_status(closer, channel, answer, body):
    result, _ = send_bounded(closer(answer), 15, attempts=3, timeout=2.0,
                             accept=lambda status, text: channel.accept(object.__new__(channel), status, text))
    assert result is not None
    assert (result.ok, result.status, result.attempts, result.error, result.body) == (True, 200, 1, None, body)
    assert closer.count() == 1


def test_a_2xx_whose_connection_closes_before_the_body_ends_is_retried_by_a_channel_judged_by_the_body(closer):
    url = closer(b'HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n{"status": "succ')
    result, _ = send_bounded(url, 15, attempts=2, timeout=2.0, base_delay=0.05, accept=pagerduty.judge)
    assert result is not None
    assert (result.ok, result.status, result.attempts) == (False, None, 2)
    assert closer.count() == 2
    assert result.error.startswith("ChunkedEncodingError: "), result.error
