"""Counts of the alerts the intake answered ``ignored``, bounded.

Every alert name would otherwise be a row here and a series of
``alerts_ignored_total{alertname, reason}`` on ``/metrics`` forever, so an
AlertManager that sends many distinct names (misconfigured, or someone with
the token) would grow the table and Prometheus' cardinality without end.
At most ``IGNORED_ALERTS_MAX_NAMES`` names are counted apart; the others are
counted under ``OTHER`` with their reason (the reasons come from the
settings, so they are few).

A name keeps its row once it has one: rank the names by count at every
scrape instead and a name moving into or out of the top would make the
``OTHER`` series go down, which Prometheus reads as a counter reset and
turns into an increase of the whole ``OTHER`` count. So the table admits
names while it has room, and room is made by the retention sweep: the
counts of a name not ignored for ``RETENTION_IGNORED_DAYS`` are deleted
(Prometheus has already scraped them; the series just ends), and names past
the bound (two intake transactions admitting names at once can each see the
last free place) are folded into ``OTHER``, the smallest counts first.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.sqltext import UTC_NOW, compact

# The alertname of everything counted beyond the bound. An alert really named
# so is counted there too, which is where it would be looked for.
OTHER = "__other__"
REASON_MAX = 200  # the column's length

# The procedure ignored_alerts_count (migration 0019 holds its SQL): planned
# once per server connection instead of in every intake transaction that
# holds an ignored alert. Its names are admitted while there is room, the
# batch's biggest first; the rest go to OTHER; rows written in (alert name,
# reason) order, the order the fold below locks them in.
COUNT = sa.text("CALL ignored_alerts_count(CAST(:rows AS jsonb), :other, :max_names)")

_EXTRA = """
    extra AS (
        SELECT alert_name FROM ignored_alerts WHERE alert_name <> :other
        GROUP BY alert_name ORDER BY sum(count) DESC, alert_name OFFSET :max_names
    )"""

# The fold runs as three statements, and only the last writes counts:
#
# 1. PREPARE_FOLD, in a short transaction of its own, gives OTHER a row (of
#    count 0) for each reason of the names past the bound, in COUNT's order.
#    Had the fold inserted such a row itself, an intake transaction that had
#    inserted the same (OTHER, reason) and then waited for a row the fold
#    holds would deadlock with it.
# 2. LOCK_EXTRA locks, in COUNT's order (alert name, reason), the rows of
#    the names past the bound whose reason has an OTHER row, and the OTHER
#    rows, and returns the rows it locked: those are what the fold writes.
#    Recomputing the names past the bound in the next statement (a fresh
#    snapshot under READ COMMITTED) could pick rows never locked.
# 3. FOLD_EXTRA deletes exactly those rows and adds them to OTHER's (locked)
#    rows in one statement: what is deleted is what is added.
#
# The fold runs under a short lock_timeout: when it meets a lock anyway, it
# is the one that gives way (the next sweep tries again), never the intake.
PREPARE_FOLD = sa.text(compact(
    f"""
    WITH {_EXTRA}
    INSERT INTO ignored_alerts (alert_name, reason, count, last_seen_at)
    SELECT DISTINCT :other, reason, 0, {UTC_NOW} FROM ignored_alerts WHERE alert_name IN (SELECT alert_name FROM extra)
    ORDER BY 2
    ON CONFLICT (alert_name, reason) DO NOTHING
    """
))

LOCK_EXTRA = sa.text(compact(
    f"""
    WITH {_EXTRA}, locked AS (
        SELECT alert_name, reason FROM ignored_alerts i
        WHERE alert_name = :other
           OR (alert_name IN (SELECT alert_name FROM extra)
               AND EXISTS (SELECT 1 FROM ignored_alerts o WHERE o.alert_name = :other AND o.reason = i.reason))
        ORDER BY alert_name, reason FOR UPDATE
    )
    SELECT alert_name, reason FROM locked WHERE alert_name <> :other
    """
))

FOLD_EXTRA = sa.text(compact(
    """
    WITH gone AS (
        DELETE FROM ignored_alerts
        WHERE (alert_name, reason) IN (SELECT * FROM unnest(CAST(:names AS text[]), CAST(:reasons AS text[])))
        RETURNING reason, count, last_seen_at
    )
    INSERT INTO ignored_alerts (alert_name, reason, count, last_seen_at)
    SELECT :other, reason, sum(count), max(last_seen_at) FROM gone GROUP BY reason
    ORDER BY reason
    ON CONFLICT (alert_name, reason)
    DO UPDATE SET count = ignored_alerts.count + EXCLUDED.count,
                  last_seen_at = GREATEST(ignored_alerts.last_seen_at, EXCLUDED.last_seen_at)
    """
))

# Long enough for an intake transaction to finish its few statements, short
# enough that the intake never waits long behind a fold.
FOLD_LOCK_TIMEOUT = "200ms"


def count(conn: Connection, ignored: list[tuple[str, str]], max_names: int) -> None:
    """Count each (alert name, reason) once, in the caller's transaction."""
    counts: dict[tuple[str, str], int] = {}
    for name, reason in ignored:
        key = (name, reason[:REASON_MAX])
        counts[key] = counts.get(key, 0) + 1
    if counts:
        rows = [{"alert_name": name, "reason": reason, "n": n} for (name, reason), n in counts.items()]
        conn.execute(COUNT, {"rows": json.dumps(rows), "other": OTHER, "max_names": max_names})


def prepare_fold(conn: Connection, max_names: int) -> None:
    """Give OTHER a row for each reason of the names past ``max_names``; in its own transaction, before ``fold_extra``."""
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{FOLD_LOCK_TIMEOUT}'"))
    conn.execute(PREPARE_FOLD, {"other": OTHER, "max_names": max_names})


def fold_extra(conn: Connection, max_names: int) -> int:
    """Fold the names past ``max_names`` into OTHER; the OTHER rows written (0: none was past it).

    Raises the database's lock_not_available (55P03) when a row it needs is
    held longer than FOLD_LOCK_TIMEOUT; the caller leaves it to the next sweep."""
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{FOLD_LOCK_TIMEOUT}'"))
    rows = conn.execute(LOCK_EXTRA, {"other": OTHER, "max_names": max_names}).all()
    if not rows:
        return 0
    return conn.execute(FOLD_EXTRA, {"other": OTHER, "names": [r.alert_name for r in rows],
                                     "reasons": [r.reason for r in rows]}).rowcount


def counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(alert name, reason, count) of every row: at most the bound's names and OTHER."""
    return conn.execute(sa.text("SELECT alert_name, reason, count FROM ignored_alerts ORDER BY 1, 2")).all()
