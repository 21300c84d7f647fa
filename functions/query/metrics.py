"""``/metrics`` computed from the database at scrape time.

The functions scale to zero and run as many replicas, so a counter kept in
a process would reset and split; the database is the only honest source.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared import backlog, clock, db, dead_letters, ignored_alerts, login_throttle, members, reconcile, stats
from shared.config import settings

TIME_TO_RESOLVE_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
ALERTS_PER_INCIDENT_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250)


class DatabaseCollector:
    def collect(self):
        with db.engine().connect() as conn:
            yield from self._incidents(conn)
            yield from self._remediation(conn)
            yield from self._escalations(conn)
            yield from self._time_to_resolve(conn)
            yield from self._alerts_per_incident(conn)
            yield from self._intake(conn)
            yield from self._correlation(conn)
            yield from self._noise(conn)
            yield from self._sign_in(conn)

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
        buckets = [(str(float(b)), c) for b, c in zip(TIME_TO_RESOLVE_BUCKETS, cumulative, strict=True)] + [("+Inf", count)]
        family = HistogramMetricFamily(
            "incident_time_to_resolve_seconds", "Time from an incident's creation to its resolution."
        )
        family.add_metric([], buckets, float(total))
        yield family

    def _alerts_per_incident(self, conn):
        count, total, cumulative = stats.alerts_per_incident(conn, ALERTS_PER_INCIDENT_BUCKETS)
        buckets = [(str(float(b)), c) for b, c in zip(ALERTS_PER_INCIDENT_BUCKETS, cumulative, strict=True)] + [("+Inf", count)]
        family = HistogramMetricFamily("incident_alerts", "Alerts folded into each incident: the first and its repeats.")
        family.add_metric([], buckets, float(total))
        yield family

    def _intake(self, conn):
        ignored = CounterMetricFamily(
            "alerts_ignored",
            f"Alerts the intake answered 'ignored', by reason; names past IGNORED_ALERTS_MAX_NAMES count as alertname=\"{ignored_alerts.OTHER}\".",
            labels=["alertname", "reason"])
        for name, reason, count in ignored_alerts.counts(conn):
            ignored.add_metric([name, reason], count)
        yield ignored
        yield from self._backlog(conn)

    def _correlation(self, conn):
        """The noise reduction, measured: alerts in, incidents out."""
        alerts, opened, merged = members.correlation_counts(conn)
        received = CounterMetricFamily("alerts_received", "Distinct firing alerts stored as members of an incident.")
        received.add_metric([], alerts)
        yield received
        incidents = CounterMetricFamily("incidents_opened", "Incidents opened, those merged into a later root included.")
        incidents.add_metric([], opened)
        yield incidents
        absorbed = CounterMetricFamily("incidents_merged", "Incidents merged into the incident of a root alert that arrived after them.")
        absorbed.add_metric([], merged)
        yield absorbed
        ratio = GaugeMetricFamily("alerts_per_incident", "alerts_received / incidents_opened (the noise reduction); NaN before any incident.")
        ratio.add_metric([], alerts / opened if opened else math.nan)
        yield ratio

    def _sign_in(self, conn):
        failures, held = login_throttle.summary(conn, login_throttle.Limits.of(settings()))
        yield GaugeMetricFamily("board_sign_in_failures", "Failed board sign-ins within the current limit windows (LOGIN_FAILURE_WINDOW_SECONDS).",
                                value=failures)
        yield GaugeMetricFamily("board_sign_in_limits_reached", "Sign-in budgets spent now (clients answered 429; 'all new browsers' counts as one).",
                                value=held)

    def _noise(self, conn):
        """What noise control keeps from a human right now, so a window left
        open or a storm of flapping alerts shows on a dashboard, and a
        pipeline whose Watchdog stopped shows before the sweep pages."""
        now = clock.now()
        held, flapping, windows = stats.noise(conn, now)
        for name, doc, value in (
            ("alerts_held_by_maintenance", "Alerts a maintenance window holds now (replayed when it ends).", held),
            ("alerts_flapping", "Alerts flapping now: their flips are on one incident's timeline instead of paging.", flapping),
            ("maintenance_windows_active", "Maintenance windows in force now.", windows),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        silence = GaugeMetricFamily("alerting_pipeline_heartbeat_age_seconds",
                                    "Seconds since each alerting pipeline's Watchdog (HEARTBEAT_ALERTNAMES) last arrived.", labels=["pipeline"])
        for key, age in stats.heartbeats(conn, now):
            silence.add_metric([key], age)
        yield silence

    def _backlog(self, conn):
        """What has not reached its consumer: the outbox, dead letters, and
        incidents stuck between steps (shared/reconcile.py)."""
        count, oldest = backlog.pending(conn)
        pending = GaugeMetricFamily("outbox_pending_events", "Incident events waiting for the Broker (not parked).")
        pending.add_metric([], count)
        yield pending
        age = GaugeMetricFamily("outbox_oldest_pending_age_seconds", "Age of the oldest event waiting for the Broker; 0 when none.")
        age.add_metric([], oldest)
        yield age
        parked = GaugeMetricFamily("outbox_parked_events", "Outbox events parked after too many failed attempts, waiting for a person.")
        parked.add_metric([], backlog.parked_count(conn))
        yield parked
        total, waiting = dead_letters.counts(conn)
        dead = CounterMetricFamily("dead_letters", "Events the Broker could not deliver, recorded by the dead-letter function.")
        dead.add_metric([], total)
        yield dead
        not_redriven = GaugeMetricFamily("dead_letters_not_redriven", "Dead letters not (yet) successfully re-driven.")
        not_redriven.add_metric([], waiting)
        yield not_redriven
        counts = reconcile.assess(conn, settings())
        stuck = GaugeMetricFamily("incidents_stuck", "Incidents whose step is still missing after every re-emission, by step.", labels=["step"])
        overdue = GaugeMetricFamily("incidents_reconciling", "Incidents whose step is overdue and whose event is being re-emitted, by step.", labels=["step"])
        for step in reconcile.STEPS:
            stuck.add_metric([step], counts.get((step, "stuck"), 0))
            overdue.add_metric([step], counts.get((step, "due"), 0) + counts.get((step, "waiting"), 0))
        yield stuck
        yield overdue


def build_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(DatabaseCollector())
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
