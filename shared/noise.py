"""Noise control at the door: what happens to a batch of alerts before the
ordinary recording (shared/ingest.py), and what the sweep does for it.

In this order, for one batch inside the caller's transaction:

1. heartbeats (shared/heartbeat.py): a ``Watchdog`` records that its
   pipeline is alive and resolves a "pipeline silent" incident of it; the
   Watchdog itself still opens nothing (IGNORED_ALERTNAMES);
2. maintenance windows (shared/maintenance.py): a firing alert an active
   window matches is held (``suppressed``) instead of opening anything;
3. flapping (shared/flapping.py): flips are counted; a flapping alert's
   resolution is withheld so its one incident stays active.

The sweep (:func:`sweep`) releases held alerts whose windows ended, lowers
the flapping flag after a quiet period and opens "pipeline silent"
incidents, each through the same recording path as a real alert.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from shared import clock, db, events, flapping, heartbeat, maintenance, outbox
from shared.alerts import Alert
from shared.config import Settings

log = logging.getLogger("noise")


@dataclass
class Screened:
    # fingerprint -> (action, incident id, reason) for the alerts settled here
    settled: dict[str, tuple[str, str | None, str]] = field(default_factory=dict)
    # resolutions to record with the batch (silent pipelines that spoke again)
    extra: list[Alert] = field(default_factory=list)


# The common batch (firing alerts, no maintenance window active) in one
# round trip: whether any window is active, and the batch's flapping rows,
# locked only when none is (all of them, in fingerprint order, a new
# fingerprint's written as its first sighting: shared/flapping.py says why).
# Locking them before a window holds an alert would reverse the lock order
# below, so with a window active nothing is locked here and the batch takes
# the steps one by one.
# The statement is the server-side function noise_flaps_unless_windowed
# (migration 0020 holds its SQL): planned once per server connection instead
# of once per transaction, as the intake's other write-cycle statements.
_UNLESS_WINDOWED = sa.text("SELECT windowed, fingerprint, last_status, flips, last_flip_at, flapping_since, incident_id "
                           "FROM noise_flaps_unless_windowed(CAST(:now AS timestamp), CAST(:f AS jsonb))")


def _flaps_unless_windowed(conn: Connection, firing: list[Alert], now) -> dict[str, dict] | None:
    """The firing alerts' flapping rows, locked; None if a window is active."""
    rows = conn.execute(_UNLESS_WINDOWED, {"now": now, "f": json.dumps(sorted(a.fingerprint for a in firing))}).mappings().all()
    if any(r["windowed"] for r in rows):
        return None
    return {r["fingerprint"]: {k: r[k] for k in ("fingerprint", "last_status", "flips", "last_flip_at", "flapping_since", "incident_id")}
            for r in rows}


def screen(conn: Connection, latest: list[Alert], config: Settings, hold=None) -> Screened:
    """``latest``: one alert per fingerprint, the batch's last word on it.
    ``hold(alerts, incident_ids)``: takes the batch's incident locks (in the
    global order: after this step's rows, shared/ingest.py) before flapping
    touches an incident (shared/flapping.py, observe), for the alerts the
    batch goes on to record (and the heartbeats' resolutions): a window's
    held alerts and the ignored ones record nothing, so their keys and
    incidents (a held node alert's: every pod incident it would merge) are
    left unlocked."""
    now = clock.now()
    result = Screened()
    result.extra = heartbeat.seen(conn, [a for a in latest if heartbeat.is_heartbeat(a, config.heartbeat_alertnames)], now)
    firing = [a for a in latest if a.status == "firing" and not a.ignored_reason]
    resolving = [a for a in latest if a.status == "resolved"]
    if firing and not resolving:
        # A resolution locks held alerts (maintenance.hold below) before the
        # flapping rows, so only an all-firing batch takes this way.
        stored = _flaps_unless_windowed(conn, firing, now)
        if stored is not None:
            withheld = flapping.observe(conn, firing, now, config.flap_threshold, config.flap_window_seconds, stored,
                                        _holding(hold, firing + result.extra))
            for fp, incident_id in withheld.items():
                result.settled[fp] = ("flapping", incident_id, "the alert is flapping; its incident stays open until it settles")
            return result
    # Lock order: held alerts (suppressed_alerts) before flapping rows
    # (alert_flaps), as the sweep's release does (it locks the held rows,
    # then replays them through here); the other order deadlocks the two.
    # Correlation keys and incidents come after both (``hold``: taken
    # before flapping touches an incident; shared/ingest.py).
    held = maintenance.hold(conn, firing, now, resolving)
    for fp, window_ids in held.items():
        result.settled[fp] = ("suppressed", None, "held by maintenance window " + ", ".join(window_ids))
    observed = [a for a in firing if a.fingerprint not in held] + resolving
    withheld = flapping.observe(conn, observed, now, config.flap_threshold, config.flap_window_seconds,
                                hold=_holding(hold, observed + result.extra))
    for fp, incident_id in withheld.items():
        result.settled[fp] = ("flapping", incident_id, "the alert is flapping; its incident stays open until it settles")
    return result


