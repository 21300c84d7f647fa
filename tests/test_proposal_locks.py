"""A decision on a proposal, a new proposal and a person's reopen of the
same incident, at once, against the real PostgreSQL: each locks the
incident row before the proposals, so one waits for the other and neither
is chosen as a deadlock's victim (40P01, a 503 to the person).

The interleavings are made certain, not likely: one side is held right
after its first row lock, the other is let go until it waits for a lock
(pg_blocking_pids of its own backend) or has finished. Nothing sleeps."""

from __future__ import annotations

import threading

import sqlalchemy as sa

from loopback.processes import wait_until
from shared import incidents as svc
from shared import proposals
from tests.factories import alert
from tests.holding import HOLD_LIMIT

ACTIONS = [{"action": "restart_deployment", "target": "production/email-service", "params": {}}]


def resolved_incident_with_a_proposal(engine) -> tuple[str, dict]:
    """A resolved incident whose proposal is still pending, as the previous
    release (which superseded nothing at a resolve) left them."""
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("Locks")], "/t", "alertmanager").outcomes[0].incident_id
        proposal = proposals.create(conn, svc.get_incident(conn, incident_id), "restart", ACTIONS, [], 600)
        svc.transition(conn, incident_id, "resolved", "api:bob", "/t")
        conn.execute(sa.text("UPDATE remediation_proposals SET status = 'pending', reason = NULL, finished_at = NULL WHERE id = :id"),
                     {"id": proposal["id"]})
    return incident_id, proposal


def reopen(incident_id):
    return lambda conn: svc.transition(conn, incident_id, "investigating", "api:alice", "/t")


def approve(incident_id, proposal_id):
    return lambda conn: proposals.decide(conn, incident_id, proposal_id, True, "api:carol", (), None, "/t")


class Sides:
    """Units of work, each in a transaction of its own in a thread named
    after it; ``held`` is stopped right after its first row lock until the
    other side waits for a lock or has finished. Results and errors by name."""

    def __init__(self, engine, held: str):
        self.engine, self.held = engine, held
        self.locked, self.release = threading.Event(), threading.Event()
        self.results: dict[str, object] = {}
        self.errors: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.threads: dict[str, threading.Thread] = {}

    def __enter__(self):
        sa.event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc):
        self.release.set()
        for thread in self.threads.values():
            thread.join(HOLD_LIMIT)
        sa.event.remove(self.engine, "after_cursor_execute", self._after)
        assert not any(t.is_alive() for t in self.threads.values()), "a side never finished"

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        text = statement.upper()
        first_lock = " FOR UPDATE" in text or " FOR NO KEY UPDATE" in text or text.lstrip().startswith("UPDATE ")
        if threading.current_thread().name == self.held and first_lock and not self.locked.is_set():
            self.locked.set()
            self.release.wait(HOLD_LIMIT)

    def start(self, name, work) -> None:
        def run():
            try:
                with self.engine.begin() as conn:
                    self.pids[name] = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
                    self.results[name] = work(conn)
            except Exception as exc:  # noqa: BLE001 - a deadlock, asserted on below
                self.errors[name] = str(exc).splitlines()[0]

        self.threads[name] = threading.Thread(target=run, name=name)
        self.threads[name].start()

    def waits_or_finished(self, name) -> bool:
        if not self.threads[name].is_alive():
            return True
        pid = self.pids.get(name)
        if pid is None:
            return False
        with self.engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT cardinality(pg_blocking_pids(:p)) > 0"), {"p": pid}).scalar())

    def run(self, held_work, other: str, other_work) -> None:
        """The held side takes its first lock; the other runs until it waits
        (or is done); then the held side goes on."""
        self.start(self.held, held_work)
        assert self.locked.wait(HOLD_LIMIT), f"{self.held} took no lock"
        self.start(other, other_work)
        wait_until(lambda: self.waits_or_finished(other), timeout=HOLD_LIMIT)
        self.release.set()


def state(engine, incident_id, proposal_id) -> tuple[tuple, tuple]:
    with engine.connect() as conn:
        proposal = conn.execute(sa.text("SELECT status, generation FROM remediation_proposals WHERE id = :p"), {"p": proposal_id}).one()
        incident = conn.execute(sa.text("SELECT status, generation FROM incidents WHERE id = :i"), {"i": incident_id}).one()
    return tuple(proposal), tuple(incident)


