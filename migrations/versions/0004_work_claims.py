"""Claims that make every event handler do its work once.

Events are delivered at least once, sometimes concurrently. A handler claims
``<step>:<incident>:<generation>`` before it works and marks the claim
complete in the same transaction as the work's record; a redelivery finds
the claim complete and replays the answer. A claim whose holder died is
taken over once it is older than the step's deadline.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "work_claims",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("incident_id", sa.String(36), sa.ForeignKey("incidents.id", ondelete="CASCADE"), nullable=True),
        sa.Column("claimed_at", sa.DateTime, nullable=False, server_default=sa.text("timezone('utc', now())")),
        sa.Column("completed_at", sa.DateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    )


def downgrade() -> None:
    op.drop_table("work_claims")
