"""The engineers' API for noise control: acknowledging an incident,
maintenance windows, and AlertManager silences of an incident's alert
(docs/noise-control.md)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from flask import Request, Response

from functions.query.api import NOTE_MAX, check_parameters, present
from shared import acknowledge, clock, db, flapping, incidents, maintenance, silences
from shared.config import Settings
from shared.errors import BadRequest, Conflict, NotFound
from shared.filters import parse_time_param
from shared.http import has_body, json_response, parse_json_body, parse_uuid, storable_text
from shared.publisher import Publisher
from shared.timefmt import rfc3339

log = logging.getLogger("query")

BODY_LIMIT = 64 * 1024
REASON_MAX = 1000
COMMENT_MAX = 1000
# A window or a silence longer than this is a forgotten one.
MAX_MINUTES = 31 * 24 * 60
WINDOW_FIELDS = {"matchers", "starts_at", "ends_at", "duration_minutes", "reason"}


def window_state(window: dict, now: datetime) -> str:
    if window["starts_at"] > now:
        return "scheduled"
    return "active" if window["ends_at"] > now else "ended"


def present_window(window: dict, now: datetime, held: list[dict] | None = None, audit: list[dict] | None = None) -> dict:
    body = {name: rfc3339(window[name]) for name in ("id", "matchers", "starts_at", "ends_at", "reason", "created_by",
                                                     "created_at", "ended_by")}
    body["state"] = window_state(window, now)
    if held is not None:
        body["suppressed"] = [{**{k: rfc3339(v) for k, v in s.items()}} for s in held]
        body["suppressed_count"] = sum(s["count"] for s in held)
    if audit is not None:
        body["audit"] = [{**a, "at": rfc3339(a["at"])} for a in audit]
    return body


def present_silence(silence: dict) -> dict:
    return {k: rfc3339(v) for k, v in silence.items()}


def parse_minutes(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MINUTES:
        raise BadRequest(f"{name}: a whole number of minutes from 1 to {MAX_MINUTES}", field=name)
    return value


def parse_window(body, now: datetime) -> tuple[list[str], datetime, datetime, str]:
    """matchers, start (default now), end (``ends_at`` or ``duration_minutes``), reason."""
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object like {"matchers": ["namespace=\\"db\\""], '
                         '"duration_minutes": 60, "reason": "..."}')
    unknown = sorted(set(body) - WINDOW_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:60]!r}; allowed: {', '.join(sorted(WINDOW_FIELDS))}", field=unknown[0][:60])
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > REASON_MAX:
        raise BadRequest(f"reason: required, at most {REASON_MAX} characters", field="reason")
    storable_text(reason, "reason")
    starts_at = now
    if body.get("starts_at") is not None:
        if not isinstance(body["starts_at"], str):
            raise BadRequest("starts_at: an RFC 3339 time", field="starts_at")
        starts_at = parse_time_param(body["starts_at"], "starts_at", in_query=False)
    if ("ends_at" in body) == ("duration_minutes" in body):
        raise BadRequest("give exactly one of ends_at and duration_minutes", field="ends_at")
    if "duration_minutes" in body:
        minutes = parse_minutes(body["duration_minutes"], "duration_minutes")
        try:
            ends_at = starts_at + timedelta(minutes=minutes)
        except OverflowError:
            raise BadRequest("starts_at: too far in the future", field="starts_at") from None
    else:
        if not isinstance(body["ends_at"], str):
            raise BadRequest("ends_at: an RFC 3339 time", field="ends_at")
        ends_at = parse_time_param(body["ends_at"], "ends_at", in_query=False)
    if ends_at <= starts_at:
        raise BadRequest("ends_at: must be after starts_at", field="ends_at")
    if ends_at <= now:
        raise BadRequest("ends_at: already past; a window that has ended suppresses nothing", field="ends_at")
    if ends_at - starts_at > timedelta(minutes=MAX_MINUTES):
        raise BadRequest(f"the window is longer than {MAX_MINUTES // 1440} days", field="ends_at")
    matchers = body.get("matchers")
    if isinstance(matchers, list):
        for m in matchers:
            if isinstance(m, str):
                storable_text(m, "matchers")
    return matchers, starts_at, ends_at, reason.strip()


def parse_silence_id(raw: str) -> str:
    if not silences.SILENCE_ID.fullmatch(raw or ""):
        raise BadRequest(f"silence_id: not an AlertManager silence id: {raw[:60]!r}", parameter="silence_id")
    return raw.lower()


class NoiseApi:
    def __init__(self, config: Settings, publisher: Publisher, actor):
        self.config = config
        self.publisher = publisher
        self.actor = actor

    # ------------------------------------------------------------ acknowledge

    def acknowledge(self, request: Request, incident_id: str) -> Response:
        incident_id = parse_uuid(incident_id, "id")
        check_parameters(request.args, ())
        note = None
        body = parse_json_body(request, BODY_LIMIT, allow_empty=True) if has_body(request) else None
        if body is not None:
            if not isinstance(body, dict) or set(body) - {"note"}:
                raise BadRequest('the body, when given, must be {"note": "..."}', field="note")
            note = body.get("note")
            if note is not None and (not isinstance(note, str) or len(note) > NOTE_MAX):
                raise BadRequest(f"note: must be a string of at most {NOTE_MAX} characters", field="note")
            if note:
                storable_text(note, "note")
        return json_response(self.do_acknowledge(incident_id, self.actor(request), note))

    def do_acknowledge(self, incident_id: str, actor: str, note: str | None = None) -> dict:
        with db.transaction() as conn:
            row, event_ids, acknowledged = acknowledge.acknowledge(conn, incident_id, actor, self.config.event_source, note)
        if acknowledged:
            log.info("Incident acknowledged", extra={"incident_id": incident_id, "actor": actor})
        self.publisher.submit(event_ids)
        return {**present(row), "acknowledged": acknowledged}

    # ------------------------------------------------------------ maintenance windows

    def list_windows(self, request: Request) -> Response:
        check_parameters(request.args, ())
        now = clock.now()
        with db.engine().connect() as conn:
            rows = maintenance.list_windows(conn)
        return json_response([present_window(w, now) for w in rows])

    def create_window(self, request: Request) -> Response:
        check_parameters(request.args, ())
        body = parse_json_body(request, BODY_LIMIT)
        created = self.do_create_window(body, self.actor(request))
        return json_response(created, status=201, headers={"Location": f"/maintenance-windows/{created['id']}"})

    def do_create_window(self, body, actor: str) -> dict:
        now = clock.now()
        matchers, starts_at, ends_at, reason = parse_window(body, now)
        with db.transaction() as conn:
            window = maintenance.create(conn, matchers, starts_at, ends_at, reason, actor)
        log.info("Maintenance window created", extra={"window_id": window["id"], "actor": actor, "matchers": window["matchers"]})
        return present_window(window, now)

    def get_window(self, request: Request, window_id: str) -> Response:
        check_parameters(request.args, ())
        window_id = parse_uuid(window_id, "id")
        with db.engine().connect() as conn:
            window = maintenance.get(conn, window_id)
            held = maintenance.suppressed(conn, window_id)
            audit = maintenance.audit_of(conn, window_id)
        return json_response(present_window(window, clock.now(), held, audit))

    def end_window(self, request: Request, window_id: str) -> Response:
        check_parameters(request.args, ())
        window_id = parse_uuid(window_id, "id")
        with db.transaction() as conn:
            window = maintenance.end(conn, window_id, self.actor(request))
        return json_response(present_window(window, clock.now()))

    def delete_window(self, request: Request, window_id: str) -> Response:
        check_parameters(request.args, ())
        window_id = parse_uuid(window_id, "id")
        with db.transaction() as conn:
            maintenance.delete(conn, window_id, self.actor(request))
        return Response(status=204)

    def suppressed(self, request: Request) -> Response:
        check_parameters(request.args, ())
        with db.engine().connect() as conn:
            held = maintenance.suppressed(conn)
        return json_response([{k: rfc3339(v) for k, v in s.items()} for s in held])

    # ------------------------------------------------------------ silences

    def alertmanager(self) -> silences.AlertManager:
        if not self.config.alertmanager_url:
            raise Conflict("silences need ALERTMANAGER_URL, which is not set")
        return silences.AlertManager(self.config.alertmanager_url, self.config.notify_timeout_seconds)

    def _incident(self, incident_id: str) -> dict:
        with db.engine().connect() as conn:
            return incidents.require_incident(conn, incident_id)

    def list_silences(self, request: Request, incident_id: str) -> Response:
        check_parameters(request.args, ())
        incident = self._incident(parse_uuid(incident_id, "id"))
        return json_response([present_silence(s) for s in self.alertmanager().for_labels(incident["labels"] or {})])

    def create_silence(self, request: Request, incident_id: str) -> Response:
        check_parameters(request.args, ())
        incident_id = parse_uuid(incident_id, "id")
        body = parse_json_body(request, BODY_LIMIT)
        if not isinstance(body, dict) or set(body) - {"duration_minutes", "comment"}:
            raise BadRequest('the body must be {"duration_minutes": 60, "comment": "..."}', field="duration_minutes")
        silence = self.do_silence(incident_id, body.get("duration_minutes"), body.get("comment"), self.actor(request))
        return json_response(silence, status=201)

    def do_silence(self, incident_id: str, minutes, comment, actor: str) -> dict:
        minutes = parse_minutes(minutes, "duration_minutes")
        if comment is not None and (not isinstance(comment, str) or len(comment) > COMMENT_MAX):
            raise BadRequest(f"comment: a string of at most {COMMENT_MAX} characters", field="comment")
        comment = storable_text((comment or "").strip(), "comment") or f"silenced from incident {incident_id}"
        incident = self._incident(incident_id)
        if not incident["labels"]:
            raise Conflict("this incident's alert has no labels to silence")
        am = self.alertmanager()
        now = clock.now()
        ends_at = now + timedelta(minutes=minutes)
        silence_id = am.create(incident["labels"], now, ends_at, actor, f"{comment} (incident {incident_id})")
        with db.transaction() as conn:
            incidents.add_timeline(conn, incident_id, "silenced",
                                   {"silence_id": silence_id, "ends_at": ends_at, "note": comment}, actor)
        log.info("AlertManager silence created", extra={"incident_id": incident_id, "silence_id": silence_id, "actor": actor})
        return {"id": silence_id, "starts_at": rfc3339(now), "ends_at": rfc3339(ends_at), "created_by": actor,
                "comment": comment, "matchers": silences.matchers_for(incident["labels"])}

    def expire_silence(self, request: Request, incident_id: str, silence_id: str) -> Response:
        check_parameters(request.args, ())
        self.do_expire(parse_uuid(incident_id, "id"), parse_silence_id(silence_id), self.actor(request))
        return Response(status=204)

    def do_expire(self, incident_id: str, silence_id: str, actor: str) -> None:
        incident = self._incident(incident_id)
        am = self.alertmanager()
        if silence_id not in {s["id"] for s in am.for_labels(incident["labels"] or {})}:
            raise NotFound(f"no active silence {silence_id} mutes this incident's alert")
        am.expire(silence_id)
        with db.transaction() as conn:
            incidents.add_timeline(conn, incident_id, "silence_expired", {"silence_id": silence_id}, actor)
        log.info("AlertManager silence expired", extra={"incident_id": incident_id, "silence_id": silence_id, "actor": actor})

    # ------------------------------------------------------------ flapping

    def flapping_since(self, incident_id: str) -> datetime | None:
        with db.engine().connect() as conn:
            return flapping.flapping_since(conn, incident_id)
