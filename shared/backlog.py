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
from shared.errors import Conflict, NotFound

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
    data = dead_letters.decode_data(row)
    content_type = str(attributes.get("datacontenttype") or "application/json").split(";")[0].strip().lower()
    if data and not is_base64 and (content_type == "application/json" or content_type.endswith("+json")):
        try:
            # Strict: data with NaN, Infinity or a number no float holds (as
            # a binary-mode letter keeps its bytes) would not go out as the
            # JSON that came in, so its bytes go as they came, in data_base64.
            document["data"] = json.loads(data, parse_constant=_not_json, parse_float=_finite)
        except (ValueError, RecursionError):
            document["data_base64"] = base64.b64encode(data).decode("ascii")
    elif data and not is_base64 and content_type.startswith("text/"):
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
    button at once send it once (the second is told it is under way).
    """
    with bind.begin() as conn:
        row = dead_letters.get(conn, letter_id, for_update=True)
        if row is None:
            raise NotFound(f"no dead letter {letter_id}")
        if row["redelivery_status"] == dead_letters.SENT and not force:
            row.pop("data", None)
            return row, False, None
        if not sink:
            raise Conflict("this function has no Broker to send to (K_SINK is not set)")
        # Two tries of the send, each bounded by the timeout, and a margin.
        if not dead_letters.claim_redelivery(conn, letter_id, actor, stale_seconds=2 * timeout + 10):
            raise Conflict(f"a redelivery of dead letter {letter_id} is under way; look again in a moment")
    if http is None:
        import requests

        from shared.deadline import bounded

        http = bounded(requests.Session())
    error = send(http, sink, structured(row), timeout)
    with bind.begin() as conn:
        record = dead_letters.mark_redelivered(conn, letter_id, actor, error)
        if row.get("incident_id") and incidents.get_incident(conn, row["incident_id"]) is not None:
            incidents.add_timeline(conn, row["incident_id"], "dead_letter_redelivered",
                                   {"dead_letter_id": letter_id, "event_type": clip(row["event_type"], 120),
                                    "outcome": record["redelivery_status"], "error": error}, clip(actor, 200))
    level = logging.WARNING if error else logging.INFO
    log.log(level, "Dead letter redelivered" if not error else "Dead letter redelivery failed",
            extra={"dead_letter_id": letter_id, "event_type": clip(row["event_type"], 120), "actor": actor, "error": error})
    return record, True, error
