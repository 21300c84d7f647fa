"""Failed board sign-ins, counted where every replica of the query function
sees them (shared/login_throttle.py).

One row per client that failed recently (``address:<ip>``, ``device:<id>``
for a browser that signed in here before, ``all`` for every client without
such a cookie together) with the failures counted in its current window.
Rows exist only while their window lasts (each failure deletes the expired
ones, through the index on ``window_start``), and a client is only counted
while it is not yet held back, so the table stays as small as the limits.

Board sessions need no column: a session is a signed cookie that already
carries who signed in (functions/query/board.py).

Revision ID: 0022
Revises: 0019
"""

from alembic import op
import sqlalchemy as sa

revision = "0022"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "login_failures",
        sa.Column("client", sa.String(120), primary_key=True),
        sa.Column("window_start", sa.DateTime, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
    )
    op.create_index("idx_login_failures_window_start", "login_failures", ["window_start"])


def downgrade() -> None:
    op.drop_table("login_failures")
