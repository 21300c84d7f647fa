"""The thin HTTP layer every function shares: routing, the bearer token,
body limits, JSON, and the one place where typed errors become statuses.

A function entry point is a functions-framework ``http`` function that calls
:func:`dispatch` with its routes; handlers receive the Flask request and the
path parameters and return a Flask response or a JSON-able value.
"""

from __future__ import annotations

import functools
import gc
import hmac
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from flask import Request, Response

from shared import content_coding
from shared.config import Secret
from shared.users import ApiUsers, UsersSource
from shared.errors import (
    ApiError,
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    SchemaBehind,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from shared.timefmt import json_default

log = logging.getLogger("http")

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    auth: bool = True

    def match(self, path: str) -> dict | None:
        m = self._regex.fullmatch(path)
        return m.groupdict() if m else None

    # Every request tries every route: the pattern is translated once.
    @functools.cached_property
    def _regex(self) -> re.Pattern:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern.rstrip("/") or "/") + "/?$")


# Set by the entry point (shared/serve.py): whether a build's objects are
# frozen out of the collector's full passes. Off elsewhere, so that a test
# process building routes in-process does not freeze its whole heap.
FREEZE_AFTER_BUILD = False


class LazyRoutes:
    """Routes whose handlers are imported by the first request that needs
    them; ``/health`` is answered without them.

    ``/health`` is the request a new instance answers first (the readiness
    probe, the cold-start measure): it needs the database and nothing else,
    so it is served from ``ready`` and does not build the rest; the first
    other request builds it. Settings are still read, and bad ones still
    refused, at import time. Requests that arrive together wait for one
    build (not one each)."""

    def __init__(self, build: Callable[[], list[Route]], ready: list[Route]):
        self._build = build
        self.ready = ready
        self._lock = threading.Lock()
        self._built: list[list[Route]] = []

    @property
    def built(self) -> bool:
        return bool(self._built)

    def __call__(self) -> list[Route]:
        if not self._built:
            with self._lock:
                if not self._built:
                    self._built.append(self._build())
                    if FREEZE_AFTER_BUILD:
                        # The handlers and what they imported live as long
                        # as the process: kept out of the collector's full
                        # passes. (The few cycles already garbage then, such
                        # as requests in flight, stay uncollected: a
                        # collection first would cost the first request
                        # tens of milliseconds.)
                        gc.freeze()
        return self._built[0]

    def for_request(self, method: str, path: str) -> list[Route]:
        """``ready`` when one of its routes answers this request, else every route."""
        if not self._built:
            for route in self.ready:
                if route.match(path) is not None and (route.method == method or (route.method == "GET" and method == "HEAD")):
                    return self.ready
        return self()


Routes = list[Route] | Callable[[], list[Route]]


def built_on_first_request(build: Callable[[], list[Route]]) -> LazyRoutes:
    """Decorate the function that returns a function's routes: they are built
    by the first request other than ``GET /health`` (:class:`LazyRoutes`)."""
    return LazyRoutes(build, [Route("GET", "/health", health, auth=False)])


def _database_error(exc: BaseException) -> bool:
    # SQLAlchemy is imported by whatever touched the database; if nothing
    # has, no exception can be one of its errors.
    errors = sys.modules.get("sqlalchemy.exc")
    return errors is not None and isinstance(exc, errors.SQLAlchemyError)


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        json.dumps(body, default=json_default, ensure_ascii=False),
        status=status,
        headers=headers or {},
        mimetype="application/json",
    )


# Where check_bearer leaves the verified name of a personal token's owner.
VERIFIED_USER = "incident_response.user"
# Where request_users keeps the personal token list this request reads.
REQUEST_USERS = "incident_response.users"


def request_users(request: Request, users: ApiUsers | UsersSource | None) -> ApiUsers:
    """The personal token list as this request sees it, taken once: the file
    may be reloaded while the request runs (shared/users.py), and a sign-in
    that identified a token with the old list must not stamp its session
    from the new one (a rotated token's session would outlive the rotation)."""
    if users is None or isinstance(users, ApiUsers):
        return users or ApiUsers()
    snapshot = request.environ.get(REQUEST_USERS)
    if snapshot is None:
        snapshot = request.environ[REQUEST_USERS] = users.current()
    return snapshot


