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


def submit_many_in_thread(batcher, names, done: dict):
    """One request carrying one alert per name; the answer is kept under the first name."""
    def run():
        done[names[0]] = batcher.submit([alert(n) for n in names])
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_one_writer_stays_one_batch_in_flight_after_the_queue_has_run_dry():
    # The first request finds the queue empty when it is done and gives the
    # lead back; the next two must again go one transaction at a time.
    writer = GatedWriter()
    batcher = GroupCommit(writer, writers=1)
    done: dict = {}
    first = submit_in_thread(batcher, "A", done)
    writer.wait_for_calls(1)
    writer.gates[0].set()
    first.join(DEADLINE)
    assert done == {"A": "A"}
    second = submit_in_thread(batcher, "B", done)
    writer.wait_for_calls(2)
    third = submit_in_thread(batcher, "C", done)
    wait_until(lambda: batcher.waiting == 1 or len(writer.calls) == 3, DEADLINE, interval=0.005,
               message="C to queue or to start a transaction")
    assert len(writer.calls) == 2, "a second transaction started beside B's with one writer"
    writer.gates[1].set()
    writer.wait_for_calls(3)
    writer.gates[2].set()
    for t in (second, third):
        t.join(DEADLINE)
    assert done == {"A": "A", "B": "B", "C": "C"}


def test_a_request_that_does_not_fit_ends_the_batch_and_the_ones_behind_it_wait_their_turn():
    writer = GatedWriter()
    batcher = GroupCommit(writer, max_alerts=3)
    done: dict = {}
    threads = [submit_many_in_thread(batcher, ["A"], done)]
    writer.wait_for_calls(1)
    for queued, names in enumerate((["X"], ["Y1", "Y2", "Y3"], ["Z"]), start=1):
        threads.append(submit_many_in_thread(batcher, names, done))
        wait_until(lambda n=queued: batcher.waiting == n, DEADLINE, interval=0.005, message=f"{names} to queue")
    writer.gates[0].set()
    writer.wait_for_calls(2)
    # Y (3 alerts) does not fit beside X under a limit of 3: X goes alone,
    # and Z, which would fit, is not taken past Y.
    assert writer.calls[1] == ["X"]
    for i in (1, 2, 3):
        writer.wait_for_calls(i + 1)
        writer.gates[i].set()
    for t in threads:
        t.join(DEADLINE)
    assert writer.calls == [["A"], ["X"], ["Y1", "Y2", "Y3"], ["Z"]]
    assert sorted(done) == ["A", "X", "Y1", "Z"]


def test_an_event_no_outcome_names_is_published_by_the_first_request_of_the_batch():
    # An incident merged into a late root has an event but no outcome of
    # its own: exactly one request of the batch, the first, publishes it.
    class WithAMergedRoot(GatedWriter):
        def __call__(self, alerts):
            result = super().__call__(alerts)
            return RecordResult(result.outcomes, [f"{a.alert_name}.opened" for a in alerts] + ["Root.merged"])

    writer = WithAMergedRoot()
    batcher = GroupCommit(writer, writers=1)
    done: dict = {}
    threads = [submit_many_in_thread(batcher, ["A"], done)]
    writer.wait_for_calls(1)
    for queued, name in enumerate(("B", "C"), start=1):
        threads.append(submit_many_in_thread(batcher, [name], done))
        wait_until(lambda n=queued: batcher.waiting == n, DEADLINE, interval=0.005, message=f"{name} to queue")
    writer.gates[0].set()
    writer.wait_for_calls(2)
    writer.gates[1].set()
    for t in threads:
        t.join(DEADLINE)
    assert writer.calls[1] == ["B", "C"]
    assert done["B"].event_ids == ["B.opened", "Root.merged"]
    assert done["C"].event_ids == ["C.opened"]


def test_writers_below_one_still_write():
    def write(alerts):
        return RecordResult([Outcome(a.fingerprint, "created", a.alert_name) for a in alerts], [])

    batcher = GroupCommit(write, writers=0)
    assert batcher.writers == 1
    done: dict = {}
    submit_in_thread(batcher, "A", done).join(DEADLINE)
    assert done == {"A": "A"}, "with no writer allowed the request was never written"
