"""Transactional outbox: events are written with the change they announce
and published to the Broker (``K_SINK``) after the commit.

Publishing claims rows with ``FOR UPDATE SKIP LOCKED``, so the post-commit
drain and the periodic sweep (and any number of replicas) never send the
same row at once; a row is marked published only after the Broker answered
``2xx``. A crash between the send and the mark re-sends the same event id,
which subscribers recognise as a duplicate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Iterable

import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from sqlalchemy.engine import Connection, Engine

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


@dataclass
class PublishReport:
    published: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending_left: int = 0


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


def post_event(http: requests.Session, sink: str, event: CloudEvent, timeout: float) -> None:
    """Send one event in binary mode; raise on anything but ``2xx``."""
    headers, body = to_binary(event)
    try:
        response = http.post(sink, headers=headers, data=body, timeout=timeout)
    except requests.ConnectionError:
        # A pooled keep-alive connection the Broker has closed fails on first
        # use; one fresh attempt tells that apart from a Broker that is down.
        # The event id is stable, so a rare double delivery is recognisable.
        response = http.post(sink, headers=headers, data=body, timeout=timeout)
    if not 200 <= response.status_code < 300:
        raise RuntimeError(f"broker answered {response.status_code}: {response.text[:200]}")


UTC_NOW = "timezone('utc', now())"


def _claim(bind: Engine, ids: list[str] | None, limit: int, lease_seconds: float) -> list:
    """Lease up to ``limit`` unpublished events (oldest first) in one short
    transaction; rows another publisher leases are skipped, not waited for."""
    where = f"published_at IS NULL AND (claimed_until IS NULL OR claimed_until < {UTC_NOW})"
    params: dict = {"limit": limit, "lease": lease_seconds}
    if ids is not None:
        where += " AND id = ANY(:ids)"
        params["ids"] = ids
    with bind.begin() as conn:
        rows = conn.execute(
            sa.text(
                f"UPDATE event_outbox SET claimed_until = {UTC_NOW} + make_interval(secs => :lease) "
                f"WHERE id IN (SELECT id FROM event_outbox WHERE {where} ORDER BY created_at, id "
                "LIMIT :limit FOR UPDATE SKIP LOCKED) "
                "RETURNING id, type, source, subject, extensions, data, created_at"
            ),
            params,
        ).all()
    return sorted(rows, key=lambda r: (r.created_at, r.id))


def _settle(bind: Engine, event_id: str, error: str | None, attempted: bool = True) -> None:
    """Record one outcome and give the lease back."""
    with bind.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE event_outbox SET claimed_until = NULL, "
                "attempts = attempts + CASE WHEN CAST(:attempted AS boolean) THEN 1 ELSE 0 END, "
                f"last_error = CAST(:error AS text), published_at = CASE WHEN CAST(:error AS text) IS NULL THEN {UTC_NOW} END "
                "WHERE id = :id"
            ),
            {"id": event_id, "error": error, "attempted": attempted},
        )


def publish_pending(
    bind: Engine,
    sink: str,
    timeout: float = 5.0,
    ids: Iterable[str] | None = None,
    limit: int = 200,
    http: requests.Session | None = None,
) -> PublishReport:
    """Send unpublished events (all, or only ``ids``), oldest first.

    The rows are leased in one transaction and posted outside it, so no
    database transaction waits on the Broker. A publisher that dies keeps its
    lease until it expires; the next sweep then sends those events (with the
    same ids, which subscribers recognise as duplicates).
    """
    report = PublishReport()
    id_list = list(ids) if ids is not None else None
    if id_list == [] or not sink:
        return report
    http = http or requests.Session()
    rows = _claim(bind, id_list, limit, lease_seconds=30 + 2 * timeout * limit)
    broker_down = False
    for row in rows:
        if broker_down:
            report.failed[row.id] = "not attempted: the broker is unreachable"
            _settle(bind, row.id, report.failed[row.id], attempted=False)
            continue
        try:
            post_event(http, sink, to_cloudevent(row), timeout)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried by the sweep
            error = f"{type(exc).__name__}: {exc}"[:500]
            report.failed[row.id] = error
            broker_down = isinstance(exc, requests.ConnectionError | requests.Timeout)
            _settle(bind, row.id, error)
            continue
        _settle(bind, row.id, None)
        report.published.append(row.id)
    if report.failed:
        log.warning(
            "Events not published; the sweep will retry",
            extra={"failed": len(report.failed), "first_error": next(iter(report.failed.values()))},
        )
    return report


def pending_count(bind: Engine) -> int:
    with bind.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM event_outbox WHERE published_at IS NULL")).scalar_one()
