"""``/metrics`` computed from the database at scrape time.

The functions scale to zero and run as many replicas, so a counter kept in
a process would reset and split; the database is the only honest source.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared import db, stats

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
        for priority, status, count in stats.incidents_by_priority_status(conn):
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
        for action, success, dry_run, count in stats.remediation_actions(conn):
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
        for channel, outcome, count in stats.notifications(conn):
            family.add_metric([channel or "unknown", outcome], count)
        yield family

    def _time_to_resolve(self, conn):
        count, total, cumulative = stats.time_to_resolve(conn, TIME_TO_RESOLVE_BUCKETS)
        buckets = [(str(float(b)), c) for b, c in zip(TIME_TO_RESOLVE_BUCKETS, cumulative)] + [("+Inf", count)]
        family = HistogramMetricFamily(
            "incident_time_to_resolve_seconds", "Time from an incident's creation to its resolution."
        )
        family.add_metric([], buckets, float(total))
        yield family

    def _intake(self, conn):
        ignored = CounterMetricFamily("alerts_ignored", "Alerts the intake answered 'ignored', by reason.", labels=["alertname", "reason"])
        for name, reason, count in stats.ignored_alerts(conn):
            ignored.add_metric([name, reason], count)
        yield ignored
        dead = CounterMetricFamily("dead_letters", "Events the Broker could not deliver, recorded by the dead-letter function.")
        dead.add_metric([], stats.dead_letters(conn))
        yield dead
        pending = GaugeMetricFamily("outbox_pending_events", "Incident events not yet accepted by the Broker.")
        pending.add_metric([], stats.pending_events(conn))
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
