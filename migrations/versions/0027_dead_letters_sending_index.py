"""Dead letters being redelivered are found by their claim's moment.

The intake's sweep releases redelivery claims whose sender is gone
(shared/dead_letters.py ``release_stale``): letters ``sending`` whose
claim (``redelivered_at``) is older than the staleness, oldest first. Every
minute, on a table that only grows (dead letters are never deleted), that
read the whole table for the handful of letters, if any, a redelivery
holds. A partial index over those alone stays as small as they are and
gives them in the release's order.

A plain CREATE INDEX in the migration's transaction, as 0014's and 0025's
(writes to dead_letters, the dead-letter sink's, wait while it builds). On
a large production table create it first with ``CREATE INDEX CONCURRENTLY
idx_dead_letters_sending ON dead_letters (redelivered_at) WHERE
redelivery_status = 'sending'`` (docs/deploy.md): the migration then finds
it and skips it. CONCURRENTLY cannot run inside the transaction Alembic
wraps a migration in, and one that fails half-way leaves an invalid index
that IF NOT EXISTS would then skip, so it is left to the operator, who can
see it through.

Revision ID: 0027
Revises: 0025
"""

from alembic import op

revision = "0027"
down_revision = "0025"
branch_labels = None
depends_on = None

INDEX = "idx_dead_letters_sending"


def upgrade() -> None:
    op.execute(f"CREATE INDEX IF NOT EXISTS {INDEX} ON dead_letters (redelivered_at) WHERE redelivery_status = 'sending'")


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
