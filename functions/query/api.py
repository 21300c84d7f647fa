"""The engineers' HTTP API over the incident service: declarative filters,
keyset pagination, lifecycle changes refused with a clear error."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from datetime import datetime
from urllib.parse import urlencode

from flask import Request, Response
from werkzeug.datastructures import MultiDict

from shared import db, filters, incidents, members
from shared import flapping as noise_flapping
from shared.config import Settings
from shared.errors import BadRequest
from shared.filters import single as _single
from shared.http import MAX_QUERY_STRING, json_response, parse_json_body, parse_uuid, storable_text, verified_user
from shared.models import STATUSES
from shared.publisher import Publisher
from shared.timefmt import rfc3339

log = logging.getLogger("query")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# Room for the cursor the Link adds: the longest this API issues (an outbox
# id of 120 characters, each JSON-escaped as a surrogate pair, in base64) is
# under 2 KiB. So the Link's query, followed, is within MAX_QUERY_STRING.
CURSOR_ROOM = 2048
MAX_LINK_QUERY = MAX_QUERY_STRING - CURSOR_ROOM
# Characters a query may carry as they are (RFC 3986) that a value can hold:
# left unencoded, a value is no longer in the Link than in the query.
_LINK_SAFE = "!$'()*,/:@"
NOTE_MAX = 4000
_ASCII_NUMBER = re.compile(r"[0-9]{1,9}")
_CURSOR_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?")
# The declared filters (shared/filters.py), then paging.
LIST_PARAMETERS = tuple(f.name for f in filters.FILTERS) + ("limit", "cursor")

PUBLIC_FIELDS = (
    "id", "alert_name", "priority", "status", "created_at", "updated_at", "resolved_at", "summary",
    "description", "diagnostics", "remediation_actions", "fingerprint", "labels", "annotations", "source",
    "starts_at", "last_seen_at", "repeat_count", "generation", "resolved_by", "merged_into",
)


def present(row: dict) -> dict:
    return {name: rfc3339(row.get(name)) for name in PUBLIC_FIELDS}


def present_member(member: dict) -> dict:
    return {name: rfc3339(value) for name, value in member.items()}


def link_query(args: MultiDict) -> str:
    """The query a next page's Link repeats, without its cursor: each
    parameter once, its values comma-separated and each named once (the same
    filter), so repetitions do not lengthen it."""
    params = []
    for name in args:
        if name != "cursor":
            parts = dict.fromkeys(part for value in args.getlist(name) for part in value.split(","))
            params.append((name, ",".join(parts)))
    return urlencode(params, safe=_LINK_SAFE)


def next_link(request: Request, cursor: str) -> str:
    """The Link header of the next page: the same query, the next cursor.
    check_parameters bounded the query, so the Link is a URL this API reads
    and a header line clients read."""
    query = link_query(request.args)
    return f'<{request.base_url}?{query}{"&" if query else ""}{urlencode([("cursor", cursor)])}>; rel="next"'


def encode_cursor(cursor: incidents.Cursor) -> str:
    raw = json.dumps([cursor.created_at.isoformat(), cursor.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _incident_uuid(raw) -> str:
    return parse_uuid(raw, "cursor")


def decode_cursor(token: str, parse_id=_incident_uuid) -> incidents.Cursor:
    """Only what encode_cursor makes: a naive time and an id of the listed
    kind (``parse_id`` raises ValueError or BadRequest otherwise), so nothing
    a client forged (NUL, a lone surrogate) reaches the driver."""
    try:
        created_at, row_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not _CURSOR_TIME.fullmatch(created_at):
            raise ValueError("cursors carry naive UTC times")
        return incidents.Cursor(datetime.fromisoformat(created_at), parse_id(row_id))
    except (ValueError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError, RecursionError, BadRequest):
        raise BadRequest("cursor: not a cursor this API issued; follow the Link header", parameter="cursor") from None


def check_parameters(args: MultiDict, allowed: tuple[str, ...]) -> None:
    """Refuse a query parameter the endpoint does not take (a misspelt filter
    silently ignored answers more than was asked for) and a NUL in any value.
    A name is echoed at most 60 characters long. An endpoint that pages (takes
    a cursor) refuses a query its next page's Link could not repeat within
    MAX_QUERY_STRING."""
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        known = f"allowed: {', '.join(allowed)}" if allowed else "this endpoint takes no query parameters"
        raise BadRequest(f"unknown parameter {unknown[0][:60]!r}; {known}", parameter=unknown[0][:60], allowed=list(allowed))
    for name in args:
        if any("\x00" in value for value in args.getlist(name)):
            raise BadRequest(f"{name[:60]}: contains a NUL character", parameter=name[:60])
    if "cursor" in allowed:
        length = len(link_query(args))
        if length > MAX_LINK_QUERY:
            raise BadRequest(f"the query is {length} bytes as the next page's link repeats it (each value once, no cursor); "
                             f"at most {MAX_LINK_QUERY}, so that link stays within the {MAX_QUERY_STRING}-byte query string",
                             limit=MAX_LINK_QUERY)


def parse_filters(args: MultiDict) -> tuple[incidents.IncidentFilter, int, incidents.Cursor | None]:
    """The list filters from query arguments; BadRequest names a bad one."""
    check_parameters(args, LIST_PARAMETERS)
    limit_raw = _single(args, "limit")
    limit = DEFAULT_LIMIT
    if limit_raw is not None:
        # ASCII digits only: str.isdigit() and int() accept "²" and "١٢".
        if not _ASCII_NUMBER.fullmatch(limit_raw) or not 1 <= int(limit_raw) <= MAX_LIMIT:
            raise BadRequest(f"limit: must be a whole number from 1 to {MAX_LIMIT}, got {limit_raw[:20]!r}", parameter="limit")
        limit = int(limit_raw)
    cursor_raw = _single(args, "cursor")
    flt = filters.parse(args)
    return flt, limit, decode_cursor(cursor_raw) if cursor_raw is not None else None


class QueryApi:
    def __init__(self, config: Settings, publisher: Publisher):
        self.config = config
        self.publisher = publisher

    def list(self, request: Request) -> Response:
        flt, limit, after = parse_filters(request.args)
        with db.engine().connect() as conn:
            rows, next_cursor = incidents.list_incidents(conn, flt, limit, after)
            counts = members.alert_counts(conn, [r["id"] for r in rows])
        headers = {}
        if next_cursor is not None:
            headers["Link"] = next_link(request, encode_cursor(next_cursor))
        return json_response([{**present(r), "alert_count": counts.get(r["id"], 0)} for r in rows], headers=headers)

    def get(self, request: Request, incident_id: str) -> dict:
        incident_id = parse_uuid(incident_id, "id")
        check_parameters(request.args, ())
        with db.engine().connect() as conn:
            row = incidents.require_incident(conn, incident_id)
            timeline = incidents.get_timeline(conn, incident_id)
            flapping = noise_flapping.flapping_since(conn, incident_id)
            alerts = members.members_of(conn, incident_id)
        body = present(row)
        body["flapping_since"] = rfc3339(flapping)  # shared/flapping.py
        body["alert_count"] = len(alerts)
        body["alerts"] = [present_member(a) for a in alerts]
        body["timeline"] = [{**t, "at": rfc3339(t["at"])} for t in timeline]
        return body

    def patch(self, request: Request, incident_id: str) -> dict:
        incident_id = parse_uuid(incident_id, "id")
        check_parameters(request.args, ())
        body = parse_json_body(request, 64 * 1024)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object like {\"status\": \"investigating\", \"note\": \"...\"}")
        unknown = sorted(set(body) - {"status", "note"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:60]!r}; allowed: status, note", field=unknown[0][:60])
        status = body.get("status")
        if status not in STATUSES:
            raise BadRequest(f"status: must be one of {', '.join(STATUSES)}", field="status", allowed=list(STATUSES))
        note = body.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > NOTE_MAX):
            raise BadRequest(f"note: must be a string of at most {NOTE_MAX} characters", field="note")
        if note is not None:
            storable_text(note, "note")
        actor = self.actor(request)
        with db.transaction() as conn:
            row, event_ids = incidents.transition(conn, incident_id, status, actor, self.config.event_source, note=note)
        log.info("Incident status changed", extra={"incident_id": incident_id, "status": status, "actor": actor})
        self.publisher.submit(event_ids)
        return present(row)

    def actor(self, request: Request) -> str:
        """Who acts: ``user:NAME`` for a personal token (verified), else
        ``api:`` and what ACTOR_HEADER says (the caller's word). A personal
        token whose request names someone else in ACTOR_HEADER is refused,
        not silently re-attributed: the script or person sending it is
        confused about whose token it holds."""
        header = self.config.actor_header
        named = request.headers.get(header, "").strip()
        person = verified_user(request)
        if person is not None:
            if named and named != person:
                raise BadRequest(f"{header} names {named[:100]!r} but the bearer token is {person}'s personal token; "
                                 f"leave {header} out (the token says who you are) or send it as {person!r}", header=header)
            return f"user:{person}"
        return f"api:{storable_text(named, header)[:150]}" if named else "api"

