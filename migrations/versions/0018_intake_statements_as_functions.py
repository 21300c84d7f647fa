"""The intake's write-cycle statements as server-side functions, each planned
once per server connection instead of once per transaction.

Sent as text, PostgreSQL parsed and planned every statement of an intake
transaction each time (pg8000 sends each as an unnamed statement): for a
one-alert batch about 2.9 ms of the 4.3 ms of database time, the firing
upsert alone 0.7 ms of parsing and 1.2-1.5 ms of planning. A PL/pgSQL
function keeps its statements' parse trees and plans in the server
connection, so they outlive the client's transaction without anything of
the client's session: PgBouncer's transaction pooling (no named prepared
statements, no session state) is fine with it, whichever client's
transaction lands on that server connection.

Two settings on each function, both needed:

- ``plan_cache_mode = force_generic_plan``: left to itself (``auto``) the
  plan cache kept choosing a custom plan for the upsert, planned on every
  call (its generic plan is costed a little higher because ``p_window > 0``
  is no longer folded), which saves the parsing and not the planning.
- ``enable_seqscan = off``: the one generic plan is made on the first call
  of a server connection, maybe on nearly empty tables, and is only made
  again when the tables' statistics change (ANALYZE). Where ANALYZE is late
  or off, a plan made on empty tables reads whole tables as they grow: the
  upsert measured 2.2 ms per transaction at 2,000 incidents and 10.4 ms at
  12,000 (the text statement 4 ms throughout); this is why an earlier
  attempt at this revision was withdrawn. Every table these statements
  read is reached through an index (by fingerprint, id or primary key), and
  with sequential scans priced out the plan made on empty tables is that
  one: 1.3-1.6 ms from 2,000 to 12,000 incidents. The setting is the
  function's own, not the session's.

The statements are the ones the intake sent as text until this revision
(the upsert's lock step, ``held``, still locks the batch's incidents in id
order before anything is written), with one change: the upsert's
``after_fix`` finds the batch's fingerprints by index (``= ANY``) and
compares the status as text. Planned on empty tables it read every
resolved incident through the status index in every transaction (the
reopen window is on by default); now the fingerprint index is the only
one it can use. The upsert serves both kinds of batch: planning is no
longer paid per transaction, so the reduced statement for batches without
correlation keys has nothing left to save (with no keys the correlation
parts find nothing). This file is now their
source: a change to one is a new revision that runs ``CREATE OR REPLACE
FUNCTION`` with the whole new body (docs/deploy.md, "Statements that live
in the database").

Revision ID: 0018
Revises: 0017
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

# How every function of this revision plans (the docstring says why).
PLANNING = "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off"

# shared/ingest.py: opens or refreshes a batch's incidents, with the
# timeline and the new incidents' events (its comment there says how).
# p_sought: the keys the batch seeks when joinable alerts are to be left
# out, else []; a batch without correlation keys passes [] and no provides
# or seeks, and the correlation parts find nothing.
INGEST_FIRING = f"""
CREATE OR REPLACE FUNCTION ingest_firing(p_rows jsonb, p_lock_also jsonb, p_window integer, p_actor text,
                                         p_events jsonb, p_sought jsonb)
