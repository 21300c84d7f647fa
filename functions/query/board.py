"""The incident board: server-rendered pages for engineers at 3 a.m.

Sign-in exchanges the API token for a signed, expiring, ``HttpOnly``,
``SameSite=Strict`` session cookie (the token never goes into a URL) that
carries a session id, and never a person: sign-out revokes that id
(``shared.sessions``), so a copy of the cookie is refused afterwards. A
person's own token (shared/users.py) gets a session kept in the database
(``shared.board_sessions``): the cookie carries only its random id, the row
says who (a verified identity, ended when that person's token is changed or
removed, or at sign-out); failed sign-ins of the shared token are limited
(``shared.login_throttle``, with a device cookie that keeps a browser that
signed in before out of the overall limit; a personal token is never held);
every form that changes state carries the session's CSRF token; Jinja2
escapes everything (labels come from alerts and may hold HTML) and shows the
characters that reorder or hide text as ``‹U+202E›`` (:func:`shown`); a strict
Content-Security-Policy allows nothing but this origin's stylesheet.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode

from flask import Request, Response
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from werkzeug.datastructures import MultiDict

from functions.query.api import NOTE_MAX, encode_cursor, link_query, parse_filters, present
from shared import acknowledge, board_sessions, db, diagnosis, filters, incidents, members, proposals, sessions
from shared import login_throttle as throttle
from shared.config import Settings
from shared.domain import ACTIVE_STATUSES, action_scope
from shared.errors import ApiError, BadRequest, NotFound
from shared.http import parse_uuid, request_users, storable_text
from shared.models import PRIORITIES, STATUSES
from shared.publisher import Publisher
from shared.users import ApiUsers
from shared.visible import visible

COOKIE = "ir_session"
# A personal session's cookie: this, then the session's id (shared/board_sessions.py).
PERSONAL_PREFIX = "p."
SESSION_SECONDS = 12 * 3600
# A browser that signed in here before: counted apart by the sign-in limit.
DEVICE_COOKIE = "ir_device"
DEVICE_SECONDS = 90 * 86400
# Where session() leaves the request's session, for form_actor and verified_user.
SESSION_ENVIRON = "incident_response.board_session"
log = logging.getLogger("http")
# "Sign-in held back" lines, at most so many a minute per process.
HELD_LOG = throttle.LogBudget()
HERE = Path(__file__).parent
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
ACTION_LABELS = {"investigating": "Investigating", "resolved": "Resolve", "closed": "Close"}
# The filter form shows the declared filters that have a widget (shared/filters.py).
BOARD_FILTERS = filters.BOARD_FILTERS


def take_label(status: str, taken_by: str | None) -> str | None:
    """The Acknowledge button's label, or None when it is not offered: an
    active incident nobody has taken in this generation (diagnostics moving
    it to investigating is no acknowledgement), or a resolved one, which it
    reopens and takes. A closed incident is final."""
    if status in ACTIVE_STATUSES:
        return None if taken_by else "Acknowledge"
    return "Reopen and acknowledge" if status == "resolved" else None


def allowed_transitions(status: str, taken_by: str | None) -> list[str]:
    """The plain status changes offered beside the Acknowledge button.
    Moving to investigating is that button's (take_label), except on an open
    incident someone already took in this generation: flapping reopened it
    silently (resolved -> open, no new generation), so the button is not
    offered and the status change is, as before the button existed."""
    return [s for s in incidents.TRANSITIONS[status] if s != "investigating" or (status == "open" and taken_by)]


def ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "—"
    seconds = int(((now or datetime.utcnow()) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


def duration(start: datetime | None, end: datetime | None) -> str:
    if not start or not end:
        return "—"
    seconds = int((end - start).total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s"


# CommonMark lets any ASCII punctuation be backslash-escaped: this is all of
# it but , / ; ? @ % ' " : which start no Markdown, GFM or HTML construct and
# stay as they are, for a readable draft.
_MD_ESCAPE = {ord(c): "\\" + c for c in "!#$&()*+-.<=>[\\]^_`{|}~"}
_LINE_BREAKS = re.compile("\r\n|[\r\n\v\f\x85\u2028\u2029]")
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")


def md(value) -> str:
    """Any value as inline Markdown text: one line, no construct (heading,
    list, table cell, link, image, code, emphasis, raw HTML, entity) can
    start or end inside it; a renderer shows exactly the characters."""
    text = "" if value is None else str(value)
    text = _CONTROLS.sub("\ufffd", _LINE_BREAKS.sub(" ", text))
    return text.translate(_MD_ESCAPE)


def md_block(value) -> str:
    """Multi-line text as Markdown paragraphs: each line escaped as inline
    text and without leading blanks (which would make a code block)."""
    text = "" if value is None else str(value)
    return "\n".join(md(line.lstrip()) for line in _LINE_BREAKS.split(text))


def md_code(value) -> str:
    """A value as a one-line code span, fenced by more backticks than it holds."""
    text = _CONTROLS.sub("\ufffd", _LINE_BREAKS.sub(" ", "" if value is None else str(value)))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def next_page_url(page: str, args: MultiDict, cursor: str, names: tuple[str, ...] | None = None) -> str:
    """The board's link to its next page: the query as the API's ``Link``
    repeats it (each parameter once, each value once: ``link_query``; the
    filters the page read bounded it), without the filter form's empty
    fields or any parameter but ``names``, and the next ``cursor``."""
    kept = MultiDict([(k, v) for k, v in args.items(multi=True)
                      if k != "cursor" and v != "" and (names is None or k in names)])
    query = link_query(kept)
    return f"{page}?{query}{'&' if query else ''}{urlencode([('cursor', cursor)])}"


def shown(value):
    """Every ``{{ … }}`` of the board's pages and report draft: text with the
    characters that reorder or hide it shown as ``‹U+202E›``
    (shared.visible), so an alert name cannot be reordered or hidden on the
    board. Markup (a macro's output, ``tojson``, :func:`as_typed`) is ours
    and left as it is."""
    return visible(value) if isinstance(value, str) and not isinstance(value, Markup) else value


def as_typed(value) -> Markup:
    """A form field's value as the person typed it (escaped, not made
    :func:`shown`): sent again, it must be what was sent."""
    return escape("" if value is None else value)


def iso(value: datetime | None) -> str:
    return value.replace(tzinfo=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if value else ""


def same_csrf(request: Request, session: dict) -> bool:
    """The form's CSRF token is the session's, compared in constant time as
    bytes: compare_digest raises TypeError on a str that is not ASCII, and a
    form field can be anything."""
    return hmac.compare_digest(request.form.get("csrf", "").encode("utf-8", "surrogatepass"), session["csrf"].encode())


class Board:
    def __init__(self, config: Settings, publisher: Publisher):
        self.config = config
        self.publisher = publisher
        self.signer = URLSafeTimedSerializer(session_key(config), salt="incident-board")
        self.device_signer = URLSafeTimedSerializer(session_key(config), salt="incident-board-device")
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                                     trim_blocks=True, lstrip_blocks=True, finalize=shown)
        self.templates.filters.update(ago=ago, iso=iso, md=md, md_block=md_block, md_code=md_code, fact_anchor=diagnosis.anchor,
                                      as_typed=as_typed)
        self.templates.globals.update(duration=duration, PRIORITIES=PRIORITIES, STATUSES=STATUSES, ACTION_LABELS=ACTION_LABELS,
                                     BOARD_FILTERS=BOARD_FILTERS, ENUM=filters.Kind.ENUM, diagnosis_facts=diagnosis.facts,
                                     probable_causes=diagnosis.probable_causes, log_lines=diagnosis.log_lines,
                                     action_scope=action_scope)

    # ------------------------------------------------------------------ session

    def session(self, request: Request) -> dict | None:
        """The signed-in session, or None: unsigned, expired, from before
        sessions had ids, or signed out (revoked_sessions). A session of a
        person's own token is a row of board_sessions (shared/board_sessions.py)
        and is refused once that person's token is changed or removed."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        if raw.startswith(PERSONAL_PREFIX):
            session = self._personal_session(request, raw[len(PERSONAL_PREFIX):])
        else:
            session = self._shared_session(raw)
        if session is not None:
            request.environ[SESSION_ENVIRON] = session
        return session

    def _shared_session(self, raw: str) -> dict | None:
        try:
            session = self.signer.loads(raw, max_age=SESSION_SECONDS)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(session, dict) or not isinstance(session.get("sid"), str) or not isinstance(session.get("exp"), int):
            return None
        if "user" in session:
            # Whoever holds the shared token can sign a cookie: one never names a person.
            return None
        with db.engine().connect() as conn:
            if sessions.is_revoked(conn, session["sid"]):
                return None
        return session

    def _personal_session(self, request: Request, session_id: str) -> dict | None:
        if not 0 < len(session_id) <= 64:
            return None
        users = request_users(request, self.config.api_users)
        with db.transaction() as conn:
            found = board_sessions.find(conn, session_id, self._idle_seconds())
            if found is None:
                return None  # unknown, expired, idle too long, or signed out
            if users.stamp(found.user) != found.token_stamp:
                # Made with another token of theirs than this list has. If this
                # list was read after the session was made, the token was
                # changed or removed: ended for good, so putting the old line
                # back does not bring it back. Otherwise this replica may be
                # the one behind (the session made by a replica whose copy of
                # the Secret is newer): refused here, not deleted.
                if users.read_after(found.created_at):
                    board_sessions.end(conn, session_id)
                return None
        return {"sid": session_id, "user": found.user, "personal": True, "csrf": personal_csrf(session_id),
                "since": iso(found.created_at), "exp": int(found.expires_at.replace(tzinfo=timezone.utc).timestamp())}

    @staticmethod
    def verified_user(request: Request) -> str | None:
        """Who signed this request's session in with a personal token, or None
        (a session of the shared token: names typed in forms are claims)."""
        return (request.environ.get(SESSION_ENVIRON) or {}).get("user")

    def _page(self, template: str, status: int = 200, **context) -> Response:
        html = self.templates.get_template(template).render(**context)
        return Response(html, status=status, mimetype="text/html", headers=self.security_headers())

    @staticmethod
    def security_headers() -> dict:
        return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY", "Cache-Control": "no-store"}

    def query_too_long(self, request: Request, limit: int) -> Response:
        """A board page asked with a query string past the query function's
        bound: the board's own error page (a person reads it), not the
        API's JSON. Nothing of the query is read, and no session looked up
        (the page shows no sign-out form: it needs the database)."""
        return self._page("error.html", status=400, csrf=None,
                          message=f"This address is too long: its query string is {len(request.query_string)} bytes, "
                                  f"at most {limit}. Name fewer or shorter filter values.")

    def _redirect(self, location: str) -> Response:
        return Response(status=303, headers={"Location": location, **self.security_headers()})

    def _signed_in(self, request: Request) -> dict | Response:
        session = self.session(request)
        if session is None:
            return self._redirect("/ui/login?" + urlencode({"next": request.full_path.rstrip("?")}))
        return session

    def form_session(self, request: Request) -> dict | Response:
        """The session of a form post, or the answer to give instead: every
        board form needs a session and its CSRF token."""
        session = self.session(request)
        if session is None:
            return self._redirect("/ui/login")
        if not same_csrf(request, session):
            return self._page("error.html", status=403, message="The form expired or did not come from this board; reload and try again.",
                              csrf=session["csrf"])
        return session

    @classmethod
    def form_actor(cls, request: Request) -> str:
        """Who acted through a form: ``user:NAME`` when the session was signed
        in with NAME's personal token (the form shows no name field then, and
        one sent anyway is not read); else the board and the name typed, if
        any, which is the person's word."""
        person = cls.verified_user(request)
        if person is not None:
            return f"user:{person}"
        named = storable_text(request.form.get("actor", "").strip(), "actor", 100)
        return f"board:{named}" if named else "board"

    # ------------------------------------------------------------------ sign-in

    def login_form(self, request: Request) -> Response:
        return self._page("login.html", next=_safe_next(request.args.get("next")), error=None)

    def _idle_seconds(self) -> int:
        return self.config.board_idle_timeout_minutes * 60

    def login(self, request: Request) -> Response:
        token = request.form.get("token", "")
        next_url = _safe_next(request.form.get("next"))
        # One list for the whole sign-in: the token is identified and its
        # session stamped from the same one, even if the file is reloaded meanwhile.
        users = request_users(request, self.config.api_users)
        # A person's own token first: 256 random bits nobody guesses, so it
        # signs in even while the sign-in limit holds this client back.
        person = users.identify(token) if users and token else None
        device = self._device(request, users)
        address = throttle.client_address(request.remote_addr)
        if person is None:
            expected = self.config.api_token.reveal() if self.config.api_token else None
            shared = bool(expected) and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), expected.encode())
            limits = throttle.Limits.of(self.config)
            wait = throttle.judge(db.engine(), throttle.clients(address, device), limits, right=shared)
            if wait is not None:
                # Refused whatever the token: a right guess while held back says nothing.
                left_out = HELD_LOG.take()
                if left_out is not None:
                    log.warning("Sign-in held back", extra={"path": request.path, "client": address, "device": bool(device),
                                                            "retry_after": wait, "not_logged_before": left_out})
                minutes = max(1, -(-wait // 60))
                held = self._page("login.html", status=429, next=next_url, held=True,
                                  error=f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes > 1 else ''}.")
                held.headers["Retry-After"] = str(wait)
                return held
            if not shared:
                log.warning("Unauthorized", extra={"path": request.path, "remote": request.remote_addr, "client": address})
                return self._page("login.html", status=401, next=next_url, error="That token is not valid.")
        response = self._redirect(next_url)
        # The browser's earlier session, if any, ends: a sign-in replaces it.
        earlier = request.cookies.get(COOKIE, "")
        earlier_personal = earlier[len(PERSONAL_PREFIX):] if earlier.startswith(PERSONAL_PREFIX) else None
        if person is not None:
            with db.transaction() as conn:
                session_id, _ = board_sessions.create(conn, person, users.stamp(person), SESSION_SECONDS,
                                                      self._idle_seconds(), replaces=earlier_personal)
            value = PERSONAL_PREFIX + session_id
        else:
            now = datetime.utcnow()
            value = self.signer.dumps({"sid": secrets.token_urlsafe(24), "csrf": secrets.token_urlsafe(24), "since": iso(now),
                                       "exp": int(now.replace(tzinfo=timezone.utc).timestamp()) + SESSION_SECONDS})
            if earlier_personal:
                with db.transaction() as conn:
                    board_sessions.end(conn, earlier_personal)
        # Who signed in and from where; never the token.
        log.info("Signed in", extra={"path": request.path, "user": person, "token": "personal" if person else "shared",
                                     "client": address})
        response.set_cookie(COOKIE, value, max_age=SESSION_SECONDS, httponly=True, samesite="Strict",
                            secure=request.is_secure, path="/ui")
        # Renewed at every sign-in; sent only to the sign-in form. Bound to
        # the token it was earned with: a person's (by its stamp) stops
        # counting once that token is changed or removed; the shared token's
        # ends with it (the signing key comes from it).
        earned = {"u": person, "s": users.stamp(person)} if person is not None else {"u": None}
        response.set_cookie(DEVICE_COOKIE, self.device_signer.dumps({"d": device or secrets.token_urlsafe(16), **earned}),
                            max_age=DEVICE_SECONDS, httponly=True, samesite="Strict", secure=request.is_secure, path="/ui/login")
        return response

    def _device(self, request: Request, users: ApiUsers) -> str | None:
        """The id of this browser's device cookie, if it signed in here before
        with the shared token, or with a personal token that is still listed."""
        raw = request.cookies.get(DEVICE_COOKIE)
        if not raw:
            return None
        try:
            device = self.device_signer.loads(raw, max_age=DEVICE_SECONDS)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(device, dict) or "u" not in device:
            return None
        person = device["u"]
        if person is not None and (not isinstance(person, str) or users.stamp(person) != device.get("s")):
            return None  # earned with a token that is no longer listed
        value = device.get("d")
        return value if isinstance(value, str) and 0 < len(value) <= 64 else None

    def logout(self, request: Request) -> Response:
        session = self.session(request)
        if session is None or not same_csrf(request, session):
            return self._redirect("/ui/login")
        with db.transaction() as conn:
            if session.get("personal"):
                board_sessions.end(conn, session["sid"])
            else:
                sessions.revoke(conn, session["sid"], datetime.fromtimestamp(session["exp"], timezone.utc).replace(tzinfo=None))
                sessions.purge_expired(conn)
        response = self._redirect("/ui/login")
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # ------------------------------------------------------------------ pages

    def index(self, request: Request) -> Response:
        session = self._signed_in(request)
        if isinstance(session, Response):
            return session
        form = {f.name: request.args.get(f.name, "") for f in BOARD_FILTERS}
        try:
            # An empty field of the filter form means "any".
            flt, limit, after = parse_filters(MultiDict([(k, v) for k, v in request.args.items(multi=True) if v != ""]))
            error = None
        except BadRequest as exc:
            flt, limit, after, error = filters.IncidentFilter(), 50, None, exc.message
        with db.engine().connect() as conn:
            rows, next_cursor = incidents.list_incidents(conn, flt, limit, after)
            counts = members.alert_counts(conn, [r["id"] for r in rows])
            by_status = {r["status"]: r["count"] for r in incidents.count_by(conn, "status")}
            by_priority = {r["priority"]: r["count"] for r in incidents.count_by(conn, "priority") if r["priority"]}
        # A refused query lists the first page unfiltered: its next page is
        # that list's, not the refused query's (refused again, it showed the
        # first page again, forever).
        next_url = (next_page_url("/ui", MultiDict() if error else request.args, encode_cursor(next_cursor))
                    if next_cursor is not None else None)
        return self._page("index.html", me=session.get("user"), incidents=rows, alert_counts=counts, form=form, error=error, by_status=by_status, by_priority=by_priority,
                          next_url=next_url, now=datetime.utcnow(), csrf=session["csrf"], refresh_url=request.full_path.rstrip("?"))

    def _load(self, incident_id: str) -> tuple[dict, list[dict]]:
        incident_id = parse_uuid(incident_id, "id")
        with db.engine().connect() as conn:
            row = incidents.require_incident(conn, incident_id)
            timeline = incidents.get_timeline(conn, incident_id)
            row["alerts"] = members.members_of(conn, incident_id)
        return row, timeline

    def incident(self, request: Request, incident_id: str) -> Response:
        session = self._signed_in(request)
        if isinstance(session, Response):
            return session
        try:
            row, timeline = self._load(incident_id)
        except (NotFound, BadRequest) as exc:
            return self._page("error.html", status=exc.status, message=exc.message, csrf=session["csrf"])
        notifications = [t for t in timeline if t["kind"] == "notification"]
        from functions.query.noise_board import incident_extras  # flapping, silences

        with db.engine().connect() as conn:
            pending = [proposals.present(p, row["generation"], row.get("root_generation") or 0, row["status"])
                       for p in proposals.of_incident(conn, row["id"])]
            taken_by = acknowledge.acknowledged_by(conn, row["id"]) if row["status"] in ACTIVE_STATUSES else None
        return self._page("incident.html", i=row, timeline=timeline, notifications=notifications, now=datetime.utcnow(),
                          noise=incident_extras(self.config, row), taken_by=taken_by, take=take_label(row["status"], taken_by),
                          allowed=allowed_transitions(row["status"], taken_by),
                          csrf=session["csrf"], proposals=pending, me=session.get("user"),
                          error=request.args.get("error"), notice=request.args.get("notice"),
                          service=(row.get("labels") or {}).get("service"))

    def transition(self, request: Request, incident_id: str) -> Response:
        status = request.form.get("status", "")

        def move(conn, incident_id: str, actor: str, note: str | None) -> list[str]:
            return incidents.transition(conn, incident_id, status, actor, self.config.event_source, note=note)[1]

        return self._incident_form(request, incident_id, move)

    def acknowledge(self, request: Request, incident_id: str) -> Response:
        """The Acknowledge button: the person takes the incident, through the
        same path as ``POST /incidents/{id}/acknowledge`` (shared.acknowledge:
        the timeline names them, PagerDuty's page is acknowledged). On a
        resolved incident it reopens it first, in the same transaction."""
        def take(conn, incident_id: str, actor: str, note: str | None) -> list[str]:
            event_ids: list[str] = []
            if incidents.require_incident(conn, incident_id)["status"] == "resolved":
                # The lifecycle refuses it if someone else moved it meanwhile.
                _, event_ids = incidents.transition(conn, incident_id, "investigating", actor, self.config.event_source, note=note)
            _, taken, _ = acknowledge.acknowledge(conn, incident_id, actor, self.config.event_source, note)
            return event_ids + taken

        return self._incident_form(request, incident_id, take)

    def _incident_form(self, request: Request, incident_id: str, act) -> Response:
        """A form that changes an incident: the signed-in session and its
        CSRF token, the person and an optional note, then ``act(conn,
        incident_id, actor, note)`` in one transaction, whose events are
        published after it commits; a refusal comes back on the page."""
        session = self.form_session(request)
        if isinstance(session, Response):
            return session
        incident_id = parse_uuid(incident_id, "id")
        try:
            note = storable_text((request.form.get("note") or "").strip(), "note", NOTE_MAX) or None
            actor = self.form_actor(request)
        except BadRequest as exc:
            return self._page("error.html", status=exc.status, message=exc.message, csrf=session["csrf"])
        try:
            with db.transaction() as conn:
                event_ids = act(conn, incident_id, actor, note)
        except ApiError as exc:
            if exc.status >= 500:
                raise
            return self._redirect(f"/ui/incidents/{incident_id}?" + urlencode({"error": exc.message}))
        self.publisher.submit(event_ids)
        return self._redirect(f"/ui/incidents/{incident_id}")

    def report(self, request: Request, incident_id: str) -> Response:
        session = self._signed_in(request)
        if isinstance(session, Response):
            return session
        row, timeline = self._load(incident_id)
        text = self.templates.get_template("report.md").render(i=row, p=present(row), timeline=timeline,
                                                               ttr=duration(row["created_at"], row.get("resolved_at")))
        return Response(text, mimetype="text/markdown", headers={**self.security_headers(),
                        "Content-Disposition": f'inline; filename="incident-{row["id"]}.md"'})

    def stylesheet(self, request: Request) -> Response:
        return Response((HERE / "static" / "board.css").read_text(), mimetype="text/css",
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


def session_key(config: Settings) -> bytes:
    """The key shared-token session cookies (and device cookies) are signed
    with: from the shared token, so that rotating it ends every such session.
    Without a shared token there are no such sessions, and nothing public may
    stand in for the key (the list of token hashes is no secret): a key of
    this process alone. Personal sessions need no key: they are rows."""
    material = config.api_token.reveal() if config.api_token else secrets.token_hex(32)
    return hmac.new(material.encode(), b"board-session", hashlib.sha256).digest()


def personal_csrf(session_id: str) -> str:
    """A personal session's CSRF token: derived from its id (which only the
    HttpOnly cookie carries), one-way, so the page that shows it shows no id."""
    return hmac.new(session_id.encode(), b"board-csrf", hashlib.sha256).hexdigest()[:32]


_UNSAFE_IN_NEXT = re.compile(r"[\x00-\x20\x7f\\]|^//")


def _safe_next(value: str | None) -> str:
    """Only paths of this board: never an open redirect, and nothing that
    could split or end the Location header (control characters) or that a
    browser reads as another host (a backslash)."""
    if value and value.startswith("/ui") and not _UNSAFE_IN_NEXT.search(value):
        return value
    return "/ui"

