"""Dead-lettered events that name no known incident (the rest go on the
incident's timeline), so no event is ever silently lost.

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("event_source", sa.String(300), nullable=False),
        sa.Column("event_type", sa.String(200), nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False, server_default=sa.text("timezone('utc', now())")),
        sa.Column("error_destination", sa.Text, nullable=True),
        sa.Column("error_code", sa.String(10), nullable=True),
        sa.Column("error_data", sa.Text, nullable=True),
        sa.Column("attributes", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("data", sa.Text, nullable=True),
        sa.UniqueConstraint("event_source", "event_id", "error_destination", name="uq_dead_letters_event"),
    )
    op.create_index("idx_dead_letters_received_at", "dead_letters", ["received_at"])


def downgrade() -> None:
    op.drop_table("dead_letters")
