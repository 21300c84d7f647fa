"""Claims in-process against the real PostgreSQL: taken once, completed,
released, stale, and what a handler does for each state of its step. (The
same under certain overlap through real functions: tests/test_claims_overlap.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

from shared import claims
from shared import incidents as svc
from shared.errors import BadRequest, Conflict
from tests.factories import alert


def incident(engine, name="ClaimUnit", status=None) -> str:
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name)], "/t", "t").outcomes[0].incident_id
        if status:
            svc.transition(conn, incident_id, status, "t", "/t")
    return incident_id


def take(engine, key, incident_id=None, stale=60.0):
    with engine.begin() as conn:
        return claims.claim(conn, key, incident_id, stale)


def age(engine, key, seconds):
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE work_claims SET claimed_at = claimed_at - make_interval(secs => :s) WHERE key = :k"), {"s": seconds, "k": key})


def test_a_claim_is_taken_once_then_held(clean_db):
    assert take(clean_db, "k") == claims.Claim("k", acquired=True, completed=False)
    assert take(clean_db, "k") == claims.Claim("k", acquired=False, completed=False)


def test_a_stale_claim_is_taken_again_and_counted(clean_db):
    take(clean_db, "k", stale=60)
    age(clean_db, "k", 59)
    assert not take(clean_db, "k", stale=60).acquired
    age(clean_db, "k", 2)
    assert take(clean_db, "k", stale=60).acquired
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT attempts FROM work_claims WHERE key = 'k'")).scalar() == 2


def test_a_completed_claim_is_never_taken_again_even_when_old(clean_db):
    take(clean_db, "k")
    with clean_db.begin() as conn:
        assert not claims.is_completed(conn, "k")
        claims.complete(conn, "k")
        assert claims.is_completed(conn, "k")
    age(clean_db, "k", 3600)
    assert take(clean_db, "k", stale=1) == claims.Claim("k", acquired=False, completed=True)


def test_release_gives_back_unfinished_work_only(clean_db):
    take(clean_db, "open")
    take(clean_db, "done")
    with clean_db.begin() as conn:
        claims.complete(conn, "done")
        claims.release(conn, "open")
        claims.release(conn, "done")
        assert not claims.is_completed(conn, "missing")
    assert take(clean_db, "open").acquired
    assert take(clean_db, "done").completed


def test_any_completed_matches_the_prefix_literally(clean_db):
    first, other = incident(clean_db), incident(clean_db, "Other")
    take(clean_db, "notify:pagerduty:trigger:x:0:opened", first)
    take(clean_db, "notify_pagerduty_trigger_y", first)
    with clean_db.begin() as conn:
        assert not claims.any_completed(conn, first, "notify:pagerduty:trigger:")
        claims.complete(conn, "notify_pagerduty_trigger_y")
        # "_" is not a wildcard: the underscored key is not a trigger.
        assert not claims.any_completed(conn, first, "notify:pagerduty:trigger:")
        claims.complete(conn, "notify:pagerduty:trigger:x:0:opened")
        assert claims.any_completed(conn, first, "notify:pagerduty:trigger:")
        assert not claims.any_completed(conn, other, "notify:pagerduty:trigger:")
        assert not claims.any_completed(conn, first, "notify:slack:")


def step(engine, incident_id, stale=60.0):
    with engine.begin() as conn:
        return claims.begin_step(conn, "diagnostics", incident_id, stale)


def test_begin_step_runs_once_then_conflicts_then_replays(clean_db):
    incident_id = incident(clean_db)
    first = step(clean_db, incident_id)
    assert (first.state, first.key, first.incident["id"]) == ("run", f"diagnostics:{incident_id}:0", incident_id)
    with pytest.raises(Conflict, match="diagnostics of this incident is running elsewhere; retry later"):
        step(clean_db, incident_id)
    with clean_db.begin() as conn:
        claims.complete(conn, first.key)
    replay = step(clean_db, incident_id)
    assert (replay.state, replay.key) == ("replay", first.key)


def test_begin_step_skips_what_no_longer_fires_but_replays_what_ran(clean_db):
    assert step(clean_db, "00000000-0000-4000-8000-000000000000") == claims.Step("skip", None)
    resolved = incident(clean_db, "Gone", status="resolved")
    skipped = step(clean_db, resolved)
    assert skipped.state == "skip" and skipped.incident["status"] == "resolved"
    done = incident(clean_db, "DoneThenResolved")
    key = step(clean_db, done).key
    with clean_db.begin() as conn:
        claims.complete(conn, key)
        svc.transition(conn, done, "resolved", "t", "/t")
    assert step(clean_db, done).state == "replay"
    investigating = incident(clean_db, "Investigating", status="investigating")
    assert step(clean_db, investigating).state == "run"


def test_begin_step_leaves_a_generation_the_incident_has_left_and_refuses_one_it_never_had(clean_db):
    incident_id = incident(clean_db, "Reopened", status="resolved")
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "investigating", "t", "/t")  # a reopen: generation 1

    def of(generation, root_generation=0):
        with clean_db.begin() as conn:
            return claims.begin_step(conn, "diagnostics", incident_id, 60.0, generation, root_generation)

    stale = of(0, root_generation=5)  # the generation decides first: a stale one's root is not judged
    assert (stale.state, stale.key) == ("stale", None)
    assert stale.reason == "the event is of generation 0; the incident is at generation 1 (reopened since)"
    with pytest.raises(BadRequest, match="data.generation 2 is above the incident's generation 1"):
        of(2)
    with pytest.raises(BadRequest, match="data.root_generation 1 is above the incident's root generation 0"):
        of(1, root_generation=1)
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM work_claims WHERE incident_id = :i"), {"i": incident_id}).scalar() == 0
    current = of(1)
    assert (current.state, current.key) == ("run", f"diagnostics:{incident_id}:1")


def test_diagnosed_is_of_the_current_generation_whatever_the_root(clean_db):
    incident_id = incident(clean_db, "Diagnosed")
    with clean_db.connect() as conn:
        row = svc.get_incident(conn, incident_id)
    for key, expected in ((f"diagnostics:{incident_id}:1", False), (f"diagnostics:{incident_id}:10", False),
                          (f"diagnostics:{incident_id}:0.root2", True)):
        with clean_db.begin() as conn:
            assert claims.claim(conn, key, incident_id, 60.0).acquired
            claims.complete(conn, key)
            assert claims.diagnosed(conn, row) is expected, key
            conn.execute(sa.text("DELETE FROM work_claims WHERE key = :k"), {"k": key})
    with clean_db.begin() as conn:
        claims.claim(conn, f"diagnostics:{incident_id}:0", incident_id, 60.0)
        assert not claims.diagnosed(conn, row)  # taken, not finished
        claims.complete(conn, f"diagnostics:{incident_id}:0")
        assert claims.diagnosed(conn, row)


def test_diagnosed_looks_claims_up_by_primary_key_however_many_there_are(clean_db):
    """Remediation asks it in begin_step's transaction for every
    incident.diagnosed: with the statistics of a grown work_claims table,
    the plan is the primary key's (an equality and a range), never a scan."""
    incident_id = incident(clean_db, "ManyClaims")
    with clean_db.begin() as conn:
        conn.execute(sa.text("INSERT INTO work_claims (key, completed_at) SELECT 'diagnostics:' || md5(g::text) || ':' || (g % 3), "
                             "timezone('utc', now()) FROM generate_series(1, 20000) AS g"))
    with clean_db.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE work_claims")
    key = f"diagnostics:{incident_id}:0"
    with clean_db.connect() as conn:
        plan = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + claims._DIAGNOSED.text), {
            "k": key, "lo": key + ".root", "hi": key + ".roou", "p": key + ".root%"}))
        # The planner may use the key twice (a BitmapOr of two index
        # conditions) or once; what matters is that it never reads the whole
        # table, nor the whole key: each scan of the key has an Index Cond
        # (an Index Scan with only a Filter reads every entry).
        lines = plan.splitlines()
        scans = [i for i, line in enumerate(lines) if "work_claims_pkey" in line]
        assert "Seq Scan on work_claims" not in plan and scans, plan
        assert all(lines[i + 1:i + 2] and lines[i + 1].strip().startswith("Index Cond:") for i in scans), plan
        assert not claims.diagnosed(conn, svc.get_incident(conn, incident_id))


def test_begin_step_takes_over_a_stale_step(clean_db):
    incident_id = incident(clean_db)
    key = step(clean_db, incident_id, stale=30).key
    age(clean_db, key, 31)
    assert step(clean_db, incident_id, stale=30).state == "run"


def test_a_claim_and_a_step_cannot_be_changed_after_the_fact(clean_db):
    """What a caller was told stays what it was told: no code path may turn a
    held claim into an acquired one, or a replay into a run."""
    held = take(clean_db, "k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        held.acquired = False
    assert {held, claims.Claim("k", acquired=True, completed=False)} == {held}
    ran = step(clean_db, incident(clean_db))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ran.state = "replay"
