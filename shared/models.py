"""Table definitions as the migrations leave them (Alembic owns the schema;
these are only for building statements, never for ``create_all``)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

from shared.domain import ACTIVE_STATUSES, PRIORITIES, STATUSES  # noqa: E402, F401 - re-exported for statements

# incidents.source is text (migration 0009): the registry of alert sources
# (functions/intake/sources/) names them, so a new source needs no migration.
SOURCE_MAX = 40

priority_enum = postgresql.ENUM(*PRIORITIES, name="incident_priority", create_type=False)
status_enum = postgresql.ENUM(*STATUSES, name="incident_status", create_type=False)

incidents_table = sa.Table(
    "incidents",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("alert_name", sa.String(100), nullable=False),
    sa.Column("priority", priority_enum),
    sa.Column("status", status_enum),
    sa.Column("created_at", sa.DateTime),
    sa.Column("updated_at", sa.DateTime),
    sa.Column("resolved_at", sa.DateTime),
    sa.Column("summary", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("diagnostics", sa.JSON),
    sa.Column("remediation_actions", sa.JSON),
    sa.Column("fingerprint", sa.String(128)),
    sa.Column("labels", postgresql.JSONB),
    sa.Column("annotations", postgresql.JSONB),
    sa.Column("source", sa.String(SOURCE_MAX)),
    sa.Column("starts_at", sa.DateTime),
    sa.Column("last_seen_at", sa.DateTime),
    sa.Column("repeat_count", sa.Integer),
    sa.Column("generation", sa.Integer),
    sa.Column("resolved_by", sa.String(40)),
    # Migration 0010: the incident this one was merged into (its root arrived late).
    sa.Column("merged_into", sa.String(36)),
    # Migration 0017: how many times a stronger alert took over as root.
    sa.Column("root_generation", sa.Integer),
)

incident_timeline = sa.Table(
    "incident_timeline",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("incident_id", sa.String(36), sa.ForeignKey("incidents.id")),
    sa.Column("at", sa.DateTime),
    sa.Column("kind", sa.String(40)),
    sa.Column("actor", sa.String(200)),
    sa.Column("details", postgresql.JSONB),
    sa.Column("dedup_key", sa.String(200)),
)

event_outbox = sa.Table(
    "event_outbox",
    metadata,
    sa.Column("id", sa.String(120), primary_key=True),
    sa.Column("type", sa.String(200)),
    sa.Column("source", sa.String(200)),
    sa.Column("subject", sa.String(200)),
    sa.Column("extensions", postgresql.JSONB),
    sa.Column("data", postgresql.JSONB),
    sa.Column("created_at", sa.DateTime),
    sa.Column("published_at", sa.DateTime),
    sa.Column("attempts", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("claimed_until", sa.DateTime),
)

# Migration 0010: the alerts of an incident (its root and the ones that joined).
incident_members = sa.Table(
    "incident_members",
    metadata,
    sa.Column("incident_id", sa.String(36), sa.ForeignKey("incidents.id"), primary_key=True),
    sa.Column("fingerprint", sa.String(128), primary_key=True),
    sa.Column("alert_name", sa.String(100)),
    sa.Column("labels", postgresql.JSONB),
    sa.Column("priority", sa.String(2)),
    sa.Column("status", sa.String(10)),
    sa.Column("starts_at", sa.DateTime),
    sa.Column("ends_at", sa.DateTime),
    sa.Column("last_seen_at", sa.DateTime),
    sa.Column("joined_at", sa.DateTime),
    sa.Column("is_root", sa.Boolean),
    sa.Column("rank", sa.Integer),
    sa.Column("correlation_reason", sa.Text),
    sa.Column("provides", postgresql.ARRAY(sa.Text)),
    sa.Column("seeks", postgresql.ARRAY(sa.Text)),
)
