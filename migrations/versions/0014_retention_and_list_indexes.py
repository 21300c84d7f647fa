"""Indexes for retention and for the incident list at a million rows.

Retention (shared/retention.py) deletes, in bounded batches, published
outbox rows, completed work claims and old timeline entries: each batch
finds its oldest rows through a partial index instead of a scan.

The list (``GET /incidents``, the board) is newest first with keyset pages
(``created_at DESC, id DESC``). Filtered by status, priority or alert name,
an index that starts with the filtered column and continues in the list's
order reads exactly one page, however many rows match; without it
PostgreSQL reads every match to sort them (bench/run.py, section 8).

These are plain CREATE INDEX in the migration's transaction (writes to the
table wait meanwhile). On a large production table create them first with
``CREATE INDEX CONCURRENTLY`` under the same names (docs/deploy.md): the
migration then finds them and skips them.

Revision ID: 0014
Revises: 0012
"""

from alembic import op

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None

INDEXES = {
    "idx_event_outbox_published": "event_outbox (published_at) WHERE published_at IS NOT NULL",
    "idx_work_claims_completed": "work_claims (completed_at) WHERE completed_at IS NOT NULL",
    "idx_incident_timeline_at": "incident_timeline (at)",
    "idx_incidents_status_created": "incidents (status, created_at DESC, id DESC)",
    "idx_incidents_priority_created": "incidents (priority, created_at DESC, id DESC)",
    "idx_incidents_alert_name_created": "incidents (alert_name, created_at DESC, id DESC)",
}


def upgrade() -> None:
    for name, definition in INDEXES.items():
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {definition}")


def downgrade() -> None:
    for name in reversed(list(INDEXES)):
        op.execute(f"DROP INDEX IF EXISTS {name}")
