"""Publishes outbox events after the commit without holding up the response.

The caller has already committed the incident and its events; this only
speeds delivery up. Whatever it fails to send stays in the outbox for the
sweep, so a crash or a Broker outage delays events and loses none.

A fixed number of drainer threads per process send everything due, in
leased batches, P0 first, until nothing is due: a 10,000-alert webhook is
published in one drain, not 200 events now and the rest a minute later. A
commit only wakes the drainers, so a storm of commits costs no more threads
and no more memory than one batch per drainer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from shared import db, outbox
from shared.config import Settings

if TYPE_CHECKING:
    import requests

log = logging.getLogger("publisher")

DRAINERS = 2
# The sweep answers an HTTP request (the PingSource's, every minute): it
# stops well before the next one and says what is left.
SWEEP_DEADLINE_SECONDS = 40.0


class Publisher:
    def __init__(self, config: Settings, drainers: int = DRAINERS):
        self.sink = config.k_sink
        self.timeout = config.publish_timeout_seconds
        self.max_attempts = config.outbox_max_attempts
        self.drainers = drainers
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._local = threading.local()
        if not self.sink:
            log.warning("K_SINK is not set: incident events are kept in the outbox and not sent to a Broker")

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            import requests  # by the drainer thread that sends first, off the request path

            from shared.deadline import bounded

            self._local.session = bounded(requests.Session())
        return self._local.session

    def _drain(self, deadline: float | None = None) -> outbox.PublishReport:
        return outbox.publish_pending(db.engine(), self.sink, self.timeout, http=self._session(),
                                      max_attempts=self.max_attempts, deadline=deadline)

    def _drainer(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                report = self._drain()
            except Exception:  # the sweep will retry; never let the drainer die
                log.exception("Publishing events failed; the sweep will retry")
                time.sleep(1.0)
                continue
            if report.published or report.failed:
                log.info("Events published", extra={"published": len(report.published), "failed": len(report.failed),
                                                    "parked": len(report.parked)})

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            for number in range(self.drainers):
                thread = threading.Thread(target=self._drainer, name=f"publisher-{number}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def submit(self, ids) -> None:
        """Committed events are waiting: send them (and anything else due) now."""
        ids = list(ids)
        if not ids:
            return
        if not self.sink:
            log.info("Events not sent: K_SINK is not set", extra={"events": len(ids)})
            return
        self._start()
        self._wake.set()

    def sweep(self, deadline_seconds: float = SWEEP_DEADLINE_SECONDS) -> outbox.PublishReport:
        """Send everything due until none is left or the deadline (the PingSource calls this)."""
        if not self.sink:
            return outbox.PublishReport(pending_left=outbox.pending_count(db.engine()))
        report = self._drain(time.monotonic() + deadline_seconds)
        report.pending_left = outbox.pending_count(db.engine())
        return report
