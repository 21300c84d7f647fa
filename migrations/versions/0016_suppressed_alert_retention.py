"""An index for pruning released held alerts.

``suppressed_alerts`` keeps one row per fingerprint a maintenance window
ever held; fingerprints carry pod names, so over months the released rows
grow without bound. Retention (shared/retention.py) deletes released rows
``RETENTION_SUPPRESSED_DAYS`` after their release, oldest first, and finds
each batch through this partial index instead of a scan. Held rows are
never pruned: the window's end replays them.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS idx_suppressed_alerts_released ON suppressed_alerts (released_at) "
               "WHERE released_at IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS idx_suppressed_alerts_released")
