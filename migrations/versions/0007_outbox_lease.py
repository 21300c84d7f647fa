"""A lease on outbox rows, so the publisher claims events in one short
transaction and posts them to the Broker outside any transaction.

Revision ID: 0007
Revises: 0006
"""

from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("event_outbox", sa.Column("claimed_until", sa.DateTime, nullable=True))


def downgrade() -> None:
    op.drop_column("event_outbox", "claimed_until")
