"""The incident service, one import for the callers: every read and write of
incidents goes through the modules re-exported here, each with one job.

- shared.ingest: recording alerts (open, refresh, resolve, reopen)
- shared.lifecycle: status transitions, diagnostics and remediation records
- shared.timeline: the incident timeline
- shared.incident_queries: one incident, filtered pages, counts

Functions take a ``Connection`` inside the caller's transaction, so a
function entry point decides what commits together (for example an incident,
its timeline entry and its outbox event).
"""

from typing import TYPE_CHECKING

from shared.incident_queries import (
    INCIDENT_COLUMNS,
    Cursor,
    IncidentFilter,
    count_by,
    get_incident,
    list_incidents,
    require_incident,
)
from shared.lifecycle import TRANSITIONS, append_remediation_action, mark_investigating, store_diagnostics, transition
from shared.timeline import add_timeline, get_timeline

# Recording alerts (shared.ingest) brings in the correlation rules and their
# pydantic models, which only the intake uses: imported on first use, so a
# function that only reads or transitions incidents does not load them.
if TYPE_CHECKING:
    from shared.ingest import Outcome, RecordResult, record_alerts, resolve_by_fingerprint

_FROM_INGEST = ("Outcome", "RecordResult", "record_alerts", "resolve_by_fingerprint")


def __getattr__(name: str):
    if name not in _FROM_INGEST:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from shared import ingest

    value = getattr(ingest, name)
    globals()[name] = value
    return value


__all__ = [
    "INCIDENT_COLUMNS", "TRANSITIONS", "Cursor", "IncidentFilter", "Outcome", "RecordResult", "add_timeline",
    "append_remediation_action", "count_by", "get_incident", "get_timeline", "list_incidents", "mark_investigating",
    "record_alerts", "require_incident", "resolve_by_fingerprint", "store_diagnostics", "transition",
]