def check_bearer(request: Request, token: Secret | None, users: ApiUsers | UsersSource | None = None) -> str | None:
    """The shared token or, with ``users``, a person's own token (shared/users.py),
    compared in constant time; refuses everything when neither is set. Returns
    the verified name for a personal token (also left in the request's
    environ, :func:`verified_user`), None for the shared token."""
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    users = request_users(request, users)
    if scheme.lower() != "bearer" or not presented or (token is None and not users):
        raise Unauthorized("a valid bearer token is required")
    # Both comparisons run whatever the first found: the time says nothing about which.
    person = users.identify(presented) if users else None
    shared = token is not None and hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), token.reveal().encode())
    if person is not None:
        request.environ[VERIFIED_USER] = person
        return person
    if not shared:
        raise Unauthorized("a valid bearer token is required")
    return None


def verified_user(request: Request) -> str | None:
    """Whose personal token authenticated this request, or None (the shared
    token: the caller's word about who it is, nothing more)."""
    return request.environ.get(VERIFIED_USER)


def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    data = request.stream.read(limit + 1)
    capped = request.environ.get("wsgi.input")
    if len(data) > limit or getattr(capped, "truncated", False):
        raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
    return data


# The largest body any function reads on its own fixed limit (the dead-letter
# sink's 2 MiB); MAX_BODY_BYTES may raise the bound above it.
LARGEST_FIXED_BODY = 2 * 1024 * 1024


class CappedInput:
    """``wsgi.input`` that ends after ``cap`` bytes, whoever reads it.

    functions-framework reads the whole body into memory after every
    response (its ``read_request`` hook), whatever the function answered:
    a 300 MB POST without a token took 300 MB. Through this stream that read
    stops at the cap; ``truncated`` says a larger body was cut. The image's
    server (shared/serve.py) already refuses such a body before reading it;
    this keeps the bound under any other server that streams the body
    (``functions-framework --target``'s gunicorn, a developer's)."""

    def __init__(self, raw, cap: int):
        self._raw = raw
        self._left = cap
        self.truncated = False

    def _allowance(self, size: int | None) -> int:
        return self._left if size is None or size < 0 else min(size, self._left)

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left <= 0 and not self.truncated and self._raw.read(1):
            self.truncated = True
        return data

    def read(self, size: int | None = -1) -> bytes:
        allowance = self._allowance(size)
        return self._take(self._raw.read(allowance)) if allowance > 0 else b""

    def readline(self, size: int | None = -1) -> bytes:
        allowance = self._allowance(size)
        return self._take(self._raw.readline(allowance)) if allowance > 0 else b""

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        # PEP 3333 requires it of wsgi.input; same hint rule as io.IOBase.
        lines, total = [], 0
        for line in self:
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while line := self.readline():
            yield line


def bound_request_bodies(app, cap: int) -> None:
    """Wrap the Flask app functions-framework created so no request body is
    ever buffered beyond ``cap`` bytes (call while that app is being set up).
    The cap is also left in the app's config for the server, which refuses
    a larger body before reading it (shared/serve.py)."""
    app.config["BODY_CAP"] = cap
    inner = app.wsgi_app

    def capped(environ, start_response):
        if "wsgi.input" in environ:
            environ["wsgi.input"] = CappedInput(environ["wsgi.input"], cap)
        return inner(environ, start_response)

    app.wsgi_app = capped


TOO_DEEP = "the body is nested too deeply"


