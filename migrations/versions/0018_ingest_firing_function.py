"""The intake's firing upsert as a server-side function, planned once per
server connection instead of once per transaction.

The upsert (shared/ingest.py, ``UPSERT_FIRING``) is one statement of eight
CTEs. Sent as text, PostgreSQL planned it on every execution: about 1 ms of
the database's CPU, more than executing it for one alert, and two thirds of
the database time of an intake transaction (the bench's throughput section:
2.9 ms of backend CPU per upsert transaction as text, 1.0 ms through this
function). A PL/pgSQL function keeps its statements' plans for the life of
the server connection; ``plan_cache_mode = force_generic_plan`` uses the one
generic plan from the first call on (its estimates are the custom plans':
``jsonb_to_recordset`` is costed at 100 rows whatever the batch, and
``p_window > 0`` is checked when the plan runs).

Behind PgBouncer in transaction pooling the plan lives in the server
connection, not the client's session, so nothing outlives a transaction on
the client's side: any client whose transaction lands on that server
connection reuses it.

The statement is the one shared/ingest.py sent as text until this revision
(with correlation's ``joinable`` check and its lock step, ``held``); a change to it is a new migration (``CREATE OR REPLACE
FUNCTION``).

Revision ID: 0018
Revises: 0017
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

INGEST_FIRING = """
CREATE OR REPLACE FUNCTION ingest_firing(p_rows jsonb, p_window integer, p_actor text, p_events jsonb, p_sought jsonb)
RETURNS SETOF jsonb
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $fn$
BEGIN
RETURN QUERY
WITH x AS (
    SELECT * FROM jsonb_to_recordset(p_rows) AS r(
        id text, alert_name text, priority text, summary text, description text, fingerprint text,
        labels jsonb, annotations jsonb, source text, starts_at timestamp, seen integer,
        rank integer, provides jsonb, seeks jsonb)
),
member_of AS (
    SELECT m.fingerprint, m.incident_id FROM incident_members m JOIN incidents i ON i.id = m.incident_id
    WHERE m.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x)) AND CAST(i.status AS text) IN ('open', 'investigating')
      AND i.fingerprint IS DISTINCT FROM m.fingerprint
),
providers AS MATERIALIZED (
    SELECT incident_id, provides FROM incident_members
    WHERE provides <> '{}' AND provides && ARRAY(SELECT jsonb_array_elements_text(p_sought))
),
held AS MATERIALIZED (
    SELECT i.id FROM incidents i
    WHERE jsonb_array_length(p_sought) > 0
      AND i.id = ANY(ARRAY(
          SELECT incident_id FROM providers
          UNION
          SELECT m.incident_id FROM incident_members m WHERE m.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x))
          UNION
          SELECT a.id FROM incidents a WHERE a.fingerprint = ANY(ARRAY(SELECT fingerprint FROM x))
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
    SELECT DISTINCT i.fingerprint FROM incidents i JOIN x ON x.fingerprint = i.fingerprint
    WHERE p_window > 0 AND i.status = 'resolved' AND i.resolved_by = 'remediation'
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
           '{}'::json, '[]'::json, x.fingerprint, x.labels, x.annotations,
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
    SELECT u.id, u.fingerprint, x.alert_name, COALESCE(x.labels, '{}'::jsonb), x.priority, 'firing', x.starts_at,
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
UNION ALL
SELECT jsonb_build_object('joinable', fingerprint) FROM joinable;
END
$fn$
"""


def upgrade() -> None:
    op.execute(INGEST_FIRING)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS ingest_firing(jsonb, integer, text, jsonb, jsonb)")
