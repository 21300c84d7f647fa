"""What "nothing acknowledged is lost" needs from the schema.

- ``event_outbox.parked_at``: a row that failed ``OUTBOX_MAX_ATTEMPTS``
  times is parked: no longer retried by the sweep (so it never blocks the
  rows behind it), but counted, listed and re-drivable.
- ``event_outbox.next_attempt_at``: a failed row waits (backing off) before
  the next attempt, so fresh events go first.
- ``dead_letters``: every dead letter is kept here (also those of known
  incidents, which are on the timeline too), with what its redeliveries did,
  so an operator can list and re-drive them.
- ``revoked_sessions``: a signed-out board session stays signed out until
  the cookie would have expired anyway.
- ``idx_incidents_resolved_at``: the reconciliation sweep looks at incidents
  resolved recently (has their resolution been announced?) every minute;
  without it that scan grows with the history.

Revision ID: 0008
Revises: 0007
"""

from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UTC_NOW = sa.text("timezone('utc', now())")


def upgrade() -> None:
    op.add_column("event_outbox", sa.Column("parked_at", sa.DateTime, nullable=True))
    op.add_column("event_outbox", sa.Column("next_attempt_at", sa.DateTime, nullable=True))
    op.drop_index("idx_event_outbox_pending", table_name="event_outbox")
    op.create_index(
        "idx_event_outbox_pending",
        "event_outbox",
        ["created_at"],
        postgresql_where=sa.text("published_at IS NULL AND parked_at IS NULL"),
    )
    op.create_index(
        "idx_event_outbox_parked",
        "event_outbox",
        ["parked_at"],
        postgresql_where=sa.text("parked_at IS NOT NULL AND published_at IS NULL"),
    )

    op.add_column("dead_letters", sa.Column("incident_id", sa.String(36), nullable=True))
    op.add_column("dead_letters", sa.Column("redelivery_count", sa.Integer, nullable=False, server_default="0"))
    op.add_column("dead_letters", sa.Column("redelivered_at", sa.DateTime, nullable=True))
    op.add_column("dead_letters", sa.Column("redelivered_by", sa.String(200), nullable=True))
    op.add_column("dead_letters", sa.Column("redelivery_status", sa.String(20), nullable=True))
    op.add_column("dead_letters", sa.Column("redelivery_error", sa.Text, nullable=True))
    op.create_index("idx_dead_letters_incident_id", "dead_letters", ["incident_id"])

    op.create_table(
        "revoked_sessions",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("revoked_at", sa.DateTime, nullable=False, server_default=UTC_NOW),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )
    op.create_index("idx_revoked_sessions_expires_at", "revoked_sessions", ["expires_at"])

    op.create_index("idx_incidents_resolved_at", "incidents", ["resolved_at"],
                    postgresql_where=sa.text("status = 'resolved'"))


def downgrade() -> None:
    op.drop_index("idx_incidents_resolved_at", table_name="incidents")
    op.drop_table("revoked_sessions")
    op.drop_index("idx_dead_letters_incident_id", table_name="dead_letters")
    for column in ("redelivery_error", "redelivery_status", "redelivered_by", "redelivered_at", "redelivery_count", "incident_id"):
        op.drop_column("dead_letters", column)
    op.drop_index("idx_event_outbox_parked", table_name="event_outbox")
    op.drop_index("idx_event_outbox_pending", table_name="event_outbox")
    op.create_index(
        "idx_event_outbox_pending",
        "event_outbox",
        ["created_at"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_column("event_outbox", "next_attempt_at")
    op.drop_column("event_outbox", "parked_at")
