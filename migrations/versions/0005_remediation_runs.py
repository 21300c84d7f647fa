"""Remediation bookkeeping that rails need across replicas and cold starts.

- ``remediation_runs``: one row per action attempted or blocked, with its
  target, so the cooldown per target and the cap per hour are queries, not
  process memory.
- ``incidents.resolved_by`` (alert, remediation, api): a re-fire soon after
  remediation resolved an incident reopens it instead of opening a new one.

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "remediation_runs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("incident_id", sa.String(36), sa.ForeignKey("incidents.id", ondelete="CASCADE"), nullable=False),
        sa.Column("action", sa.String(60), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False, server_default=sa.text("timezone('utc', now())")),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("success", sa.Boolean, nullable=True),
        sa.Column("blocked_by", sa.String(60), nullable=True),
        sa.Column("details", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.create_index("idx_remediation_runs_target_time", "remediation_runs", ["action", "target", "started_at"])
    op.create_index("idx_remediation_runs_time", "remediation_runs", ["started_at"])
    op.add_column("incidents", sa.Column("resolved_by", sa.String(40), nullable=True))


def downgrade() -> None:
    op.drop_column("incidents", "resolved_by")
    op.drop_table("remediation_runs")