RETURNS SETOF jsonb
LANGUAGE plpgsql
{PLANNING}
AS $fn$
BEGIN
RETURN QUERY
    WITH x AS (
        SELECT * FROM jsonb_to_recordset(p_rows) AS r(
            id text, alert_name text, priority text, summary text, description text, fingerprint text,
            labels jsonb, annotations jsonb, source text, starts_at timestamp, seen integer,
            rank integer, provides jsonb, seeks jsonb)
    ),
    locking AS (
        SELECT fingerprint FROM x UNION SELECT jsonb_array_elements_text(p_lock_also)
    ),
    member_of AS (
        SELECT m.fingerprint, m.incident_id FROM incident_members m JOIN incidents i ON i.id = m.incident_id
        WHERE m.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x)) AND CAST(i.status AS text) IN ('open', 'investigating')
          AND i.fingerprint IS DISTINCT FROM m.fingerprint
    ),
    providers AS MATERIALIZED (
        SELECT incident_id, provides FROM incident_members
        WHERE provides <> '{{}}' AND provides && ARRAY(SELECT jsonb_array_elements_text(p_sought))
    ),
    held AS MATERIALIZED (
        SELECT i.id FROM incidents i
        WHERE i.id = ANY(ARRAY(
              SELECT incident_id FROM providers UNION
              SELECT m.incident_id FROM incident_members m WHERE m.fingerprint = ANY(ARRAY(SELECT fingerprint FROM locking))
              UNION
              SELECT a.id FROM incidents a WHERE a.fingerprint = ANY(ARRAY(SELECT fingerprint FROM locking))
                AND CAST(a.status AS text) IN ('open', 'investigating')))
          AND CAST(i.status AS text) IN ('open', 'investigating')
        ORDER BY i.id
        FOR UPDATE
    ),
    member_refreshed AS (
        UPDATE incident_members m SET last_seen_at = timezone('utc', now()), status = 'firing', ends_at = NULL
        WHERE (SELECT count(*) FROM held) >= 0
          AND m.fingerprint = ANY(ARRAY(SELECT fingerprint FROM member_of))
          AND (m.incident_id, m.fingerprint) IN (SELECT incident_id, fingerprint FROM member_of)
        RETURNING m.incident_id, m.fingerprint
    ),
    after_fix AS (
        SELECT DISTINCT i.fingerprint FROM incidents i
        WHERE p_window > 0 AND i.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x))
          AND CAST(i.status AS text) = 'resolved' AND i.resolved_by = 'remediation'
          AND i.resolved_at > timezone('utc', now()) - make_interval(secs => p_window)
          AND NOT EXISTS (SELECT 1 FROM incidents a WHERE a.fingerprint = i.fingerprint
                          AND a.status IN ('open', 'investigating'))
    ),
    offered AS MATERIALIZED (
        SELECT DISTINCT k.key FROM providers p
        CROSS JOIN LATERAL unnest(p.provides) AS k(key)
        WHERE p.incident_id IN (SELECT id FROM held)
    ),
    joinable AS (
        SELECT x.fingerprint FROM x
        WHERE EXISTS (SELECT 1 FROM offered) AND x.fingerprint NOT IN (SELECT fingerprint FROM member_of)
          AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(COALESCE(x.seeks, '[]'::jsonb)) AS s(key)
                      WHERE s.key IN (SELECT key FROM offered))
    ),
    upserted AS (
        INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics,
                               remediation_actions, fingerprint, labels, annotations, source, starts_at,
                               last_seen_at, repeat_count)
        SELECT x.id, x.alert_name, CAST(x.priority AS incident_priority), 'open', x.summary, x.description,
               '{{}}'::json, '[]'::json, x.fingerprint, x.labels, x.annotations,
               x.source, x.starts_at, timezone('utc', now()), x.seen - 1
        FROM x WHERE (SELECT count(*) FROM held) >= 0
          AND x.fingerprint NOT IN (SELECT fingerprint FROM after_fix)
          AND x.fingerprint NOT IN (SELECT fingerprint FROM member_of)
          AND x.fingerprint NOT IN (SELECT fingerprint FROM joinable)
        ORDER BY x.fingerprint
        ON CONFLICT (fingerprint) WHERE status IN ('open', 'investigating')
        DO UPDATE SET updated_at = timezone('utc', now()), last_seen_at = timezone('utc', now()),
                      repeat_count = incidents.repeat_count + EXCLUDED.repeat_count + 1
        RETURNING incidents.*, (xmax = 0) AS created
    ),
    root_member AS (
        INSERT INTO incident_members (incident_id, fingerprint, alert_name, labels, priority, status, starts_at,
                                      last_seen_at, joined_at, is_root, rank, correlation_reason, provides, seeks)
        SELECT u.id, u.fingerprint, x.alert_name, COALESCE(x.labels, '{{}}'::jsonb), x.priority, 'firing', x.starts_at,
               timezone('utc', now()), timezone('utc', now()), true, COALESCE(x.rank, 0), 'root',
               ARRAY(SELECT jsonb_array_elements_text(COALESCE(x.provides, '[]'::jsonb))),
               ARRAY(SELECT jsonb_array_elements_text(COALESCE(x.seeks, '[]'::jsonb)))
        FROM upserted u JOIN x ON x.fingerprint = u.fingerprint
        WHERE jsonb_array_length(COALESCE(x.provides, '[]'::jsonb)) > 0 OR jsonb_array_length(COALESCE(x.seeks, '[]'::jsonb)) > 0
        ORDER BY u.id
        ON CONFLICT (incident_id, fingerprint)
        DO UPDATE SET last_seen_at = timezone('utc', now()), status = 'firing', ends_at = NULL
    ),
    timeline AS (
        INSERT INTO incident_timeline (incident_id, kind, actor, details)
        SELECT u.id, CASE WHEN u.created THEN 'opened' ELSE 'repeated' END, p_actor,
               CASE WHEN u.created THEN jsonb_build_object('priority', u.priority, 'source', u.source)
                    ELSE jsonb_build_object('repeat_count', u.repeat_count) END
        FROM upserted u
    ),
    outboxed AS (
        INSERT INTO event_outbox (id, type, source, subject, extensions, data)
        SELECT e.id, e.type, e.source, e.subject, e.extensions,
               e.data || jsonb_build_object('created_at', to_char(u.created_at, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                                            'starts_at', to_char(u.starts_at, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        FROM jsonb_to_recordset(p_events)
             AS e(id text, type text, source text, subject text, extensions jsonb, data jsonb)
        JOIN upserted u ON u.id = e.subject AND u.created
        ON CONFLICT (id) DO NOTHING
    )
    SELECT to_jsonb(u) AS row FROM upserted u
    UNION ALL
    SELECT jsonb_build_object('after_fix', fingerprint) FROM after_fix
    UNION ALL
    SELECT jsonb_build_object('member_of', fingerprint, 'incident_id', incident_id) FROM member_refreshed
    UNION ALL SELECT jsonb_build_object('joinable', fingerprint) FROM joinable;
END
$fn$
"""

# shared/noise.py: whether a maintenance window is active and, when none is,
# the batch's flapping rows, locked.
NOISE_FLAPS_UNLESS_WINDOWED = f"""
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

# shared/flapping.py: saves the batch's flapping rows.
FLAPS_SAVE = f"""
CREATE OR REPLACE PROCEDURE flaps_save(p_rows jsonb)
LANGUAGE plpgsql
{PLANNING}
AS $fn$
BEGIN
INSERT INTO alert_flaps (fingerprint, last_status, flips, last_flip_at, flapping_since, incident_id)
SELECT x.fingerprint, x.last_status, x.flips, x.last_flip_at, x.flapping_since, x.incident_id
FROM jsonb_to_recordset(p_rows)
     AS x(fingerprint text, last_status text, flips jsonb, last_flip_at timestamp, flapping_since timestamp, incident_id text)
ORDER BY x.fingerprint
ON CONFLICT (fingerprint) DO UPDATE SET last_status = EXCLUDED.last_status, flips = EXCLUDED.flips,
    last_flip_at = EXCLUDED.last_flip_at, flapping_since = EXCLUDED.flapping_since, incident_id = EXCLUDED.incident_id;
END
$fn$
"""


def upgrade() -> None:
    for statement in (INGEST_FIRING, NOISE_FLAPS_UNLESS_WINDOWED, FLAPS_SAVE):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP PROCEDURE IF EXISTS flaps_save(jsonb)")
    op.execute("DROP FUNCTION IF EXISTS noise_flaps_unless_windowed(timestamp, jsonb)")
    op.execute("DROP FUNCTION IF EXISTS ingest_firing(jsonb, jsonb, integer, text, jsonb, jsonb)")