def has_body(request: Request) -> bool:
    """A body was sent: a Content-Length above 0, or a chunked one (which has
    no Content-Length, so testing that alone drops it)."""
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def parse_json_body(request: Request, limit: int, allow_empty: bool = False, webhook: bool = False) -> Any:
    """The JSON body; ``None`` for an empty one when ``allow_empty``.

    ``webhook``: what relays in front of a webhook do is undone. A body
    labelled ``text/plain`` is read as JSON too (relays and scripts label
    what they forward so), and a gzip or deflate ``Content-Encoding`` is
    undone within ``limit`` (shared/content_coding.py). Off for the query
    API: there a browser could post, and a cross-site form may send
    text/plain without a preflight; nobody compresses those small bodies,
    so the header is not read there, as before."""
    content_type = (request.mimetype or "").lower()
    json_type = not content_type or content_type == "application/json" or content_type.endswith("+json")
    if not json_type and not (webhook and content_type == "text/plain"):
        expected = "application/json or text/plain" if webhook else "application/json"
        raise UnsupportedMediaType(f"expected Content-Type {expected}, got {request.mimetype}")
    body = read_body(request, limit)
    if webhook:
        body = content_coding.decode(body, request.headers.get("Content-Encoding"), limit)
    if allow_empty and not body.strip():
        return None
    if not body:
        if "Content-Length" in request.headers or "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise BadRequest("the body is not valid JSON: it is empty")
        # HTTP/1.0 without a Content-Length has no body (RFC 9112 6.3): the
        # sender meant one, and "Expecting value at line 1" would not say so.
        raise BadRequest("the body is not valid JSON: it is empty (a request body needs a Content-Length "
                         "or chunked Transfer-Encoding)")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    except ValueError as exc:
        # An integer of more digits than int() converts (4300): json.loads
        # raises a plain ValueError, not a JSONDecodeError.
        raise BadRequest(f"the body is not valid JSON: {str(exc).split(';')[0]}") from None


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(value: str, name: str, max_length: int | None = None) -> str:
    """Refuse text PostgreSQL cannot store before it reaches the driver: NUL,
    and lone UTF-16 surrogates (legal in JSON escapes, not UTF-8), on which
    pg8000 fails half-way through a message."""
    match = _UNSTORABLE.search(value)
    if match:
        what = "a NUL character" if match.group() == "\x00" else f"a lone UTF-16 surrogate (U+{ord(match.group()):04X})"
        raise BadRequest(f"{name}: contains {what}", field=name)
    if max_length is not None and len(value) > max_length:
        raise BadRequest(f"{name}: longer than {max_length} characters", field=name)
    return value


# The canonical text form only, ASCII hex in either case. uuid.UUID reads
# far more (braces, "urn:uuid:", no hyphens, and through int() surrounding
# whitespace, underscores, a sign and non-ASCII digits), so " 2345678-…" or
# "1_345678-…" named another incident's id instead of being refused.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_uuid(value: Any, name: str, detail: str = "parameter") -> str:
    """``value`` as the lower-case UUID it spells, or BadRequest naming
    ``name`` (under ``detail``: ``parameter`` for a path or query value,
    ``field`` for one in a body or event). A path or query parameter is
    named as functions/query/openapi.yaml names it: ``id`` for the id of the
    resource the path names, ``proposal_id`` for the one nested in it. Anything
    refused never reaches the driver, which fails half-way on a NUL or a lone surrogate."""
    if isinstance(value, str) and _UUID.fullmatch(value):
        return value.lower()
    shown = repr(value[:60]) if isinstance(value, str) else type(value).__name__
    raise BadRequest(f"{name}: not a UUID: {shown}", **{detail: name})


# The longest query string the query function reads (bytes), on every
# endpoint. The next page's Link repeats the query (functions/query/api.py)
# and must stay a header line clients read (http.client stops at 64 KiB);
# Knative's Envoy ingress refuses request headers of about 60 KiB anyway.
MAX_QUERY_STRING = 16 * 1024


