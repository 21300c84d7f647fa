"""``incident.opened`` in, diagnostics stored, ``incident.diagnosed`` out."""

from __future__ import annotations

import logging

from cloudevents.http import CloudEvent
from flask import Response

from functions.diagnostics.collector import Collector
from shared import claims, db, events, eventio, incidents
from shared.config import Settings

log = logging.getLogger("diagnostics")


TIMELINE_CAUSES = 3


def _pods_view(pods, keys) -> dict:
    if isinstance(pods, dict) and "error" not in pods:
        return {name: {k: v.get(k) for k in keys if k in v} for name, v in pods.items() if isinstance(v, dict)}
    return pods


def summarise(diagnostics: dict) -> dict:
    """A short view for the timeline and for the people paged."""
    summary: dict = {"pods": _pods_view(diagnostics.get("pods"), ("ready", "status"))}
    for section in ("metrics", "dependencies"):
        summary[section] = diagnostics.get(section)
    summary["probable_causes"] = [{k: c[k] for k in ("cause", "confidence", "summary")}
                                  for c in (diagnostics.get("probable_causes") or [])[:TIMELINE_CAUSES]]
    return summary


def event_view(diagnostics: dict) -> dict:
    """What ``incident.diagnosed`` carries: the conclusions and the small
    sections, not the logs and events (every consumer reads the incident)."""
    view = {k: diagnostics[k] for k in ("target", "window", "metrics", "dependencies", "probable_causes", "sources", "root")
            if k in diagnostics}
    view["pods"] = _pods_view(diagnostics.get("pods"), ("ready", "status", "restarts", "replicas"))
    return view


def root_of(incident: dict) -> dict:
    """The root alert a diagnosis is of: a stronger alert taking over as
    root (shared.correlation.store) raises ``root_generation``."""
    return {"alert_name": incident["alert_name"], "fingerprint": incident.get("fingerprint"),
            "root_generation": incident.get("root_generation") or 0}


def diagnosed_root_generation(diagnostics: dict, incident: dict) -> int:
    """The root generation a stored diagnosis is of. One written before
    migration 0017 (a diagnostics replica of the previous release during a
    rolling upgrade) names no root: it read the incident as it stood, so it
    is taken as of the incident's current root rather than left waiting
    for a diagnosis that replica will never write."""
    root = diagnostics.get("root") if isinstance(diagnostics, dict) else None
    if not isinstance(root, dict):
        return incident.get("root_generation") or 0
    return root.get("root_generation") or 0


class DiagnosticsHandler:
    def __init__(self, config: Settings, collector: Collector):
        self.config = config
        self.collector = collector

    def handle(self, event: CloudEvent) -> Response:
        incident_id = eventio.incident_id_of(event)
        generation, root_generation = eventio.generation_of(event), eventio.root_generation_of(event)
        with db.transaction() as conn:
            step = claims.begin_step(conn, "diagnostics", incident_id, self.config.diagnostics_deadline_seconds * 3,
                                     generation, root_generation)
        if step.state == "stale":
            # A late opening of a generation the incident has left: nothing to diagnose.
            log.info("Diagnostics skipped: stale event", extra={"incident_id": incident_id, "reason": step.reason})
            return eventio.ack()
        if step.state == "skip":
            status = step.incident["status"] if step.incident else "missing"
            log.info("Diagnostics skipped: incident is %s" % status, extra={"incident_id": incident_id})
            return eventio.ack()
        if step.state == "replay":
            log.info("Diagnostics already stored; replying again", extra={"incident_id": incident_id})
            return self._reply(step.incident, step.incident.get("diagnostics") or {})
        incident, key = step.incident, step.key

        log.info("Running diagnostics", extra={"incident_id": incident_id, "alert_name": incident["alert_name"]})
        try:
            with db.transaction() as conn:
                incidents.mark_investigating(conn, incident_id, "diagnostics")
            diagnostics = self.collector.collect(incident)
            # Which root this diagnosis is of: remediation acts only on the
            # diagnosis of the incident's current root.
            diagnostics["root"] = root_of(incident)
            with db.transaction() as conn:
                # Stored only while the incident is still at the root it
                # read: another alert taking over (or a reopen) while this
                # ran has its own diagnosis, which this one must not
                # overwrite. A stale one is dropped and nothing is replied.
                stored = incidents.store_diagnostics(conn, incident_id, diagnostics, of=incident)
                if stored:
                    incidents.add_timeline(
                        conn, incident_id, "diagnosed", {"summary": summarise(diagnostics), "durations_ms": diagnostics["durations_ms"],
                                                         "root": diagnostics["root"]}, "diagnostics"
                    )
                claims.complete(conn, key)
        except Exception:
            with db.transaction() as conn:
                claims.release(conn, key)
            raise
        if not stored:
            log.info("Diagnostics dropped: the incident's root changed while they ran", extra={
                "incident_id": incident_id, "root_generation": diagnostics["root"]["root_generation"]})
            return eventio.ack()
        log.info("Diagnostics stored", extra={"incident_id": incident_id, "durations_ms": diagnostics["durations_ms"]})
        return self._reply(incident, diagnostics)

    def _reply(self, of: dict, diagnostics: dict) -> Response:
        """The diagnosis of the step that ran (``of``: the incident as the
        step read it), stamped with that step's generation and the root the
        diagnosis is of, whatever the incident is at by now: a reply a
        reopen overtook is stale to its consumers (nothing done), never a
        pair of generation and root that did not exist together (400)."""
        with db.engine().connect() as conn:
            incident = incidents.require_incident(conn, of["id"])
        incident["generation"] = of["generation"]
        incident["root_generation"] = diagnosed_root_generation(diagnostics, of)
        return eventio.reply(
            events.INCIDENT_DIAGNOSED,
            incident,
            self.config.event_source,
            {"diagnostics": event_view(diagnostics)},
            events.step_event_id(events.INCIDENT_DIAGNOSED, incident),
        )
