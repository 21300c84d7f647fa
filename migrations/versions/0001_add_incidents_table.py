"""add_incidents_table: the seed's incidents table, exactly as TZ-005 gives it.

Times are stored as UTC in ``timestamp without time zone`` columns, as the
seed's ``sa.DateTime`` declares; the defaults live on the server so that a
row written by any client gets them.

Revision ID: 0001
Revises:
"""

from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UTC_NOW = sa.text("timezone('utc', now())")


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("alert_name", sa.String(100), nullable=False),
        sa.Column("priority", sa.Enum("P0", "P1", "P2", name="incident_priority")),
        sa.Column("status", sa.Enum("open", "investigating", "resolved", "closed", name="incident_status")),
        sa.Column("created_at", sa.DateTime, server_default=UTC_NOW),
        sa.Column("updated_at", sa.DateTime, server_default=UTC_NOW),
        sa.Column("resolved_at", sa.DateTime, nullable=True),
        sa.Column("summary", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("diagnostics", sa.JSON),
        sa.Column("remediation_actions", sa.JSON),
        sa.Index("idx_incidents_status", "status"),
        sa.Index("idx_incidents_priority", "priority"),
        sa.Index("idx_incidents_created_at", "created_at"),
    )


def downgrade() -> None:
    op.drop_table("incidents")
    sa.Enum(name="incident_status").drop(op.get_bind(), checkfirst=True)
    sa.Enum(name="incident_priority").drop(op.get_bind(), checkfirst=True)
