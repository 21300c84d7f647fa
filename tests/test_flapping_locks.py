"""Concurrent batches and the flapping rows (alert_flaps), against the real
PostgreSQL: each batch locks its rows, new fingerprints' included, in one
step and in fingerprint order before it reads them, and saves what it read
under those locks; and the incidents a flapping alert touches (its
timeline entries, a silent reopen) only once the batch, or the sweep, holds
its correlation keys and its incidents in id order.

The interleavings are made certain, not likely: one batch is held between
reading its flapping rows and its next statement (the one that carries its
save), and the others are let go only once each has finished or waits for
a lock (pg_blocking_pids of their own backends). Nothing sleeps."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from shared import clock, maintenance
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


def blocked(engine, pid: int) -> bool:
    """Whether the backend ``pid`` waits for a lock another session holds."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT cardinality(pg_blocking_pids(:p)) > 0"), {"p": pid}).scalar()


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
    """Batches recorded in threads of their own, each in one transaction
    whose backend is known by its pid; their errors by name."""

    def __init__(self, engine, config):
        self.engine, self.config = engine, config
        self.errors: dict[str, str] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.pids: dict[str, int] = {}

    def start(self, name, *alerts) -> threading.Thread:
        return self.run(name, lambda conn: svc.record_alerts(conn, list(alerts), "/t", "alertmanager", 0, config=self.config))

    def run(self, name, work) -> threading.Thread:
        """``work(conn)`` in a transaction of its own, in a thread named ``name``."""
        def run():
            try:
                with self.engine.begin() as conn:
                    self.pids[name] = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
                    work(conn)
                    del self.pids[name]  # its backend may serve another batch once this one commits
            except Exception as exc:  # noqa: BLE001 - a deadlock, asserted on below
                self.errors[name] = str(exc).splitlines()[0]

        thread = self.threads[name] = threading.Thread(target=run, name=name)
        thread.start()
        return thread

    def waiting(self, name) -> bool:
        """The named batch's own backend waits for a lock."""
        pid = self.pids.get(name)
        return pid is not None and blocked(self.engine, pid)

    def finished_or_waiting(self, *names) -> bool:
        """Each named batch has finished or waits for a lock (and stays so
        while the held batch is held); a waiter of another session counts
        for none of them."""
        return all(not self.threads[n].is_alive() or self.waiting(n) for n in names)

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
    batches = Batches(clean_db, config)
    with clean_db.connect() as holding:
        with holding.begin():
            holding.execute(sa.text("SELECT 1 FROM alert_flaps WHERE fingerprint = :f FOR UPDATE"), {"f": first.fingerprint})
            batches.start("batch", first, second)
            wait_until(lambda: batches.waiting("batch"), 20, message="the batch waiting for S1")
            batches.run("prune", lambda conn: flapping.prune(conn, clock.now(), config.flap_window_seconds,
                                                             config.retention_batch))
            wait_until(lambda: batches.finished_or_waiting("prune"), 20, message="the prune finished or waiting for S1")
        batches.join()
    assert batches.errors == {}
    for fp in (first.fingerprint, second.fingerprint):
        assert flap_row(clean_db, fp)["last_status"] == "firing"


def locked_elsewhere(engine, table: str, fingerprints) -> set[str]:
    """The fingerprints whose rows of ``table`` another session holds."""
    with engine.begin() as conn:
        free = conn.execute(sa.text(f"SELECT fingerprint FROM {table} WHERE fingerprint = ANY(:f) FOR UPDATE SKIP LOCKED"),
                            {"f": list(fingerprints)}).scalars().all()
    return set(fingerprints) - set(free)


class Holding:
    """A session of the test's own holding one row, until ``release()``."""

    def __init__(self, engine, statement: str, fingerprint: str):
        self.conn = engine.connect()
        self.conn.begin()
        self.conn.execute(sa.text(statement), {"f": fingerprint})

    def release(self) -> None:
        self.conn.commit()
        self.conn.close()


FLAP_ROW = "SELECT 1 FROM alert_flaps WHERE fingerprint = :f FOR UPDATE"
HELD_ROW = "SELECT 1 FROM suppressed_alerts WHERE fingerprint = :f FOR UPDATE"


