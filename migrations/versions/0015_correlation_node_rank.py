"""Node roots rank above every dependency level.

Correlation ranks roots (shared/correlation/plan.py): a node alert used to
rank 30, a workload alert 20. Dependency rules add 100 per dependency level,
so a node alert now ranks 1,000,000 (above everything that runs on the
node). The ranks of node roots already stored, in incidents still open
when this runs, are raised with it; a later alert then compares with the
same scale.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

NODE_MEMBERS = "EXISTS (SELECT 1 FROM unnest(provides) AS p WHERE p LIKE 'node:%')"


def upgrade() -> None:
    op.execute(f"UPDATE incident_members SET rank = 1000000 WHERE rank = 30 AND {NODE_MEMBERS}")


def downgrade() -> None:
    op.execute(f"UPDATE incident_members SET rank = 30 WHERE rank = 1000000 AND {NODE_MEMBERS}")
