"""Group commit, observed from outside: the first transaction is held until
the other requests have queued behind it, so the next transaction certainly
carries several requests; each must get exactly its own slice of the result,
and an exception in any request thread fails the test.

Supersedes ``test_concurrent_submissions_share_transactions_and_get_their_own_outcomes``
and ``test_a_failing_webhook_fails_only_itself`` in tests/test_group_commit.py
(equal-sized requests and a count; swallowed thread exceptions; ``_flushing``)."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from functions.intake.batching import GroupCommit
from shared import incidents as svc
from loopback.processes import wait_until
from tests.factories import alert

DEADLINE = 5.0  # generous for a held write released at once; a broken batcher hangs


class HeldWriter:
    """Records every transaction's alert names; holds the first one until
    released, the way a slow commit keeps the next requests queued."""

    def __init__(self, engine, poison: str | None = None):
        self.engine = engine
        self.poison = poison
        self.calls: list[list[str]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, alerts):
        self.calls.append([a.alert_name for a in alerts])
        if len(self.calls) == 1:
            self.first_started.set()
            assert self.release.wait(DEADLINE), "the first transaction was never released"
        if self.poison and any(a.alert_name == self.poison for a in alerts):
            raise ValueError("cannot store this one")
        with self.engine.begin() as conn:
            return svc.record_alerts(conn, alerts, "/t", "alertmanager")


def run_threads(targets: dict) -> tuple[dict, dict]:
    """Run each named callable in its own thread; results and exceptions."""
    results, errors = {}, {}

    def wrap(name, fn):
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - returned to the test, never swallowed
            errors[name] = exc

    # Daemons: a broken batcher leaves them blocked, and the run must still end.
    threads = {name: threading.Thread(target=wrap, args=(name, fn), daemon=True) for name, fn in targets.items()}
    for t in threads.values():
        t.start()
    return threads, (results, errors)


def queued_behind(batcher: GroupCommit, n: int) -> None:
    """Until all n requests wait behind the held write: then the next
    transaction can carry them together."""
    wait_until(lambda: batcher.waiting == n, DEADLINE, interval=0.005, message=f"{n} requests to queue behind the held write")


def batched(writer: HeldWriter, names: set[str]) -> bool:
    """Whether one transaction after the first carried all these requests."""
    return any(names <= set(call) for call in writer.calls[1:])


def submit_behind_a_held_write(engine, requests: dict[str, list], poison=None):
    """The lead request's write is held until every other request waits
    behind it, so the next transaction carries them all: the case under
    test happens for certain, not by luck."""
    writer = HeldWriter(engine, poison)
    batcher = GroupCommit(writer)
    lead, (lead_results, lead_errors) = run_threads({"lead": lambda: batcher.submit([alert("Lead", instance=str(time.monotonic()))])})
    assert writer.first_started.wait(DEADLINE)
    threads, (results, errors) = run_threads({name: (lambda a=alerts: batcher.submit(a)) for name, alerts in requests.items()})
    queued_behind(batcher, len(requests))
    writer.release.set()
    for t in [*lead.values(), *threads.values()]:
        t.join(DEADLINE)
        assert not t.is_alive(), "a request never got its answer"
    assert not lead_errors, lead_errors
    names = {a.alert_name for alerts in requests.values() for a in alerts}
    assert batched(writer, names), f"the queued requests did not share a transaction: {writer.calls}"
    return writer, results, errors


def alert_names_of(engine, incident_ids) -> list[str]:
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, alert_name FROM incidents WHERE id = ANY(:ids)"), {"ids": list(incident_ids)}).all())
    return [rows[i] for i in incident_ids]


def test_every_batched_request_gets_its_own_slice(clean_db):
    # Different sizes, so a slice taken at the wrong offset or of the wrong
    # length cannot look right by accident.
    requests = {f"r{i}": [alert(f"Slice{i}", instance=str(j)) for j in range(i + 1)] for i in range(5)}
    writer, results, errors = submit_behind_a_held_write(clean_db, requests)
    assert not errors, errors
    assert set(results) == set(requests)
    for name, sent in requests.items():
        result = results[name]
        ids = [o.incident_id for o in result.outcomes]
        assert [o.action for o in result.outcomes] == ["created"] * len(sent), name
        assert alert_names_of(clean_db, ids) == [a.alert_name for a in sent], name
        # Each event id is published once, by the request whose alerts made it.
        assert sorted(e.split(".", 1)[0] for e in result.event_ids) == sorted(ids), name
    all_events = [e for r in results.values() for e in r.event_ids]
    assert len(all_events) == len(set(all_events)) == sum(len(a) for a in requests.values())


def test_a_failing_request_in_a_batch_fails_only_itself(clean_db):
    requests = {n: [alert(n)] for n in ("Good1", "Poison", "Good2")}
    writer, results, errors = submit_behind_a_held_write(clean_db, requests, poison="Poison")
    assert set(results) == {"Good1", "Good2"} and [o.action for o in results["Good1"].outcomes] == ["created"]
    assert [o.action for o in results["Good2"].outcomes] == ["created"]
    assert set(errors) == {"Poison"} and str(errors["Poison"]) == "cannot store this one"
    # Retried one by one after the shared transaction failed.
    assert ["Poison"] in writer.calls and ["Good1"] in writer.calls and ["Good2"] in writer.calls
    assert alert_names_of(clean_db, [results["Good1"].outcomes[0].incident_id]) == ["Good1"]


def test_a_failing_request_in_a_batch_of_two_fails_only_itself(clean_db):
    requests = {n: [alert(n)] for n in ("Good", "Poison")}
    writer, results, errors = submit_behind_a_held_write(clean_db, requests, poison="Poison")
    assert set(results) == {"Good"} and set(errors) == {"Poison"}
    assert ["Good"] in writer.calls and ["Poison"] in writer.calls


def test_a_transient_error_fails_the_whole_batch_without_retrying_each(clean_db):
    from sqlalchemy.exc import OperationalError

    class Transient(HeldWriter):
        def __call__(self, alerts):
            if len(self.calls) >= 1:
                self.calls.append([a.alert_name for a in alerts])
                raise OperationalError("INSERT", {}, ConnectionRefusedError("database went away"))
            return super().__call__(alerts)

    writer = Transient(clean_db)
    batcher = GroupCommit(writer)
    lead, (_, lead_errors) = run_threads({"lead": lambda: batcher.submit([alert("Lead")])})
    assert writer.first_started.wait(DEADLINE)
    threads, (results, errors) = run_threads({n: (lambda n=n: batcher.submit([alert(n)])) for n in ("T1", "T2")})
    queued_behind(batcher, 2)
    writer.release.set()
    for t in [*lead.values(), *threads.values()]:
        t.join(DEADLINE)
    assert not lead_errors and not results
    assert set(errors) == {"T1", "T2"} and all(isinstance(e, OperationalError) for e in errors.values())
    # Whatever the batching, no request was written twice for one failure.
    assert sum(call.count("T1") for call in writer.calls) == 1


def test_a_batch_stops_at_max_alerts_and_a_big_request_goes_alone(clean_db):
    def batched_sizes(max_alerts, sizes):
        writer = HeldWriter(clean_db)
        batcher = GroupCommit(writer, max_alerts=max_alerts)
        lead, (_, lead_errors) = run_threads({"lead": lambda: batcher.submit([alert("Lead", instance=str(time.monotonic()))])})
        assert writer.first_started.wait(DEADLINE)
        requests = {f"m{max_alerts}-{i}": [alert(f"Max{max_alerts}x{i}", instance=str(j)) for j in range(n)] for i, n in enumerate(sizes)}
        threads, (results, errors) = run_threads({name: (lambda a=a: batcher.submit(a)) for name, a in requests.items()})
        queued_behind(batcher, len(requests))
        writer.release.set()
        for t in [*lead.values(), *threads.values()]:
            t.join(DEADLINE)
        assert not errors and not lead_errors and set(results) == set(requests)
        return [len(call) for call in writer.calls[1:]]

    # Queued in an unknown order, so compare the multiset of batch sizes.
    exact = batched_sizes(4, [2, 2])  # 2 + 2 = 4: one batch, the limit is inclusive
    over = batched_sizes(3, [2, 2])  # 2 + 2 > 3: two batches
    big = batched_sizes(4, [5])  # more than the limit alone: still written, alone
    sums = batched_sizes(3, [1, 3])  # the sizes add up: 1 + 3 > 3
    assert exact == [4] and sorted(over) == [2, 2] and big == [5] and sorted(sums) == [1, 3]


def test_the_batcher_serves_one_request_after_another(clean_db):
    writer = HeldWriter(clean_db)
    writer.release.set()
    batcher = GroupCommit(writer)
    results, errors = {}, []

    def sequence():
        try:
            for i in range(3):
                results[i] = batcher.submit([alert(f"Seq{i}")]).outcomes[0].action
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=sequence, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "a later request waited for ever: the batcher never let go of the lead"
    assert not errors and results == {0: "created", 1: "created", 2: "created"}


def test_an_event_no_outcome_names_is_still_published_once():
    """A merged incident's resolution names no alert of the batch (its
    members moved to the late root): the first request publishes it."""
    from shared.incidents import Outcome, RecordResult

    def write(alerts):
        outcomes = [Outcome(a.fingerprint, "created", f"inc-{a.alert_name}") for a in alerts]
        return RecordResult(outcomes, [f"inc-{a.alert_name}.opened.0" for a in alerts] + ["merged-1.resolved.0"])

    batcher = GroupCommit(write)
    result = batcher.submit([alert("A"), alert("B")])
    assert sorted(result.event_ids) == ["inc-A.opened.0", "inc-B.opened.0", "merged-1.resolved.0"]
