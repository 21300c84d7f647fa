"""The operators' API over what did not reach its consumer: dead letters and
parked outbox events, listed with filters and keyset pages, and sent again
by a person (recorded with the actor)."""

from __future__ import annotations

from flask import Request, Response
from werkzeug.datastructures import MultiDict

from functions.query.api import DEFAULT_LIMIT, MAX_LIMIT, check_parameters, decode_cursor, encode_cursor, next_link
from shared import backlog, db, dead_letters, incidents
from shared.config import Settings
from shared.errors import BadGateway, BadRequest
from shared.filters import repeated as _values, single as _single, time_range
from shared.http import json_response, parse_uuid
from shared.publisher import Publisher
from shared.timefmt import rfc3339

DEAD_LETTER_PARAMETERS = ("event_type", "incident_id", "destination", "redelivered", "since", "until", "limit", "cursor")
PARKED_PARAMETERS = ("event_type", "incident_id", "since", "until", "limit", "cursor")
MAX_DEAD_LETTER_ID = 2**63 - 1


def parse_limit(args: MultiDict) -> int:
    raw = _single(args, "limit")
    if raw is None:
        return DEFAULT_LIMIT
    # int() raises ValueError past 4300 digits: the length is bounded first.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit: must be a whole number from 1 to {MAX_LIMIT}, got {raw[:20]!r}", parameter="limit")
    return int(raw)


def parse_flag(args: MultiDict, name: str, true: str, false: str) -> bool | None:
    """Exactly the two spellings the OpenAPI document names."""
    raw = _single(args, name)
    if raw is None:
        return None
    if raw in (true, false):
        return raw == true
    raise BadRequest(f"{name}: must be {true} or {false}, got {raw[:20]!r}", parameter=name)


def _incident_ids(args: MultiDict) -> tuple[str, ...]:
    return tuple(parse_uuid(v, "incident_id") for v in _values(args, "incident_id", strip=True))


def parse_dead_letter_filters(args: MultiDict) -> tuple[dead_letters.Filter, int, tuple | None]:
    check_parameters(args, DEAD_LETTER_PARAMETERS)
    since, until = time_range(args)
    flt = dead_letters.Filter(
        event_types=tuple(_values(args, "event_type")),
        incident_ids=_incident_ids(args),
        destinations=tuple(_values(args, "destination")),
        redelivered=parse_flag(args, "redelivered", "yes", "no"),
        since=since,
        until=until,
    )
    cursor = _single(args, "cursor")
    after = None
    if cursor is not None:
        position = decode_cursor(cursor, lambda raw: str(parse_dead_letter_id(raw)))
        after = (position.created_at, int(position.id))
    return flt, parse_limit(args), after


def parse_parked_filters(args: MultiDict) -> tuple[backlog.ParkedFilter, int, tuple | None]:
    check_parameters(args, PARKED_PARAMETERS)
    since, until = time_range(args)
    flt = backlog.ParkedFilter(event_types=tuple(_values(args, "event_type")), incident_ids=_incident_ids(args),
                               since=since, until=until)
    cursor = _single(args, "cursor")
    after = None
    if cursor is not None:
        position = decode_cursor(cursor, lambda raw: parse_outbox_id(raw))
        after = (position.created_at, position.id)
    return flt, parse_limit(args), after


def parse_dead_letter_id(raw: str) -> int:
    if (not isinstance(raw, str) or not (raw.isascii() and raw.isdigit()) or len(raw) > 19
            or not 1 <= int(raw) <= MAX_DEAD_LETTER_ID):
        raise BadRequest(f"id: not a dead-letter id (a positive whole number): {raw[:60]!r}", parameter="id")
    return int(raw)


def parse_outbox_id(raw: str) -> str:
    if "\x00" in raw or len(raw) > 200:
        raise BadRequest("id: not an outbox event id", parameter="id")
    return dead_letters.clean(raw)


