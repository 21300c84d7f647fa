"""Sending one notification, in-process against a loopback receiver that
answers from a script and notes when each attempt arrived: retries, back-off,
Retry-After, no retry on other 4xx. (No database: the mutation run uses it
with ``--noconftest``.)"""

from __future__ import annotations

import logging
import time

import pytest
import requests

from functions.escalation.delivery import Delivery, send
from loopback.servers import RecordingServer
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


def deliver(url, attempts=4, base_delay=0.05, max_retry_after=1.0, timeout=2.0):
    with requests.Session() as http:
        return send(http, url, {"text": "hi"}, "slack", timeout, attempts, max_retry_after, base_delay)


@pytest.mark.parametrize("status", [202, 299])
def test_any_2xx_is_success(receiver, status):
    r = receiver((status, {}, b""))
    assert deliver(r.server.url, attempts=1).ok


def test_the_default_back_off_starts_at_half_a_second(receiver):
    r = receiver((500, {}, b""), (202, {}, b"ok"))
    with requests.Session() as http:
        assert send(http, r.server.url, {}, "slack", 2.0, 2, 1.0).ok
    assert 0.5 <= r.gaps()[0] < 1.0


def test_a_transport_error_names_the_kind_of_failure_never_the_url():
    # A Slack webhook URL is the secret itself; requests quotes it in its message.
    secret_path = "services/T0001/B0002/" + "s" * 24
    result = deliver(f"http://127.0.0.1:{free_port()}/{secret_path}", attempts=1)
    assert result.error == "ConnectionError: connection refused"


def test_success_at_once(receiver):
    r = receiver((200, {}, b"ok"))
    assert deliver(r.server.url) == Delivery(True, 200, 1, None, "ok")
    assert r.server.requests[0].json() == {"text": "hi"}


def test_5xx_is_retried_with_doubling_back_off(receiver):
    r = receiver((500, {}, b"down"), (503, {}, b"down"), (502, {}, b"down"), (202, {}, b"ok"))
    # The Retry-After cap is for 429 only: it must not shorten a 5xx back-off.
    result = deliver(r.server.url, attempts=4, base_delay=0.1, max_retry_after=0.3)
    assert (result.ok, result.status, result.attempts) == (True, 202, 4)
    g = r.gaps()
    assert 0.1 <= g[0] < 0.19 and 0.2 <= g[1] < 0.39 and 0.4 <= g[2] < 0.79, g


def test_attempts_are_bounded_and_the_last_failure_is_reported(receiver, caplog):
    r = receiver(*[(500, {}, b"x" * 600)] * 5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="delivery"):
        result = deliver(r.server.url, attempts=3, base_delay=0.1)
    assert len(r.server.requests) == 3
    assert (result.ok, result.status, result.attempts) == (False, 500, 3)
    assert result.error == "HTTP 500: " + "x" * 200 and result.body == "x" * 500
    # No wait after the last attempt.
    assert time.monotonic() - started < 0.3 + 0.25
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages.count("Notification failed, retrying") == 2 and messages[-1] == "Notification failed after retries"
    assert caplog.records[-1].error == result.error and caplog.records[-1].attempts == 3


def test_429_honours_retry_after(receiver):
    r = receiver((429, {"Retry-After": "0.4"}, b"slow down"), (202, {}, b"ok"))
    result = deliver(r.server.url, base_delay=0.01)
    assert result.ok and result.attempts == 2
    assert 0.4 <= r.gaps()[0] < 0.6


def test_429_retry_after_is_capped(receiver):
    r = receiver((429, {"Retry-After": "3600"}, b""), (202, {}, b"ok"))
    assert deliver(r.server.url, base_delay=0.01, max_retry_after=0.2).ok
    assert 0.2 <= r.gaps()[0] < 0.4


@pytest.mark.parametrize("header, low, high", [("soon", 0.15, 0.3), ("-5", 0.0, 0.1)])
def test_429_with_an_unusable_retry_after_waits_the_back_off_or_not_at_all(receiver, header, low, high):
    r = receiver((429, {"Retry-After": header}, b""), (202, {}, b"ok"))
    assert deliver(r.server.url, base_delay=0.15).ok
    assert low <= r.gaps()[0] < high


def test_429_without_retry_after_is_capped_too(receiver):
    r = receiver((429, {}, b""), (202, {}, b"ok"))
    assert deliver(r.server.url, base_delay=5, max_retry_after=0.1).ok
    assert r.gaps()[0] < 0.3


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


def test_a_refusal_logs_at_most_200_characters_of_the_answer(receiver, caplog):
    r = receiver((400, {}, b"y" * 300))
    with caplog.at_level(logging.ERROR, logger="delivery"):
        result = deliver(r.server.url)
    (record,) = [rec for rec in caplog.records if rec.getMessage() == "Notification refused"]
    # Cut to 200 characters in all, the last one marking the cut.
    assert record.response == "y" * 199 + "…" and result.body == "y" * 300


def test_transport_errors_are_retried_then_reported():
    started = time.monotonic()
    result = deliver(f"http://127.0.0.1:{free_port()}/hook", attempts=3, base_delay=0.1)
    elapsed = time.monotonic() - started
    assert (result.ok, result.status, result.attempts) == (False, None, 3)
    assert result.error.startswith("ConnectionError: ") and len(result.error) <= len("ConnectionError: ") + 200
    assert 0.3 <= elapsed < 1.5


def test_a_hanging_receiver_is_bounded_by_the_timeout(receiver):
    r = receiver("hang")
    started = time.monotonic()
    result = deliver(r.server.url, attempts=1, timeout=0.3)
    assert not result.ok and "Timeout" in result.error and time.monotonic() - started < 1.5
