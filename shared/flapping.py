"""Flapping: an alert that keeps changing between firing and resolved.

Every change of an alert's status is a *flip* (``alert_flaps``: its last
status and the times of its flips within ``FLAP_WINDOW_SECONDS``). At
``FLAP_THRESHOLD`` flips inside the window the fingerprint is *flapping*,
and its incident is flagged (timeline ``flapping``). While it flaps:

- its incident stays active: a resolution is noted on the timeline (kind
  ``flap``) instead of resolving it, and a firing refreshes it; if the flag
  is raised while the incident is resolved, it is reopened *silently*
  (same generation, no event);
- so no new incident, no new generation and no event: nothing is paged
  again and remediation, which runs once per generation, cannot loop.

The sweep (:func:`clear_quiet`) lowers the flag after ``FLAP_QUIET_SECONDS``
without a flip, noting it on the timeline; if the alert's last word was
"resolved", the incident is then resolved the ordinary way (one resolve
notification).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import db, proposals
from shared.correlation import store as correlation_store
from shared.alerts import Alert
from shared.timeline import add_timeline

ACTOR = "flapping"

# Locks the batch's rows before they are read, in one statement and in
# fingerprint order: a row not there yet is written as the alert's first
# sighting, so it is locked as well (a row locked only after the decision,
# by the save, let two batches deadlock or overwrite each other's flip).
# The function flaps_lock (migration 0020 holds its SQL) is planned once per
# server connection; it finds the rows by primary key, one per fingerprint.
_LOCK = sa.text("SELECT fingerprint, last_status, flips, last_flip_at, flapping_since, incident_id "
                "FROM flaps_lock(CAST(:alerts AS jsonb))")

# Saves the batch's rows, every one of them locked since it was read. The
# procedure flaps_save (migration 0018 holds its SQL) is planned once per
# server connection instead of once per transaction, as the intake's other
# write-cycle statements.
_SAVE = sa.text("CALL flaps_save(CAST(:rows AS jsonb))")

_ACTIVE = sa.text("SELECT id FROM incidents WHERE fingerprint = :f AND status IN ('open', 'investigating')")
# The alert's last incident was resolved by remediation and none is active:
# a re-firing now means the fix did not hold, which the ingest's after-fix
# rule reopens and pages at once. That is news for a human, not flapping.
_AFTER_A_FIX = sa.text("SELECT resolved_by = 'remediation' FROM incidents i WHERE fingerprint = :f "
                       "AND NOT EXISTS (SELECT 1 FROM incidents a WHERE a.fingerprint = :f "
                       "AND a.status IN ('open', 'investigating')) "
                       "ORDER BY created_at DESC LIMIT 1")
# The incidents flapping may touch for a fingerprint, read without locking
# them. A flapping row names the incident of its fingerprint when the flag
# went up; a take-over since moved that incident to its new root's
# fingerprint (the flapping alert is now one of its members). Touched
# through the old fingerprint, it was locked by a batch that did not hold
# the new root's flapping row, against one that did (its after-fix reopen,
# shared/ingest.py): a deadlock. And it would be reopened silently by an
# alert that is no longer its root. So an incident is used only while it
# has the fingerprint: every writer of it then holds that flapping row first.
# A merged incident lives on in its survivor and is never reopened.
_OWNED = sa.text(
    "SELECT r.fingerprint, "
    "(SELECT a.id FROM incidents a WHERE a.fingerprint = r.fingerprint AND a.status IN ('open', 'investigating') "
    " LIMIT 1) AS active, "
    "(SELECT n.id FROM incidents n WHERE n.id = r.named AND n.fingerprint = r.fingerprint) AS named, "
    "(SELECT b.id FROM incidents b WHERE b.fingerprint = r.fingerprint AND b.status = 'resolved' "
    " AND b.merged_into IS NULL ORDER BY b.resolved_at DESC NULLS LAST LIMIT 1) AS resolved "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(fingerprint text, named text)")
# Back to open without a new generation or an event: nobody is paged again.
_SILENT_REOPEN = sa.text("UPDATE incidents SET status = 'open', resolved_at = NULL, resolved_by = NULL, "
                         "updated_at = :now WHERE id = :id AND status = 'resolved' AND merged_into IS NULL "
                         "AND NOT EXISTS (SELECT 1 FROM incidents a WHERE a.fingerprint = incidents.fingerprint "
                         "AND a.status IN ('open', 'investigating')) RETURNING id")


def observe(conn: Connection, alerts: Sequence[Alert], now: datetime, threshold: int, window_seconds: int,
            stored: dict[str, dict] | None = None, hold: Callable[[list[str]], None] | None = None) -> dict[str, str]:
    """Count the flips of this batch (one alert per fingerprint); returns the
    fingerprints whose resolution is withheld because they flap, with the
    id of the flagged incident. ``stored``: the batch's rows, already locked
    (shared/noise.py reads them with the maintenance windows). Every row is
    locked before it is read, a new fingerprint's included (the lock step
    writes its first sighting), so the save updates what was read and no
    concurrent batch's flip is overwritten.

    ``hold(incident_ids)`` takes the batch's incident locks (the intake's:
    its advisory locks, then its incidents in id order, these ones
    included; shared/ingest.py) before any incident row is touched here.
    Touched first, one fingerprint at a time (the flag's timeline entry
    takes a key-share lock on its incident, a silent reopen updates it), an
    incident was locked out of the one global order: a batch holding it
    then waited for a correlation key or a lower incident that a writer
    waiting for it held, a deadlock (40P01) answered 503 for every webhook
    of the group commit. Without ``hold`` the incidents are locked in id
    order on their own. Neither is taken when no incident is to be written
    (a flapping alert repeating what it said last while its incident is
    active): the batch's own statements then lock what they lock, in order."""
    if not alerts:
        return {}
    by_fp = {a.fingerprint: a for a in alerts}
    if stored is None:
        locking = [{"fingerprint": fp, "status": by_fp[fp].status} for fp in sorted(by_fp)]
        stored = {r["fingerprint"]: dict(r) for r in conn.execute(_LOCK, {"alerts": json.dumps(locking)}).mappings()}
    cutoff = now - timedelta(seconds=window_seconds)
    rows, withheld = [], {}
    # First what each row becomes, reading incidents without locking them;
    # the incidents are touched only once they are held.
    flagging: list[tuple[dict, list[str], bool, bool]] = []  # (the stored row, its flips, flagged now, flipped)
    for fp in sorted(by_fp):
        alert = by_fp[fp]
        row = stored.get(fp)
        if row is None:  # not returned by a lock step older than migration 0020
            rows.append({"fingerprint": fp, "last_status": alert.status, "flips": [], "last_flip_at": None,
                         "flapping_since": None, "incident_id": None})
            continue
        if row["last_status"] == alert.status and row["flapping_since"] is None:
            continue
        flips = [t for t in row["flips"] if datetime.fromisoformat(t) > cutoff]
        flipped = row["last_status"] != alert.status
        if flipped:
            flips.append(now.isoformat())
        flagged = row["flapping_since"] is None and len(flips) >= threshold and not (
            alert.status == "firing" and conn.execute(_AFTER_A_FIX, {"f": fp}).scalar())
        flagging.append((row, flips, flagged, flipped))
    # A flag just raised names the fingerprint's incident of now, not one of an earlier episode.
    owned = _owned(conn, [(row["fingerprint"], None if flagged else row["incident_id"]) for row, _, flagged, _ in flagging
                          if flagged or row["flapping_since"] is not None])
    touching: list[tuple[dict, bool, bool]] = []  # (the row to save, flagged now, flipped): written once held
    for row, flips, flagged, flipped in flagging:
        fp, alert = row["fingerprint"], by_fp[row["fingerprint"]]
        since, incident_id = row["flapping_since"], row["incident_id"]
        active = None
        if flagged or since is not None:
            active, incident_id = owned[fp]
            since = since or now
        saved = {"fingerprint": fp, "last_status": alert.status, "flips": flips,
                 "last_flip_at": now.isoformat() if flipped else _iso(row.get("last_flip_at")),
                 "flapping_since": since.isoformat() if since else None, "incident_id": incident_id}
        rows.append(saved)
        if since is None:
            continue
        # Written once held: the flag's or a flip's timeline entry on the
        # active incident, or a silent reopen to try on the resolved one.
        if (flagged or flipped) if active else incident_id is not None:
            touching.append((saved, flagged, flipped))
            continue
        # A repeat of a flapping alert whose incident is active (or that has
        # none): nothing to write, so nothing is locked here (the upsert
        # locks it in order).
        saved["incident_id"] = active or incident_id
        if alert.status == "resolved" and saved["incident_id"]:
            withheld[fp] = saved["incident_id"]
    if touching:
        ids = sorted({saved["incident_id"] for saved, _, _ in touching if saved["incident_id"]})
        if hold is not None:
            hold(ids)
        else:
            _hold(conn, sorted(by_fp), ids)
    for saved, flagged, flipped in touching:
        fp, alert, incident_id = saved["fingerprint"], by_fp[saved["fingerprint"]], saved["incident_id"]
        if flagged and incident_id:
            add_timeline(conn, incident_id, "flapping", {"flips": len(saved["flips"]), "window_seconds": window_seconds,
                                                          "note": "paging and remediation paused until the alert settles"},
                         ACTOR)
        incident_id = saved["incident_id"] = _keep_active(conn, fp, incident_id, alert, now, flipped) or incident_id
        if alert.status == "resolved" and incident_id:
            withheld[fp] = incident_id
    if rows:
        # Nothing here waits for the save: it travels with the batch's next statement.
        db.later(conn, _SAVE, {"rows": json.dumps(sorted(rows, key=lambda r: r["fingerprint"]))})
    return withheld


