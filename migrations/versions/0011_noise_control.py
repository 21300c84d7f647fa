"""Noise control: flapping state per alert fingerprint, maintenance windows
(with their audit trail and the alerts they hold back), and the heartbeats
of the alerting pipeline.

Revision ID: 0011
Revises: 0010
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

NOW = sa.text("timezone('utc', now())")


def upgrade() -> None:
    # One row per alert fingerprint that ever changed state: its last status
    # and the times of its recent flips (bounded by the flap window in code).
    op.create_table(
        "alert_flaps",
        sa.Column("fingerprint", sa.String(128), primary_key=True),
        sa.Column("last_status", sa.String(10), nullable=False),
        sa.Column("flips", postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("last_flip_at", sa.DateTime, nullable=True),
        sa.Column("flapping_since", sa.DateTime, nullable=True),
        sa.Column("incident_id", sa.String(36), sa.ForeignKey("incidents.id", ondelete="SET NULL"), nullable=True),
    )
    op.create_index("idx_alert_flaps_flapping", "alert_flaps", ["flapping_since"],
                    postgresql_where=sa.text("flapping_since IS NOT NULL"))
    op.create_table(
        "maintenance_windows",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("matchers", postgresql.JSONB, nullable=False),
        sa.Column("starts_at", sa.DateTime, nullable=False),
        sa.Column("ends_at", sa.DateTime, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=NOW),
        sa.Column("ended_by", sa.String(200), nullable=True),
        sa.CheckConstraint("ends_at > starts_at", name="ck_maintenance_windows_span"),
    )
    op.create_index("idx_maintenance_windows_ends_at", "maintenance_windows", ["ends_at"])
    # Kept after a window is deleted: the audit outlives what it describes.
    op.create_table(
        "maintenance_audit",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("window_id", sa.String(36), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False, server_default=NOW),
        sa.Column("details", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )
    op.create_index("idx_maintenance_audit_window", "maintenance_audit", ["window_id", "id"])
    # Alerts a window held back: kept whole (replayed as if just arrived when
    # the window ends) and counted.
    op.create_table(
        "suppressed_alerts",
        sa.Column("fingerprint", sa.String(128), primary_key=True),
        sa.Column("alert_name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("alert", postgresql.JSONB, nullable=False),
        sa.Column("window_ids", postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="1"),
        sa.Column("first_suppressed_at", sa.DateTime, nullable=False),
        sa.Column("last_seen_at", sa.DateTime, nullable=False),
        sa.Column("released_at", sa.DateTime, nullable=True),
        sa.Column("incident_id", sa.String(36), nullable=True),
    )
    op.create_index("idx_suppressed_alerts_held", "suppressed_alerts", ["last_seen_at"],
                    postgresql_where=sa.text("released_at IS NULL"))
    op.create_table(
        "heartbeats",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("labels", postgresql.JSONB, nullable=False),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("first_seen_at", sa.DateTime, nullable=False),
        sa.Column("last_seen_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    for table in ("heartbeats", "suppressed_alerts", "maintenance_audit", "maintenance_windows", "alert_flaps"):
        op.drop_table(table)
