"""Aggregates for ``/metrics``, computed from the database at scrape time
(the functions scale to zero, so process counters would lie)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def incidents_by_priority_status(conn: Connection) -> list[tuple[str, str, int]]:
    return conn.execute(sa.text(
        "SELECT priority, status, count(*) FROM incidents WHERE priority IS NOT NULL AND status IS NOT NULL GROUP BY 1, 2"
    )).all()


def remediation_actions(conn: Connection) -> list[tuple[str, str, str, int]]:
    """(action, success, dry_run, count) over every recorded action."""
    return conn.execute(sa.text(
        "SELECT a->>'action', COALESCE(a->>'success', 'false'), COALESCE(a->>'dry_run', 'false'), count(*) "
        "FROM incidents, jsonb_array_elements(CAST(remediation_actions AS jsonb)) AS a "
        "WHERE remediation_actions IS NOT NULL AND json_typeof(remediation_actions) = 'array' GROUP BY 1, 2, 3"
    )).all()


def notifications(conn: Connection) -> list[tuple[str, str, int]]:
    return conn.execute(sa.text(
        "SELECT details->>'channel', COALESCE(details->>'outcome', 'sent'), count(*) FROM incident_timeline "
        "WHERE kind = 'notification' GROUP BY 1, 2"
    )).all()


def time_to_resolve(conn: Connection, buckets: tuple[float, ...]) -> tuple[int, float, list[int]]:
    """Count, sum (seconds) and cumulative counts per upper bound."""
    filters = ", ".join(f"count(*) FILTER (WHERE d <= {float(b)})" for b in buckets)
    count, total, *cumulative = conn.execute(sa.text(
        f"SELECT count(*), COALESCE(sum(d), 0), {filters} FROM ("
        "SELECT EXTRACT(EPOCH FROM (resolved_at - created_at)) AS d FROM incidents "
        "WHERE resolved_at IS NOT NULL AND created_at IS NOT NULL) AS t"
    )).one()
    return count, float(total), list(cumulative)


def alerts_per_incident(conn: Connection, buckets: tuple[float, ...]) -> tuple[int, float, list[int]]:
    """Alerts folded into each incident (the first plus its repeats): count
    of incidents, sum of alerts, cumulative counts per upper bound."""
    filters = ", ".join(f"count(*) FILTER (WHERE n <= {float(b)})" for b in buckets)
    count, total, *cumulative = conn.execute(sa.text(
        f"SELECT count(*), COALESCE(sum(n), 0), {filters} FROM (SELECT repeat_count + 1 AS n FROM incidents) AS t"
    )).one()
    return count, float(total), list(cumulative)


def dead_letters(conn: Connection) -> int:
    return conn.execute(sa.text(
        "SELECT (SELECT count(*) FROM dead_letters) + (SELECT count(*) FROM incident_timeline WHERE kind = 'dead_letter')"
    )).scalar_one()


def pending_events(conn: Connection) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM event_outbox WHERE published_at IS NULL")).scalar_one()


def noise(conn: Connection, now: datetime) -> tuple[int, int, int]:
    """(alerts held by maintenance windows, alerts flapping, windows in force)
    now: what noise control keeps from a human at this moment."""
    return tuple(conn.execute(sa.text(
        "SELECT (SELECT count(*) FROM suppressed_alerts WHERE released_at IS NULL), "
        "(SELECT count(*) FROM alert_flaps WHERE flapping_since IS NOT NULL), "
        "(SELECT count(*) FROM maintenance_windows WHERE starts_at <= :now AND ends_at > :now)"), {"now": now}).one())


def heartbeats(conn: Connection, now: datetime) -> list[tuple[str, float]]:
    """(pipeline key, seconds since its Watchdog was last seen)."""
    return [(key, max(0.0, float(age))) for key, age in conn.execute(sa.text(
        "SELECT key, EXTRACT(EPOCH FROM (:now - last_seen_at)) FROM heartbeats ORDER BY key"), {"now": now})]