def test_an_approval_that_locked_first_is_judged_at_its_generation_and_the_reopen_waits_for_it(clean_db):
    """The approval holds its first lock when a person reopens. The reopen
    waits for the approval, then goes through; the approval was judged on
    the incident as it stood under its lock, resolved at generation 0: it
    is refused (the incident resolved before anyone approved), nothing is
    approved, and the reopen then supersedes the proposal. Had the approval locked the proposal first, the
    reopen would lock the incident and wait for the proposal while the
    approval's timeline entry waited for the incident."""
    incident_id, proposal = resolved_incident_with_a_proposal(clean_db)
    with Sides(clean_db, held="approval") as sides:
        sides.run(approve(incident_id, proposal["id"]), "reopen", reopen(incident_id))
    assert sides.errors == {}
    decision = sides.results["approval"]
    assert decision.refusal == "conflict" and "the incident resolved before anyone approved" in decision.message, decision
    assert state(clean_db, incident_id, proposal["id"]) == (("superseded", 0), ("investigating", 1))


def test_an_approval_that_comes_while_a_reopen_holds_the_incident_is_refused_as_superseded(clean_db):
    """The reopen holds the incident when the approval arrives: the approval
    waits for it, reads generation 1 and is refused (409, superseded). Had
    it locked the proposal and read the generation without a lock, it would
    have approved generation 0 and waited for the incident while the reopen
    waited for the proposal."""
    incident_id, proposal = resolved_incident_with_a_proposal(clean_db)
    with Sides(clean_db, held="reopen") as sides:
        sides.run(reopen(incident_id), "approval", approve(incident_id, proposal["id"]))
    assert sides.errors == {}
    decision = sides.results["approval"]
    assert decision.refusal == "conflict" and "superseded" in decision.message, decision
    assert state(clean_db, incident_id, proposal["id"]) == (("superseded", 0), ("investigating", 1))


def test_a_new_proposal_and_a_reopen_at_once_do_not_deadlock(clean_db):
    """Remediation records a proposal of generation 0 (superseding the
    earlier one) while a person reopens: the reopen waits, then supersedes
    the new proposal too."""
    incident_id, earlier = resolved_incident_with_a_proposal(clean_db)
    with clean_db.connect() as conn:
        incident = svc.get_incident(conn, incident_id)
    with Sides(clean_db, held="proposal") as sides:
        sides.run(lambda conn: proposals.create(conn, incident, "restart", ACTIONS, [], 600), "reopen", reopen(incident_id))
    assert sides.errors == {}
    newer = sides.results["proposal"]
    assert state(clean_db, incident_id, newer["id"]) == (("superseded", 0), ("investigating", 1))
    assert state(clean_db, incident_id, earlier["id"])[0] == ("superseded", 0)


def reasons(engine, incident_id) -> dict[str, tuple]:
    with engine.connect() as conn:
        return {r.id: (r.status, r.reason) for r in conn.execute(sa.text(
            "SELECT id, status, reason FROM remediation_proposals WHERE incident_id = :i"), {"i": incident_id})}


def test_a_new_proposal_supersedes_an_earlier_one_with_a_reason(clean_db):
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("Locks")], "/t", "alertmanager").outcomes[0].incident_id
        incident = svc.get_incident(conn, incident_id)
        first = proposals.create(conn, incident, "restart", ACTIONS, [], 600)
        second = proposals.create(conn, incident, "restart", ACTIONS, [], 600)
    assert reasons(clean_db, incident_id) == {
        first["id"]: ("superseded", f"replaced by the newer proposal {second['id']}"), second["id"]: ("pending", None)}


def test_a_proposal_planned_for_a_generation_left_since_does_not_supersede_the_current_ones(clean_db):
    """Remediation read the incident at generation 0 and planned slowly;
    meanwhile it was reopened and generation 1 got its own proposal. The
    late one is stored superseded and leaves generation 1's pending."""
    incident_id, _ = resolved_incident_with_a_proposal(clean_db)
    with clean_db.connect() as conn:
        generation_0 = svc.get_incident(conn, incident_id)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "investigating", "api:alice", "/t")
        current = proposals.create(conn, svc.get_incident(conn, incident_id), "restart", ACTIONS, [], 600)
    with clean_db.begin() as conn:
        late = proposals.create(conn, generation_0, "restart", ACTIONS, [], 600)
    found = reasons(clean_db, incident_id)
    assert found[current["id"]] == ("pending", None)
    assert late["status"] == "superseded" and found[late["id"]] == (
        "superseded", "the incident was reopened (generation 1) since it was proposed for generation 0")
