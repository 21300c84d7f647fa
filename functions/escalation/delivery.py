"""Sending one notification: a bound on every attempt, exponential backoff on
transport errors and on the answers the channel says are worth a retry
(``429``, honouring ``Retry-After``, and ``5xx`` by default), and no retry on
any other answer (it will not get better).

The timeout bounds each attempt as a whole (name lookup, connect, TLS
handshake, send and the whole answer, :mod:`shared.deadline`), not each
socket read: a peer
that trickles its answer a byte at a time is cut off at the timeout, like
one that says nothing. At most :data:`ANSWER_MAX_BYTES` of an answer are
read. A ``2xx`` is not yet an acceptance: the channel judges the answer
(``accept``), because a proxy, a captive portal or a wrong endpoint answers
``200`` with a page of its own, and Slack's Web API answers ``200`` with
``"ok": false``. An answer the channel does not recognise is retried like
an error on their side; a refusal in the service's own words is not retried
here (the handler answers ``502``, so the Broker's redelivery tries again),
and neither is a URL no request can be made to (a host name label over 63
characters, no scheme: :data:`shared.deadline.UNUSABLE_URL`), a setting to
fix that fails at once, logged, and ends as a dead letter the same way.
A judge that fails on an answer counts it as unrecognised. A ``2xx`` cut
off after its status line (headers or body still coming at the bound, or
the connection dropped before the body's end) is judged on what arrived: a
channel judged by the status alone has its notification accepted (sending
it again would post it twice); any other retries it as the failure it is.

Every attempt and every wait fits in one budget (:func:`worst_case_seconds`),
so the claim that guards a notification can go stale right after the budget
ends instead of after a guessed constant. Error texts are built from the
failure's kind, never from the exception's message: requests quotes the URL,
and a Slack webhook URL is the secret itself.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from dataclasses import dataclass

from typing import Callable

import requests
import urllib3.exceptions

from functions.escalation.answer import Answer, accept_any_2xx
from shared.deadline import UNUSABLE_URL, DeadlinePassed, answer_text, request
from shared.log import scrub

log = logging.getLogger("delivery")
BASE_DELAY = 0.5
# Enough for any service's answer (PagerDuty's is under 200 bytes, Slack's
# two): the rest of a longer one is never read.
ANSWER_MAX_BYTES = 64 * 1024
# Each attempt that runs to its bound overruns it by a little (the timer's
# and the scheduler's latency), so after timed-out attempts the budget is
# that much short of a full last attempt. Up to this share of the timeout,
# the last attempt is made shorter rather than not made at all.
OVERRUN_ALLOWANCE = 0.1


@dataclass
class Delivery:
    ok: bool
    status: int | None
    attempts: int
    error: str | None = None
    body: str = ""


def worst_case_seconds(timeout: float, max_attempts: int, base_delay: float = BASE_DELAY) -> float:
    """How long :func:`send` may take at most: every attempt times out, and
    the backoff between attempts (a ``Retry-After`` never extends it)."""
    return timeout * max_attempts + sum(base_delay * 2 ** i for i in range(max_attempts - 1))


def describe_failure(exc: BaseException, timeout: float) -> str:
    """``ConnectionError: connection refused`` - the kind of failure, never
    the message (which names the URL). ``timeout``: the bound of the attempt
    that failed (the last one may be shorter than the others)."""
    kind = type(exc).__name__
    chain = [exc]
    seen = {id(exc)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__ or _reason(chain[-1])) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        chain.append(nxt)
    if isinstance(exc, requests.exceptions.InvalidProxyURL):
        # The proxy's setting, not the channel's.
        return f"{kind}: the proxy URL cannot be used (check HTTP_PROXY/HTTPS_PROXY)"
    if isinstance(exc, UNUSABLE_URL):
        # Its message quotes the URL (and a Slack URL is the secret).
        return f"{kind}: the configured URL cannot be used (check the channel's setting)"
    passed = next((e for e in chain if isinstance(e, DeadlinePassed)), None)
    if passed is not None:
        # Its text is ours: "answer not complete within 5s".
        return f"{kind}: {passed}"
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return f"{kind}: no answer within {round(timeout, 2):g}s"
    root = chain[-1]
    if isinstance(root, ConnectionRefusedError):
        return f"{kind}: connection refused"
    if isinstance(root, ConnectionResetError):
        return f"{kind}: connection reset"
    if isinstance(root, socket.gaierror) or "NameResolution" in type(root).__name__:
        return f"{kind}: the host name did not resolve"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"{kind}: TLS handshake failed"
    if isinstance(root, OSError) and root.strerror:
        return f"{kind}: {scrub(root.strerror, 100)}"
    return f"{kind}: {type(root).__name__}"


def _reason(exc: BaseException) -> BaseException | None:
    # urllib3 keeps the underlying error in .reason, requests in args[0].
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        return reason
    first = exc.args[0] if exc.args else None
    return first if isinstance(first, BaseException) else None


def _retry_after(response: requests.Response, fallback: float, cap: float) -> float:
    raw = response.headers.get("Retry-After", "")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if math.isnan(seconds):
        # "nan" parses, and time.sleep() refuses it: unusable, like "soon".
        return min(fallback, cap)
    return min(max(seconds, 0.0), cap)


def _retry_by_default(status: int) -> bool:
    return status == 429 or status >= 500


def _judge(accept: Callable[[int, str], Answer], channel: str, status: int, text: str) -> Answer:
    """The channel's judgement of a ``2xx``; one that fails (a body it could
    not parse) is no judgement: the answer is unrecognised and retried, so
    that no receiver's answer becomes our own 4xx or 5xx to the Broker."""
    try:
        answer = accept(status, text)
    except Exception as exc:  # noqa: BLE001 - any judge's failure: the answer is unrecognised, retried
        log.error("Notification answer could not be judged", extra={"channel": channel, "status": status, "error": type(exc).__name__})
        return Answer.UNRECOGNISED
    return answer if isinstance(answer, Answer) else Answer.UNRECOGNISED


