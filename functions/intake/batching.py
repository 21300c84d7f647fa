"""Group commit: webhooks that arrive while a transaction is in flight share
the next one.

An intake process serves several requests at once (its server's threads). Each
webhook costs a few round trips to PostgreSQL whatever its size, so while
one thread commits, the webhooks that queue up behind it are written
together by the next transaction, and every request is answered from its own
slice of the result. Nobody waits for a timer: a request that finds no
transaction in flight writes at once. Each request still gets ``2xx`` only
after its alerts are committed, and an error fails only the requests of the
batch that hit it (a non-transient error is retried request by request, so
one bad webhook cannot fail its neighbours).

The thread that writes a batch writes exactly one, the one that carries its
own request, and then hands the lead to the oldest waiting request. A leader
that kept writing until the queue ran dry would, under steady load, never
get back to its own client: its request was answered in the database long
ago, yet its response waited behind everyone else's batches (p99 of seconds
at 8 connections; tests/test_group_commit_slices.py holds the hand-off).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from shared import db
from shared.alerts import Alert
from shared.incidents import Outcome, RecordResult

Writer = Callable[[Sequence[Alert]], RecordResult]


# eq=False: entries are told apart by identity (two webhooks may carry equal alerts).
@dataclass(eq=False)
class _Entry:
    alerts: Sequence[Alert]
    # Set when the entry is answered (result or error) or made a leader.
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: RecordResult | None = None
    error: BaseException | None = None

    def answer(self, result: RecordResult | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.wake.set()


class GroupCommit:
    """``writers`` transactions may be in flight at once: a commit waits
    for the disk, and the next batch can be written meanwhile (PostgreSQL
    flushes concurrent commits together). Two batches lock their incidents
    in one order, by id, and insert in fingerprint order (shared/ingest.py),
    as two replicas' batches do."""

    def __init__(self, write: Writer, max_alerts: int = 5000, writers: int = 1):
        self.write = write
        self.max_alerts = max_alerts
        self.writers = max(1, writers)
        self._lock = threading.Lock()
        self._queue: list[_Entry] = []
        self._leaders = 0

    @property
    def waiting(self) -> int:
        """Requests queued for a transaction that has not started yet."""
        with self._lock:
            return sum(1 for e in self._queue if not e.lead)

    def submit(self, alerts: Sequence[Alert]) -> RecordResult:
        entry = _Entry(alerts)
        with self._lock:
            self._queue.append(entry)
            if self._leaders < self.writers:
                self._leaders += 1
                self._promote(entry)
        entry.wake.wait()
        if entry.lead:
            try:
                self._write(self._take(entry))
            finally:
                self._hand_off()
        if entry.error is not None:
            raise entry.error
        return entry.result

    @staticmethod
    def _promote(entry: _Entry) -> None:
        entry.lead = True
        entry.wake.set()

    def _hand_off(self) -> None:
        with self._lock:
            successor = next((e for e in self._queue if not e.lead), None)
            if successor is None:
                self._leaders -= 1
            else:
                self._promote(successor)

    def _take(self, own: _Entry) -> list[_Entry]:
        """The leader's own entry and the oldest waiting ones after it, but
        no other leader's."""
        with self._lock:
            self._queue.remove(own)
            batch, size = [own], len(own.alerts)
            for entry in list(self._queue):
                if entry.lead:
                    continue
                if size + len(entry.alerts) > self.max_alerts:
                    break
                self._queue.remove(entry)
                batch.append(entry)
                size += len(entry.alerts)
            return batch

    def _write(self, batch: list[_Entry]) -> None:
        try:
            result = self.write([a for e in batch for a in e.alerts])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) > 1 and not db.is_transient(exc):
                for entry in batch:
                    self._write([entry])
                return
            for entry in batch:
                entry.answer(error=exc)
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
            entry.answer(RecordResult(outcomes, events))