def _hold(conn: Connection, fingerprints: list[str], incident_ids: list[str]) -> None:
    """The incidents of these fingerprints (theirs and those they are members
    of, as the resolve statement finds them) and ``incident_ids`` (a resolved
    one included: a silent reopen updates it), locked in one id-ordered
    statement before any of them is touched."""
    conn.execute(correlation_store.HOLD, {"fps": json.dumps(fingerprints), "seeks": "[]", "provides": "[]",
                                          "ids": json.dumps(incident_ids)})


def _owned(conn: Connection, named: list[tuple[str, str | None]]) -> dict[str, tuple[str | None, str | None]]:
    """For each (fingerprint, incident its flapping row names): the
    fingerprint's active incident, and the incident flapping acts on: the
    named one while it still has this fingerprint, else the active one, else
    the latest resolved one (OWNED). One statement for the batch."""
    if not named:
        return {}
    rows = conn.execute(_OWNED, {"rows": json.dumps([{"fingerprint": fp, "named": i} for fp, i in named])}).mappings()
    return {r["fingerprint"]: (r["active"], r["named"] or r["active"] or r["resolved"]) for r in rows}


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _keep_active(conn: Connection, fp: str, incident_id: str | None, alert: Alert, now: datetime, flipped: bool) -> str | None:
    """While it flaps the flagged incident stays the fingerprint's one
    active incident; a flip is noted on it."""
    active = conn.execute(_ACTIVE, {"f": fp}).scalar()
    reopened = False
    if active is None and incident_id:
        if conn.execute(_SILENT_REOPEN, {"id": incident_id, "now": now}).first() is not None:
            active, reopened = incident_id, True
    if active and (flipped or reopened):
        add_timeline(conn, active, "flap", {"alert": alert.status, **({"reopened": True} if reopened else {})}, ACTOR)
    return active


