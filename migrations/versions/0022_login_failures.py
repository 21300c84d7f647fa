"""Failed board sign-ins, counted where every replica of the query function
sees them (shared/login_throttle.py).

One row per client that failed recently (``address:<ip>``, ``device:<id>``
for a browser that signed in here before, ``all`` for every client without
such a cookie together) with the failures counted in its current window.
Rows exist only while their window lasts (each failure deletes the expired
ones, through the index on ``window_start``), and a client is only counted
while it is not yet held back, so the table stays as small as the limits.

A board session signed in with a person's own token is a row of
``board_sessions`` (shared/board_sessions.py): the cookie carries only a
random id, the row says who, so no cookie, however it was signed, can make
a personal identity. Only the SHA-256 of the id is stored: a read of the
table does not give anyone a session. A person keeps at most a few
sessions (the index on ``user_name`` finds the ones a sign-in ends), and the
retention sweep deletes expired ones.

Revision ID: 0022
Revises: 0020
"""

from alembic import op
import sqlalchemy as sa

revision = "0022"
down_revision = "0020"
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
    op.create_table(
        "board_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("user_name", sa.String(100), nullable=False),
        # A mark of the person's token at sign-in: the session ends when the token changes.
        sa.Column("token_stamp", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
    )
    op.create_index("idx_board_sessions_expires_at", "board_sessions", ["expires_at"])
    # A sign-in keeps the person's newest sessions and deletes the others (shared/board_sessions.py KEEP_PER_USER).
    op.create_index("idx_board_sessions_user_name", "board_sessions", ["user_name", "created_at"])


def downgrade() -> None:
    op.drop_table("board_sessions")
    op.drop_table("login_failures")
