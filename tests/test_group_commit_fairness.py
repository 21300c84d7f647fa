"""Group commit under steady load: the thread that writes a batch answers
its own client as soon as that batch is committed (it hands the lead to a
waiting request instead of writing everyone's batches), and with
``writers`` > 1 that many batches are in flight at once. A writer without a
database, so the interleaving is the only thing under test."""

from __future__ import annotations

import random
import threading
import time

from functions.intake.batching import GroupCommit
from shared.incidents import Outcome, RecordResult
from loopback.processes import wait_until
from tests.factories import alert

DEADLINE = 5.0


class GatedWriter:
    """Every call waits at its own gate until the test opens it."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.gates: list[threading.Event] = []
        self.started = threading.Condition()

    def __call__(self, alerts):
        gate = threading.Event()
        with self.started:
            self.calls.append([a.alert_name for a in alerts])
            self.gates.append(gate)
            self.started.notify_all()
        assert gate.wait(DEADLINE), "a write was never released"
        return RecordResult([Outcome(a.fingerprint, "created", a.alert_name) for a in alerts], [])

    def wait_for_calls(self, n: int) -> None:
        with self.started:
            assert self.started.wait_for(lambda: len(self.calls) >= n, DEADLINE), f"{n} writes never started: {self.calls}"


def submit_in_thread(batcher, name, done: dict):
    def run():
        done[name] = batcher.submit([alert(name)]).outcomes[0].incident_id
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_idle(batcher, writer) -> None:
    """Nothing queued, and every lead given back: as many new requests as
    there are writers all start a transaction at once (a leaked lead would
    leave one of them waiting for ever)."""
    assert batcher.waiting == 0
    before = len(writer.calls) if isinstance(writer, GatedWriter) else 0
    done: dict = {}
    names = [f"Idle{i}" for i in range(batcher.writers)]
    threads = [submit_in_thread(batcher, n, done) for n in names]
    if isinstance(writer, GatedWriter):
        writer.wait_for_calls(before + len(names))
        for gate in writer.gates:
            gate.set()
    for t in threads:
        t.join(DEADLINE)
    assert done == {n: n for n in names}, "a lead was never given back"


def test_the_leader_answers_its_client_before_the_next_batch_is_written():
    writer = GatedWriter()
    batcher = GroupCommit(writer, writers=1)
    done: dict = {}
    lead = submit_in_thread(batcher, "Lead", done)
    writer.wait_for_calls(1)
    followers = [submit_in_thread(batcher, f"F{i}", done) for i in range(3)]
    wait_until(lambda: batcher.waiting == 3, DEADLINE, interval=0.005, message="the followers to queue behind the lead")
    writer.gates[0].set()
    # The followers' batch starts and is held; the lead request is answered
    # meanwhile (a leader that drained the queue would still be writing it).
    writer.wait_for_calls(2)
    lead.join(DEADLINE)
    assert not lead.is_alive() and done["Lead"] == "Lead"
    assert sorted(writer.calls[1]) == ["F0", "F1", "F2"]
    writer.gates[1].set()
    for t in followers:
        t.join(DEADLINE)
    assert {k: v for k, v in done.items()} == {n: n for n in ("Lead", "F0", "F1", "F2")}


def test_two_writers_have_two_batches_in_flight_and_never_more():
    writer = GatedWriter()
    batcher = GroupCommit(writer, writers=2)
    done: dict = {}
    first = submit_in_thread(batcher, "A", done)
    writer.wait_for_calls(1)
    second = submit_in_thread(batcher, "B", done)
    writer.wait_for_calls(2)  # B did not wait for A's commit
    third = submit_in_thread(batcher, "C", done)
    # C has queued (and was not made a leader: a leader is not waiting).
    wait_until(lambda: batcher.waiting == 1, DEADLINE, interval=0.005, message="C to queue behind the two in flight")
    assert len(writer.calls) == 2, "a third transaction started while two were in flight"
    writer.gates[0].set()
    writer.wait_for_calls(3)  # A's finish hands the lead to C
    assert writer.calls[2] == ["C"]
    writer.gates[1].set(), writer.gates[2].set()
    for t in (first, second, third):
        t.join(DEADLINE)
    assert done == {"A": "A", "B": "B", "C": "C"}
    assert_idle(batcher, writer)


def test_many_requests_each_get_their_own_answer_and_the_lead_is_never_lost():
    class Jittery:
        def __call__(self, alerts):
            time.sleep(random.random() / 500)
            return RecordResult([Outcome(a.fingerprint, "created", a.alert_name) for a in alerts], [])

    for writers in (1, 2, 3):
        batcher = GroupCommit(Jittery(), writers=writers)
        done: dict = {}
        errors: list = []

        def client(n, batcher=batcher, done=done, errors=errors, writers=writers):
            try:
                for i in range(40):
                    name = f"w{writers}c{n}r{i}"
                    assert batcher.submit([alert(name)]).outcomes[0].incident_id == name
                    done[name] = True
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and not any(t.is_alive() for t in threads), f"writers={writers}: a request hung or failed: {errors[:1]}"
        assert len(done) == 8 * 40
        assert_idle(batcher, batcher.write)