def test_a_batch_with_a_resolution_locks_its_flapping_rows_in_the_order_an_all_firing_batch_does(
        database_url, clean_db, at):
    """Batch F fires K1 and K2 (all firing: noise_flaps_unless_windowed locks
    the rows); batch S fires K1 and resolves K2 (a resolution: flaps_lock
    locks them, after maintenance.hold). A session holds K1; F waits for it,
    then S queues behind F. When it lets go F takes K1, then needs K2: had S
    locked K2 before waiting for K1 (any order but the fingerprint order), F
    would wait for S and S for F, a deadlock (40P01, a 503)."""
    config = settings(database_url)
    k1, k2 = alert("Ordered", fingerprint="fp-k1"), alert("Ordered", fingerprint="fp-k2")
    record(clean_db, config, k1, k2)
    batches = Batches(clean_db, config)
    holding = Holding(clean_db, FLAP_ROW, k1.fingerprint)
    try:
        batches.start("F", k1, k2)
        wait_until(lambda: batches.waiting("F"), 20, message="batch F waiting for K1")
        batches.start("S", k1, replace(k2, status="resolved"))
        wait_until(lambda: batches.waiting("S"), 20, message="batch S waiting for K1")
    finally:
        holding.release()
    batches.join()
    assert batches.errors == {}
    assert flap_row(clean_db, k1.fingerprint)["last_status"] == "firing"
    assert flap_row(clean_db, k2.fingerprint)["last_status"] == "resolved"


@pytest.mark.parametrize("why", ["resolution", "window"])
def test_a_batch_off_the_common_path_waits_for_its_first_flapping_row_before_it_locks_the_next(
        database_url, clean_db, at, why):
    """A batch with a resolution, or any batch while a maintenance window is
    active, locks its flapping rows with flaps_lock: in fingerprint order,
    so while it waits for its first row (K1, held by another session) it
    holds none of the later ones (K2, K3); the new fingerprint it brings
    (N) is written once it has them."""
    config = settings(database_url)
    k1, k2, k3 = (alert("Ordered", fingerprint=f"fp-k{i}") for i in (1, 2, 3))
    new = alert("Ordered", fingerprint="fp-n")
    record(clean_db, config, k1, k2, k3)
    batch = [k1, k2, replace(k3, status="resolved") if why == "resolution" else k3, new]
    if why == "window":
        with clean_db.begin() as conn:
            maintenance.create(conn, ['alertname="Elsewhere"'], T0, T0 + timedelta(hours=1), "upgrade", "api:alice")
    batches = Batches(clean_db, config)
    holding = Holding(clean_db, FLAP_ROW, k1.fingerprint)
    try:
        batches.start("S", *batch)
        wait_until(lambda: batches.waiting("S"), 20, message="the batch waiting for K1")
        assert locked_elsewhere(clean_db, "alert_flaps", [k2.fingerprint, k3.fingerprint]) == set()
    finally:
        holding.release()
    batches.join()
    assert batches.errors == {}
    assert flap_row(clean_db, new.fingerprint)["last_status"] == "firing"


def test_during_a_window_a_batch_locks_its_flapping_rows_only_after_its_held_alerts(database_url, clean_db, at):
    """The lock order is held alerts (suppressed_alerts), then flapping rows,
    as the sweep's release takes them. A batch during a window refires a
    held alert H, whose row another session holds, and fires K1 and K2:
    while it waits for H it holds neither flapping row."""
    config = settings(database_url)
    with clean_db.begin() as conn:
        maintenance.create(conn, ['alertname="Held"'], T0, T0 + timedelta(hours=1), "upgrade", "api:alice")
    held = alert("Held", fingerprint="fp-h")
    k1, k2 = alert("Ordered", fingerprint="fp-k1"), alert("Ordered", fingerprint="fp-k2")
    record(clean_db, config, held, k1, k2)
    batches = Batches(clean_db, config)
    holding = Holding(clean_db, HELD_ROW, held.fingerprint)
    try:
        batches.start("W", held, k1, k2)
        wait_until(lambda: batches.waiting("W"), 20, message="the batch waiting for its held alert")
        assert locked_elsewhere(clean_db, "alert_flaps", [k1.fingerprint, k2.fingerprint]) == set()
    finally:
        holding.release()
    batches.join()
    assert batches.errors == {}
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count FROM suppressed_alerts WHERE fingerprint = :f"),
                            {"f": held.fingerprint}).scalar() == 2


