"""Sending one notification: a timeout on every call, exponential backoff on
transport errors, ``429`` (honouring ``Retry-After``) and ``5xx``, and no
retry on any other ``4xx`` (it will not get better)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import requests

log = logging.getLogger("delivery")


@dataclass
class Delivery:
    ok: bool
    status: int | None
    attempts: int
    error: str | None = None
    body: str = ""


def _retry_after(response: requests.Response, fallback: float, cap: float) -> float:
    raw = response.headers.get("Retry-After", "")
    try:
        return min(max(float(raw), 0.0), cap)
    except ValueError:
        return min(fallback, cap)


def send(
    http: requests.Session,
    url: str,
    payload: dict,
    channel: str,
    timeout: float,
    max_attempts: int,
    max_retry_after: float,
    base_delay: float = 0.5,
) -> Delivery:
    delay = base_delay
    last = Delivery(False, None, 0, "not attempted")
    for attempt in range(1, max_attempts + 1):
        try:
            response = http.post(url, json=payload, timeout=timeout)
        except requests.RequestException as exc:
            last = Delivery(False, None, attempt, f"{type(exc).__name__}: {str(exc)[:200]}")
            wait = delay
        else:
            body = response.text[:500]
            if 200 <= response.status_code < 300:
                return Delivery(True, response.status_code, attempt, None, body)
            last = Delivery(False, response.status_code, attempt, f"HTTP {response.status_code}: {body[:200]}", body)
            if response.status_code == 429:
                wait = _retry_after(response, delay, max_retry_after)
            elif response.status_code >= 500:
                wait = delay
            else:
                # The URL is the secret for Slack, the key is in the body for
                # PagerDuty: log the status, never the request.
                log.error("Notification refused", extra={"channel": channel, "status": response.status_code, "response": body[:200]})
                return last
        if attempt < max_attempts:
            log.warning("Notification failed, retrying", extra={"channel": channel, "attempt": attempt, "status": last.status, "wait_s": wait})
            time.sleep(wait)
            delay *= 2
    log.error("Notification failed after retries", extra={"channel": channel, "attempts": last.attempts, "status": last.status, "error": last.error})
    return last
