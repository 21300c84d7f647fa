"""Group commit: webhooks that arrive while a transaction is in flight share
the next one.

An intake process serves several requests at once (gunicorn threads). Each
webhook costs a few round trips to PostgreSQL whatever its size, so while
one thread commits, the webhooks that queue up behind it are written
together by the next transaction, and every request is answered from its own
slice of the result. Nobody waits for a timer: a request that finds no
transaction in flight writes at once. Each request still gets ``2xx`` only
after its alerts are committed, and an error fails only the requests of the
batch that hit it (a non-transient error is retried request by request, so
one bad webhook cannot fail its neighbours).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from shared import db
from shared.alerts import Alert
from shared.incidents import Outcome, RecordResult

Writer = Callable[[Sequence[Alert]], RecordResult]


@dataclass
class _Entry:
    alerts: Sequence[Alert]
    done: threading.Event = field(default_factory=threading.Event)
    result: RecordResult | None = None
    error: BaseException | None = None


class GroupCommit:
    def __init__(self, write: Writer, max_alerts: int = 5000):
        self.write = write
        self.max_alerts = max_alerts
        self._lock = threading.Lock()
        self._queue: list[_Entry] = []
        self._flushing = False

    def submit(self, alerts: Sequence[Alert]) -> RecordResult:
        entry = _Entry(alerts)
        with self._lock:
            self._queue.append(entry)
            lead = not self._flushing
            self._flushing = True
        if lead:
            self._drain()
        entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _take(self) -> list[_Entry]:
        with self._lock:
            batch, size = [], 0
            while self._queue and (not batch or size + len(self._queue[0].alerts) <= self.max_alerts):
                entry = self._queue.pop(0)
                batch.append(entry)
                size += len(entry.alerts)
            if not batch:
                self._flushing = False
            return batch

    def _drain(self) -> None:
        while batch := self._take():
            self._write(batch)

    def _write(self, batch: list[_Entry]) -> None:
        try:
            result = self.write([a for e in batch for a in e.alerts])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) > 1 and not db.is_transient(exc):
                for entry in batch:
                    self._write([entry])
                return
            for entry in batch:
                entry.error = exc
                entry.done.set()
            return
        start = 0
        slices = []
        for entry in batch:
            outcomes: list[Outcome] = result.outcomes[start:start + len(entry.alerts)]
            start += len(entry.alerts)
            # Every event id of the batch is published once, by the request
            # whose alerts produced it.
            ids = {o.incident_id for o in outcomes}
            slices.append((outcomes, [e for e in result.event_ids if e.split(".", 1)[0] in ids]))
        # An incident merged into a late root is named by no outcome: the
        # first request publishes its event.
        named = {e for _, events in slices for e in events}
        slices[0][1].extend(e for e in result.event_ids if e not in named)
        for entry, (outcomes, events) in zip(batch, slices, strict=True):
            entry.result = RecordResult(outcomes, events)
            entry.done.set()