# Whether the incident was reopened silently during the flapping episode
# that started at :since (its page was resolved, and nobody was told since).
_REOPENED_SILENTLY = sa.text("SELECT EXISTS (SELECT 1 FROM incident_timeline WHERE incident_id = :i AND kind = 'flap' "
                             "AND details->>'reopened' = 'true' AND at >= :since)")
_REPAGE = sa.text("UPDATE incidents SET generation = generation + 1, root_generation = 0, updated_at = :now "
                  "WHERE id = :i AND status IN ('open', 'investigating') RETURNING *")


_QUIET = sa.text("SELECT fingerprint FROM alert_flaps WHERE flapping_since IS NOT NULL "
                 "AND COALESCE(last_flip_at, flapping_since) < :cutoff ORDER BY fingerprint")
_LOCK_HELD = sa.text("SELECT 1 FROM suppressed_alerts WHERE released_at IS NULL "
                     "AND fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:f AS jsonb)))) "
                     "ORDER BY fingerprint FOR UPDATE")
# Locked in fingerprint order (as the intake locks them), and judged again
# once locked: a flip committed meanwhile keeps the flag.
_CLEAR = sa.text(
    "UPDATE alert_flaps f SET flapping_since = NULL, flips = '[]'::jsonb "
    "FROM (SELECT fingerprint, flapping_since AS since FROM alert_flaps "
    "      WHERE fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST(:f AS jsonb)))) "
    "        AND flapping_since IS NOT NULL AND COALESCE(last_flip_at, flapping_since) < :cutoff "
    "      ORDER BY fingerprint FOR UPDATE) o "
    "WHERE f.fingerprint = o.fingerprint "
    "RETURNING f.fingerprint, f.last_status, f.incident_id, o.since")


