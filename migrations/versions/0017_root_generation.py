"""The incident's root generation: how many times another alert took over as
its root.

Diagnostics and remediation claim their step per incident, generation and
root generation (shared/claims.py: ``diagnostics:{id}:{generation}`` while
the first root stands, ``…:{generation}.root{n}`` after the n-th take-over),
so a stronger root gets a fresh diagnosis and remediation while a
redelivery of an earlier event finds the current root's claim and does
nothing twice. Escalation tells the change as a follow-up of the page it
sent, never a second page.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: no table rewrite, whatever the size of incidents.
    op.add_column("incidents", sa.Column("root_generation", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("incidents", "root_generation")
