"""Alerts the noise-control sweep replays (held by a maintenance window
that ended) are correlated like fresh ones. The sweep records them inside
its own transaction, where no network call may wait, so their topology is
looked up here first, before that transaction; the replay then plans from
the cache (``Correlator.plan(fetch=False)``)."""

from __future__ import annotations

import logging

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from shared import clock, maintenance
from shared.correlation.plan import Correlator

log = logging.getLogger("correlation")


def look_up_topology(bind: Engine, correlator: Correlator) -> int:
    """Plans (and so caches the topology of) the alerts the sweep is about
    to release; returns how many. Best effort: the sweep runs regardless."""
    try:
        with bind.connect() as conn:
            due = maintenance.due(conn, clock.now())
        if due:
            correlator.plan(due)
        return len(due)
    except SQLAlchemyError:
        return 0  # the sweep itself reports the database
    except Exception:  # the replay then falls back to label rules; the sweep must run
        log.exception("Topology lookup for the sweep's replays failed")
        return 0