def _holding(hold, alerts: list[Alert]):
    """``hold`` for these alerts, as flapping calls it (with the incident ids alone)."""
    return None if hold is None else (lambda incident_ids: hold(alerts, incident_ids))


def sweep(bind: Engine, config: Settings, record) -> list[str]:
    """One pass; ``record(conn, alerts, actor)`` is the intake's recording path.
    Returns the ids of the events to publish. Each part commits on its own,
    so one failing does not hold back the others."""
    event_ids: list[str] = []
    for name, part in (("maintenance", _release), ("flapping", _clear_flapping), ("heartbeat", _heartbeats)):
        try:
            with bind.begin() as conn:
                event_ids += part(conn, config, record)
        except SQLAlchemyError as exc:
            bound = db.bound_reached(exc)
            if bound is not None:
                # A bound of the sweep's transaction (DB_SWEEP_*): a lock a
                # request or a migration holds, a long statement. The database
                # is there; the other parts may well not need what this one
                # waited for.
                log.warning(f"Noise-control sweep part stopped at its database {db.bound_described(exc)}; the next sweep retries",
                            extra={"part": name, "bound": bound})
                continue
            if db.is_transient(exc):
                # The database is away: the other parts would only wait for it too.
                log.warning("Noise-control sweep skipped: the database is unavailable", extra={"part": name})
                break
            log.exception("Noise-control sweep failed; the next sweep retries", extra={"part": name})
        except Exception:  # logged; the next sweep tries again
            log.exception("Noise-control sweep failed; the next sweep retries", extra={"part": name})
    return event_ids


def _release(conn: Connection, config: Settings, record) -> list[str]:
    return maintenance.release(conn, lambda c, alerts: record(c, alerts, maintenance.ACTOR), clock.now())


def _clear_flapping(conn: Connection, config: Settings, record) -> list[str]:
    resolutions, repaged = flapping.clear_quiet(conn, clock.now(), config.flap_quiet_seconds)
    flapping.prune(conn, clock.now(), config.flap_window_seconds, config.retention_batch)
    opened = [events.incident_event(events.INCIDENT_OPENED, row, config.event_source) for row in repaged]
    outbox.enqueue(conn, opened)
    return [e["id"] for e in opened] + (record(conn, resolutions, flapping.ACTOR).event_ids if resolutions else [])


def _heartbeats(conn: Connection, config: Settings, record) -> list[str]:
    silent = heartbeat.silent(conn, clock.now(), config.heartbeat_timeout_seconds)
    if not silent:
        return []
    log.error("Alerting pipeline silent: no Watchdog within HEARTBEAT_TIMEOUT_SECONDS",
              extra={"pipelines": [a.labels.get("heartbeat") for a in silent]})
    return record(conn, silent, heartbeat.ACTOR).event_ids
