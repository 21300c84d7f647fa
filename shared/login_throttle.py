"""Failed board sign-ins, limited (table ``login_failures``, migration 0022).

In the database, not in a process: the query function runs as several
replicas that come and go with scale-to-zero, and a count kept in each
would multiply the limit by the replicas and forget it at every cold start.

What is limited is guessing the shared ``INCIDENT_API_TOKEN``, which an
operator chose. A person's own token (shared/users.py) is 256 random bits:
nobody guesses it, so answering it tells a guesser nothing, and it signs in
even while every budget here is spent (functions/query/board.py checks it
first). Whatever TRUSTED_PROXY_HOPS says, a person with their own token is
never locked out by someone else's typos.

Budgets, each a fixed window of ``LOGIN_FAILURE_WINDOW_SECONDS``:

- every client by its address (an IPv6 address by its /64, which one host
  usually owns whole): ``LOGIN_MAX_FAILURES`` per window;
- all clients without a device cookie together: ``LOGIN_MAX_FAILURES_TOTAL``
  per window, which bounds a guesser spread over many addresses;
- a browser that signed in here before carries a signed device cookie
  (functions/query/board.py) and has a budget of its own,
  ``LOGIN_MAX_FAILURES``, on top of its address's: it escapes only the
  overall budget, so minting device cookies (one per sign-in) buys no
  guesses beyond what the address already has.

The trade-off: the overall budget is a lockout an attacker can trigger, for
as long as the attack lasts, for shared-token sign-ins of browsers that
never signed in here; and every client behind one address shares that
address's budget (behind a wrong TRUSTED_PROXY_HOPS every client is one
address, docs/deploy.md). A client held back is answered 429 without its
token being judged, so guessing on while held learns nothing, not even from
a right guess.

Exact under concurrency: an attempt locks its budgets' rows (in one order,
so two attempts never wait for each other in a cycle), reads them, and
records its failure before the locks go, so requests in flight together
cannot pass a limit. The address comes first in that order and an attempt
stops at the first budget spent: a guesser held by its address's budget,
trying on at full speed, never queues on the overall budget's row, which
every new browser's sign-in locks. Only a failure is committed: a held attempt and a
right one leave nothing behind, and rows exist only while their window
lasts (each failure deletes a bounded batch of expired ones afterwards)."""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from shared import addresses

UTC_NOW = "timezone('utc', now())"
OVERALL = "all"

# Creates the budget's row if need be and locks it until the attempt ends;
# a window that has passed starts again now. Rolled back unless the attempt failed.
_LOCK = sa.text(
    f"INSERT INTO login_failures (client, window_start, failures) VALUES (:client, {UTC_NOW}, 0) "
    "ON CONFLICT (client) DO UPDATE SET "
    f"failures = CASE WHEN login_failures.window_start <= {UTC_NOW} - make_interval(secs => :window) THEN 0 "
    "ELSE login_failures.failures END, "
    f"window_start = CASE WHEN login_failures.window_start <= {UTC_NOW} - make_interval(secs => :window) THEN {UTC_NOW} "
    "ELSE login_failures.window_start END "
    f"RETURNING failures, EXTRACT(EPOCH FROM window_start + make_interval(secs => :window) - {UTC_NOW}) AS remaining"
)
_COUNT = sa.text("UPDATE login_failures SET failures = failures + 1 WHERE client IN :clients").bindparams(
    sa.bindparam("clients", expanding=True))
# Its own statement after the failure committed, never inside an attempt: it
# skips rows anyone holds and never waits, so it is in no lock cycle.
_PURGE = sa.text(
    "DELETE FROM login_failures WHERE client IN (SELECT client FROM login_failures "
    f"WHERE window_start <= {UTC_NOW} - make_interval(secs => :window) LIMIT :batch FOR UPDATE SKIP LOCKED)"
)
PURGE_BATCH = 500


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
    proxies (shared/serve.py), read as shared/addresses.py reads it (an
    IPv4-mapped address is its IPv4 address, whether it came from the socket
    or the header). IPv6 by its /64, its zone left out."""
    address = addresses.parse(remote_addr)
    if address is None:
        return (remote_addr or "unknown")[:80]
    if address.version == 6:
        return str(ipaddress.IPv6Network((int(address), 64), strict=False))
    return str(address)


def clients(address: str, device: str | None) -> list[str]:
    """The budgets an attempt counts against, in the order they are locked:
    the address's first (``address:`` sorts before ``all`` and ``device:``)."""
    return sorted([f"address:{address}", f"device:{device}" if device else OVERALL])


def judge(engine: Engine, keys: list[str], limits: Limits, right: bool) -> int | None:
    """Seconds until these clients may try again (the attempt is refused,
    whatever its token), or None: the attempt is judged, and counted as a
    failure unless ``right``. The first budget found spent, in the order
    they are locked, says how long: another may be spent longer, and then
    the retry is held again, for the rest of it."""
    with engine.connect() as conn:
        with conn.begin() as attempt:
            wait = None
            for key in keys:
                row = conn.execute(_LOCK, {"client": key, "window": limits.window_seconds}).one()
                if row.failures >= (limits.overall if key == OVERALL else limits.per_client):
                    # Refused whatever the rest say: the budgets after it are
                    # not locked, so a guesser held by its address's budget
                    # (first in the order) takes no lock on the overall one,
                    # which every new browser's sign-in needs.
                    wait = max(1, math.ceil(float(row.remaining)))
                    break
            if wait is not None or right:
                attempt.rollback()
                return wait
            conn.execute(_COUNT, {"clients": keys})
        with conn.begin():
            conn.execute(_PURGE, {"window": limits.window_seconds, "batch": PURGE_BATCH})
    return None


def summary(conn: Connection, limits: Limits) -> tuple[int, int]:
    """For /metrics: failed sign-ins counted in the current windows (each
    once, by its address), and how many budgets are spent now (the overall one
    included): a guesser at work shows as a rise in both."""
    failures = held = 0
    for row in conn.execute(sa.text(
            f"SELECT client, failures FROM login_failures WHERE window_start > {UTC_NOW} - make_interval(secs => :window)"),
            {"window": limits.window_seconds}).mappings():
        failures += row["failures"] if row["client"].startswith("address:") else 0
        held += row["failures"] >= (limits.overall if row["client"] == OVERALL else limits.per_client)
    return failures, held


class LogBudget:
    """At most ``per_window`` lines per ``window`` seconds in this process: a
    guesser held back at a thousand requests a second must not become a
    thousand log lines a second. The next line logged says how many were left out."""

    def __init__(self, per_window: int = 10, window: float = 60.0, clock=time.monotonic):
        self.per_window, self.window, self.clock = per_window, window, clock
        self._lock = threading.Lock()
        self._start = clock()
        self._logged = self._left_out = 0

    def take(self) -> int | None:
        """None: leave this line out; else how many were left out before it."""
        with self._lock:
            now = self.clock()
            if now - self._start >= self.window:
                self._start, self._logged = now, 0
            if self._logged >= self.per_window:
                self._left_out += 1
                return None
            self._logged += 1
            left_out, self._left_out = self._left_out, 0
            return left_out
