"""What has not reached its consumer yet, and how an operator sends it again.

- The outbox backlog: rows waiting for the Broker (``published_at IS NULL
  AND parked_at IS NULL``), and parked rows, which failed too often and wait
  for a person (``parked_at IS NOT NULL``).
- Re-driving a parked row puts it back in the queue (``parked_at``,
  ``next_attempt_at`` cleared, ``attempts`` reset, ``last_error`` kept); the
  publisher and the sweep send it as any other row.
- Redelivering a dead letter sends the stored event to the Broker again, in
  structured mode, with its original id, type, source, extensions and data,
  and records who did it, when and how it went. A letter already re-driven
  successfully is not sent again unless forced.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from shared import dead_letters, incidents
from shared.dead_letters import clip
from shared.errors import Conflict, NotFound, NotRecorded
from shared.timefmt import rfc3339

if TYPE_CHECKING:  # sent by a redelivery only: the query's other requests never load requests
    import requests

log = logging.getLogger("backlog")

UTC_NOW = "timezone('utc', now())"
OUTBOX_COLUMNS = ("id", "type", "source", "subject", "extensions", "created_at", "published_at", "parked_at",
                  "next_attempt_at", "attempts", "last_error")
STRUCTURED = "application/cloudevents+json; charset=utf-8"


# --------------------------------------------------------------------------- the outbox


def pending(conn: Connection) -> tuple[int, float]:
    """(rows waiting for the Broker, age in seconds of the oldest; 0 when none)."""
    count, age = conn.execute(sa.text(
        f"SELECT count(*), COALESCE(EXTRACT(EPOCH FROM ({UTC_NOW} - min(created_at))), 0) "
        "FROM event_outbox WHERE published_at IS NULL AND parked_at IS NULL"
    )).one()
    return count, max(float(age), 0.0)


def parked_count(conn: Connection) -> int:
    return conn.execute(sa.text(
        "SELECT count(*) FROM event_outbox WHERE parked_at IS NOT NULL AND published_at IS NULL"
    )).scalar_one()


def state_of(row: dict) -> str:
    if row.get("published_at") is not None:
        return "published"
    return "parked" if row.get("parked_at") is not None else "pending"


@dataclass(frozen=True)
class ParkedFilter:
    event_types: tuple[str, ...] = ()
    incident_ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None


def list_parked(conn: Connection, flt: ParkedFilter, limit: int, after: tuple[datetime, str] | None = None
                ) -> tuple[list[dict], tuple[datetime, str] | None]:
    """Most recently parked first; the page and the (parked_at, id) of the next one."""
    clauses = ["parked_at IS NOT NULL", "published_at IS NULL"]
    params: dict = {"limit": limit + 1}
    if flt.event_types:
        clauses.append("type = ANY(:types)")
        params["types"] = list(flt.event_types)
    if flt.incident_ids:
        clauses.append("subject = ANY(:incidents)")
        params["incidents"] = list(flt.incident_ids)
    if flt.since is not None:
        clauses.append("parked_at >= :since")
        params["since"] = flt.since
    if flt.until is not None:
        clauses.append("parked_at < :until")
        params["until"] = flt.until
    if after is not None:
        clauses.append("(parked_at, id) < (:after_at, :after_id)")
        params.update(after_at=after[0], after_id=after[1])
    rows = conn.execute(sa.text(
        f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM event_outbox WHERE {' AND '.join(clauses)} "
        "ORDER BY parked_at DESC, id DESC LIMIT :limit"
    ), params).mappings().all()
    rows = [dict(r) for r in rows]
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, (rows[-1]["parked_at"], rows[-1]["id"])
    return rows, None


def get_outbox(conn: Connection, event_id: str) -> dict | None:
    row = conn.execute(sa.text(f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM event_outbox WHERE id = :id"),
                       {"id": event_id}).mappings().first()
    return dict(row) if row else None


def redrive_parked(conn: Connection, event_id: str, actor: str) -> tuple[dict, bool]:
    """Put a parked row back in the queue: (the row, whether it was parked).

    A row that is pending or already published is left alone (a second
    re-drive changes nothing); an unknown id is NotFound.
    """
    row = conn.execute(sa.text(
        "UPDATE event_outbox SET parked_at = NULL, next_attempt_at = NULL, attempts = 0 "
        f"WHERE id = :id AND parked_at IS NOT NULL AND published_at IS NULL RETURNING {', '.join(OUTBOX_COLUMNS)}"
    ), {"id": event_id}).mappings().first()
    if row is None:
        current = get_outbox(conn, event_id)
        if current is None:
            raise NotFound(f"no outbox event {clip(event_id, 120)!r}")
        return current, False
    row = dict(row)
    if row.get("subject") and incidents.get_incident(conn, row["subject"]) is not None:
        incidents.add_timeline(conn, row["subject"], "outbox_redriven",
                               {"event_id": row["id"], "event_type": row["type"], "last_error": clip(row.get("last_error"), 300)},
                               clip(actor, 200))
    log.info("Parked event re-driven", extra={"event_id": row["id"], "event_type": row["type"], "actor": actor})
    return row, True


# --------------------------------------------------------------------------- dead letters


def _not_json(token: str):
    raise ValueError(f"{token} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is no finite number")
    return number


def structured(row: dict) -> bytes:
    """The stored dead letter as a structured-mode CloudEvent (JSON), its
    attributes as they came (less the Broker's error attributes)."""
    attributes = dict(row.get("attributes") or {})
    is_base64 = bool(attributes.pop(dead_letters.BASE64_MARK, False))
    attributes.pop(dead_letters.CLEANED_MARK, None)
    for name in dead_letters.ERROR_ATTRIBUTES:
        attributes.pop(name, None)
    document = {k: v for k, v in attributes.items() if v is not None}
    if is_base64:
        if row.get("data"):
            # The sink keeps a data_base64 that is not valid base64 as the
            # text that came; the Broker (strict, padded base64) must refuse
            # it, and anything else sent would not be the event that came.
            try:
                data = base64.b64decode(row["data"].replace("\r", "").replace("\n", ""), validate=True)
            except (binascii.Error, ValueError):
                raise Conflict(f"dead letter {row.get('id')} cannot be redelivered: its data_base64 is not valid "
                               "base64 (kept as the text that came) and the Broker refuses such an event") from None
            document["data_base64"] = base64.b64encode(data).decode("ascii")
        return json.dumps(document, allow_nan=False).encode()
    data = dead_letters.decode_data(row)
    content_type = str(attributes.get("datacontenttype") or "application/json").split(";")[0].strip().lower()
    if (data and (content_type == "application/json" or content_type.endswith("+json"))
            # Not built in this function past the sink's bound: its bytes go as they came.
            and dead_letters.items(data) <= dead_letters.MAX_ITEMS):
        try:
            # Strict: data with NaN, Infinity or a number no float holds (as
            # a binary-mode letter keeps its bytes) would not go out as the
            # JSON that came in, so its bytes go as they came, in data_base64.
            document["data"] = json.loads(data, parse_constant=_not_json, parse_float=_finite)
        except (ValueError, RecursionError):
            document["data_base64"] = base64.b64encode(data).decode("ascii")
    elif data and content_type.startswith("text/"):
        document["data"] = data.decode("utf-8")
    elif data:
        document["data_base64"] = base64.b64encode(data).decode("ascii")
    return json.dumps(document, allow_nan=False).encode()


# Only the start of a refusal is kept: the rest is not read.
ANSWER_MAX_BYTES = 4096


def send(http: requests.Session, sink: str, body: bytes, timeout: float) -> str | None:
    """Post one structured event; None when the Broker accepted it, else why
    not. Each try ends within ``timeout`` as a whole (shared.deadline), so
    a Broker that trickles its answer cannot outlive the redelivery's claim."""
    import requests

    from shared import deadline

    headers = {"Content-Type": STRUCTURED}

    def post() -> requests.Response:
        # Redirects are not followed (shared.outbox.post_event says why).
        # A 2xx is the Broker's yes however its answer ends (partial_2xx):
        # reporting it failed would have the engineer send the event again.
        return deadline.request(http, "POST", sink, timeout, ANSWER_MAX_BYTES, partial_2xx=True, data=body,
                                headers=headers, allow_redirects=False)

    try:
        try:
            response = post()
        except requests.ConnectionError as exc:
            # A kept-alive connection the Broker closed fails on first use;
            # an error inside an answer (an SSLError is a ConnectionError)
            # is that answer's, not sent again.
            if deadline.answered(exc):
                raise
            response = post()
    except deadline.UNUSABLE_URL as exc:
        # A setting to fix, not a Broker that is down: said so, and the
        # letter stays failed, to be redelivered once it is fixed.
        return clip(f"{type(exc).__name__}: {deadline.unusable_setting(exc, 'K_SINK')} is not a URL an event can be sent to", 300)
    except requests.RequestException as exc:
        why = (f"no whole answer within {timeout:g}s" if isinstance(exc, requests.Timeout)
               else "the answer was cut off" if isinstance(exc, requests.exceptions.ChunkedEncodingError)
               else f"the Broker answered {exc.response.status_code} and its answer could not be read"
               if deadline.answered(exc) else "the Broker could not be reached")
        return clip(f"{type(exc).__name__}: {why}", 300)
    if 200 <= response.status_code < 300:
        return None
    return clip(f"the Broker answered {response.status_code}: {deadline.answer_text(response)[:200]}", 300)


def redeliver(bind: Engine, sink: str, letter_id: int, actor: str, force: bool = False, timeout: float = 5.0,
              http: requests.Session | None = None) -> tuple[dict, bool, str | None]:
    """Send a dead letter again: (its record, whether it was sent now, the error).

    The letter is claimed in one short transaction and sent outside any, so
    no database transaction waits on the Broker; two operators pressing the
    button at once send it once (the second is told it is under way). A
    claim whose sender is gone (older than dead_letters.claim_stale_seconds)
    is released and taken over. Whatever happens after the claim, the
    letter does not stay ``sending``: an error in the send is recorded as a
    failure (and raised), and a recording the database failed is tried
    again, the outcome alone; only when that fails too does the claim wait
    to go stale, and the caller gets :class:`NotRecorded` (a 500 saying
    what the Broker did, logged at error level).
    """
    stale = dead_letters.claim_stale_seconds(timeout)
    with bind.begin() as conn:
        row = dead_letters.get(conn, letter_id, for_update=True)
        if row is None:
            raise NotFound(f"no dead letter {letter_id}")
        if row["redelivery_status"] == dead_letters.SENT and not force:
            row.pop("data", None)
            return row, False, None
        if not sink:
            raise Conflict("this function has no Broker to send to (K_SINK is not set)")
        body = structured(row)  # a 409 before the claim when there is nothing the Broker would take
        row.pop("data", None)  # up to the sink's 2 MiB: not kept while the Broker answers
        told_released(conn, dead_letters.release_stale(conn, stale, letter_id))
        claimed_at = dead_letters.claim_redelivery(conn, letter_id, actor, stale)
        if claimed_at is None:
            raise Conflict(f"a redelivery of dead letter {letter_id} is under way; look again in a moment")
    try:
        if http is None:
            import requests

            from shared.deadline import bounded

            http = bounded(requests.Session())
        error = send(http, sink, body, timeout)
    except BaseException as exc:
        # Not the Broker's answer (send says those): a bug, a setting the
        # bound refuses (a SOCKS proxy in HTTP_PROXY), the worker stopped.
        # Recorded as the failure it is, so the letter does not show
        # "sending" until its claim goes stale; raised, so it is a 500 with
        # its traceback in the log.
        _record_crash(bind, row, actor, claimed_at, exc)
        raise
    record = _record(bind, row, actor, claimed_at, error)
    level = logging.WARNING if error else logging.INFO
    log.log(level, "Dead letter redelivered" if not error else "Dead letter redelivery failed",
            extra={"dead_letter_id": letter_id, "event_type": clip(row["event_type"], 120), "actor": actor, "error": error})
    return record, True, error


def _record(bind: Engine, row: dict, actor: str, claimed_at: datetime, error: str | None) -> dict:
    """Record the outcome under the claim, and tell the incident. When that
    fails, the outcome alone in a transaction of its own: a timeline entry
    lost is better than a letter shown "sending" that is not. When that
    fails too, :class:`NotRecorded` (a 500 saying what the Broker did: a
    503 would invite a retry, which would send the event again once the
    claim is stale)."""
    letter_id = row["id"]
    try:
        with bind.begin() as conn:
            record = dead_letters.mark_redelivered(conn, letter_id, actor, error, claimed_at)
            outcome = record["redelivery_status"] if record else (dead_letters.FAILED if error else dead_letters.SENT)
            _tell(conn, row, actor, outcome, error, claimed_at, taken_over=record is None,
                  replaces_release=record is not None and not record["was_sending"])
            if record is None:
                record = _taken_over(conn, letter_id, actor)
        return record
    except Exception:  # any failure, a bug in _tell too: the outcome alone
        log.warning("Recording a dead letter's redelivery failed; recording its outcome alone", exc_info=True,
                    extra={"dead_letter_id": letter_id, "actor": actor, "broker_error": error})
    try:
        with bind.begin() as conn:
            record = dead_letters.mark_redelivered(conn, letter_id, actor, error, claimed_at)
            return record if record is not None else _taken_over(conn, letter_id, actor)
    except Exception as exc:  # said below, with what the Broker did
        accepted = error is None
        what = (f"the Broker accepted dead letter {letter_id} and recording that failed: it has the event, a redelivery would send it again"
                if accepted else f"the Broker did not accept dead letter {letter_id} and recording that failed")
        # The claim stays until it goes stale (claim_of shows it so); the
        # sweep or the next redelivery then releases it as "failed", sender
        # gone: this line is the only place that says the Broker had it.
        log.error(what[0].upper() + what[1:], exc_info=True,
                  extra={"dead_letter_id": letter_id, "actor": actor, "event_type": clip(row["event_type"], 120),
                         "broker_accepted": accepted, "broker_error": error})
        raise NotRecorded(f"{what} ({type(exc).__name__}); its claim is released as stale later",
                          dead_letter_id=letter_id, broker_accepted=accepted, broker_error=error) from exc


def _record_crash(bind: Engine, row: dict, actor: str, claimed_at: datetime, exc: BaseException) -> None:
    error = (f"{type(exc).__name__}: the redelivery failed before the Broker's answer was read; whether the Broker "
             "got the event is not known (the query function's log has the error)")
    try:
        with bind.begin() as conn:
            record = dead_letters.mark_redelivered(conn, row["id"], actor, error, claimed_at)
            if record is not None:
                _tell(conn, row, actor, dead_letters.FAILED, error, claimed_at, replaces_release=not record["was_sending"])
    except Exception:  # the send's error is the one raised; the claim goes stale
        log.exception("Recording a crashed dead-letter redelivery failed; its claim stays until it is stale",
                      extra={"dead_letter_id": row["id"], "actor": actor})


def _taken_over(conn: Connection, letter_id: int, actor: str) -> dict:
    log.warning("A dead-letter redelivery outlived its claim, which another took over; its outcome is on the "
                "timeline only", extra={"dead_letter_id": letter_id, "actor": actor})
    current = dead_letters.get(conn, letter_id)
    current.pop("data", None)
    return current


# What a redelivery's entry says when the sweep had released its claim
# (told_released's entry, same claimed_at): that entry was a guess.
REPLACES_RELEASE = ("replaces the earlier entry of this claim (claimed_at), released as its sender gone: the sender was "
                    "only slow, this is its real outcome, counted once")


def _tell(conn: Connection, row: dict, actor: str, outcome: str, error: str | None, claimed_at: datetime,
          taken_over: bool = False, replaces_release: bool = False) -> None:
    """The redelivery on its incident's timeline, with the claim it was
    made under (``claimed_at``: a release's entry and the outcome of the
    same claim carry the same); ``replaces_release``: the sweep had
    released that claim, and this outcome replaces its entry."""
    if row.get("incident_id") and incidents.get_incident(conn, row["incident_id"]) is not None:
        details = {"dead_letter_id": row["id"], "event_type": clip(row["event_type"], 120), "outcome": outcome, "error": error}
        if taken_over:
            details["claim"] = "taken over by a later redelivery before this one ended"
        details["claimed_at"] = rfc3339(claimed_at)
        if replaces_release:
            details["replaces"] = REPLACES_RELEASE
        incidents.add_timeline(conn, row["incident_id"], "dead_letter_redelivered", details, clip(actor, 200))


def told_released(conn: Connection, released: list[dict]) -> None:
    """Claims released as stale (dead_letters.release_stale): each on its
    incident's timeline, under the actor who claimed it, and logged."""
    for letter in released:
        _tell(conn, letter, letter["redelivered_by"] or "unknown", letter["redelivery_status"], letter["redelivery_error"],
              letter["redelivered_at"])
        log.warning("Released a dead-letter redelivery claim whose sender is gone",
                    extra={"dead_letter_id": letter["id"], "claimed_by": letter["redelivered_by"],
                           "outcome": letter["redelivery_status"]})


RELEASE_BATCH = 100
RELEASE_MAX_BATCHES = 10


def release_stale_claims(bind: Engine, publish_timeout: float) -> int:
    """For the sweep: release every redelivery claim whose sender is gone
    (a batch at a time, at most ``RELEASE_MAX_BATCHES``; rows a
    redelivery holds are left to the next sweep)."""
    stale = dead_letters.claim_stale_seconds(publish_timeout)
    total = 0
    for _ in range(RELEASE_MAX_BATCHES):
        with bind.begin() as conn:
            released = dead_letters.release_stale(conn, stale, batch=RELEASE_BATCH)
            told_released(conn, released)
        total += len(released)
        if len(released) < RELEASE_BATCH:
            break
    return total
