"""Publishes outbox events after the commit without holding up the response.

The caller has already committed the incident and its events; this only
speeds delivery up. Whatever it fails to send stays in the outbox for the
sweep, so a crash or a Broker outage delays events and loses none.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import requests

from shared import db, outbox
from shared.config import Settings

log = logging.getLogger("publisher")


class Publisher:
    def __init__(self, config: Settings):
        self.sink = config.k_sink
        self.timeout = config.publish_timeout_seconds
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        if not self.sink:
            log.warning("K_SINK is not set: incident events are kept in the outbox and not sent to a Broker")

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _run(self, ids: list[str]) -> outbox.PublishReport:
        try:
            return outbox.publish_pending(db.engine(), self.sink, self.timeout, ids=ids, http=self._session())
        except Exception:  # noqa: BLE001 - the sweep will retry; never crash the worker
            log.exception("Publishing events failed; the sweep will retry", extra={"events": len(ids)})
            return outbox.PublishReport(failed={i: "publish crashed" for i in ids})

    def submit(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if not ids:
            return
        if not self.sink:
            log.info("Events not sent: K_SINK is not set", extra={"events": len(ids)})
            return
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="publisher")
        self._executor.submit(self._run, ids)

    def sweep(self, limit: int = 500) -> outbox.PublishReport:
        """Send everything still pending (the PingSource calls this)."""
        if not self.sink:
            return outbox.PublishReport(pending_left=outbox.pending_count(db.engine()))
        report = outbox.publish_pending(db.engine(), self.sink, self.timeout, limit=limit, http=self._session())
        report.pending_left = outbox.pending_count(db.engine())
        return report