def present_claim(row: dict, stale_seconds: float) -> dict | None:
    """The redelivery claim of a ``sending`` letter: being sent now, or
    stale (its sender is gone; the sweep or the next redelivery releases it)."""
    claim = dead_letters.claim_of(row, stale_seconds)
    return claim and {**claim, "claimed_at": rfc3339(claim["claimed_at"])}


def present_dead_letter(row: dict, stale_seconds: float) -> dict:
    marks = (dead_letters.BASE64_MARK, dead_letters.CLEANED_MARK)
    attributes = {k: v for k, v in (row.get("attributes") or {}).items() if k not in marks}
    return {
        "id": row["id"],
        "event_id": row["event_id"],
        "event_source": row["event_source"],
        "event_type": row["event_type"],
        "received_at": rfc3339(row["received_at"]),
        "destination": row["error_destination"],
        "code": row["error_code"],
        "error": row["error_data"],
        "incident_id": row["incident_id"],
        "attributes": attributes,
        "cleaned": (row.get("attributes") or {}).get(dead_letters.CLEANED_MARK) or [],
        "redelivered": row["redelivery_status"] == dead_letters.SENT,
        "redelivery_count": row["redelivery_count"],
        "redelivered_at": rfc3339(row["redelivered_at"]),
        "redelivered_by": row["redelivered_by"],
        "redelivery_status": row["redelivery_status"],
        "redelivery_error": row["redelivery_error"],
        "redelivery_claim": present_claim(row, stale_seconds),
    }


def present_outbox(row: dict) -> dict:
    body = {name: rfc3339(row.get(name)) for name in backlog.OUTBOX_COLUMNS}
    body["state"] = backlog.state_of(row)
    return body


class BacklogApi:
    """Dead letters and parked outbox events: listed, and sent again by a person."""

    def __init__(self, config: Settings, publisher: Publisher, actor):
        self.config = config
        self.publisher = publisher
        self.actor = actor

    def dead_letters(self, request: Request) -> Response:
        flt, limit, after = parse_dead_letter_filters(request.args)
        with db.engine().connect() as conn:
            rows, following = dead_letters.list_letters(conn, flt, limit, after)
        headers = {}
        if following is not None:
            headers["Link"] = next_link(request, encode_cursor(incidents.Cursor(following[0], str(following[1]))))
        stale = dead_letters.claim_stale_seconds(self.config.publish_timeout_seconds)
        return json_response([present_dead_letter(r, stale) for r in rows], headers=headers)

    def redeliver_dead_letter(self, request: Request, letter_id: str) -> Response:
        check_parameters(request.args, ("force",))
        letter_id_int = parse_dead_letter_id(letter_id)
        force = bool(parse_flag(request.args, "force", "true", "false"))
        record, sent, error = backlog.redeliver(db.engine(), self.config.k_sink, letter_id_int, self.actor(request),
                                                force, self.config.publish_timeout_seconds)
        body = present_dead_letter(record, dead_letters.claim_stale_seconds(self.config.publish_timeout_seconds))
        if error:
            raise BadGateway(f"the Broker did not accept the event: {error}", dead_letter=body)
        return json_response({**body, "sent": sent})

    def parked(self, request: Request) -> Response:
        flt, limit, after = parse_parked_filters(request.args)
        with db.engine().connect() as conn:
            rows, following = backlog.list_parked(conn, flt, limit, after)
        headers = {}
        if following is not None:
            headers["Link"] = next_link(request, encode_cursor(incidents.Cursor(following[0], following[1])))
        return json_response([present_outbox(r) for r in rows], headers=headers)

    def redeliver_parked(self, request: Request, event_id: str) -> Response:
        check_parameters(request.args, ())
        event_id = parse_outbox_id(event_id)
        with db.transaction() as conn:
            row, requeued = backlog.redrive_parked(conn, event_id, self.actor(request))
        if requeued:
            self.publisher.submit([row["id"]])
        return json_response({**present_outbox(row), "requeued": requeued})