def _attempt(http: requests.Session, url: str, payload: dict | bytes, headers: dict[str, str] | None,
             timeout: float) -> tuple[requests.Response, str]:
    """One POST and its answer, all of it within ``timeout``."""
    # Never follow a redirect: requests turns a POST answered 301/302
    # into a GET, whose 200 (a login page) is no page accepted, and a
    # 307 re-posts the routing key in the body to wherever it points.
    body = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
    # A 2xx whose body the bound cuts off comes back with what arrived and
    # ``cut_short`` set: the channel judges it (send).
    response = request(http, "POST", url, timeout, ANSWER_MAX_BYTES, partial_2xx=True, headers=headers,
                       allow_redirects=False, **body)
    # answer_text: requests' .text raises on a charset that cannot be
    # decoded with replacement (idna, punycode), after the receiver said
    # 2xx: raised here, it escaped send, the handler released the claim and
    # every redelivery posted the notification again.
    return response, answer_text(response)


def send(
    http: requests.Session,
    url: str,
    payload: dict | bytes,
    channel: str,
    timeout: float,
    max_attempts: int,
    max_retry_after: float,
    base_delay: float = BASE_DELAY,
    headers: dict[str, str] | None = None,
    retry: Callable[[int], bool] = _retry_by_default,
    accept: Callable[[int, str], Answer] = accept_any_2xx,
) -> Delivery:
    """POST ``payload`` (a dict as JSON, or bytes as they are: a signature
    may cover them) until it is accepted, refused, or the budget is spent.
    ``timeout`` bounds each attempt as a whole; ``accept`` judges a ``2xx``."""
    deadline = time.monotonic() + worst_case_seconds(timeout, max_attempts, base_delay)
    delay = base_delay
    last = Delivery(False, None, 0, "not attempted")
    for attempt in range(1, max_attempts + 1):
        # An attempt that used its whole timeout ends a little after it:
        # the last one may be that much shorter, so the send stays in its budget.
        bound = max(min(timeout, deadline - time.monotonic()), 0.001)
        try:
            response, text = _attempt(http, url, payload, headers, bound)
        except UNUSABLE_URL as exc:
            # A setting to fix (a host name label over 63 characters, no
            # scheme): no retry makes it better. Not accepted, so the handler
            # answers 502 and the Broker dead-letters the event, to be
            # redelivered once the setting is fixed.
            error = describe_failure(exc, bound)
            log.error("Notification not sent: the channel's URL cannot be used", extra={"channel": channel, "error": error})
            return Delivery(False, None, attempt, error)
        except requests.RequestException as exc:
            last = Delivery(False, None, attempt, describe_failure(exc, bound))
            wait = delay
        else:
            body = text[:500]
            status = response.status_code
            answer = _judge(accept, channel, status, text) if 200 <= status < 300 else None
            if answer is Answer.ACCEPTED:
                return Delivery(True, status, attempt, None, body)
            cut_short = getattr(response, "cut_short", None)
            if cut_short is not None:
                # Not accepted from what arrived: a timeout or a dropped
                # connection, retried as one.
                last = Delivery(False, None, attempt, describe_failure(cut_short, bound))
                wait = delay
            elif answer is Answer.UNRECOGNISED:
                # A page that is not the service's, or the service's "not now".
                last = Delivery(False, status, attempt, scrub(f"HTTP {status}, not accepted: {body[:200]}"), body)
                wait = delay
            elif answer is None and retry(status):
                last = Delivery(False, status, attempt, scrub(f"HTTP {status}: {body[:200]}"), body)
                wait = _retry_after(response, delay, max_retry_after) if status == 429 else delay
            else:
                # A refusal: a 4xx, or a 2xx saying no in the service's own words.
                # The URL is the secret for Slack and Teams, the key is in the
                # body for PagerDuty: log the status, never the request.
                log.error("Notification refused", extra={"channel": channel, "status": status, "response": scrub(body, 200)})
                return Delivery(False, status, attempt, scrub(f"HTTP {status}: {body[:200]}"), body)
        remaining = deadline - time.monotonic() - timeout * (1 - OVERRUN_ALLOWANCE)
        if attempt < max_attempts and wait > remaining:
            # Waiting longer (a long Retry-After) would outlive the claim:
            # give the event back to the Broker, which retries it.
            log.warning("Notification retry would exceed its time budget", extra={"channel": channel, "attempt": attempt, "wait_s": wait})
            break
        if attempt < max_attempts:
            log.warning("Notification failed, retrying", extra={"channel": channel, "attempt": attempt, "status": last.status, "wait_s": wait})
            time.sleep(wait)
            delay *= 2
    log.error("Notification failed after retries", extra={"channel": channel, "attempts": last.attempts, "status": last.status, "error": last.error})
    return last
