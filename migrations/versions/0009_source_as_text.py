"""``incidents.source`` as bounded text instead of the enum ``incident_source``.

The registry of alert sources (functions/intake/sources/) decides which
names exist and checks them in code; an enum (or a CHECK constraint) would
need a migration for every new source. Existing rows keep their value.

Downgrade restores the enum. It refuses while rows hold a source the enum
lacks (for example ``grafana``) rather than relabel them silently: relabel
them knowingly first, e.g.
``UPDATE incidents SET source = 'alertmanager' WHERE source = 'grafana'``.

Revision ID: 0009
Revises: 0008
"""

from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The values of the enum as 0002 created it; the downgrade's target.
ENUM_VALUES = ("alertmanager", "cloudevent", "api")
SOURCE_MAX = 40


def upgrade() -> None:
    op.execute("ALTER TABLE incidents ALTER COLUMN source DROP DEFAULT")
    op.execute(f"ALTER TABLE incidents ALTER COLUMN source TYPE varchar({SOURCE_MAX}) USING source::text")
    op.execute("ALTER TABLE incidents ALTER COLUMN source SET DEFAULT 'alertmanager'")
    op.execute("DROP TYPE incident_source")


def downgrade() -> None:
    known = ", ".join(f"'{value}'" for value in ENUM_VALUES)
    strays = op.get_bind().execute(
        sa.text(f"SELECT source, count(*) FROM incidents WHERE source NOT IN ({known}) GROUP BY source ORDER BY source")
    ).all()
    if strays:
        found = ", ".join(f"{source!r} ({count} rows)" for source, count in strays)
        raise RuntimeError(
            f"cannot downgrade below 0009: incidents.source holds values the enum incident_source lacks: {found}; "
            f"relabel them to one of {known} first"
        )
    op.execute(f"CREATE TYPE incident_source AS ENUM ({known})")
    op.execute("ALTER TABLE incidents ALTER COLUMN source DROP DEFAULT")
    op.execute("ALTER TABLE incidents ALTER COLUMN source TYPE incident_source USING source::incident_source")
    op.execute("ALTER TABLE incidents ALTER COLUMN source SET DEFAULT 'alertmanager'")
