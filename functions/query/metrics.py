"""``/metrics`` computed from the database at scrape time.

The functions scale to zero and run as many replicas, so a counter kept in
a process would reset and split; the database is the only honest source.
"""

from __future__ import annotations

import math

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared import db

TIME_TO_RESOLVE_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


class DatabaseCollector:
    def collect(self):
        with db.engine().connect() as conn:
            yield from self._incidents(conn)
            yield from self._remediation(conn)
            yield from self._escalations(conn)
            yield from self._time_to_resolve(conn)
            yield from self._intake(conn)

    def _incidents(self, conn):
        total = GaugeMetricFamily("incidents_total", "Incidents by priority and current status.", labels=["priority", "status"])
        open_ = GaugeMetricFamily("incidents_open", "Incidents still open or investigating, by priority.", labels=["priority"])
        counts = {(p, s): 0 for p in ("P0", "P1", "P2") for s in ("open", "investigating", "resolved", "closed")}
        for priority, status, count in conn.execute(
            sa.text("SELECT priority, status, count(*) FROM incidents WHERE priority IS NOT NULL AND status IS NOT NULL GROUP BY 1, 2")
        ):
            counts[(priority, status)] = count
        for (priority, status), count in sorted(counts.items()):
            total.add_metric([priority, status], count)
        for priority in ("P0", "P1", "P2"):
            open_.add_metric([priority], counts[(priority, "open")] + counts[(priority, "investigating")])
        yield total
        yield open_

    def _remediation(self, conn):
        actions = CounterMetricFamily(
            "remediation_actions", "Remediation actions recorded, by action, outcome and mode.", labels=["action", "success", "dry_run"]
        )
        live_total = live_ok = 0
        rows = conn.execute(
            sa.text(
                "SELECT a->>'action', COALESCE(a->>'success', 'false'), COALESCE(a->>'dry_run', 'false'), count(*) "
                "FROM incidents, jsonb_array_elements(CAST(remediation_actions AS jsonb)) AS a "
                "WHERE remediation_actions IS NOT NULL AND json_typeof(remediation_actions) = 'array' GROUP BY 1, 2, 3"
            )
        )
        for action, success, dry_run, count in rows:
            actions.add_metric([action or "unknown", success, dry_run], count)
            if dry_run != "true":
                live_total += count
                live_ok += count if success == "true" else 0
        yield actions
        rate = GaugeMetricFamily(
            "remediation_success_rate",
            "Share of live (not dry-run) remediation actions that succeeded, 0-1; NaN before any ran.",
        )
        rate.add_metric([], live_ok / live_total if live_total else math.nan)
        yield rate

    def _escalations(self, conn):
        family = CounterMetricFamily("escalations", "Notifications by channel and outcome.", labels=["channel", "outcome"])
        for channel, outcome, count in conn.execute(
            sa.text(
                "SELECT details->>'channel', COALESCE(details->>'outcome', 'sent'), count(*) FROM incident_timeline "
                "WHERE kind = 'notification' GROUP BY 1, 2"
            )
        ):
            family.add_metric([channel or "unknown", outcome], count)
        yield family

    def _time_to_resolve(self, conn):
        filters = ", ".join(f"count(*) FILTER (WHERE d <= {b})" for b in TIME_TO_RESOLVE_BUCKETS)
        row = conn.execute(
            sa.text(
                f"SELECT count(*), COALESCE(sum(d), 0), {filters} FROM ("
                "SELECT EXTRACT(EPOCH FROM (resolved_at - created_at)) AS d FROM incidents "
                "WHERE resolved_at IS NOT NULL AND created_at IS NOT NULL) AS t"
            )
        ).one()
        count, total, *cumulative = row
        buckets = [(str(float(b)), c) for b, c in zip(TIME_TO_RESOLVE_BUCKETS, cumulative)] + [("+Inf", count)]
        family = HistogramMetricFamily(
            "incident_time_to_resolve_seconds", "Time from an incident's creation to its resolution."
        )
        family.add_metric([], buckets, float(total))
        yield family

    def _intake(self, conn):
        ignored = CounterMetricFamily("alerts_ignored", "Alerts the intake answered 'ignored', by reason.", labels=["alertname", "reason"])
        for name, reason, count in conn.execute(sa.text("SELECT alert_name, reason, count FROM ignored_alerts")):
            ignored.add_metric([name, reason], count)
        yield ignored
        dead = CounterMetricFamily("dead_letters", "Events the Broker could not deliver, recorded by the dead-letter function.")
        dead.add_metric([], conn.execute(sa.text(
            "SELECT (SELECT count(*) FROM dead_letters) + (SELECT count(*) FROM incident_timeline WHERE kind = 'dead_letter')"
        )).scalar_one())
        yield dead
        pending = GaugeMetricFamily("outbox_pending_events", "Incident events not yet accepted by the Broker.")
        pending.add_metric([], conn.execute(sa.text("SELECT count(*) FROM event_outbox WHERE published_at IS NULL")).scalar_one())
        yield pending


def build_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(DatabaseCollector())
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
