"""Work claims are found by their incident.

Escalation reads what a channel sent for an incident from its claims
(``notify:{channel}:…``, functions/escalation/handler.py ``sent_by``), and
the reconciliation sweep whether a page of this generation was sent and
whether an acknowledgement covers it (shared/acknowledge.py
``covered_page_sql``). Both ask by incident. Without this index every such
lookup read the whole table: ``key LIKE 'notify:…%'`` cannot use the
primary key under a collation other than "C" (C.UTF-8, en_US), and
``incident_id`` had none. It also serves the foreign key's ``ON DELETE
CASCADE``.

A plain CREATE INDEX in the migration's transaction, as 0014's (writes to
work_claims wait while it builds). On a large production table create it
first with ``CREATE INDEX CONCURRENTLY idx_work_claims_incident ON
work_claims (incident_id)`` (docs/deploy.md): the migration then finds it
and skips it. CONCURRENTLY cannot run inside the transaction Alembic wraps
a migration in, and one that fails half-way leaves an invalid index that
IF NOT EXISTS would then skip, so it is left to the operator, who can see
it through.

Revision ID: 0025
Revises: 0022
"""

from alembic import op

revision = "0025"
down_revision = "0022"
branch_labels = None
depends_on = None

INDEX = "idx_work_claims_incident"


def upgrade() -> None:
    op.execute(f"CREATE INDEX IF NOT EXISTS {INDEX} ON work_claims (incident_id)")


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
