"""Transactional outbox: events are written with the change they announce
and published to the Broker (``K_SINK``) after the commit.

Publishing leases small batches of rows (``FOR UPDATE SKIP LOCKED``, then a
short ``claimed_until``), so the post-commit drain and the periodic sweep (and
any number of replicas) never send the same row at once, and a publisher
that dies holds its rows for one short lease only. A row is marked published
only after the Broker answered ``2xx``; a crash between the send and the mark
re-sends the same event id, which subscribers recognise as a duplicate.

Only due rows are claimed, P0 first, then oldest. A row that fails waits
(exponential backoff in ``next_attempt_at``) behind the others, and after
``OUTBOX_MAX_ATTEMPTS`` failed attempts it is parked (``parked_at``): no
longer retried, logged at error level, counted and re-drivable (clearing
``parked_at`` and ``next_attempt_at`` and zeroing ``attempts`` re-queues it).
A Broker that cannot be reached at all says nothing about the event, so
that is not counted against the row; neither is a ``K_SINK`` no request can
be made to (a host name label over 63 characters, no scheme), which stops
the drain at once and is logged at error level.

    pending = published_at IS NULL AND parked_at IS NULL
    parked  = published_at IS NULL AND parked_at IS NOT NULL
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
import time
from typing import TYPE_CHECKING, Iterable

import sqlalchemy as sa
from cloudevents.http import CloudEvent
from sqlalchemy.engine import Connection, Engine

from shared import eventio

if TYPE_CHECKING:
    import requests

log = logging.getLogger("outbox")

# {rows} names the bind parameter, so callers can fold this insert into a
# larger statement (one round trip for an incident's records and its events).
INSERT_SQL = """
    INSERT INTO event_outbox (id, type, source, subject, extensions, data)
    SELECT x.id, x.type, x.source, x.subject, x.extensions, x.data
    FROM jsonb_to_recordset(CAST(:{rows} AS jsonb))
         AS x(id text, type text, source text, subject text, extensions jsonb, data jsonb)
    ON CONFLICT (id) DO NOTHING
"""
INSERT_SQL = " ".join(INSERT_SQL.split())
_INSERT = sa.text(INSERT_SQL.format(rows="rows"))


def serialise(events: Iterable[dict]) -> str:
    return json.dumps(list(events), default=str)


def enqueue(conn: Connection, events: Iterable[dict]) -> None:
    """Add events to the outbox inside the caller's transaction (one statement)."""
    rows = list(events)
    if rows:
        conn.execute(_INSERT, {"rows": serialise(rows)})


# Batches are small and leased briefly: a publisher that dies after leasing
# delays those events by at most one lease. The lease covers a batch's sends
# (each bounded as a whole by the timeout, twice when a kept-alive connection was
# stale); a publisher stops sending from a batch whose lease is running out
# and hands the rest back.
BATCH_SIZE = 50
MAX_ATTEMPTS = 8
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 300.0


def lease_seconds(timeout: float) -> float:
    """3 s plus three sends' worth: 18 s for the default 5 s timeout."""
    return 3.0 + 3.0 * timeout


@dataclass
class PublishReport:
    published: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    parked: list[str] = field(default_factory=list)
    pending_left: int = 0
    broker_unreachable: bool = False
    broker_error: str | None = None  # why it could not be reached (failed leaves those events out)
    sink_unusable: bool = False  # K_SINK (or the proxy setting) is no URL a request can be made to: logged as that


def to_cloudevent(row) -> CloudEvent:
    attributes = {
        "id": row.id,
        "type": row.type,
        "source": row.source,
        "time": row.created_at.isoformat() + "Z",
        "datacontenttype": "application/json",
    }
    if row.subject:
        attributes["subject"] = row.subject
    attributes.update(row.extensions or {})
    return CloudEvent(attributes, row.data)


class BrokerAnswered(RuntimeError):
    """The Broker answered, but not ``2xx``."""


# Only the start of a refusal is kept (in last_error): the rest is not read.
ANSWER_MAX_BYTES = 4096


