"""What the system needs beyond the seed: alert identity, timeline, outbox.

- ``fingerprint`` with a unique index over incidents that are still open or
  investigating: deduplication is the database's job, so two replicas that
  receive the same alert at once still make one incident.
- ``labels``/``annotations`` (JSONB), ``source``, ``starts_at``,
  ``last_seen_at``, ``repeat_count``, and ``generation`` (how many times the
  incident was reopened; part of stable event ids).
- ``incident_timeline``: everything that happened to an incident, with its
  time. ``dedup_key`` makes "do this once" claims (one page per transition)
  a unique-key insert in the same transaction as the effect's record.
- ``event_outbox``: CloudEvents written in the same transaction as the
  change they announce, published after the commit and by a sweep, so a
  Broker outage loses nothing.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UTC_NOW = sa.text("timezone('utc', now())")
EMPTY_OBJECT = sa.text("'{}'::jsonb")
ACTIVE = sa.text("status IN ('open', 'investigating')")


def upgrade() -> None:
    source = postgresql.ENUM("alertmanager", "cloudevent", "api", name="incident_source")
    source.create(op.get_bind())
    op.add_column("incidents", sa.Column("fingerprint", sa.String(128), nullable=True))
    op.add_column("incidents", sa.Column("labels", postgresql.JSONB, nullable=False, server_default=EMPTY_OBJECT))
    op.add_column(
        "incidents", sa.Column("annotations", postgresql.JSONB, nullable=False, server_default=EMPTY_OBJECT)
    )
    op.add_column(
        "incidents",
        sa.Column(
            "source",
            postgresql.ENUM(name="incident_source", create_type=False),
            nullable=False,
            server_default="alertmanager",
        ),
    )
    op.add_column("incidents", sa.Column("starts_at", sa.DateTime, nullable=True))
    op.add_column("incidents", sa.Column("last_seen_at", sa.DateTime, nullable=True, server_default=UTC_NOW))
    op.add_column("incidents", sa.Column("repeat_count", sa.Integer, nullable=False, server_default="0"))
    op.add_column("incidents", sa.Column("generation", sa.Integer, nullable=False, server_default="0"))
    op.create_index(
        "uq_incidents_active_fingerprint",
        "incidents",
        ["fingerprint"],
        unique=True,
        postgresql_where=ACTIVE,
    )
    op.create_index("idx_incidents_fingerprint", "incidents", ["fingerprint"])
    op.create_index("idx_incidents_alert_name", "incidents", ["alert_name"])
    # Keyset pagination walks (created_at, id) newest first.
    op.create_index("idx_incidents_created_at_id", "incidents", [sa.text("created_at DESC"), sa.text("id DESC")])

    op.create_table(
        "incident_timeline",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column(
            "incident_id",
            sa.String(36),
            sa.ForeignKey("incidents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime, nullable=False, server_default=UTC_NOW),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False, server_default="system"),
        sa.Column("details", postgresql.JSONB, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("dedup_key", sa.String(200), nullable=True),
        sa.UniqueConstraint("dedup_key", name="uq_incident_timeline_dedup_key"),
    )
    op.create_index("idx_incident_timeline_incident_at", "incident_timeline", ["incident_id", "at", "id"])

    op.create_table(
        "event_outbox",
        sa.Column("id", sa.String(120), primary_key=True),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(200), nullable=True),
        sa.Column("extensions", postgresql.JSONB, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("data", postgresql.JSONB, nullable=False, server_default=EMPTY_OBJECT),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=UTC_NOW),
        sa.Column("published_at", sa.DateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index(
        "idx_event_outbox_pending",
        "event_outbox",
        ["created_at"],
        postgresql_where=sa.text("published_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("event_outbox")
    op.drop_table("incident_timeline")
    op.drop_index("idx_incidents_created_at_id", table_name="incidents")
    op.drop_index("idx_incidents_alert_name", table_name="incidents")
    op.drop_index("idx_incidents_fingerprint", table_name="incidents")
    op.drop_index("uq_incidents_active_fingerprint", table_name="incidents")
    for column in (
        "generation",
        "repeat_count",
        "last_seen_at",
        "starts_at",
        "source",
        "annotations",
        "labels",
        "fingerprint",
    ):
        op.drop_column("incidents", column)
    postgresql.ENUM(name="incident_source").drop(op.get_bind(), checkfirst=True)
