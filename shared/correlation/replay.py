"""Alerts the noise-control sweep replays (held by a maintenance window
that ended) are correlated like fresh ones. The sweep records them inside
its own transaction, where no network call may wait, so their topology is
looked up here first, before that transaction; the replay then plans from
the cache (``Correlator.plan(fetch=False)``)."""

from __future__ import annotations

import logging
import time

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from shared import clock, maintenance
from shared.correlation.plan import Correlator

log = logging.getLogger("correlation")

# The sweep also republishes missed pages after this: a slow API must not
# hold that up. What is not looked up in time replays on label rules.
BUDGET_SECONDS = 10.0
CHUNK = 25


def look_up_topology(bind: Engine, correlator: Correlator, budget: float = BUDGET_SECONDS) -> int:
    """Plans (and so caches the topology of) the alerts the sweep is about
    to release, for at most ``budget`` seconds; returns how many were
    looked up. Best effort: the sweep runs regardless."""
    try:
        with bind.connect() as conn:
            due = maintenance.due(conn, clock.now())
        deadline = time.monotonic() + budget
        done = 0
        for start in range(0, len(due), CHUNK):
            if time.monotonic() >= deadline:
                log.warning("Topology lookup for the sweep's replays ran out of time; the rest replay on label rules",
                            extra={"looked_up": done, "due": len(due)})
                break
            correlator.plan(due[start:start + CHUNK])
            done += len(due[start:start + CHUNK])
        return done
    except SQLAlchemyError:
        return 0  # the sweep itself reports the database
    except Exception:  # the replay then falls back to label rules; the sweep must run
        log.exception("Topology lookup for the sweep's replays failed")
        return 0
