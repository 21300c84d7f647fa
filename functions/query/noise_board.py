"""The board's noise control: the maintenance-window page (create, end,
delete, what is held), and on an incident page the flapping flag and
AlertManager silences (create for a duration, expire). Every form carries
the session's CSRF token like the rest of the board."""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Request, Response

from functions.query.board import Board
from functions.query.noise_api import NoiseApi, window_state
from shared import clock, db, flapping, maintenance
from shared.config import Settings
from shared.errors import ApiError, BadRequest
from shared.http import parse_uuid

MAINTENANCE_PAGE = "/ui/maintenance"
SILENCE_DURATIONS = ((30, "30 minutes"), (60, "1 hour"), (120, "2 hours"), (240, "4 hours"), (480, "8 hours"), (1440, "1 day"))


def incident_extras(config: Settings, row: dict) -> dict:
    """What the incident page shows of noise control. AlertManager being
    down must not take the incident page with it: the error is shown instead."""
    from shared import silences

    with db.engine().connect() as conn:
        since = flapping.flapping_since(conn, row["id"])
    extras = {"flapping_since": since, "alertmanager": bool(config.alertmanager_url), "silences": [], "silence_error": None,
              "SILENCE_DURATIONS": SILENCE_DURATIONS}
    if config.alertmanager_url and row.get("labels"):
        try:
            extras["silences"] = silences.AlertManager(config.alertmanager_url, config.notify_timeout_seconds).for_labels(row["labels"])
        except ApiError as exc:
            extras["silence_error"] = exc.message
    return extras


def form_minutes(raw: str) -> int:
    # ASCII digits only, and few: int() raises ValueError past 4300 digits.
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise BadRequest("duration: a whole number of minutes")
    return int(raw)


class NoiseBoard:
    def __init__(self, board: Board, api: NoiseApi):
        self.board = board
        self.api = api

    def _back(self, location: str, **message) -> Response:
        return self.board._redirect(location + ("?" + urlencode(message) if message else ""))

    # ------------------------------------------------------------ maintenance page

    def page(self, request: Request) -> Response:
        session = self.board._signed_in(request)
        if isinstance(session, Response):
            return session
        now = clock.now()
        with db.engine().connect() as conn:
            windows = maintenance.list_windows(conn)
            held = maintenance.suppressed(conn)
        for w in windows:
            w["state"] = window_state(w, now)
        return self.board._page("maintenance.html", windows=windows, held=held, now=now, csrf=session["csrf"], me=session.get("user"),
                                error=request.args.get("error"), notice=request.args.get("notice"))

    def create_window(self, request: Request) -> Response:
        session = self.board.form_session(request)
        if isinstance(session, Response):
            return session
        form = request.form
        try:
            matchers = [line.strip() for line in form.get("matchers", "").splitlines() if line.strip()]
            body = {"matchers": matchers, "reason": form.get("reason", "")}
            body["duration_minutes"] = form_minutes(form.get("duration_minutes", ""))
            if form.get("starts_at", "").strip():
                body["starts_at"] = form["starts_at"].strip()
            created = self.api.do_create_window(body, self.board.form_actor(request))
        except ApiError as exc:
            if exc.status >= 500:
                raise
            return self._back(MAINTENANCE_PAGE, error=exc.message)
        return self._back(MAINTENANCE_PAGE, notice=f"Maintenance window {created['id'][:8]} created ({created['state']}).")

    def end_window(self, request: Request, window_id: str) -> Response:
        return self._window_change(request, window_id, "end")

    def delete_window(self, request: Request, window_id: str) -> Response:
        return self._window_change(request, window_id, "delete")

    def _window_change(self, request: Request, window_id: str, what: str) -> Response:
        session = self.board.form_session(request)
        if isinstance(session, Response):
            return session
        try:
            window_id = parse_uuid(window_id, "id")
            with db.transaction() as conn:
                (maintenance.end if what == "end" else maintenance.delete)(conn, window_id, self.board.form_actor(request))
        except ApiError as exc:
            if exc.status >= 500:
                raise
            return self._back(MAINTENANCE_PAGE, error=exc.message)
        done = "ended; what it held is released at the next sweep" if what == "end" else "deleted"
        return self._back(MAINTENANCE_PAGE, notice=f"Maintenance window {window_id[:8]} {done}.")

    # ------------------------------------------------------------ incident page

    def _incident_action(self, request: Request, incident_id: str, action) -> Response:
        session = self.board.form_session(request)
        if isinstance(session, Response):
            return session
        incident_id = parse_uuid(incident_id, "id")
        try:
            action(incident_id, self.board.form_actor(request))
        except ApiError as exc:
            if exc.status >= 500 and exc.status not in (502, 503):
                raise
            return self._back(f"/ui/incidents/{incident_id}", error=exc.message)
        return self._back(f"/ui/incidents/{incident_id}")

    def silence(self, request: Request, incident_id: str) -> Response:
        minutes = request.form.get("duration_minutes", "")
        comment = request.form.get("comment", "")

        def create(i, actor):
            self.api.do_silence(i, form_minutes(minutes), comment, actor)
        return self._incident_action(request, incident_id, create)

    def expire_silence(self, request: Request, incident_id: str, silence_id: str) -> Response:
        from functions.query.noise_api import parse_silence_id

        return self._incident_action(request, incident_id,
                                     lambda i, actor: self.api.do_expire(i, parse_silence_id(silence_id), actor))