def post_event(http: requests.Session, sink: str, event: CloudEvent, timeout: float) -> None:
    """Send one event in binary mode; raise on anything but ``2xx``.

    ``timeout`` bounds each send as a whole (name lookup, connect, TLS
    handshake, send and the whole answer, :mod:`shared.deadline`): a Broker, or a proxy before it, that
    trickles its answer is cut off at the timeout (a ``ReadTimeout``, a
    failed attempt) instead of holding the drain and every event behind it.
    A ``2xx`` is a publish even when the rest of its answer is cut off: the
    Broker has the event. An answer whose connection drops inside its body
    is a ``ChunkedEncodingError``, a failed attempt (the Broker was reached,
    for the batch as for a refusal), not a dropped kept-alive connection to
    retry at once."""
    import requests  # a sending process only: the others write the outbox and never send

    from shared import deadline

    headers, body = eventio.to_http(event)

    def post() -> requests.Response:
        # A redirect is an answer, not a delivery: followed, a 302 would turn
        # the POST into a GET whose 200 marked the event published though no
        # Broker took it.
        # partial_2xx: a 2xx is the Broker's yes, however its answer ends
        # (headers or body cut off at the bound, the connection dropped
        # inside the body); sending the event again would publish it twice.
        return deadline.request(http, "POST", sink, timeout, ANSWER_MAX_BYTES, partial_2xx=True, headers=headers,
                                data=body, allow_redirects=False)

    try:
        response = post()
    except requests.ConnectionError as exc:
        # A pooled keep-alive connection the Broker has closed fails on first
        # use; one fresh attempt tells that apart from a Broker that is down.
        # The event id is stable, so a rare double delivery is recognisable.
        # An error after an answer (TLS failing inside a refusal's body: an
        # SSLError is a ConnectionError) is that answer's, not sent again.
        if deadline.answered(exc):
            raise
        response = post()
    cut_short = getattr(response, "cut_short", None)
    if cut_short is not None:
        log.info("Broker said 2xx and its answer was cut off; the event is published",
                 extra={"event_id": event["id"], "status": response.status_code, "error": type(cut_short).__name__})
    if not 200 <= response.status_code < 300:
        raise BrokerAnswered(f"broker answered {response.status_code}: {deadline.answer_text(response)[:200]}")


UTC_NOW = "timezone('utc', now())"
PENDING = "published_at IS NULL AND parked_at IS NULL"
PARKED = "published_at IS NULL AND parked_at IS NOT NULL"
_DUE = f"{PENDING} AND (claimed_until IS NULL OR claimed_until < {UTC_NOW}) " \
       f"AND (next_attempt_at IS NULL OR next_attempt_at <= {UTC_NOW})"


def _claim(bind: Engine, ids: list[str] | None, limit: int, lease: float) -> list:
    """Lease up to ``limit`` due events, P0 first, then oldest, in one short
    transaction; rows another publisher leases are skipped, not waited for."""
    where = _DUE
    params: dict = {"limit": limit, "lease": lease}
    if ids is not None:
        where += " AND id = ANY(:ids)"
        params["ids"] = ids
    with bind.begin() as conn:
        rows = conn.execute(
            sa.text(
                f"UPDATE event_outbox SET claimed_until = {UTC_NOW} + make_interval(secs => :lease) "
                f"WHERE id IN (SELECT id FROM event_outbox WHERE {where} "
                "ORDER BY (extensions->>'priority' = 'p0') IS NOT TRUE, created_at, id "
                "LIMIT :limit FOR UPDATE SKIP LOCKED) "
                "RETURNING id, type, source, subject, extensions, data, created_at, attempts"
            ),
            params,
        ).all()
    return sorted(rows, key=lambda r: ((r.extensions or {}).get("priority") != "p0", r.created_at, r.id))


def _mark_published(bind: Engine, ids: list[str]) -> None:
    if ids:
        with bind.begin() as conn:
            conn.execute(
                sa.text(f"UPDATE event_outbox SET claimed_until = NULL, last_error = NULL, next_attempt_at = NULL, "
                        f"published_at = {UTC_NOW} WHERE id = ANY(:ids)"),
                {"ids": ids},
            )


def _release(bind: Engine, ids: list[str], error: str | None = None) -> None:
    """Hand leased rows back untried (still due, nothing counted)."""
    if ids:
        with bind.begin() as conn:
            conn.execute(
                sa.text("UPDATE event_outbox SET claimed_until = NULL, "
                        "last_error = COALESCE(CAST(:error AS text), last_error) WHERE id = ANY(:ids)"),
                {"ids": ids, "error": error},
            )


