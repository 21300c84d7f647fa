"""Incidents of several alerts: ``incident_members`` and ``incidents.merged_into``.

- ``incident_members``: every alert of an incident (its root included), each
  with its own status and times, when and why it joined
  (``correlation_reason``), and the correlation keys it offers to others
  (``provides``) and looks for (``seeks``); a GIN index answers "which
  active member offers one of these keys".
- ``idx_incident_members_fingerprint``: the one lookup the common intake
  path adds (is this fingerprint already a member of an incident?).
- ``incidents.merged_into``: an incident absorbed into another when its root
  arrived late keeps its id and points at the survivor.

Existing incidents get their one member (their own alert), so that resolving
by members behaves for them exactly as before.

Revision ID: 0010
Revises: 0009
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UTC_NOW = sa.text("timezone('utc', now())")


def upgrade() -> None:
    op.create_table(
        "incident_members",
        sa.Column("incident_id", sa.String(36), sa.ForeignKey("incidents.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("fingerprint", sa.String(128), primary_key=True),
        sa.Column("alert_name", sa.String(100), nullable=False),
        sa.Column("labels", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("priority", sa.String(2), nullable=False, server_default="P2"),
        sa.Column("status", sa.String(10), nullable=False, server_default="firing"),
        sa.Column("starts_at", sa.DateTime, nullable=True),
        sa.Column("ends_at", sa.DateTime, nullable=True),
        sa.Column("last_seen_at", sa.DateTime, nullable=False, server_default=UTC_NOW),
        sa.Column("joined_at", sa.DateTime, nullable=False, server_default=UTC_NOW),
        sa.Column("is_root", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("rank", sa.Integer, nullable=False, server_default="0"),
        sa.Column("correlation_reason", sa.Text, nullable=True),
        sa.Column("provides", postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
        sa.Column("seeks", postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
        sa.CheckConstraint("status IN ('firing', 'resolved')", name="ck_incident_members_status"),
    )
    op.create_index("idx_incident_members_fingerprint", "incident_members", ["fingerprint"])
    op.create_index("idx_incident_members_provides", "incident_members", ["provides"], postgresql_using="gin")
    op.create_index("idx_incident_members_seeks", "incident_members", ["seeks"], postgresql_using="gin")
    op.add_column("incidents", sa.Column("merged_into", sa.String(36), nullable=True))
    op.execute(
        """
        INSERT INTO incident_members (incident_id, fingerprint, alert_name, labels, priority, status, starts_at,
                                      ends_at, last_seen_at, joined_at, is_root, correlation_reason)
        SELECT id, fingerprint, alert_name, COALESCE(labels, '{}'::jsonb), COALESCE(priority::text, 'P2'),
               CASE WHEN status IN ('open', 'investigating') THEN 'firing' ELSE 'resolved' END,
               starts_at, resolved_at, COALESCE(last_seen_at, created_at, timezone('utc', now())),
               COALESCE(created_at, timezone('utc', now())), true, 'root'
        FROM incidents WHERE fingerprint IS NOT NULL
        """
    )


def downgrade() -> None:
    op.drop_column("incidents", "merged_into")
    op.drop_index("idx_incident_members_seeks", table_name="incident_members")
    op.drop_index("idx_incident_members_provides", table_name="incident_members")
    op.drop_index("idx_incident_members_fingerprint", table_name="incident_members")
    op.drop_table("incident_members")
