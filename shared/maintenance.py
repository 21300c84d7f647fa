"""Maintenance windows: label matchers and a time span during which matching
alerts are held back instead of opening incidents.

A held alert is **kept** (``suppressed_alerts``: the whole alert, the windows
that held it, how often it came), never dropped. When no window holds it any
more, the sweep (:func:`release`) replays it through the ordinary intake path
if it is still firing, as if it had just arrived; a held alert that resolved
meanwhile is simply marked released. Every change to a window is written to
``maintenance_audit`` in the same transaction as the change.

Times come from :mod:`shared.clock` so tests can move through a window.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import clock, matchers as matcher_syntax
from shared.alerts import Alert
from shared.errors import BadRequest, Conflict, NotFound
from shared.sqltext import compact
from shared.timefmt import json_default

ACTOR = "maintenance"
log = logging.getLogger("maintenance")
WINDOW_COLUMNS = "id, matchers, starts_at, ends_at, reason, created_by, created_at, ended_by"

_ACTIVE = sa.text(f"SELECT {WINDOW_COLUMNS} FROM maintenance_windows WHERE starts_at <= :now AND ends_at > :now ORDER BY id")

# A batch's held alerts in one statement, in fingerprint order: the firing
# ones a window matches are held (kept, counted), the resolved ones already
# held are marked resolved. Two statements (the firing, then the resolved)
# deadlocked two batches that fire one held alert and resolve another in the
# opposite way (A fires X and resolves Y, B fires Y and resolves X: each
# locked its firing row, then waited for the other's). Every other statement
# that locks held alerts takes them in fingerprint order too (the sweep's
# release and its flapping clean-up).
# A resolved alert only updates a row held now (the join; the conflict's
# WHERE judges the row again once locked, so one the sweep released
# meanwhile is left alone). It is sent without its alert, which the held row
# keeps: serialising every resolution of a storm whole cost the group
# commit's writer milliseconds per hundred alerts. Should the held row vanish
# between the join and the insert, the row inserted takes the held one's
# alert and windows as the join read them.
_HOLD = sa.text(compact(
    """
    INSERT INTO suppressed_alerts AS s (fingerprint, alert_name, status, alert, window_ids, count, first_suppressed_at, last_seen_at)
    SELECT x.fingerprint, x.alert_name, x.status, COALESCE(x.alert, h.alert), COALESCE(x.window_ids, h.window_ids), 1, :now, :now
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(fingerprint text, alert_name text, status text, alert jsonb, window_ids jsonb)
    LEFT JOIN suppressed_alerts h ON h.fingerprint = x.fingerprint AND h.released_at IS NULL
    WHERE x.status = 'firing' OR h.fingerprint IS NOT NULL
    ORDER BY x.fingerprint
    ON CONFLICT (fingerprint) DO UPDATE SET
        status = EXCLUDED.status, last_seen_at = :now,
        alert = CASE WHEN EXCLUDED.status = 'firing' THEN EXCLUDED.alert ELSE s.alert END,
        window_ids = CASE WHEN EXCLUDED.status = 'firing' THEN EXCLUDED.window_ids ELSE s.window_ids END,
        count = CASE WHEN EXCLUDED.status <> 'firing' THEN s.count WHEN s.released_at IS NULL THEN s.count + 1 ELSE 1 END,
        first_suppressed_at = CASE WHEN EXCLUDED.status = 'firing' AND s.released_at IS NOT NULL
                                   THEN :now ELSE s.first_suppressed_at END,
        released_at = CASE WHEN EXCLUDED.status = 'firing' THEN NULL ELSE s.released_at END,
        incident_id = CASE WHEN EXCLUDED.status = 'firing' THEN NULL ELSE s.incident_id END
    WHERE EXCLUDED.status = 'firing' OR s.released_at IS NULL
    """
))

_HELD = sa.text("SELECT fingerprint, status, alert FROM suppressed_alerts WHERE released_at IS NULL "
                "ORDER BY fingerprint LIMIT :batch FOR UPDATE SKIP LOCKED")
_HELD_FIRING = sa.text("SELECT fingerprint, status, alert FROM suppressed_alerts WHERE released_at IS NULL "
                       "AND status = 'firing' ORDER BY fingerprint LIMIT :batch")


def _labels(alert_labels: dict, alert_name: str) -> dict:
    # AlertManager's labels always carry alertname; other sources may not.
    return {"alertname": alert_name, **alert_labels}


def _parsed(window: dict) -> list | None:
    try:
        return [matcher_syntax.parse(t) for t in window["matchers"]]
    except BadRequest as exc:
        # A window stored under older rules: it holds nothing (the alert
        # pages) rather than failing the intake for every alert.
        log.warning("Maintenance window matcher no longer parses", extra={"window_id": window["id"], "error": exc.message})
        return None


def _windows_matching(windows: list[dict], labels: dict) -> list[str]:
    found = []
    for w in windows:
        parsed = _parsed(w)
        if parsed is not None and matcher_syntax.match_all(parsed, labels):
            found.append(w["id"])
    return found


def active_windows(conn: Connection, now: datetime) -> list[dict]:
    return [dict(r) for r in conn.execute(_ACTIVE, {"now": now}).mappings()]


def alert_to_json(alert: Alert) -> dict:
    data = asdict(alert)
    return json.loads(json.dumps(data, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v)))


def alert_from_json(data: dict) -> Alert:
    values = dict(data)
    for name in ("starts_at", "ends_at"):
        if values.get(name):
            values[name] = datetime.fromisoformat(values[name])
    return Alert(**values)


def hold(conn: Connection, firing: Sequence[Alert], now: datetime, resolving: Sequence[Alert] = ()) -> dict[str, list[str]]:
    """Record the firing alerts an active window matches, and that the
    ``resolving`` ones already held resolved (a held alert that resolves is
    not replayed when its window ends), in one statement: one alert per
    fingerprint across both (the batch's last word on it, as noise.screen
    passes them). Returns fingerprint -> the ids of the windows holding it."""
    held: dict[str, list[str]] = {}
    windows = active_windows(conn, now) if firing else []
    for alert in firing if windows else ():
        ids = _windows_matching(windows, _labels(alert.labels, alert.alert_name))
        if ids:
            held[alert.fingerprint] = ids
    rows = [{"fingerprint": a.fingerprint, "alert_name": a.alert_name, "status": "firing", "alert": alert_to_json(a),
             "window_ids": held[a.fingerprint]} for a in firing if a.fingerprint in held]
    rows += [{"fingerprint": a.fingerprint, "alert_name": a.alert_name, "status": "resolved"} for a in resolving]
    if rows:
        conn.execute(_HOLD, {"rows": json.dumps(rows), "now": now})
    return held


def release(conn: Connection, record, now: datetime, batch: int = 500) -> list[str]:
    """Replay held alerts no window holds any more; ``record(conn, alerts)``
    is the intake's store path (returns its RecordResult). Returns the ids of
    the events to publish."""
    held = conn.execute(_HELD, {"batch": batch}).mappings().all()
    if not held:
        return []
    replay, done = _released(held, active_windows(conn, now))
    event_ids: list[str] = []
    incident_of: dict[str, str | None] = {}
    if replay:
        result = record(conn, replay)
        event_ids = result.event_ids
        incident_of = {o.fingerprint: o.incident_id for o in result.outcomes}
    if done:
        conn.execute(sa.text(compact(
            """
            UPDATE suppressed_alerts s SET released_at = :now, incident_id = x.incident_id
            FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(fingerprint text, incident_id text)
            WHERE s.fingerprint = x.fingerprint
            """)), {"now": now, "rows": json.dumps([{"fingerprint": f, "incident_id": incident_of.get(f)} for f in done])})
    return event_ids


def _released(held, windows: list[dict]) -> tuple[list[Alert], list[str]]:
    """Of the held rows, the firing alerts to replay and every fingerprint
    no window holds any more."""
    replay, done = [], []
    for row in held:
        alert = alert_from_json(row["alert"])
        if _windows_matching(windows, _labels(alert.labels, alert.alert_name)):
            continue  # an overlapping window still holds it
        done.append(row["fingerprint"])
        if row["status"] == "firing":
            replay.append(alert)
    return replay, done


def due(conn: Connection, now: datetime, batch: int = 500) -> list[Alert]:
    """The firing alerts the next :func:`release` would replay, read without
    locking: the intake looks up their topology before the sweep's
    transaction, so the replay is correlated like a fresh alert."""
    held = conn.execute(_HELD_FIRING, {"batch": batch}).mappings().all()
    return _released(held, active_windows(conn, now))[0] if held else []


# ---------------------------------------------------------------- windows


def _audit(conn: Connection, window_id: str, action: str, actor: str, details: dict) -> None:
    conn.execute(sa.text("INSERT INTO maintenance_audit (window_id, action, actor, at, details) "
                         "VALUES (:w, :a, :actor, :at, CAST(:d AS jsonb))"),
                 {"w": window_id, "a": action, "actor": actor, "at": clock.now(), "d": json.dumps(details, default=json_default)})


def create(conn: Connection, matchers: list[str], starts_at: datetime, ends_at: datetime, reason: str, actor: str) -> dict:
    parsed = matcher_syntax.parse_all(matchers)
    texts = [m.text() for m in parsed]
    window_id = str(uuid.uuid4())
    conn.execute(sa.text(
        "INSERT INTO maintenance_windows (id, matchers, starts_at, ends_at, reason, created_by, created_at) "
        "VALUES (:id, CAST(:m AS jsonb), :s, :e, :r, :by, :now)"),
        {"id": window_id, "m": json.dumps(texts), "s": starts_at, "e": ends_at, "r": reason, "by": actor, "now": clock.now()})
    _audit(conn, window_id, "created", actor, {"matchers": texts, "starts_at": starts_at, "ends_at": ends_at, "reason": reason})
    return get(conn, window_id)


def get(conn: Connection, window_id: str, lock: bool = False) -> dict:
    row = conn.execute(sa.text(f"SELECT {WINDOW_COLUMNS} FROM maintenance_windows WHERE id = :id" + (" FOR UPDATE" if lock else "")),
                       {"id": window_id}).mappings().first()
    if row is None:
        raise NotFound(f"maintenance window {window_id} not found")
    return dict(row)


def list_windows(conn: Connection) -> list[dict]:
    return [dict(r) for r in conn.execute(sa.text(f"SELECT {WINDOW_COLUMNS} FROM maintenance_windows ORDER BY starts_at DESC, id"))
            .mappings()]


def suppressed(conn: Connection, window_id: str | None = None, limit: int = 200) -> list[dict]:
    """Held alerts (and, for a window, those it held that were released since)."""
    where = "WHERE window_ids ? :id" if window_id else "WHERE released_at IS NULL"
    rows = conn.execute(sa.text(
        "SELECT fingerprint, alert_name, status, alert->'labels' AS labels, window_ids, count, first_suppressed_at, "
        f"last_seen_at, released_at, incident_id FROM suppressed_alerts {where} ORDER BY last_seen_at DESC LIMIT :limit"),
        {"id": window_id, "limit": limit}).mappings()
    return [dict(r) for r in rows]


def audit_of(conn: Connection, window_id: str) -> list[dict]:
    rows = conn.execute(sa.text("SELECT action, actor, at, details FROM maintenance_audit WHERE window_id = :w ORDER BY id"),
                        {"w": window_id}).mappings()
    return [dict(r) for r in rows]


def end(conn: Connection, window_id: str, actor: str) -> dict:
    """End a window now. Ending one that already ended changes nothing; one
    that has not started is deleted instead (it never held anything)."""
    window = get(conn, window_id, lock=True)
    now = clock.now()
    if window["ends_at"] <= now:
        return window
    if window["starts_at"] >= now:
        raise Conflict("this window has not started; delete it instead", starts_at=window["starts_at"].isoformat() + "Z")
    conn.execute(sa.text("UPDATE maintenance_windows SET ends_at = :now, ended_by = :by WHERE id = :id"),
                 {"now": now, "by": actor, "id": window_id})
    _audit(conn, window_id, "ended", actor, {"ends_at": now, "was": window["ends_at"]})
    return get(conn, window_id)


def delete(conn: Connection, window_id: str, actor: str) -> None:
    window = get(conn, window_id, lock=True)
    conn.execute(sa.text("DELETE FROM maintenance_windows WHERE id = :id"), {"id": window_id})
    _audit(conn, window_id, "deleted", actor, {"matchers": window["matchers"], "starts_at": window["starts_at"],
                                                "ends_at": window["ends_at"], "reason": window["reason"]})
