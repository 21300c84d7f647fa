"""Incidents of several alerts: ``incident_members`` and ``incidents.merged_into``.

- ``incident_members``: every alert of an incident (its root included), each
  with its own status and times, when and why it joined
  (``correlation_reason``), and the correlation keys it offers to others
  (``provides``) and looks for (``seeks``); partial GIN indexes (over the
  rows that have keys) answer "which active member offers one of these keys".
- ``idx_incident_members_fingerprint``: the one lookup the common intake
  path adds (is this fingerprint already a member of an incident?).
- ``incidents.merged_into``: an incident absorbed into another when its root
  arrived late keeps its id and points at the survivor.

An incident whose alert no correlation rule concerns has no member row: it
is its own single member (shared/members.py shows it so). Existing
incidents are such incidents, so nothing is copied.

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
    # Partial: most alerts relate to nothing, and their rows never enter these.
    op.create_index("idx_incident_members_provides", "incident_members", ["provides"], postgresql_using="gin",
                    postgresql_where=sa.text("provides <> '{}'"))
    op.create_index("idx_incident_members_seeks", "incident_members", ["seeks"], postgresql_using="gin",
                    postgresql_where=sa.text("seeks <> '{}'"))
    op.add_column("incidents", sa.Column("merged_into", sa.String(36), nullable=True))


def downgrade() -> None:
    op.drop_column("incidents", "merged_into")
    op.drop_index("idx_incident_members_seeks", table_name="incident_members")
    op.drop_index("idx_incident_members_provides", table_name="incident_members")
    op.drop_index("idx_incident_members_fingerprint", table_name="incident_members")
    op.drop_table("incident_members")