class Peer:
    """A session of the test's own standing in for another writer that takes
    its locks in the global order (a correlation key, then incidents), one
    statement at a time."""

    def __init__(self, engine):
        self.conn = engine.connect()
        self.conn.begin()

    def take(self, statement: str, **params) -> None:
        self.conn.execute(sa.text(statement), params)

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


INCIDENT_ROW = "SELECT id FROM incidents WHERE id = :i FOR UPDATE"


def open_incident(engine, incident_id: str, fingerprint: str) -> None:
    """An open incident of a chosen id (so that the test knows the id order)."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics, remediation_actions, "
            "fingerprint, labels, annotations, source) VALUES (:i, 'Ordered', 'P0', 'open', 's', 'd', '{}'::json, '[]'::json, "
            ":f, '{}'::jsonb, '{}'::jsonb, 'alertmanager')"), {"i": incident_id, "f": fingerprint})


def flaps_noted(engine, incident_id: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM incident_timeline WHERE incident_id = :i AND kind = 'flap'"),
                            {"i": incident_id}).scalar()


def flap_until_flagged(engine, config, firing, plan=None) -> str:
    """firing, resolved, firing, resolved (FLAP_THRESHOLD=3): the last is
    withheld, the alert flaps and its incident stays open. Its id."""
    for status in ("firing", "resolved", "firing", "resolved"):
        with engine.begin() as conn:
            (outcome,) = svc.record_alerts(conn, [replace(firing, status=status)], "/t", "alertmanager", 0, config=config,
                                           plan=plan).outcomes
        clock.advance(10)
    assert outcome.action == "flapping"
    return outcome.incident_id


def test_a_flapping_pod_alert_takes_its_correlation_key_before_it_touches_its_incident(database_url, clean_db, at):
    """A pod alert that flaps fires again: its incident gets a ``flap`` entry
    on the timeline, whose foreign key locks the incident. A peer holds the
    key of the pod's node (as a node root's batch does) and then locks the
    incident (as its candidate statement does). Touched before the batch
    waited for the key, the incident closed a cycle: a deadlock (40P01), a
    503 for every webhook of the group commit. The batch now waits for the
    key before it touches any incident, so the peer goes first."""
    from shared.correlation.plan import Correlator
    from shared.correlation.rules import load
    from shared.correlation.store import lock_id

    config = settings(database_url, FLAP_THRESHOLD="3")
    pod = alert("KubePodCrashLooping", namespace="ns", pod="p-1", node="dn-1", severity="critical")
    plan = Correlator(load(), None).plan([pod], fetch=False)
    assert plan, "the node rule concerns a pod alert with a node label"
    incident_id = flap_until_flagged(clean_db, config, pod, plan)
    noted = flaps_noted(clean_db, incident_id)
    batches = Batches(clean_db, config)
    peer = Peer(clean_db)
    try:
        peer.take("SELECT pg_advisory_xact_lock(:k)", k=lock_id("key:node:dn-1"))
        batches.run("intake", lambda conn: svc.record_alerts(conn, [pod], "/t", "alertmanager", 0, config=config, plan=plan))
        wait_until(lambda: batches.waiting("intake"), 20, message="the batch waiting for the node's key")
        peer.take(INCIDENT_ROW, i=incident_id)
    finally:
        peer.release()
    batches.join()
    assert batches.errors == {}
    assert flaps_noted(clean_db, incident_id) == noted + 1


def test_a_flapping_alert_s_batch_locks_its_incidents_in_id_order_before_its_timeline_entry(database_url, clean_db, at):
    """A batch fires L and H (incident ids in that order); H flaps, so its
    incident gets a ``flap`` entry, whose foreign key locks it. A peer holds
    L's incident (as a batch's id-ordered lock step that took it first) and
    then locks H's. Had the entry been written before the batch's own
    id-ordered lock step, the batch would hold H and wait for L, the peer
    hold L and wait for H: a deadlock. The batch now locks both in id order
    first, so it holds nothing while it waits for L."""
    config = settings(database_url, FLAP_THRESHOLD="3")
    high = alert("Ordered", fingerprint="fp-high")
    high_id = flap_until_flagged(clean_db, config, high)
    low, low_id = alert("Ordered", fingerprint="fp-low"), "00000000-0000-4000-8000-000000000000"
    assert low_id < high_id
    open_incident(clean_db, low_id, low.fingerprint)
    noted = flaps_noted(clean_db, high_id)
    batches = Batches(clean_db, config)
    peer = Peer(clean_db)
    try:
        peer.take(INCIDENT_ROW, i=low_id)
        batches.start("intake", high, low)
        wait_until(lambda: batches.waiting("intake"), 20, message="the batch waiting for the lower incident")
        peer.take(INCIDENT_ROW, i=high_id)
    finally:
        peer.release()
    batches.join()
    assert batches.errors == {}
    assert flaps_noted(clean_db, high_id) == noted + 1


def test_the_sweep_lowering_flags_locks_the_incidents_it_notes_on_in_id_order(database_url, clean_db, at):
    """Two flapping alerts fall quiet: A (sorts first) whose incident has the
    higher id, B whose incident has the lower. The sweep notes
    ``flapping_cleared`` on each, a timeline entry whose foreign key locks
    its incident. A peer holds B's incident (an id-ordered lock step that
    took it first), then locks A's. Noting in fingerprint order, the sweep
    would hold A and wait for B: a deadlock. It locks both in id order
    first, so while it waits for B it holds nothing."""
    from shared import flapping

    config = settings(database_url)
    high_id, low_id = "ffffffff-0000-4000-8000-000000000000", "00000000-0000-4000-8000-000000000000"
    open_incident(clean_db, high_id, "fp-a")
    open_incident(clean_db, low_id, "fp-b")
    quiet_since = T0 - timedelta(seconds=config.flap_quiet_seconds + 60)
    with clean_db.begin() as conn:
        for fp, incident_id in (("fp-a", high_id), ("fp-b", low_id)):
            conn.execute(sa.text("INSERT INTO alert_flaps (fingerprint, last_status, last_flip_at, flapping_since, incident_id) "
                                 "VALUES (:f, 'firing', :t, :t, :i)"), {"f": fp, "t": quiet_since, "i": incident_id})
    batches = Batches(clean_db, config)
    peer = Peer(clean_db)
    try:
        peer.take(INCIDENT_ROW, i=low_id)
        batches.run("sweep", lambda conn: flapping.clear_quiet(conn, clock.now(), config.flap_quiet_seconds))
        wait_until(lambda: batches.waiting("sweep"), 20, message="the sweep waiting for the lower incident")
        peer.take(INCIDENT_ROW, i=high_id)
    finally:
        peer.release()
    batches.join()
    assert batches.errors == {}
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM incident_timeline WHERE kind = 'flapping_cleared'")).scalar() == 2


LOW, HIGH = "00000000-0000-4000-8000-000000000000", "ffffffff-0000-4000-8000-000000000000"


def taken_over_and_fixed(engine, flapping_status: str, flapping_since: datetime, last_flip_at: datetime) -> None:
    """Incident LOW, opened by fp-x (a pod), taken over by its root fp-y
    (fp-x now one of its members), resolved by remediation a moment ago;
    fp-x's flapping row still names LOW. Incident HIGH, open, has fp-w as a
    member."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO incidents (id, alert_name, priority, status, summary, description, diagnostics, "
            "remediation_actions, fingerprint, labels, annotations, source, resolved_at, resolved_by) VALUES "
            "(:i, 'Y', 'P1', 'resolved', 's', 'd', '{}'::json, '[]'::json, 'fp-y', '{}'::jsonb, '{}'::jsonb, "
            "'alertmanager', timezone('utc', now()), 'remediation')"), {"i": LOW})
        open_incident(engine, HIGH, "fp-z")
        for incident_id, fp, root in ((LOW, "fp-y", True), (LOW, "fp-x", False), (HIGH, "fp-w", False)):
            conn.execute(sa.text(
                "INSERT INTO incident_members (incident_id, fingerprint, alert_name, labels, priority, status, "
                "last_seen_at, joined_at, is_root, rank, correlation_reason) VALUES (:i, :f, 'M', '{}'::jsonb, 'P1', "
                "'firing', timezone('utc', now()), timezone('utc', now()), :r, 0, 'r')"), {"i": incident_id, "f": fp, "r": root})
        conn.execute(sa.text(
            "INSERT INTO alert_flaps (fingerprint, last_status, flips, last_flip_at, flapping_since, incident_id) "
            "VALUES ('fp-x', :s, '[]'::jsonb, :flip, :since, :i)"),
            {"s": flapping_status, "flip": last_flip_at, "since": flapping_since, "i": LOW})


