"""Counts of alerts the intake answered ``ignored`` (never silently dropped).

Kept in the database because the intake scales to zero: a process counter
would reset with every cold start. ``/metrics`` exposes them.

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ignored_alerts",
        sa.Column("alert_name", sa.String(100), primary_key=True),
        sa.Column("reason", sa.String(200), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_seen_at", sa.DateTime, nullable=False, server_default=sa.text("timezone('utc', now())")),
    )


def downgrade() -> None:
    op.drop_table("ignored_alerts")
