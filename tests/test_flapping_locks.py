"""Concurrent batches and the flapping rows (alert_flaps), against the real
PostgreSQL: each batch locks its rows, new fingerprints' included, in one
step and in fingerprint order before it reads them, and saves what it read
under those locks.

The interleavings are made certain, not likely: one batch is held between
reading its flapping rows and its next statement (the one that carries its
save), and the others are let go only once each has finished or waits for
a lock (pg_stat_activity). Nothing sleeps."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime

import pytest
import sqlalchemy as sa

from shared import clock
from shared import incidents as svc
from shared.config import load_settings
from loopback.processes import wait_until
from tests.factories import alert
from tests.holding import HOLD_LIMIT

T0 = datetime(2026, 11, 29, 3, 0, 0)


@pytest.fixture
def at():
    clock.set_now(T0)
    yield clock
    clock.set_now(None)


def settings(database_url, **env):
    return load_settings({"DATABASE_URL": database_url, **env})


def record(engine, config, *alerts):
    with engine.begin() as conn:
        return svc.record_alerts(conn, list(alerts), "/t", "alertmanager", 0, config=config)


def flap_row(engine, fingerprint) -> dict:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT last_status, flips, flapping_since FROM alert_flaps WHERE fingerprint = :f"),
                                 {"f": fingerprint}).mappings().one())


def lock_waiters(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")).scalar()


class HeldAfterItsFlaps:
    """Holds one thread's batch right after the statement that read (and
    locked) its flapping rows, before the next one: the save of those rows
    travels with that next statement (db.later), so the batch is held
    between its reading and its writing, where a concurrent batch can
    commit."""

    def __init__(self, engine, thread_name: str):
        self.engine, self.thread_name = engine, thread_name
        self.read = False
        self.held = threading.Event()
        self.released = threading.Event()

    def __enter__(self):
        sa.event.listen(self.engine, "before_cursor_execute", self._pass)
        return self

    def __exit__(self, *exc):
        self.released.set()
        sa.event.remove(self.engine, "before_cursor_execute", self._pass)

    def _pass(self, conn, cursor, statement, parameters, context, executemany):
        if threading.current_thread().name != self.thread_name:
            return
        if self.read and not self.held.is_set():
            self.held.set()
            self.released.wait(HOLD_LIMIT)
        if "noise_flaps_unless_windowed(" in statement:
            self.read = True


class Batches:
    """Batches recorded in threads of their own; their errors by name."""

    def __init__(self, engine, config):
        self.engine, self.config = engine, config
        self.errors: dict[str, str] = {}
        self.threads: dict[str, threading.Thread] = {}

    def start(self, name, *alerts) -> threading.Thread:
        def run():
            try:
                record(self.engine, self.config, *alerts)
            except Exception as exc:  # noqa: BLE001 - a deadlock, asserted on below
                self.errors[name] = str(exc).splitlines()[0]

        thread = self.threads[name] = threading.Thread(target=run, name=name)
        thread.start()
        return thread

    def finished_or_waiting(self, *names) -> bool:
        """Each named batch has committed or waits for a lock (and stays so
        while the held batch is held)."""
        alive = sum(self.threads[n].is_alive() for n in names)
        return lock_waiters(self.engine) >= alive

    def join(self) -> None:
        for thread in self.threads.values():
            thread.join(HOLD_LIMIT)
        assert not any(t.is_alive() for t in self.threads.values()), "a batch never finished"


def test_a_fingerprint_another_batch_commits_meanwhile_does_not_deadlock_two_batches(database_url, clean_db, at):
    """Batch A fires a known alert K and a new one N (N sorts first). While
    A is between reading its flapping rows and saving them, batch C, a
    first sighting of N, commits N's row, and batch B fires N and K. Had A
    locked only the rows that were there (K) and written N's with its save,
    B would lock N and wait for K while A's save waited for N: a deadlock
    (40P01), one of the batches answered 503. Locking N too, as an insert,
    before reading makes C and B wait for A instead."""
    config = settings(database_url)
    known, new = alert("Relock", fingerprint="fp-2-known"), alert("Relock", fingerprint="fp-1-new")
    record(clean_db, config, known)
    batches = Batches(clean_db, config)
    with HeldAfterItsFlaps(clean_db, "A") as gate:
        batches.start("A", known, new)
        assert gate.held.wait(20), "batch A never read its flapping rows"
        batches.start("C", new)
        wait_until(lambda: batches.finished_or_waiting("C"), 20, message="batch C committed or waiting for A")
        batches.start("B", new, known)
        wait_until(lambda: batches.finished_or_waiting("C", "B") and batches.threads["B"].is_alive(), 20,
                   message="batch B waiting for a lock")
        gate.released.set()
        batches.join()
    assert batches.errors == {}
    for fp in (known.fingerprint, new.fingerprint):
        assert flap_row(clean_db, fp) == {"last_status": "firing", "flips": [], "flapping_since": None}
        with clean_db.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM incidents WHERE fingerprint = :f AND status = 'open'"),
                                {"f": fp}).scalar() == 1


@pytest.mark.parametrize("seen_before", [False, True], ids=["new", "known"])
def test_two_batches_flipping_a_fingerprint_at_once_count_both_flips(database_url, clean_db, at, seen_before):
    """Batch A fires an alert and batch B resolves it, at once. For a new
    fingerprint both found no row; had each written its own first sighting,
    the later save would overwrite the earlier and the flip would be lost,
    so an alert that keeps flipping is flagged late or never. Now B waits
    for A's row (new or known) and counts the flip, and the next firing
    flags the alert as flapping."""
    config = settings(database_url, FLAP_THRESHOLD="2")
    firing = alert("FirstFlip", fingerprint="fp-flip")
    if seen_before:
        record(clean_db, config, replace(firing, status="resolved"))
        clock.advance(60)
    batches = Batches(clean_db, config)
    with HeldAfterItsFlaps(clean_db, "A") as gate:
        batches.start("A", firing)
        assert gate.held.wait(20), "batch A never read its flapping rows"
        batches.start("B", replace(firing, status="resolved"))
        wait_until(lambda: batches.finished_or_waiting("B"), 20, message="batch B committed or waiting for A")
        gate.released.set()
        batches.join()
    assert batches.errors == {}
    row = flap_row(clean_db, firing.fingerprint)
    assert (row["last_status"], len(row["flips"])) == ("resolved", 1 + seen_before), row
    clock.advance(60)
    record(clean_db, config, firing)
    row = flap_row(clean_db, firing.fingerprint)
    assert len(row["flips"]) == 2 + seen_before and row["flapping_since"] is not None, row


def test_the_sweep_forgetting_settled_fingerprints_waits_for_no_batch(database_url, clean_db, at):
    """Two settled fingerprints the sweep may forget, S1 and S2 (S1 sorts
    first, S2 lies first in the table), fire again in one batch. A third
    session holds S1, so the batch waits for it; the sweep's prune deletes
    S2 and would wait for S1 too. Once S1 is let go the batch takes it and
    needs S2, which a prune that waited would keep until its commit: a
    deadlock. The prune skips the rows a batch holds instead, so it never
    waits, and the batch writes S2 again as a first sighting."""
    from shared import flapping

    config = settings(database_url)
    first, second = alert("Settled", fingerprint="fp-s1"), alert("Settled", fingerprint="fp-s2")
    with clean_db.begin() as conn:
        for fp in (second.fingerprint, first.fingerprint):  # S2 first in the table: the prune's scan meets it first
            conn.execute(sa.text("INSERT INTO alert_flaps (fingerprint, last_status) VALUES (:f, 'resolved')"), {"f": fp})
    errors: dict[str, str] = {}

    def prune():
        try:
            with clean_db.begin() as conn:
                flapping.prune(conn, clock.now(), config.flap_window_seconds)
        except Exception as exc:  # noqa: BLE001 - a deadlock, asserted on below
            errors["prune"] = str(exc).splitlines()[0]

    batches = Batches(clean_db, config)
    with clean_db.connect() as holding:
        with holding.begin():
            holding.execute(sa.text("SELECT 1 FROM alert_flaps WHERE fingerprint = :f FOR UPDATE"), {"f": first.fingerprint})
            batches.start("batch", first, second)
            wait_until(lambda: lock_waiters(clean_db) == 1, 20, message="the batch waiting for S1")
            pruning = threading.Thread(target=prune)
            pruning.start()
            wait_until(lambda: not pruning.is_alive() or lock_waiters(clean_db) == 2, 20,
                       message="the prune finished or waiting for S1")
        pruning.join(HOLD_LIMIT)
        batches.join()
    assert not pruning.is_alive()
    assert {**errors, **batches.errors} == {}
    for fp in (first.fingerprint, second.fingerprint):
        assert flap_row(clean_db, fp)["last_status"] == "firing"