def test_a_flapping_alert_whose_incident_a_new_root_took_over_leaves_that_incident_alone(database_url, clean_db, at):
    """fp-x flaps; its incident LOW has since been taken over by root fp-y
    and resolved by remediation. Batch 1 fires fp-y (remediation's fix did
    not hold: an after-fix reopen of LOW) and fp-w (HIGH's member): it
    locks HIGH, then LOW. Batch 2 resolves fp-x and fires fp-z (HIGH's
    root). Its flapping row named LOW, so batch 2 locked LOW before HIGH,
    while batch 1 held HIGH and waited for LOW: a deadlock (40P01). A
    flapping row's incident is now used only while it has the row's
    fingerprint: batch 2 leaves LOW alone (fp-x no longer reopens an
    incident whose root is fp-y) and waits for HIGH holding nothing."""
    config = settings(database_url, FLAP_THRESHOLD="3")
    taken_over_and_fixed(clean_db, "firing", T0, T0)
    reached, go = threading.Event(), threading.Event()

    def before_the_after_fix_reopen(conn, cursor, statement, *args):
        if threading.current_thread().name == "b1" and statement.lstrip().startswith("UPDATE incidents") \
                and "resolved_by = 'remediation'" in statement and not reached.is_set():
            reached.set()
            go.wait(HOLD_LIMIT)

    sa.event.listen(clean_db, "before_cursor_execute", before_the_after_fix_reopen)
    batches = Batches(clean_db, config)
    outcomes = {}
    try:
        batches.run("b1", lambda conn: svc.record_alerts(
            conn, [alert("Y", fingerprint="fp-y"), alert("W", fingerprint="fp-w")], "/t", "alertmanager", 600, config=config))
        wait_until(reached.is_set, 20, message="batch 1 holding HIGH, before its after-fix reopen of LOW")
        batches.run("b2", lambda conn: outcomes.update({o.fingerprint: o for o in svc.record_alerts(
            conn, [alert("X", fingerprint="fp-x", status="resolved"), alert("Z", fingerprint="fp-z")], "/t",
            "alertmanager", 600, config=config).outcomes}))
        wait_until(lambda: batches.waiting("b2"), 20, message="batch 2 waiting for HIGH")
    finally:
        go.set()
        batches.join()
        sa.event.remove(clean_db, "before_cursor_execute", before_the_after_fix_reopen)
    assert batches.errors == {}
    assert (outcomes["fp-z"].action, outcomes["fp-z"].incident_id) == ("refreshed", HIGH)
    # fp-x's resolution is its membership's in LOW (reopened by batch 1), not withheld by flapping.
    assert (outcomes["fp-x"].action, outcomes["fp-x"].incident_id) == ("resolved", LOW)
    with clean_db.connect() as conn:
        low = conn.execute(sa.text("SELECT status, generation FROM incidents WHERE id = :i"), {"i": LOW}).one()
        kinds = conn.execute(sa.text("SELECT kind FROM incident_timeline WHERE incident_id = :i AND actor = 'flapping'"),
                             {"i": LOW}).scalars().all()
    assert tuple(low) == ("open", 1), "batch 1's after-fix reopen, a new generation"
    assert kinds == []


