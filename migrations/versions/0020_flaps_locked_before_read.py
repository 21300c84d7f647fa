"""A batch's flapping rows are locked in one step, new fingerprints' included,
before they are read.

Until this revision the intake locked the alert_flaps rows that were there
(``noise_flaps_unless_windowed``, or the text statement of
shared/flapping.py) and wrote the missing ones later, with its save
(``flaps_save``: INSERT ... ON CONFLICT DO UPDATE): two runs of locks, the
second taken after the decision was made. Two consequences:

- a deadlock (40P01, a 503 and a retry): batch A locks K and finds N
  missing; batch C commits N's first sighting; batch B locks N, then waits
  for K; A's save of N waits for B;
- a lost flip: two batches that both found N missing each save a first
  sighting, and the later one overwrites the earlier one's row, flip and
  all, so flapping is counted short.

Now the lock step is one statement in fingerprint order: a missing row is
inserted as the alert's first sighting (its status, no flips), and a row
that is there is locked (``ON CONFLICT DO UPDATE ... WHERE false`` locks
the row and changes nothing), waiting for whoever holds it. The rows are
read by the next statement, which sees what the lock step waited for. So
every row the batch decides on is locked, in one global order, before it
is read; the save only updates rows held since (a first sighting needs no
save at all: the lock step wrote it). A row deleted meanwhile (the sweep's
prune) is inserted again by the same statement, as ON CONFLICT retries.

Row locks, not advisory locks: the sweep locks these rows too (after the
held alerts, then replaying resolutions through the same path), and one
kind of lock in one order is what keeps the two from a cycle.

``noise_flaps_unless_windowed`` keeps its signature (a rolling update runs
the previous release against it, which then gets every row it asked for
and saves fewer); its fingerprints are a batch's firing alerts, so a
missing row is a first sighting as firing. ``flaps_lock`` is new: the lock
step for batches with resolutions (shared/flapping.py sent it as text),
with each alert's status. ``flaps_save`` is unchanged: the previous
release still inserts with it.

The functions plan as migration 0018's (its docstring says why).

Revision ID: 0020
Revises: 0019
"""

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

# How every function of this revision plans (migration 0018's docstring says why).
PLANNING = "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off"

# Inserts the missing rows and locks the others, in fingerprint order, in
# one statement; {alerts} is a set of (fingerprint, status).
_LOCK_STEP = """
INSERT INTO alert_flaps AS a (fingerprint, last_status)
SELECT DISTINCT ON (x.fingerprint) x.fingerprint, x.status FROM ({alerts}) AS x(fingerprint, status)
ORDER BY x.fingerprint
ON CONFLICT (fingerprint) DO UPDATE SET last_status = a.last_status WHERE false;
"""

# Read after the lock step, in a statement of its own: its snapshot is
# taken after the waits, so it sees the rows as they are locked.
# `= ANY(ARRAY(...))` is a primary-key lookup per fingerprint whatever the
# planner guesses of the list (`IN (SELECT ...)` was planned as a hash join
# over the whole table, which keeps a row for every recent fingerprint).
_READ = """
SELECT {windowed}a.fingerprint, a.last_status, a.flips, a.last_flip_at, a.flapping_since, a.incident_id
FROM alert_flaps a WHERE a.fingerprint = ANY(ARRAY({fingerprints}));
"""

# shared/noise.py: whether a maintenance window is active and, when none is,
# the batch's flapping rows (all of them: missing ones written as a first
# sighting of a firing alert), locked.
NOISE_FLAPS_UNLESS_WINDOWED = f"""
CREATE OR REPLACE FUNCTION noise_flaps_unless_windowed(p_now timestamp, p_fingerprints jsonb)
RETURNS TABLE (windowed boolean, fingerprint varchar, last_status varchar, flips jsonb,
               last_flip_at timestamp, flapping_since timestamp, incident_id varchar)
LANGUAGE plpgsql
{PLANNING}
AS $fn$
#variable_conflict use_column
BEGIN
IF EXISTS (SELECT 1 FROM maintenance_windows WHERE starts_at <= p_now AND ends_at > p_now) THEN
    RETURN QUERY SELECT true, NULL::varchar, NULL::varchar, NULL::jsonb, NULL::timestamp, NULL::timestamp, NULL::varchar;
    RETURN;
END IF;
{_LOCK_STEP.format(alerts="SELECT f, 'firing' FROM jsonb_array_elements_text(p_fingerprints) AS f")}
RETURN QUERY
{_READ.format(windowed="false, ", fingerprints="SELECT jsonb_array_elements_text(p_fingerprints)")}
END
$fn$
"""

# shared/flapping.py: the batch's flapping rows (all of them: missing ones
# written as a first sighting of the alert's status), locked.
# p_alerts: [{"fingerprint": ..., "status": ...}].
FLAPS_LOCK = f"""
CREATE OR REPLACE FUNCTION flaps_lock(p_alerts jsonb)
RETURNS TABLE (fingerprint varchar, last_status varchar, flips jsonb,
               last_flip_at timestamp, flapping_since timestamp, incident_id varchar)
LANGUAGE plpgsql
{PLANNING}
AS $fn$
#variable_conflict use_column
BEGIN
{_LOCK_STEP.format(alerts="SELECT r.fingerprint, r.status FROM jsonb_to_recordset(p_alerts) AS r(fingerprint text, status text)")}
RETURN QUERY
{_READ.format(windowed="", fingerprints="SELECT e->>'fingerprint' FROM jsonb_array_elements(p_alerts) AS e")}
END
$fn$
"""

# Migration 0018's body, restored by the downgrade.
NOISE_FLAPS_UNLESS_WINDOWED_0018 = f"""
CREATE OR REPLACE FUNCTION noise_flaps_unless_windowed(p_now timestamp, p_fingerprints jsonb)
RETURNS TABLE (windowed boolean, fingerprint varchar, last_status varchar, flips jsonb,
               last_flip_at timestamp, flapping_since timestamp, incident_id varchar)
LANGUAGE plpgsql
{PLANNING}
AS $fn$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH w AS (SELECT 1 FROM maintenance_windows WHERE starts_at <= p_now AND ends_at > p_now LIMIT 1),
f AS (SELECT fingerprint, last_status, flips, last_flip_at, flapping_since, incident_id FROM alert_flaps
      WHERE fingerprint = ANY(ARRAY(SELECT jsonb_array_elements_text(p_fingerprints)))
        AND NOT EXISTS (SELECT 1 FROM w)
      ORDER BY fingerprint FOR UPDATE)
SELECT false AS windowed, fingerprint, last_status, flips, last_flip_at, flapping_since, incident_id FROM f
UNION ALL
SELECT true, NULL, NULL, NULL, NULL, NULL, NULL FROM w;
END
$fn$
"""


def upgrade() -> None:
    op.execute(NOISE_FLAPS_UNLESS_WINDOWED)
    op.execute(FLAPS_LOCK)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS flaps_lock(jsonb)")
    op.execute(NOISE_FLAPS_UNLESS_WINDOWED_0018)
