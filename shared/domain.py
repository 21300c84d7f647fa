"""Rules of the incident domain that every function must apply the same way.

One home each, so that ``?service=`` finds what Slack shows, diagnostics
probes what remediation acts on, and a priority means one thing everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # SQLAlchemy is imported by whoever builds a statement
    import sqlalchemy as sa

PRIORITIES = ("P0", "P1", "P2")
STATUSES = ("open", "investigating", "resolved", "closed")
# An alert's fingerprint belongs to at most one incident in these statuses.
ACTIVE_STATUSES = ("open", "investigating")

# Label names that name the workload an alert is about, most specific first:
# our own convention, then what Kubernetes apps, kube-state-metrics and
# Prometheus scrape jobs put on series.
SERVICE_LABELS = ("service", "app", "deployment", "job")


def service_of(labels: Mapping[str, str] | None) -> str | None:
    """The service an alert belongs to, or None when its labels name none."""
    for name in SERVICE_LABELS:
        value = (labels or {}).get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def service_sql(labels_column: sa.ColumnElement) -> sa.ColumnElement:
    """:func:`service_of` as a SQL expression over a JSONB labels column, so
    the list filter finds exactly the service every message shows."""
    import sqlalchemy as sa

    whens = [(sa.func.btrim(labels_column[name].astext) != "", labels_column[name].astext) for name in SERVICE_LABELS]
    return sa.case(*whens, else_=None)
