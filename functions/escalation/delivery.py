"""Sending one notification: a timeout on every call, exponential backoff on
transport errors and on the answers the channel says are worth a retry
(``429``, honouring ``Retry-After``, and ``5xx`` by default), and no retry on
any other answer (it will not get better).

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

from shared.log import scrub

log = logging.getLogger("delivery")
BASE_DELAY = 0.5


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
    the message (which names the URL)."""
    kind = type(exc).__name__
    if isinstance(exc, requests.Timeout):
        return f"{kind}: no answer within {timeout:g}s"
    root = exc
    seen = set()
    while (nxt := root.__cause__ or root.__context__ or _reason(root)) is not None and id(nxt) not in seen:
        seen.add(id(root))
        root = nxt
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
) -> Delivery:
    """POST ``payload`` (a dict as JSON, or bytes as they are: a signature
    may cover them) until it is accepted, refused, or the budget is spent."""
    deadline = time.monotonic() + worst_case_seconds(timeout, max_attempts, base_delay)
    delay = base_delay
    last = Delivery(False, None, 0, "not attempted")
    for attempt in range(1, max_attempts + 1):
        try:
            # Never follow a redirect: requests turns a POST answered 301/302
            # into a GET, whose 200 (a login page) is no page accepted, and a
            # 307 re-posts the routing key in the body to wherever it points.
            if isinstance(payload, bytes):
                response = http.post(url, data=payload, headers=headers, timeout=timeout, allow_redirects=False)
            else:
                response = http.post(url, json=payload, headers=headers, timeout=timeout, allow_redirects=False)
        except requests.RequestException as exc:
            last = Delivery(False, None, attempt, describe_failure(exc, timeout))
            wait = delay
        else:
            body = response.text[:500]
            if 200 <= response.status_code < 300:
                return Delivery(True, response.status_code, attempt, None, body)
            last = Delivery(False, response.status_code, attempt, scrub(f"HTTP {response.status_code}: {body[:200]}"), body)
            if retry(response.status_code):
                wait = _retry_after(response, delay, max_retry_after) if response.status_code == 429 else delay
            else:
                # The URL is the secret for Slack and Teams, the key is in the
                # body for PagerDuty: log the status, never the request.
                log.error("Notification refused", extra={"channel": channel, "status": response.status_code, "response": scrub(body, 200)})
                return last
        remaining = deadline - time.monotonic() - timeout
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
