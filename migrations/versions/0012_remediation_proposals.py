"""``remediation_proposals``: remediation that waits for a human.

A proposal holds the exact actions (rendered parameters and targets), a
dry-run preview of each, and the hash of (incident, actions, targets,
parameters) an approval is bound to. Its status moves once, under a row
lock: pending -> approved -> executing -> executed | failed, or pending ->
rejected | expired | superseded. ``decided_by`` records who approved or
rejected it; ``started_at`` when an execution began (one whose process died
is taken over after the playbook's worst case).

Revision ID: 0012
Revises: 0011
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

STATUSES = ("pending", "approved", "executing", "executed", "failed", "rejected", "expired", "superseded")


def upgrade() -> None:
    op.create_table(
        "remediation_proposals",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("incident_id", sa.String(36), sa.ForeignKey("incidents.id", ondelete="CASCADE"), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("playbook", sa.String(200), nullable=False),
        sa.Column("actions", postgresql.JSONB, nullable=False),
        sa.Column("preview", postgresql.JSONB, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default="pending"),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.text("timezone('utc', now())")),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("decided_by", sa.String(200), nullable=True),
        sa.Column("decided_at", sa.DateTime, nullable=True),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")", name="ck_remediation_proposals_status"),
    )
    op.create_index("idx_remediation_proposals_incident", "remediation_proposals", ["incident_id", "created_at"])


def downgrade() -> None:
    op.drop_index("idx_remediation_proposals_incident", table_name="remediation_proposals")
    op.drop_table("remediation_proposals")
