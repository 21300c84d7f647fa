"""The board's page of dead letters and parked events, with a redeliver
button (CSRF-protected like every form of the board)."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlencode

from flask import Request, Response
from werkzeug.datastructures import MultiDict

from functions.query.api import encode_cursor
from functions.query.board import Board, next_page_url
from functions.query.backlog_api import DEAD_LETTER_PARAMETERS, parse_dead_letter_filters, parse_dead_letter_id, parse_outbox_id
from shared import backlog, db, dead_letters, incidents
from shared.errors import ApiError, BadRequest

BACKLOG_PAGE = "/ui/backlog"
PARKED_SHOWN = 100


class BacklogBoard:
    """The board's page of what did not reach its consumer, with a
    redeliver button per item (CSRF-protected like every other form)."""

    def __init__(self, board: Board):
        self.board = board

    def page(self, request: Request) -> Response:
        session = self.board._signed_in(request)
        if isinstance(session, Response):
            return session
        shown = request.args.get("redelivered") or "no"
        args = MultiDict([(k, v) for k, v in request.args.items(multi=True)
                          if k in DEAD_LETTER_PARAMETERS and v != "" and not (k == "redelivered" and v == "any")])
        if "redelivered" not in request.args:
            args["redelivered"] = "no"
        error = request.args.get("error")
        refused = False
        try:
            flt, limit, after = parse_dead_letter_filters(args)
        except BadRequest as exc:
            flt, limit, after, error, refused = dead_letters.Filter(redelivered=False), 50, None, exc.message, True
        stale = dead_letters.claim_stale_seconds(self.board.config.publish_timeout_seconds)
        with db.engine().connect() as conn:
            letters, following = dead_letters.list_letters(conn, flt, limit, after)
            for letter in letters:
                letter["claim"] = dead_letters.claim_of(letter, stale)
            parked, _ = backlog.list_parked(conn, backlog.ParkedFilter(), PARKED_SHOWN)
            total, waiting = dead_letters.counts(conn)
            parked_total = backlog.parked_count(conn)
            pending, oldest = backlog.pending(conn)
        next_url = None
        if following is not None:
            # A refused query lists the default page: its next page is that
            # one's (the refused query's, refused again, looped).
            next_url = next_page_url(BACKLOG_PAGE, MultiDict() if refused else request.args,
                                     encode_cursor(incidents.Cursor(following[0], str(following[1]))), DEAD_LETTER_PARAMETERS)
        return self.board._page("backlog.html", letters=letters, parked=parked, parked_total=parked_total,
                                dead_total=total, dead_waiting=waiting, pending=pending, oldest=oldest, shown=shown,
                                next_url=next_url, error=error, notice=request.args.get("notice"), now=datetime.utcnow(),
                                csrf=session["csrf"], SENT=dead_letters.SENT)

    def _back(self, **message) -> Response:
        return self.board._redirect(BACKLOG_PAGE + "?" + urlencode(message))

    def redeliver_dead_letter(self, request: Request, letter_id: str) -> Response:
        session = self.board.form_session(request)
        if isinstance(session, Response):
            return session
        try:
            number = parse_dead_letter_id(letter_id)
            _, sent, error = backlog.redeliver(db.engine(), self.board.config.k_sink, number, "board",
                                               request.form.get("force") == "true", self.board.config.publish_timeout_seconds)
        except ApiError as exc:
            if exc.status >= 500:
                raise
            return self._back(error=exc.message)
        if error:
            return self._back(error=f"Dead letter {number} was not accepted by the Broker: {error}")
        return self._back(notice=f"Dead letter {number} sent to the Broker again." if sent else f"Dead letter {number} was already re-driven.")

    def redeliver_parked(self, request: Request, event_id: str) -> Response:
        session = self.board.form_session(request)
        if isinstance(session, Response):
            return session
        try:
            event_id = parse_outbox_id(event_id)
            with db.transaction() as conn:
                row, requeued = backlog.redrive_parked(conn, event_id, "board")
        except ApiError as exc:
            if exc.status >= 500:
                raise
            return self._back(error=exc.message)
        if requeued:
            self.board.publisher.submit([row["id"]])
        return self._back(notice=f"Event {row['id']} is queued for the Broker again." if requeued
                          else f"Event {row['id']} is {backlog.state_of(row)}; nothing to do.")
