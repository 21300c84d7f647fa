"""Each remediation proposal names the root it was planned on.

A proposal is planned from the diagnosis of the incident's root at the
time (docs/correlation.md); when another alert takes over as the root, the
take-over supersedes the pending ones (shared/proposals.py
``supersede_on_root_change``), and a decision refuses one whose root is not
the incident's current one (``decide``). Without the column a proposal left
pending from before that rule, or made by a replica of the previous release
during a rollout, could be approved and run under a root it was not planned
on.

Nullable, with no default: the previous release inserts proposals without
it during a rollout (it names its columns), and keeps running against this
schema. A NULL root is unknown: the new code treats it as stale once the
incident's generation has had a take-over (root_generation > 0), since the
row may be of any root the generation had; while the generation still has
its first root it can only be of that one.

Revision ID: 0028
Revises: 0027
"""

from alembic import op
import sqlalchemy as sa

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("remediation_proposals", sa.Column("root_generation", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("remediation_proposals", "root_generation")
