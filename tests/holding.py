"""Loopback servers that hold a request until the test releases it, so that
a concurrency test knows one delivery is in flight while it sends the others:
the overlap is certain, not likely."""

from __future__ import annotations

import threading

from loopback.kube import FakeKubernetes
from loopback.servers import Recorded, RecordingServer

HOLD_LIMIT = 30.0


class Gate:
    """Holds the first request that matches until ``release()``."""

    def __init__(self):
        self.pattern: str | None = None
        self.held = threading.Event()
        self.released = threading.Event()

    def arm(self, pattern: str) -> None:
        self.pattern = pattern
        self.held.clear()
        self.released.clear()

    def reset(self) -> None:
        self.pattern = None
        self.released.set()

    def release(self) -> None:
        self.released.set()

    def wait_held(self, timeout: float = 20.0) -> None:
        assert self.held.wait(timeout), f"no request matching {self.pattern!r} arrived"

    def pass_through(self, req: Recorded) -> None:
        if self.pattern is not None and self.pattern in req.path and not self.held.is_set():
            self.held.set()
            self.released.wait(HOLD_LIMIT)


class HoldingKubernetes(FakeKubernetes):
    """The loopback Kubernetes API with a gate in front of it."""

    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def respond(self, req):
        self.gate.pass_through(req)
        return super().respond(req)


class HoldingReceiver(RecordingServer):
    """A recording HTTP receiver (PagerDuty, Slack) with a gate; answers are
    taken from ``script`` first, then ``default``."""

    def __init__(self, default=(202, {"Content-Type": "application/json"}, b'{"status":"success"}')):
        self.gate = Gate()
        self.script: list[tuple[int, dict, bytes]] = []
        self.default = default
        super().__init__(self._answer)

    def _answer(self, req: Recorded):
        self.gate.pass_through(req)
        return self.script.pop(0) if self.script else self.default


def waits_for_a_lock(engine) -> bool:
    """Whether another session of this test's database is waiting for a row
    lock: the other side of a lock-order test has reached the lock it needs.
    (Sessions of other databases on the same server, a benchmark's, never count.)"""
    import sqlalchemy as sa

    with engine.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND pid <> pg_backend_pid()")).scalar())


def against_a_resolve(engine, first: str, then: str, write) -> list[str]:
    """Run ``write()`` (a batch's transaction) while another session, as a
    resolve does, has locked incident ``first``; once the batch waits for a
    lock, that session locks ``then`` and commits. The database errors
    either side met, first lines (a deadlock is one); [] when the two only
    waited for each other."""
    import sqlalchemy as sa

    from loopback.processes import wait_until

    lock = sa.text("SELECT id FROM incidents WHERE id = :i FOR UPDATE")
    errors: list[BaseException] = []

    def batch():
        try:
            write()
        except sa.exc.DBAPIError as exc:
            errors.append(exc)

    with engine.connect() as resolver:
        resolving = resolver.begin()
        resolver.execute(lock, {"i": first})
        worker = threading.Thread(target=batch)
        worker.start()
        wait_until(lambda: waits_for_a_lock(engine), message="the batch waiting for a lock the resolve holds")
        try:
            resolver.execute(lock, {"i": then})
            resolving.commit()
        except sa.exc.DBAPIError as exc:
            errors.append(exc)
            resolving.rollback()
        worker.join(HOLD_LIMIT)
    assert not worker.is_alive(), "the batch never finished"
    return [str(e).splitlines()[0] for e in errors]
