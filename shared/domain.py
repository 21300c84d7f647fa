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


def action_scope(record: Mapping) -> tuple[int, int]:
    """The (generation, root generation) a remediation action record was
    taken under. Records written before they were stamped count as (0, 0)."""
    scope = []
    for key in ("generation", "root_generation"):
        value = record.get(key)
        scope.append(value if isinstance(value, int) and not isinstance(value, bool) else 0)
    return scope[0], scope[1]


def current_actions(incident: Mapping) -> tuple[list[dict], int]:
    """The incident's remediation action records of its current generation
    and root, newest first, and how many earlier records (of previous
    generations or roots) the stored history holds besides. A reopened
    incident keeps its history; the person paged needs this round's actions,
    the failure among them, not the last round's successes. Records the
    previous release wrote carry no stamp: while no record is stamped (a
    history that began before the upgrade, of an incident perhaps reopened
    already) they all count as current, since this round's failure may be
    among them; once one is, those before it count as (0, 0)."""
    stored = incident.get("remediation_actions")
    records = [a for a in stored if isinstance(a, dict)] if isinstance(stored, list) else []
    now = (incident.get("generation") or 0, incident.get("root_generation") or 0)
    if not any("generation" in a for a in records):
        return records[::-1], 0
    current = [a for a in records if action_scope(a) == now]
    return current[::-1], len(records) - len(current)
