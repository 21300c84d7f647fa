"""``incident.opened`` in, diagnostics stored, ``incident.diagnosed`` out."""

from __future__ import annotations

import logging

from cloudevents.http import CloudEvent
from flask import Response

from functions.diagnostics.collector import Collector
from shared import claims, db, events, eventio, incidents
from shared.config import Settings

log = logging.getLogger("diagnostics")


def summarise(diagnostics: dict) -> dict:
    """A short view for the timeline and for the people paged."""
    summary: dict = {}
    pods = diagnostics.get("pods")
    if isinstance(pods, dict) and "error" not in pods:
        summary["pods"] = {name: {k: v.get(k) for k in ("ready", "status")} for name, v in pods.items() if isinstance(v, dict)}
    else:
        summary["pods"] = pods
    for section in ("metrics", "dependencies"):
        summary[section] = diagnostics.get(section)
    return summary


class DiagnosticsHandler:
    def __init__(self, config: Settings, collector: Collector):
        self.config = config
        self.collector = collector

    def handle(self, event: CloudEvent) -> Response:
        incident_id = eventio.incident_id_of(event)
        with db.transaction() as conn:
            step = claims.begin_step(conn, "diagnostics", incident_id, self.config.diagnostics_deadline_seconds * 3)
        if step.state == "skip":
            status = step.incident["status"] if step.incident else "missing"
            log.info("Diagnostics skipped: incident is %s" % status, extra={"incident_id": incident_id})
            return eventio.ack()
        if step.state == "replay":
            log.info("Diagnostics already stored; replying again", extra={"incident_id": incident_id})
            return self._reply(incident_id)
        incident, key = step.incident, step.key

        log.info("Running diagnostics", extra={"incident_id": incident_id, "alert_name": incident["alert_name"]})
        try:
            with db.transaction() as conn:
                incidents.mark_investigating(conn, incident_id, "diagnostics")
            diagnostics = self.collector.collect(incident)
            with db.transaction() as conn:
                incidents.store_diagnostics(conn, incident_id, diagnostics)
                incidents.add_timeline(
                    conn, incident_id, "diagnosed", {"summary": summarise(diagnostics), "durations_ms": diagnostics["durations_ms"]}, "diagnostics"
                )
                claims.complete(conn, key)
        except Exception:
            with db.transaction() as conn:
                claims.release(conn, key)
            raise
        log.info("Diagnostics stored", extra={"incident_id": incident_id, "durations_ms": diagnostics["durations_ms"]})
        return self._reply(incident_id)

    def _reply(self, incident_id: str) -> Response:
        with db.engine().connect() as conn:
            incident = incidents.require_incident(conn, incident_id)
        return eventio.reply(
            events.INCIDENT_DIAGNOSED,
            incident,
            self.config.event_source,
            {"diagnostics": incident.get("diagnostics") or {}},
        )