def _fail(bind: Engine, row, error: str, max_attempts: int) -> bool:
    """Count one failed attempt: back off, or park at the limit. True if parked."""
    with bind.begin() as conn:
        parked = conn.execute(
            sa.text(
                "UPDATE event_outbox SET claimed_until = NULL, attempts = attempts + 1, last_error = :error, "
                f"parked_at = CASE WHEN attempts + 1 >= :max THEN {UTC_NOW} END, "
                f"next_attempt_at = CASE WHEN attempts + 1 >= :max THEN NULL ELSE {UTC_NOW} + "
                "make_interval(secs => LEAST(:cap, :base * power(2, LEAST(attempts, 30)))) END "
                "WHERE id = :id RETURNING parked_at IS NOT NULL, attempts"
            ),
            {"id": row.id, "error": error, "max": max_attempts, "base": BACKOFF_BASE_SECONDS, "cap": BACKOFF_MAX_SECONDS},
        ).first()
    if parked and parked[0]:
        log.error(
            "Outbox event parked: not retried until re-driven",
            extra={"event_id": row.id, "event_type": row.type, "incident_id": row.subject, "attempts": parked[1], "error": error},
        )
        return True
    return False


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class _Batch:
    """Sends one leased batch and settles every row of it."""

    def __init__(self, bind: Engine, sink: str, timeout: float, http: requests.Session, max_attempts: int,
                 report: PublishReport, lease: float):
        self.bind, self.sink, self.timeout, self.http = bind, sink, timeout, http
        self.max_attempts, self.report, self.lease = max_attempts, report, lease

    def _failed(self, row, error: str) -> None:
        self.report.failed[row.id] = error
        if _fail(self.bind, row, error, self.max_attempts):
            self.report.parked.append(row.id)

    def _unreachable(self, error: str) -> None:
        self.report.broker_unreachable = True
        self.report.broker_error = self.report.broker_error or error

    def send(self, rows: list) -> None:
        import requests

        from shared.deadline import UNUSABLE_URL, answered as reached, unusable_setting

        leased_at = time.monotonic()
        published: list[str] = []
        unreached: list = []  # refused before the Broker said anything about them
        answered = False
        for index, row in enumerate(rows):
            if time.monotonic() - leased_at + 2 * self.timeout + 1 > self.lease:
                _release(self.bind, [r.id for r in rows[index:]])
                break
            try:
                post_event(self.http, self.sink, to_cloudevent(row), self.timeout)
            except UNUSABLE_URL as exc:
                # K_SINK is no URL a request can be made to (a host name
                # label over 63 characters, no scheme): a setting to fix,
                # nothing about the events. As with a Broker that cannot be
                # reached, nothing is counted, the rows stay due and the
                # drain stops; said at error level, since no retry mends it.
                error = _describe(exc)
                setting = unusable_setting(exc, "K_SINK")
                log.error(f"{setting} is not a URL an event can be sent to; events stay in the outbox", extra={"error": error})
                self.report.sink_unusable = True
                self._unreachable(error)
                _release(self.bind, [r.id for r, _ in unreached] + [row.id], error)
                _release(self.bind, [r.id for r in rows[index + 1:]])
                unreached = []
                break
            except requests.ConnectionError as exc:
                if answered or reached(exc):
                    # The Broker took other events a moment ago, or answered
                    # this one (an SSLError inside its body is a
                    # ConnectionError too): this one is the problem.
                    answered = answered or reached(exc)
                    self._failed(row, _describe(exc))
                    continue
                unreached.append((row, _describe(exc)))
                if len(unreached) >= 2:
                    self._unreachable(unreached[0][1])
                    _release(self.bind, [r.id for r, _ in unreached], unreached[0][1])
                    _release(self.bind, [r.id for r in rows[index + 1:]])
                    unreached = []
                    break
                continue
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried later
                # Reached: a refusal, or an answer whose body broke (dropped,
                # undecodable, cut at the bound), which carries its response.
                answered = answered or isinstance(exc, BrokerAnswered) or reached(exc)
                self._failed(row, _describe(exc))
                continue
            answered = True
            published.append(row.id)
        for row, error in unreached:
            if answered:  # refused while the Broker took the next event: the row's own failure
                self._failed(row, error)
            else:
                _release(self.bind, [row.id], error)
                self._unreachable(error)
        _mark_published(self.bind, published)
        self.report.published += published


def publish_pending(
    bind: Engine,
    sink: str,
    timeout: float = 5.0,
    ids: Iterable[str] | None = None,
    limit: int | None = None,
    http: requests.Session | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    deadline: float | None = None,
    batch_size: int = BATCH_SIZE,
) -> PublishReport:
    """Send due events (all, or only ``ids``) in leased batches, P0 first,
    until none is due, ``limit`` were tried, the monotonic ``deadline``
    passed, or the Broker cannot be reached.

    No database transaction is open while the Broker is waited for.
    """
    report = PublishReport()
    id_list = list(ids) if ids is not None else None
    if id_list == [] or not sink:
        return report
    if http is None:
        import requests

        from shared.deadline import bounded

        http = bounded(requests.Session())
    lease = lease_seconds(timeout)
    batch = _Batch(bind, sink, timeout, http, max_attempts, report, lease)
    tried = 0
    while limit is None or tried < limit:
        if deadline is not None and time.monotonic() >= deadline:
            break
        size = batch_size if limit is None else min(batch_size, limit - tried)
        rows = _claim(bind, id_list, size, lease)
        if not rows:
            break
        tried += len(rows)
        batch.send(rows)
        if report.broker_unreachable:
            break
    if report.broker_unreachable and not report.sink_unusable:
        # Not counted against any event, so not in failed: without this line
        # an outage would be silent. (An unusable K_SINK was logged as such.)
        log.warning("Broker unreachable; events stay in the outbox", extra={"first_error": report.broker_error})
    if report.failed:
        log.warning(
            "Events not published; they are retried later",
            extra={"failed": len(report.failed), "parked": len(report.parked), "first_error": next(iter(report.failed.values()))},
        )
    return report


def pending_count(bind: Engine) -> int:
    with bind.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM event_outbox WHERE {PENDING}")).scalar_one()


def parked_count(bind: Engine) -> int:
    with bind.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM event_outbox WHERE {PARKED}")).scalar_one()
