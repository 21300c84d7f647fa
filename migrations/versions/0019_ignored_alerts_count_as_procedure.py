"""The intake's count of ignored alerts as a server-side procedure, planned
once per server connection instead of once per transaction.

Sent as text (shared/ignored_alerts.py until this revision), its six CTEs
were parsed and planned in every intake transaction that held an ignored
alert, about 0.55 ms each time (the Watchdog alone, every repeat_interval).
Migration 0018 moved the intake's other statements into functions for the
same reason; its docstring says why each of the two SET clauses is needed,
and they are the same here. The statement reads only ignored_alerts, which
the bound keeps small, through its primary key (alert name, reason).

The statement is the one the intake sent as text, with its parameters
(the batch's counts, the OTHER name, the bound) as the procedure's. This
file is now its source: a change to it is a new revision that runs
``CREATE OR REPLACE PROCEDURE`` with the whole new body (docs/deploy.md,
"Statements that live in the database").

Revision ID: 0019
Revises: 0018
"""

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

# How the procedure plans (migration 0018's docstring says why).
PLANNING = "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off"

# shared/ignored_alerts.py: counts each (alert name, reason) of the batch,
# under p_other past p_max_names names (its docstring says how).
IGNORED_ALERTS_COUNT = f"""
CREATE OR REPLACE PROCEDURE ignored_alerts_count(p_rows jsonb, p_other text, p_max_names integer)
LANGUAGE plpgsql
{PLANNING}
AS $fn$
BEGIN
WITH x AS (
    SELECT x.alert_name, x.reason, x.n
    FROM jsonb_to_recordset(p_rows) AS x(alert_name text, reason text, n bigint)
), known AS (
    SELECT DISTINCT alert_name FROM ignored_alerts WHERE alert_name <> p_other
), room AS (
    SELECT GREATEST(p_max_names - count(*), 0) AS free FROM known
), newcomers AS (
    SELECT alert_name, row_number() OVER (ORDER BY sum(n) DESC, alert_name) AS rank
    FROM x WHERE alert_name <> p_other AND alert_name NOT IN (SELECT alert_name FROM known)
    GROUP BY alert_name
), admitted AS (
    SELECT alert_name FROM known
    UNION ALL
    SELECT alert_name FROM newcomers, room WHERE rank <= free
), placed AS (
    SELECT CASE WHEN x.alert_name IN (SELECT alert_name FROM admitted) THEN x.alert_name ELSE p_other END AS alert_name,
           x.reason, sum(x.n) AS n
    FROM x GROUP BY 1, 2
)
INSERT INTO ignored_alerts AS i (alert_name, reason, count, last_seen_at)
SELECT alert_name, reason, n, timezone('utc', now()) FROM placed
ORDER BY alert_name, reason
ON CONFLICT (alert_name, reason)
DO UPDATE SET count = i.count + EXCLUDED.count, last_seen_at = EXCLUDED.last_seen_at;
END
$fn$
"""


def upgrade() -> None:
    op.execute(IGNORED_ALERTS_COUNT)


def downgrade() -> None:
    op.execute("DROP PROCEDURE IF EXISTS ignored_alerts_count(jsonb, text, integer)")
