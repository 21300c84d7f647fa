"""Dead letters: every event the Broker could not deliver, kept with what it
takes to send it again (attributes and data) and what each redelivery did.

The dead-letter sink is the last place a page can be saved, so a letter is
stored even when PostgreSQL cannot hold it as it came: what it stores is
sanitised (no NUL, no lone surrogate at any depth, no NaN or Infinity,
no attribute nested deeper than every reader parses, bounded key columns;
each change noted, see :func:`storable`). It is
reachable by anything inside the cluster, so what it stores is never trusted: a redelivery re-sends the stored event to the Broker, and the
consumers decide from the database, by their claims, whether there is work.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

# The column sizes of migration 0006; the destination is bounded so that the
# unique constraint over it can never overflow a btree entry.
MAX_EVENT_ID = 200
MAX_SOURCE = 300
MAX_TYPE = 200
MAX_DESTINATION = 500
MAX_CODE = 10
MAX_ERROR = 2000
# Not a valid CloudEvents attribute name ([a-z0-9] only), so it can never
# collide with one: marks data kept base64-encoded because it is not text.
BASE64_MARK = "_data_base64"
# Not a valid attribute name either: what had to change for the letter to be
# stored at all (a value jsonb cannot hold), one line per place, for the
# engineer reading it; never sent on a redelivery.
CLEANED_MARK = "_cleaned"
MAX_CLEANED_NOTES = 20
NOTE_PATH = 120
ERROR_ATTRIBUTES = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")

SENT = "sent"
FAILED = "failed"
DEAD_AGAIN = "dead_again"
# Claimed by an operator's redelivery that is talking to the Broker now.
SENDING = "sending"

COLUMNS = ("id", "event_id", "event_source", "event_type", "received_at", "error_destination", "error_code",
           "error_data", "attributes", "incident_id", "redelivery_count", "redelivered_at", "redelivered_by",
           "redelivery_status", "redelivery_error")
# How long ago the redelivery claim was taken (meaningful while ``sending``),
# by the database's clock: the one that judges the claim stale.
CLAIM_AGE = ("CAST(EXTRACT(EPOCH FROM (timezone('utc', now()) - redelivered_at)) AS double precision) "
             "AS claim_age_seconds")
SELECTED = ", ".join(COLUMNS) + ", " + CLAIM_AGE


def clean(text: str | None) -> str | None:
    """Text PostgreSQL and pg8000 accept: NUL and lone surrogates replaced."""
    if text is None:
        return None
    text = str(text)
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def clip(text: str | None, limit: int) -> str | None:
    text = clean(text)
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def clip_unique(text: str, limit: int) -> str:
    """Bounded but still distinct: a long value keeps a digest of the whole."""
    text = clean(text) or ""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text[: limit - 18] + "…~" + digest


class NumberText(str):
    """A JSON number no int or finite float holds (``1e400``, ``NaN``, an
    integer of more digits than Python converts), kept as its text: jsonb
    and strict JSON refuse NaN and Infinity, and the rest would turn into
    them or fail to parse."""


def _non_finite(number: float) -> str:
    return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")


def _path(keys) -> str:
    """``custom.a[3]``: the place a note speaks of, from the keys leading
    to it (built only for a note, which is rare)."""
    path = ""
    for key in keys:
        path = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
        if len(path) > 4 * NOTE_PATH:  # clipped when noted anyway
            break
    return path


# How deep an attribute may nest: the objects and arrays a value is in,
# counting the attributes (an attribute's own array is 1 deep). Deeper values are stored as their JSON text: every
# reader of the row (the API, the board) parses it with a bounded depth, so
# a value nested ~1000 deep stored as it came made the whole list a 400.
MAX_DEPTH = 64
_END = object()


def storable(value, notes: list[str], text: bool = True, max_depth: int | None = None):
    """``value`` as jsonb (or strict JSON) can hold it, and a note in
    ``notes`` for each place changed, in document order: a number no JSON
    parser keeps (NaN, ±Infinity, :class:`NumberText`) becomes its text;
    with ``text``, a string or key holding a NUL or a lone surrogate has it
    replaced (:func:`clean`), a key that then collides with another gets
    ``~2``, ``~3``; with ``max_depth``, an object or array deeper than that
    becomes its JSON text. Everything else stays as it is, so a letter is
    still re-drivable.

    Iterative, one frame per open object or array (not one per element, and
    no path string per element: a 300 KiB letter of 150,000 elements nested
    900 deep took half a gigabyte that way): the document was parsed at
    whatever depth the parser allowed, and walking it must not fail, nor
    take much more memory than the document, where parsing did not."""
    root: list = []
    keys: list = []  # from the top to the object or array being walked
    frames = [(iter(((None, value),)), root)]  # (its remaining members, its copy)
    while frames:
        members, out = frames[-1]
        member = next(members, _END)
        if member is _END:
            frames.pop()
            if keys:
                keys.pop()
            continue
        key, item = member
        if isinstance(out, dict):
            name = key if isinstance(key, str) else str(key)
            safe = clean(name) if text else name
            if safe != name:
                _note(notes, keys + [safe], "a NUL or lone surrogate in the key replaced")
            key, n = safe, 1
            while key in out:
                n += 1
                key = f"{safe}~{n}"
            if key != safe:
                _note(notes, keys + [key], f"key renamed from {safe!r}: it collided once cleaned")
        elif out is not root:
            key = len(out)
        depth = len(frames) - 1  # of item: the objects and arrays it is in
        if isinstance(item, (dict, list, tuple)):
            if max_depth is not None and depth > max_depth:
                kept = _json_text(item)
                _place(out, key, kept)
                _note(notes, _keys(keys, key, out is root),
                      f"nested deeper than {max_depth} levels: kept as its JSON text" if kept is not None
                      else f"nested deeper than {max_depth} levels and too deep to write as JSON: dropped")
                continue
            copy: dict | list = {} if isinstance(item, dict) else []
            _place(out, key, copy)
            if out is not root:
                keys.append(key)
            frames.append((iter(item.items()) if isinstance(item, dict) else enumerate(item), copy))
        elif isinstance(item, NumberText):
            _place(out, key, str(item))
            _note(notes, _keys(keys, key, out is root), f"the number {clip(item, 40)} kept as a string")
        elif isinstance(item, float) and not math.isfinite(item):
            _place(out, key, _non_finite(item))
            _note(notes, _keys(keys, key, out is root), f"the number {_non_finite(item)} kept as a string")
        elif isinstance(item, str):
            safe = clean(item) if text else item
            if safe != item:
                _note(notes, _keys(keys, key, out is root), "a NUL or lone surrogate replaced")
            _place(out, key, safe)
        elif item is None or isinstance(item, (bool, int, float)):
            _place(out, key, item)
        else:
            _place(out, key, clean(str(item)))
    return root[0]


def _place(out, key, value) -> None:
    if isinstance(out, dict):
        out[key] = value
    else:
        out.append(value)


def _keys(keys: list, key, at_root: bool) -> list:
    return keys if at_root else keys + [key]


def _json_text(item) -> str | None:
    try:
        return clean(json.dumps(item, default=str))
    except (RecursionError, ValueError):
        return None


def _note(notes: list[str], keys, what: str) -> None:
    if len(notes) > MAX_CLEANED_NOTES:  # only counted (bounded_notes): no path to build
        notes.append("")
        return
    path = keys if isinstance(keys, str) else _path(keys)
    notes.append(f"{clip(path, NOTE_PATH) or '(the value)'}: {what}")


def bounded_notes(notes: list[str]) -> list[str]:
    if len(notes) <= MAX_CLEANED_NOTES:
        return notes
    return notes[:MAX_CLEANED_NOTES] + [f"… and {len(notes) - MAX_CLEANED_NOTES} more"]


def clean_attributes(attributes: dict, notes: list[str]) -> dict:
    """The attributes as jsonb holds them (see :func:`storable`; nothing
    nested deeper than ``MAX_DEPTH``), the notes of what changed
    (``notes`` and this call's) under ``CLEANED_MARK``."""
    notes = list(notes)
    cleaned = attributes if _plainly_storable(attributes) else storable(attributes, notes, max_depth=MAX_DEPTH)
    cleaned = dict(cleaned)
    for mark in (BASE64_MARK, CLEANED_MARK):  # only this module writes them
        if cleaned.pop(mark, None) is not None:
            _note(notes, mark, "dropped: the sink's own mark, not a CloudEvents attribute name")
    if notes:
        cleaned[CLEANED_MARK] = bounded_notes(notes)
    return cleaned


def _plainly_storable(attributes: dict) -> bool:
    """True when the attributes need no walk (the usual letter): strict
    JSON, no NUL, no lone surrogate, and fewer brackets than ``MAX_DEPTH``
    (so none nested deeper). False only means: walk them."""
    try:
        text = json.dumps(attributes, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    return "\\u0000" not in text and text.count("[") + text.count("{") <= MAX_DEPTH


# What a letter may hold before the sink stops building it in memory: its
# arrays and objects and (roughly) their elements, counted in the raw text
# ('[', '{' and ',', those inside strings too: over-counting only chooses
# the cheap way). Each becomes a Python object in every copy the sink makes;
# the system's own events hold a few hundred. Past it, a member is kept as its
# JSON text (functions/deadletter/shallow.py) and a redelivery sends such
# data as its bytes (data_base64) rather than parsing it in the query function.
MAX_ITEMS = 50_000


def items(raw: bytes | str) -> int:
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") + raw.count(",")
    return raw.count(b"[") + raw.count(b"{") + raw.count(b",")


def encode_data(body: bytes, force_base64: bool = False) -> tuple[str, bool]:
    """The data as stored: UTF-8 text when it is text, else (or when it came
    base64-encoded) base64, flagged."""
    if force_base64:
        return base64.b64encode(body).decode("ascii"), True
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        return text, False
    return base64.b64encode(body).decode("ascii"), True


def decode_data(row: dict) -> bytes:
    text = row.get("data") or ""
    if (row.get("attributes") or {}).get(BASE64_MARK):
        return base64.b64decode(text)
    return text.encode("utf-8")


@dataclass(frozen=True)
class Letter:
    event_id: str
    source: str
    event_type: str
    destination: str | None
    code: str | None
    error: str | None
    attributes: dict
    body: bytes
    incident_id: str | None = None
    # What the sink already changed for the letter to be stored (numbers in
    # the data no strict JSON holds), as notes; see storable.
    cleaned: tuple[str, ...] = ()
    # The data came base64-encoded (structured mode's data_base64): stored
    # and sent again so, its bytes never read as JSON.
    data_base64: bool = False
    # data_base64 that is not base64 (unpadded, stray characters): stored as
    # this text, flagged base64 like the rest; a redelivery refuses it (409)
    data_base64_text: str | None = None


# One writer at a time per event: the key of migration 0006 counts a missing
# destination as distinct (NULLs are), so a letter handed over twice without
# one is found by this lookup, not by the key. A transaction-scoped advisory
# lock (safe behind PgBouncer's transaction pooling) keeps two copies
# arriving together from both missing it. The two-integer form, under a class
# of its own, cannot meet another lock of the system (they all take the
# one-bigint form, a separate key space); the source's length in the key
# keeps "a\nb"+"c" and "a"+"b\nc" apart. The schema is 0006's: a previous
# release, which only knows its ON CONFLICT, keeps working beside this one.
LOCK_CLASS = 0x444C  # "DL"
_LOCK = sa.text("SELECT pg_advisory_xact_lock(CAST(:class AS integer), "
                "hashtext(length(CAST(:src AS text)) || ':' || CAST(:src AS text) || CAST(:id AS text)))")

# A repeat: the same event dead-lettered again. It is the latest news of the
# letter, so received_at moves (the list, newest first, shows it on top) and
# an incident the first copy did not name is linked. After a redelivery it
# needs a person again (dead_again); while a redelivery is being sent it
# keeps the sender's claim (another operator must not send it a second time)
# and mark_redelivered, seeing received_at past the claim, records dead_again.
def _repeat(row: str, code: str, err: str, incident: str) -> str:
    return (
        f"error_code = {code}, error_data = {err}, received_at = timezone('utc', now()), "
        f"incident_id = COALESCE({row}incident_id, {incident}), "
        f"redelivery_status = CASE WHEN {row}redelivery_status = '{SENDING}' THEN '{SENDING}' "
        f"WHEN {row}redelivered_at IS NOT NULL THEN '{DEAD_AGAIN}' ELSE {row}redelivery_status END "
    )


_AGAIN = sa.text(
    "UPDATE dead_letters SET " + _repeat("", ":code", ":err", ":incident") +
    "WHERE id = (SELECT id FROM dead_letters WHERE event_source = :src AND event_id = :id "
    # None and '' are one destination: a previous release stored '' for an
    # empty one. Of rows a previous release recorded twice, the one last
    # redelivered (whose redelivery this repeat may be), else the oldest.
    "AND COALESCE(error_destination, '') = COALESCE(:dest, '') "
    "ORDER BY redelivered_at DESC NULLS LAST, id LIMIT 1) "
    "RETURNING id, redelivery_count, false AS inserted"
)

_INSERT = sa.text(
    "INSERT INTO dead_letters (event_id, event_source, event_type, error_destination, error_code, error_data, "
    "attributes, data, incident_id) "
    "VALUES (:id, :src, :type, :dest, :code, :err, CAST(:attrs AS jsonb), :data, :incident) "
    # A previous release's sink, which takes no advisory lock, may have
    # stored the letter since the lookup (the constraint of migration 0006).
    "ON CONFLICT ON CONSTRAINT uq_dead_letters_event DO UPDATE SET "
    + _repeat("dead_letters.", "EXCLUDED.error_code", "EXCLUDED.error_data", "EXCLUDED.incident_id") +
    "RETURNING id, redelivery_count, (xmax = 0) AS inserted"
)


def record(conn: Connection, letter: Letter) -> tuple[int, int, bool]:
    """Store one dead letter; (row id, redeliveries so far, new row?).

    Once per event and destination (none, or an empty one, being one
    destination): the Broker may hand over the same dead letter twice; a
    letter that fails again after a redelivery is marked so. Values jsonb or
    a text column cannot hold are stored as :func:`storable` says, noted
    under ``CLEANED_MARK``.
    """
    key = {
        "id": clip_unique(letter.event_id, MAX_EVENT_ID),
        "src": clip_unique(letter.source, MAX_SOURCE),
        "dest": clip_unique(letter.destination, MAX_DESTINATION) if letter.destination else None,
        "code": clip(letter.code, MAX_CODE),
        "err": clip(letter.error, MAX_ERROR),
        "incident": letter.incident_id,
    }
    conn.execute(_LOCK, {**key, "class": LOCK_CLASS})
    row = conn.execute(_AGAIN, key).first()
    if row is None:
        if letter.data_base64_text is not None:
            data, is_base64 = clean(letter.data_base64_text), True
        else:
            data, is_base64 = encode_data(letter.body, force_base64=letter.data_base64)
        attributes = clean_attributes(letter.attributes, list(letter.cleaned))
        if is_base64:
            attributes[BASE64_MARK] = True
        row = conn.execute(_INSERT, {
            **key,
            "type": clip_unique(letter.event_type, MAX_TYPE),
            # Strict JSON: what storable left is all jsonb holds, and a NaN
            # slipping through is a bug to see, not a letter to half-store.
            "attrs": json.dumps(attributes, allow_nan=False),
            "data": data,
        }).one()
    return row.id, row.redelivery_count, row.inserted


# --------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class Filter:
    event_types: tuple[str, ...] = ()
    incident_ids: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    redelivered: bool | None = None  # True: successfully re-driven; False: not (yet)
    since: datetime | None = None
    until: datetime | None = None


def _where(flt: Filter) -> tuple[list[str], dict]:
    clauses, params = [], {}
    if flt.event_types:
        clauses.append("event_type = ANY(:types)")
        params["types"] = list(flt.event_types)
    if flt.incident_ids:
        clauses.append("incident_id = ANY(:incidents)")
        params["incidents"] = list(flt.incident_ids)
    if flt.destinations:
        clauses.append("error_destination = ANY(:destinations)")
        params["destinations"] = list(flt.destinations)
    if flt.redelivered is True:
        clauses.append(f"redelivery_status = '{SENT}'")
    elif flt.redelivered is False:
        clauses.append(f"redelivery_status IS DISTINCT FROM '{SENT}'")
    if flt.since is not None:
        clauses.append("received_at >= :since")
        params["since"] = flt.since
    if flt.until is not None:
        clauses.append("received_at < :until")
        params["until"] = flt.until
    return clauses, params


def list_letters(conn: Connection, flt: Filter, limit: int, after: tuple[datetime, int] | None = None,
                 with_data: bool = False) -> tuple[list[dict], tuple[datetime, int] | None]:
    """Newest first; the page and the (received_at, id) of the next one."""
    clauses, params = _where(flt)
    if after is not None:
        clauses.append("(received_at, id) < (:after_at, :after_id)")
        params.update(after_at=after[0], after_id=after[1])
    columns = SELECTED + (", data" if with_data else "")
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = conn.execute(
        sa.text(f"SELECT {columns} FROM dead_letters{where} ORDER BY received_at DESC, id DESC LIMIT :limit"),
        {**params, "limit": limit + 1},
    ).mappings().all()
    rows = [dict(r) for r in rows]
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, (rows[-1]["received_at"], rows[-1]["id"])
    return rows, None


def get(conn: Connection, letter_id: int, for_update: bool = False) -> dict | None:
    lock = " FOR UPDATE" if for_update else ""
    row = conn.execute(
        sa.text(f"SELECT {SELECTED}, data FROM dead_letters WHERE id = :id{lock}"), {"id": letter_id}
    ).mappings().first()
    return dict(row) if row else None


# A redelivery's claim: status ``sending``, redelivered_at the claim's
# moment, redelivered_by its sender. The send is bounded (two tries, each
# within PUBLISH_TIMEOUT_SECONDS as a whole, shared.deadline), so a sender
# still alive records its outcome well within claim_stale_seconds; a claim
# older than that was left by a sender that is gone (its process stopped,
# or its request failed before recording and could not release it). Such a
# claim is shown stale (claim_of), released by the sweep, and taken over by
# the next redelivery, which releases it first (release_stale).
CLAIM_MARGIN_SECONDS = 10


def claim_stale_seconds(publish_timeout: float) -> float:
    """How long a redelivery may hold its claim: two tries of the send and
    a margin for recording the outcome."""
    return 2 * publish_timeout + CLAIM_MARGIN_SECONDS


def claim_of(row: dict, stale_seconds: float) -> dict | None:
    """The claim a ``sending`` letter shows: who took it and when, how long
    ago (the database's clock), when it goes stale and whether it has: its
    sender is gone, the sweep or the next redelivery releases it. None when
    no redelivery holds the letter."""
    if row.get("redelivery_status") != SENDING:
        return None
    age = max(float(row.get("claim_age_seconds") or 0.0), 0.0)
    return {"claimed_by": row.get("redelivered_by"), "claimed_at": row.get("redelivered_at"),
            "age_seconds": round(age, 1), "stale_after_seconds": stale_seconds, "stale": age > stale_seconds}


def claim_redelivery(conn: Connection, letter_id: int, actor: str, stale_seconds: float) -> datetime | None:
    """Mark the letter as being sent by ``actor``: the claim's moment, which
    the sender hands back to mark_redelivered (its token), or None while
    another redelivery holds a claim younger than ``stale_seconds`` (the
    caller releases a stale one first, release_stale, so its attempt is
    counted and told; were it not, this takes it over all the same).

    redelivered_at is the claim's own moment (clock_timestamp, the row
    locked), not its transaction's start: a repeat recorded before it has
    an earlier received_at, and one caused by this send, recorded once the
    Broker took it, a later one (see mark_redelivered). Claims of one row
    are taken one after another under its lock, so each has a later moment
    than the one before: the moment names the claim."""
    return conn.execute(
        sa.text(
            f"UPDATE dead_letters SET redelivery_status = '{SENDING}', "
            "redelivered_at = timezone('utc', clock_timestamp()), "
            "redelivered_by = :actor WHERE id = :id AND (redelivery_status IS DISTINCT FROM :sending "
            "OR redelivered_at < timezone('utc', now()) - make_interval(secs => :stale)) RETURNING redelivered_at"
        ),
        {"id": letter_id, "actor": clip(actor, 200), "sending": SENDING, "stale": stale_seconds},
    ).scalar()


# A repeat recorded after the claim means the redelivered event failed again.
_OUTCOME_AFTER_REPEAT = (f"CASE WHEN CAST(:status AS text) = '{SENT}' AND (redelivery_status = '{DEAD_AGAIN}' "
                         f"OR received_at >= redelivered_at) THEN '{DEAD_AGAIN}' ELSE :status END")


def mark_redelivered(conn: Connection, letter_id: int, actor: str, error: str | None,
                     claimed_at: datetime) -> dict | None:
    """Record one redelivery attempt (who, when, how it went), made under
    the claim taken at ``claimed_at``; None, nothing written, when the
    letter no longer carries that claim: a redelivery that outlived its
    claim was taken over, and writing its outcome would end the claim of
    the one sending now (a third could then send it alongside). A claim the
    sweep released (``failed``, its sender thought gone) still carries its
    moment: the real outcome replaces the guess, counted once.

    The Broker's yes is not the subscriber's: a subscriber that refuses the
    event for good has it dead-lettered again at once, often before this
    runs. That repeat moved received_at past the claim's moment, and a
    previous release's sink may have set dead_again meanwhile: either way
    the letter failed again, so it stays for a person instead of showing as
    delivered.

    The record carries ``was_sending``: False when the sweep had released
    the claim (its outcome a guess, which this one replaces), so the
    incident's timeline can say the later entry replaces the earlier."""
    # The row's status before this write, read under its lock (the write
    # takes the same lock in the same transaction): RETURNING gives only the
    # new one, and the sweep's release may commit in between otherwise.
    before = conn.execute(
        sa.text("SELECT redelivery_status FROM dead_letters WHERE id = :id AND redelivered_at = :claimed_at FOR UPDATE"),
        {"id": letter_id, "claimed_at": claimed_at},
    ).first()
    if before is None:
        return None
    row = conn.execute(
        sa.text(
            "UPDATE dead_letters SET redelivery_count = redelivery_count "
            f"+ CASE WHEN redelivery_status = '{SENDING}' THEN 1 ELSE 0 END, "
            "redelivered_at = timezone('utc', now()), redelivered_by = :actor, "
            f"redelivery_status = {_OUTCOME_AFTER_REPEAT}, redelivery_error = :error "
            f"WHERE id = :id AND redelivered_at = :claimed_at RETURNING {SELECTED}"
        ),
        {"id": letter_id, "actor": clip(actor, 200), "status": FAILED if error else SENT, "error": clip(error, MAX_ERROR),
         "claimed_at": claimed_at},
    ).mappings().first()
    return {**row, "was_sending": before.redelivery_status == SENDING} if row is not None else None


def release_stale(conn: Connection, stale_seconds: float, letter_id: int | None = None, batch: int = 100) -> list[dict]:
    """End claims older than ``stale_seconds`` (their senders are gone): the
    attempt counted, ``failed`` with a redelivery_error saying so, or
    ``dead_again`` when the letter came back after the claim; the letters
    released (id, incident, type, who claimed, outcome, error). Only
    ``letter_id``'s when given (the next redelivery, which holds its row),
    else at most ``batch`` (the sweep; rows a redelivery holds are skipped).
    Whether the Broker got the event is not known: the letter stays for a
    person, and sending it again is safe (the consumers' claims)."""
    only = "AND id = :letter " if letter_id is not None else ""
    rows = conn.execute(
        sa.text(
            "UPDATE dead_letters SET redelivery_count = redelivery_count + 1, "
            f"redelivery_status = CASE WHEN received_at >= redelivered_at THEN '{DEAD_AGAIN}' ELSE '{FAILED}' END, "
            "redelivery_error = :error "
            "WHERE id IN (SELECT id FROM dead_letters "
            f"WHERE redelivery_status = '{SENDING}' AND redelivered_at < timezone('utc', now()) - make_interval(secs => :stale) "
            f"{only}ORDER BY redelivered_at LIMIT :batch FOR UPDATE SKIP LOCKED) "
            "RETURNING id, incident_id, event_type, redelivered_by, redelivered_at, redelivery_status, redelivery_error"
        ),
        {"stale": stale_seconds, "letter": letter_id, "batch": batch,
         "error": clip(f"no outcome was recorded within {stale_seconds:g}s of the claim: its sender is gone (its "
                       "process stopped, or its request failed before recording); whether the Broker got the event "
                       "is not known", MAX_ERROR)},
    ).mappings().all()
    return [dict(r) for r in rows]


def counts(conn: Connection) -> tuple[int, int]:
    """(every dead letter, those not successfully re-driven)."""
    total, pending = conn.execute(sa.text(
        f"SELECT count(*), count(*) FILTER (WHERE redelivery_status IS DISTINCT FROM '{SENT}') FROM dead_letters"
    )).one()
    return total, pending


def timeline_entries(conn: Connection, incident_id: str) -> int:
    return conn.execute(sa.text(
        "SELECT count(*) FROM incident_timeline WHERE incident_id = :i AND kind = 'dead_letter'"
    ), {"i": incident_id}).scalar_one()