def dispatch(request: Request, routes: Routes, token: Secret | None, service: str,
             max_query_string: int | None = None, users: ApiUsers | UsersSource | None = None) -> Response:
    """Route the request, enforce auth, and map every error to its status.
    A query string longer than ``max_query_string`` bytes is refused first.
    ``users``: personal tokens are accepted too (the query function)."""
    started = time.perf_counter()
    path = request.path
    try:
        if max_query_string is not None and len(request.query_string) > max_query_string:
            raise BadRequest(f"the query string is {len(request.query_string)} bytes; at most {max_query_string}",
                             limit=max_query_string)
        if isinstance(routes, LazyRoutes):
            routes = routes.for_request(request.method, path)
        elif callable(routes):
            routes = routes()
        allowed_methods = []
        for route in routes:
            params = route.match(path)
            if params is None:
                continue
            allowed_methods.append(route.method)
            if route.method != request.method and not (route.method == "GET" and request.method == "HEAD"):
                continue
            if route.auth:
                check_bearer(request, token, users)
            result = route.handler(request, **params)
            return result if isinstance(result, Response) else json_response(result)
        if allowed_methods:
            raise MethodNotAllowed(f"{request.method} is not allowed on {path}; allowed: {', '.join(sorted(set(allowed_methods)))}")
        raise NotFound(f"no such endpoint: {path}")
    except Unauthorized as exc:
        log.warning("Unauthorized", extra={"path": path, "method": request.method, "remote": request.remote_addr})
        return json_response(exc.body(), exc.status, {"WWW-Authenticate": 'Bearer realm="incident-response"'})
    except RecursionError:
        # Only input nested deeper than the interpreter's stack gets here (a
        # JSON document or CloudEvent no parser above caught): never a 500.
        log.warning("Request nested too deeply", extra={"path": path, "method": request.method})
        err = BadRequest("the request is nested too deeply")
        return json_response(err.body(), err.status)
    except MethodNotAllowed as exc:
        allow = ", ".join(sorted({r.method for r in routes if r.match(path) is not None}))
        return json_response(exc.body(), exc.status, {"Allow": allow})
    except ApiError as exc:
        if exc.status >= 500:
            log.error("Request failed", extra={"path": path, "error": exc.message, "status": exc.status})
        return json_response(exc.body(), exc.status, {"Retry-After": "5"} if exc.status == 503 else None)
    except Exception as exc:  # last resort: log it, answer 500 (503 if transient), keep serving
        if not _database_error(exc):
            log.exception("Unhandled error", extra={"path": path, "service": service})
            return json_response(ApiError("internal error").body(), 500)
        from shared import db

        reason = db.retry_reason(exc)
        bound, described = db.bound_reached(exc), db.bound_described(exc)
        log.error(
            # A bound of the request's transaction (shared/db.py Bounds) that ran out is named: a lock
            # held elsewhere (a migration, another replica) or a runaway statement, rolled back.
            f"Database {described} reached; rolled back, answered 503" if bound else "Database error",
            extra={"path": path, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", "transient": reason is not None,
                   **({"bound": bound} if bound else {})},
        )
        if reason == db.SCHEMA_BEHIND:
            err = SchemaBehind()
        elif bound is not None:
            err = ServiceUnavailable(f"the database did not answer within this request's {described}, retry later", bound=bound)
        elif reason is not None:
            err = ServiceUnavailable("the database is unavailable, retry later")
        else:
            err = ApiError("internal error")
        return json_response(err.body(), err.status, {"Retry-After": "5"} if err.status == 503 else None)
    finally:
        log.debug("request", extra={"path": path, "ms": round((time.perf_counter() - started) * 1000, 2)})


def install_json_errors() -> None:
    """Errors raised by Flask before the function runs (a path its router
    cannot match, such as one with a newline) get the same JSON body as ours.

    functions-framework exposes the app's ``errorhandler`` while it imports the
    function's source, so this must run at import time of ``main.py``.
    """
    import functions_framework
    from werkzeug.exceptions import HTTPException

    @functions_framework.errorhandler(HTTPException)
    def _json_http_error(exc: HTTPException):
        code = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge, 415: UnsupportedMediaType}.get(exc.code or 500)
        if code is None:
            err = BadRequest(exc.description or "bad request") if (exc.code or 500) < 500 else ApiError("internal error")
            return json_response(err.body(), exc.code or 500)
        return json_response(code(exc.description or code.code).body(), exc.code)

    # functions-framework registers a crash handler for the code 500 (plain
    # text, the exception's own words), and Flask prefers a handler by code
    # to one by class: ours must take the code too.
    functions_framework.errorhandler(500)(_json_http_error)


def health(request: Request) -> Response:
    """The seed's Test 1 answer; 503 when the database cannot be reached, or
    its schema is older than this code (the migrations have yet to run)."""
    from shared import dbcheck

    state = dbcheck.database_state()
    if state == dbcheck.CONNECTED:
        return json_response({"status": "healthy", "database": state})
    if state == dbcheck.SCHEMA_BEHIND:
        return json_response({"status": "unhealthy", "database": state, "message": SchemaBehind().message}, 503)
    return json_response({"status": "unhealthy", "database": state}, 503)