def test_the_sweep_does_not_repage_an_incident_a_new_root_took_over_from_a_flapping_alert(database_url, clean_db, at):
    """fp-x fell quiet, firing, after an episode during which LOW (its
    incident then) was reopened silently; a take-over since made LOW fp-y's
    and remediation resolved it, so fp-x is now one of its members. The
    sweep lowers fp-x's flag: LOW is no longer fp-x's, so nothing is noted
    on it and it is not paged again (nor locked, out of fp-y's lock order)."""
    from shared import flapping

    config = settings(database_url)
    quiet_since = T0 - timedelta(seconds=config.flap_quiet_seconds + 60)
    taken_over_and_fixed(clean_db, "firing", quiet_since, quiet_since)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET status = 'open', resolved_at = NULL, resolved_by = NULL WHERE id = :i"),
                     {"i": LOW})
        conn.execute(sa.text("INSERT INTO incident_timeline (incident_id, kind, details, actor, at) "
                             "VALUES (:i, 'flap', '{\"reopened\": true}'::jsonb, 'flapping', :t)"), {"i": LOW, "t": quiet_since})
    with clean_db.begin() as conn:
        resolutions, repaged = flapping.clear_quiet(conn, clock.now(), config.flap_quiet_seconds)
    assert (resolutions, repaged) == ([], [])
    with clean_db.connect() as conn:
        generation = conn.execute(sa.text("SELECT generation FROM incidents WHERE id = :i"), {"i": LOW}).scalar()
        cleared = conn.execute(sa.text("SELECT count(*) FROM incident_timeline WHERE kind = 'flapping_cleared'")).scalar()
    assert (generation, cleared) == (0, 0)
    assert flap_row(clean_db, "fp-x")["flapping_since"] is None