def clear_quiet(conn: Connection, now: datetime, quiet_seconds: int) -> tuple[list[Alert], list[dict]]:
    """Lower the flag of fingerprints quiet for ``quiet_seconds``. Returns
    the resolutions to record for those whose alert last said resolved, and
    the incidents to open again as a new generation (the caller queues their
    ``opened`` events): still firing after a flapping episode during which
    their incident was reopened silently, so the page PagerDuty holds was
    resolved. They are paged now, once, and run the pipeline again; the
    pending proposals of the generation they leave are superseded here."""
    cutoff = now - timedelta(seconds=quiet_seconds)
    quiet = conn.execute(_QUIET, {"cutoff": cutoff}).scalars().all()
    if not quiet:
        return [], []
    # The intake's lock order: held alerts, then flapping rows, each by
    # fingerprint, then incidents in id order (no correlation key: the
    # resolutions carry none). The resolutions recorded below lock the held alerts; taken
    # after the flapping rows, an intake resolving the same alert deadlocked.
    conn.execute(_LOCK_HELD, {"f": json.dumps(quiet)})
    rows = [dict(r) for r in conn.execute(_CLEAR, {"f": json.dumps(quiet), "cutoff": cutoff}).mappings()]
    # Each row's incident while it still has the row's fingerprint (OWNED says why).
    owned = _owned(conn, [(r["fingerprint"], r["incident_id"]) for r in rows])
    for r in rows:
        r["incident_id"] = owned[r["fingerprint"]][1]
    # Then the incidents, in one id-ordered statement, before the timeline
    # entries below lock them (a foreign key) one by one: those of the
    # resolutions recorded below too, which the resolve statement locks again.
    if rows:
        _hold(conn, sorted(r["fingerprint"] for r in rows), sorted({r["incident_id"] for r in rows if r["incident_id"]}))
    resolutions, repaged = [], []
    for row in sorted(rows, key=lambda r: r["fingerprint"]):
        if row["incident_id"]:
            add_timeline(conn, row["incident_id"], "flapping_cleared",
                         {"quiet_seconds": quiet_seconds, "alert": row["last_status"]}, ACTOR)
        if row["last_status"] == "firing" and row["incident_id"] and conn.execute(
                _REOPENED_SILENTLY, {"i": row["incident_id"], "since": row["since"]}).scalar():
            incident = conn.execute(_REPAGE, {"i": row["incident_id"], "now": now}).mappings().first()
            if incident is not None:
                add_timeline(conn, incident["id"], "reopened", {"generation": incident["generation"],
                             "reason": "still firing after it stopped flapping"}, ACTOR)
                # A new generation: the pending proposals of the last one end (incident locked first, by _REPAGE).
                proposals.supersede_on_reopen(conn, incident["id"])
                repaged.append(dict(incident))
        if row["last_status"] == "resolved":
            resolutions.append(Alert(fingerprint=row["fingerprint"], status="resolved", alert_name="", priority="P2",
                                     summary="", description="", labels={}, annotations={}, starts_at=None, ends_at=now,
                                     source="api"))
    return resolutions, repaged


# One bounded pass (LIMIT, as shared/retention.py deletes): after a storm
# the settled rows are many, and the sweep's transaction should not lock and
# delete them all at once; the next sweep continues. SKIP LOCKED: never waits.
_PRUNE = sa.text("DELETE FROM alert_flaps WHERE fingerprint IN ("
                 "SELECT fingerprint FROM alert_flaps WHERE flapping_since IS NULL AND last_status = 'resolved' "
                 "AND (last_flip_at IS NULL OR last_flip_at < :cutoff) LIMIT :batch FOR UPDATE SKIP LOCKED)")


def prune(conn: Connection, now: datetime, window_seconds: int, batch: int) -> int:
    """Forget fingerprints that are resolved, not flapping and have not
    flipped within the window: their next firing is a first sighting, which
    loses nothing (an older flip would not count anyway). Keeps the table to
    the alerts of the last window instead of every alert ever seen. At most
    ``batch`` rows a pass (RETENTION_BATCH); the next sweep forgets the rest.

    A row a batch holds is skipped (the next sweep forgets it if it is
    still settled): the prune never waits. Waiting, it deleted rows in the
    table's order, not the batches' fingerprint order, and held them until
    the sweep committed: a batch holding one row it wanted and waiting for
    one it had deleted was a deadlock."""
    return conn.execute(_PRUNE, {"cutoff": now - timedelta(seconds=window_seconds), "batch": batch}).rowcount


def flapping_since(conn: Connection, incident_id: str) -> datetime | None:
    return conn.execute(sa.text("SELECT flapping_since FROM alert_flaps WHERE incident_id = :i AND flapping_since IS NOT NULL"),
                        {"i": incident_id}).scalar()
