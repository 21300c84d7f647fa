"""Once-only work across redeliveries, replicas and crashes (see migration 0004)."""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import incidents
from shared.domain import ACTIVE_STATUSES
from shared.errors import BadRequest, Conflict

log = logging.getLogger("claims")

UTC_NOW = "timezone('utc', now())"


@dataclass(frozen=True)
class Claim:
    key: str
    acquired: bool  # this caller holds it now and must do the work
    completed: bool  # the work is already done: replay its result


def claim(conn: Connection, key: str, incident_id: str | None, stale_after_seconds: float) -> Claim:
    row = conn.execute(
        sa.text(
            f"""
            INSERT INTO work_claims (key, incident_id) VALUES (:key, :incident_id)
            ON CONFLICT (key) DO UPDATE SET claimed_at = {UTC_NOW}, attempts = work_claims.attempts + 1
            WHERE work_claims.completed_at IS NULL
              AND work_claims.claimed_at < {UTC_NOW} - make_interval(secs => :stale)
            RETURNING key
            """
        ),
        {"key": key, "incident_id": incident_id, "stale": stale_after_seconds},
    ).first()
    if row is not None:
        return Claim(key, acquired=True, completed=False)
    completed = conn.execute(sa.text("SELECT completed_at IS NOT NULL FROM work_claims WHERE key = :key"), {"key": key}).scalar()
    return Claim(key, acquired=False, completed=bool(completed))


def complete(conn: Connection, key: str) -> None:
    conn.execute(sa.text(f"UPDATE work_claims SET completed_at = {UTC_NOW} WHERE key = :key"), {"key": key})


def release(conn: Connection, key: str) -> None:
    """Give the work back (it failed) so a retry need not wait for staleness."""
    conn.execute(sa.text("DELETE FROM work_claims WHERE key = :key AND completed_at IS NULL"), {"key": key})


def is_completed(conn: Connection, key: str) -> bool:
    return bool(conn.execute(sa.text("SELECT completed_at IS NOT NULL FROM work_claims WHERE key = :key"), {"key": key}).scalar())


def any_completed(conn: Connection, incident_id: str, key_prefix: str) -> bool:
    """Was any work of this kind (``notify:pagerduty:trigger:`` …) done for the incident?"""
    return bool(conn.execute(
        sa.text("SELECT 1 FROM work_claims WHERE incident_id = :i AND key LIKE :p AND completed_at IS NOT NULL LIMIT 1"),
        {"i": incident_id, "p": key_prefix.replace("%", r"\%").replace("_", r"\_") + "%"},
    ).first())


def judge_event(incident: dict, generation: int, root_generation: int = 0) -> str | None:
    """Whether an event of ``generation`` (and ``root_generation``, as
    shared.eventio reads them) still speaks of the incident the database has.

    The database decides. An event of an earlier generation (the incident
    was resolved and reopened since: a Broker redelivery, a dead letter
    re-driven, a re-emission overtaken) is stale: the reason is returned and
    the handler acknowledges it with nothing done. Nothing legitimate
    carries a generation, or a root generation of the current generation,
    above the database's: every event leaves through the outbox or a reply
    after the transaction that made its generation committed, and the
    counters only grow. So one that does is forged or from another database
    (a restore): ``BadRequest``, dropped for good rather than retried.
    """
    current = incident.get("generation") or 0
    if generation > current:
        _refuse(incident, f"data.generation {generation} is above the incident's generation {current}")
    if generation < current:
        return f"the event is of generation {generation}; the incident is at generation {current} (reopened since)"
    root = incident.get("root_generation") or 0
    if root_generation > root:
        _refuse(incident, f"data.root_generation {root_generation} is above the incident's root generation {root}")
    return None


def _refuse(incident: dict, reason: str) -> NoReturn:
    """A generation the database never had is a forged event or one from
    another database (a restore): dropped for good, so it is logged here
    (shared.http logs only the 5xx). The reason names numbers only."""
    log.warning("Event refused: a generation the incident never had", extra={"incident_id": incident.get("id"), "reason": reason})
    raise BadRequest(reason)


# The generation's first root's key, or one of its later roots' (``….root<n>``):
# two primary-key lookups, an equality and a range, in begin_step's
# transaction. ``key LIKE 'prefix%'`` cannot use the primary key unless the
# database's collation is "C" (not "C.UTF-8", not en_US): it scanned every
# claim ever taken. The LIKE keeps the range exact whatever the collation.
_DIAGNOSED = sa.text(
    "SELECT 1 FROM work_claims WHERE (key = :k OR (key >= :lo AND key < :hi AND key LIKE :p)) "
    "AND completed_at IS NOT NULL LIMIT 1")


def diagnosed(conn: Connection, incident: dict) -> bool:
    """Did diagnostics finish for the incident's current generation (of any
    root: which root the stored diagnosis is of is remediation's other
    check)? Its completed claim commits with the diagnosis it stored."""
    key = f"diagnostics:{incident['id']}:{incident['generation']}"
    # Every ``key.root<n>`` sorts from ``key.root`` up to ``key.roou`` (t + 1).
    return bool(conn.execute(_DIAGNOSED, {"k": key, "lo": key + ".root", "hi": key + ".roou",
                                          "p": key.replace("%", r"\%").replace("_", r"\_") + ".root%"}).first())


@dataclass(frozen=True)
class Step:
    """Where a redelivered-at-least-once step stands for one incident."""

    state: str  # run | replay | skip | stale
    incident: dict | None
    key: str | None = None
    reason: str | None = None  # why a stale event is stale


def step_key(step: str, incident: dict) -> str:
    """The claim of ``step`` for the incident as it stands: one per
    generation, and one more each time a stronger alert took over as root
    (migration 0017), so the new root gets its own diagnosis and
    remediation. The first root's key is the plain one, as before."""
    key = f"{step}:{incident['id']}:{incident['generation']}"
    return f"{key}.root{incident['root_generation']}" if incident.get("root_generation") else key


def begin_step(conn: Connection, step: str, incident_id: str, stale_after_seconds: float,
               generation: int | None = None, root_generation: int = 0) -> Step:
    """Decide what an event handler does with ``step`` for this incident:

    - ``skip``: no such incident, or it no longer fires (never act on a
      resolved alert);
    - ``stale``: the event (of ``generation``, ``root_generation``) is of a
      generation the incident has left (:func:`judge_event`; ``BadRequest``
      for one it never had): acknowledged, nothing done;
    - ``replay``: the step already ran for this generation and root (a
      redelivery, or the first reply was lost; also an event from before
      a root change once the new root's step ran): answer the same;
    - ``run``: this caller now holds the claim and must do the work.

    Raises Conflict while another delivery holds a fresh claim (the Broker
    retries 409).
    """
    incident = incidents.get_incident(conn, incident_id)
    if incident is None:
        return Step("skip", None)
    if generation is not None:
        stale = judge_event(incident, generation, root_generation)
        if stale:
            return Step("stale", incident, reason=stale)
    key = step_key(step, incident)
    if is_completed(conn, key):
        return Step("replay", incident, key)
    if incident["status"] not in ACTIVE_STATUSES:
        return Step("skip", incident, key)
    held = claim(conn, key, incident_id, stale_after_seconds)
    if held.acquired:
        return Step("run", incident, key)
    if held.completed:
        return Step("replay", incident, key)
    raise Conflict(f"{step} of this incident is running elsewhere; retry later")
