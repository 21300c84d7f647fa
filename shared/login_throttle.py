"""Failed board sign-ins, limited (table ``login_failures``, migration 0022).

In the database, not in a process: the query function runs as several
replicas that come and go with scale-to-zero, and a count kept in each
would multiply the limit by the replicas and forget it at every cold start.
The cost is one primary-key read per sign-in attempt and one write per
failure; a successful sign-in never waits or sleeps.

Three budgets, each a fixed window of ``LOGIN_FAILURE_WINDOW_SECONDS``:

- a browser that signed in here before carries a signed device cookie
  (functions/query/board.py) and is counted on its own, by that cookie:
  ``LOGIN_MAX_FAILURES`` per window, and never held by anyone else's
  failures;
- any other client is counted by its address (an IPv6 address by its /64,
  which one host usually owns whole): ``LOGIN_MAX_FAILURES`` per window;
- and all of those other clients together: ``LOGIN_MAX_FAILURES_TOTAL``
  per window, which bounds a guesser spread over many addresses.

The trade-off: the overall budget is a lockout an attacker can trigger, for
as long as the attack lasts, but only for browsers that never signed in
here; a person's usual browser keeps its own budget and signs in. (The API
with a personal token is not held by any of this.) A client held back is
answered 429 without its token being looked at, so guessing on while held
learns nothing, not even from a right guess.

Counting is check-then-record, not a reservation: requests in flight at the
same moment can pass the limit by at most their number, which keeps a
successful sign-in to one read."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

UTC_NOW = "timezone('utc', now())"
OVERALL = "all"

_HELD = sa.text(
    "SELECT client, failures, EXTRACT(EPOCH FROM window_start + make_interval(secs => :window) - "
    f"{UTC_NOW}) AS remaining FROM login_failures WHERE client IN :clients "
    f"AND window_start > {UTC_NOW} - make_interval(secs => :window)"
).bindparams(sa.bindparam("clients", expanding=True))
# Rows another failure is counting or purging are left to it: two failures
# never wait for each other's purge (nor deadlock over expired rows).
_PURGE = sa.text(
    "DELETE FROM login_failures WHERE client IN (SELECT client FROM login_failures "
    f"WHERE window_start <= {UTC_NOW} - make_interval(secs => :window) FOR UPDATE SKIP LOCKED)"
)
# A window that has passed starts again at this failure.
_COUNT = sa.text(
    f"INSERT INTO login_failures (client, window_start, failures) VALUES (:client, {UTC_NOW}, 1) "
    "ON CONFLICT (client) DO UPDATE SET "
    f"failures = CASE WHEN login_failures.window_start <= {UTC_NOW} - make_interval(secs => :window) THEN 1 "
    "ELSE login_failures.failures + 1 END, "
    f"window_start = CASE WHEN login_failures.window_start <= {UTC_NOW} - make_interval(secs => :window) THEN {UTC_NOW} "
    "ELSE login_failures.window_start END"
)


@dataclass(frozen=True)
class Limits:
    per_client: int
    overall: int
    window_seconds: int

    @classmethod
    def of(cls, config) -> "Limits":
        return cls(config.login_max_failures, config.login_max_failures_total, config.login_failure_window_seconds)


def client_address(remote_addr: str | None) -> str:
    """The address failures are counted by: the request's remote address,
    which the server takes from X-Forwarded-For behind ``TRUSTED_PROXY_HOPS``
    proxies (shared/serve.py). IPv6 by its /64."""
    address = remote_addr or "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:80]
    if parsed.version == 6:
        if parsed.ipv4_mapped:  # ::ffff:192.0.2.1 is 192.0.2.1
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def clients(address: str, device: str | None) -> list[str]:
    """The budgets an attempt counts against."""
    return [f"device:{device}"] if device else [f"address:{address}", OVERALL]


def held_for(conn: Connection, keys: list[str], limits: Limits) -> int | None:
    """Seconds until these clients may try again, or None when they may now."""
    wait = None
    for row in conn.execute(_HELD, {"clients": keys, "window": limits.window_seconds}).mappings():
        limit = limits.overall if row["client"] == OVERALL else limits.per_client
        if row["failures"] >= limit:
            wait = max(wait or 0, max(1, math.ceil(float(row["remaining"]))))
    return wait


def summary(conn: Connection, limits: Limits) -> tuple[int, int]:
    """For /metrics: failed sign-ins counted in the current windows (each
    once, by its client), and how many budgets are spent now (the overall one
    included): a guesser at work shows as a rise in both."""
    failures = held = 0
    for row in conn.execute(sa.text(
            f"SELECT client, failures FROM login_failures WHERE window_start > {UTC_NOW} - make_interval(secs => :window)"),
            {"window": limits.window_seconds}).mappings():
        failures += row["failures"] if row["client"] != OVERALL else 0
        held += row["failures"] >= (limits.overall if row["client"] == OVERALL else limits.per_client)
    return failures, held


def record_failure(conn: Connection, keys: list[str], limits: Limits) -> None:
    conn.execute(_PURGE, {"window": limits.window_seconds})
    for key in keys:
        conn.execute(_COUNT, {"client": key, "window": limits.window_seconds})