HOLD_STATEMENT = ") AS held"


def test_a_flapping_alert_s_batch_locks_no_incident_of_an_alert_a_window_holds(database_url, clean_db, at, kube):
    """A batch carries a node's alert, which a maintenance window holds, and
    a flapping alert that fires again. The flapping alert's incident must be
    locked before its ``flap`` entry; the node's alert records nothing, so
    neither its correlation key nor the incidents of the six pods it would
    merge are locked: one incident of eight, not seven."""
    from tests.test_correlation_merge_many import correlator, pods_then_node
    from tests.test_correlation_merge_many import record as record_items

    config = settings(database_url, FLAP_THRESHOLD="3")
    corr = correlator(kube)
    items, node = pods_then_node(kube, "overlock", 6)
    for item in items:
        record_items(clean_db, corr, [item])
    flappy = alert("Flappy", fingerprint="fp-flap")
    flapping_id = flap_until_flagged(clean_db, config, flappy)
    with clean_db.begin() as conn:
        maintenance.create(conn, ['alertname="KubeNodeNotReady"'], T0, T0 + timedelta(hours=1), "drain", "api:alice")
    locked = []

    def count_held(conn, cursor, statement, *args):
        if HOLD_STATEMENT in statement:
            with clean_db.connect() as other:
                free = other.execute(sa.text("SELECT id FROM incidents FOR UPDATE SKIP LOCKED")).scalars().all()
                everyone = other.execute(sa.text("SELECT id FROM incidents")).scalars().all()
                other.rollback()
            locked.append(set(everyone) - set(free))

    alerts = [node.alert(), flappy]
    sa.event.listen(clean_db, "after_cursor_execute", count_held)
    try:
        with clean_db.begin() as conn:
            outcomes = svc.record_alerts(conn, alerts, "/t", "alertmanager", 0, config=config, plan=corr.plan(alerts)).outcomes
    finally:
        sa.event.remove(clean_db, "after_cursor_execute", count_held)
    assert [(o.action, o.incident_id) for o in outcomes] == [("suppressed", None), ("refreshed", flapping_id)]
    assert locked == [{flapping_id}]


def test_a_flapping_alert_firing_again_without_a_flip_takes_no_extra_locks(database_url, clean_db, at):
    """A flapping alert fires again, as it did last (no flip): its incident
    is active, so nothing is written on it and nothing is locked ahead of
    the upsert. The batch sends one statement more than a plain repeat (the
    read of its incident), not the lock step of the advisory keys and
    incidents that a flip's ``flap`` entry needs first."""
    config = settings(database_url, FLAP_THRESHOLD="3")
    plain, flappy = alert("Plain", fingerprint="fp-plain"), alert("Flappy", fingerprint="fp-flap")
    record(clean_db, config, plain)
    incident_id = flap_until_flagged(clean_db, config, flappy)
    record(clean_db, config, flappy)  # the flip back to firing
    noted = flaps_noted(clean_db, incident_id)

    def sent_by(*alerts):
        sent = []

        def seen(conn, cursor, statement, *args):
            if "CALL flaps_save(" not in statement:  # no round trip: it travels with the next statement (db.later)
                sent.append(statement)

        sa.event.listen(clean_db, "before_cursor_execute", seen)
        try:
            outcomes = record(clean_db, config, *alerts).outcomes
        finally:
            sa.event.remove(clean_db, "before_cursor_execute", seen)
        return sent, outcomes

    plain_sent, _ = sent_by(plain)
    flappy_sent, outcomes = sent_by(flappy)
    assert [(o.action, o.incident_id) for o in outcomes] == [("refreshed", incident_id)]
    assert not [s for s in flappy_sent if HOLD_STATEMENT in s]
    assert len(flappy_sent) == len(plain_sent) + 1, "\n".join(s[:90] for s in flappy_sent)
    assert flaps_noted(clean_db, incident_id) == noted
