"""Reconciliation: each kind of step an incident can be stuck before is
found after the grace period, its event re-emitted with a distinct id, at
most K times with backoff, then reported stuck once."""

import json
from dataclasses import replace

import pytest
import sqlalchemy as sa

from shared import db, events, outbox, reconcile
from shared import incidents as svc
from tests.factories import alert


@pytest.fixture
def config(settings_obj):
    return replace(settings_obj, reconcile_grace_seconds=60, reconcile_backoff_seconds=0, reconcile_max_reemits=2,
                   event_source="/test")


def open_incident(engine, name, priority="P1", published_ago=600):
    """An incident whose opened event the Broker accepted ``published_ago`` seconds ago."""
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, priority=priority)], "/test", "test").outcomes[0].incident_id
        publish(conn, f"{incident_id}.opened.0", published_ago)
    return incident_id


def publish(conn, event_id, ago):
    conn.execute(sa.text(
        "UPDATE event_outbox SET published_at = timezone('utc', now()) - make_interval(secs => :ago) WHERE id = :id"
    ), {"id": event_id, "ago": ago})


def complete(engine, key, incident_id, ago=600, done=True):
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO work_claims (key, incident_id, claimed_at, completed_at) VALUES "
            "(:k, :i, timezone('utc', now()) - make_interval(secs => :ago), "
            "CASE WHEN :done THEN timezone('utc', now()) - make_interval(secs => :ago) END)"
        ), {"k": key, "i": incident_id, "ago": ago, "done": done})


def remediation_result(engine, incident_id, outcome, reason="dry-run: a human must act"):
    with engine.begin() as conn:
        svc.add_timeline(conn, incident_id, "remediation_result",
                         {"outcome": outcome, "reason": reason, "actions": [], "playbook": "p", "generation": 0}, "remediation")
    complete(engine, f"remediation:{incident_id}:0", incident_id)


def reemitted(engine):
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(sa.text(
            "SELECT id, type, subject, extensions, data FROM event_outbox WHERE id LIKE '%.r_' ORDER BY id"))}


def test_opened_but_never_diagnosed_is_reemitted_k_times_then_reported_stuck_once(clean_db, config, caplog):
    incident_id = open_incident(clean_db, "NeverDiagnosed")
    report = reconcile.run(clean_db, config)
    assert report.reemitted == [f"{incident_id}.opened.0.r1"]
    event = reemitted(clean_db)[f"{incident_id}.opened.0.r1"]
    assert event.type == events.INCIDENT_OPENED and event.subject == incident_id
    assert event.extensions == {"priority": "p1", "alertname": "NeverDiagnosed"}
    assert event.data["incident_id"] == incident_id and event.data["generation"] == 0

    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.opened.0.r2"]
    caplog.set_level("ERROR", logger="reconcile")
    last = reconcile.run(clean_db, config)
    assert last.reemitted == [] and last.stuck == [("diagnostics", incident_id, 0)]
    assert any(r.levelname == "ERROR" and "stuck" in r.getMessage() for r in caplog.records)
    assert reconcile.run(clean_db, config).stuck == []  # reported once
    assert len(reemitted(clean_db)) == 2
    with clean_db.connect() as conn:
        stuck = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "stuck"]
        assert [s["details"]["step"] for s in stuck] == ["diagnostics"]
        assert reconcile.assess(conn, config) == {("diagnostics", "stuck"): 1}


def test_backoff_waits_before_the_next_reemission(clean_db, config):
    incident_id = open_incident(clean_db, "BackingOff")
    slow = replace(config, reconcile_backoff_seconds=3600)
    assert reconcile.run(clean_db, slow).reemitted == [f"{incident_id}.opened.0.r1"]
    assert reconcile.run(clean_db, slow).reemitted == []
    with clean_db.connect() as conn:
        assert reconcile.assess(conn, slow) == {("diagnostics", "waiting"): 1}


def test_diagnosed_but_never_remediated_reemits_diagnosed(clean_db, config):
    incident_id = open_incident(clean_db, "NeverRemediated")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.diagnosed.0.r1"]
    assert reemitted(clean_db)[f"{incident_id}.diagnosed.0.r1"].type == events.INCIDENT_DIAGNOSED


@pytest.mark.parametrize("outcome,transition", [("failed", "remediation_failed"), ("remediated", "remediated")])
def test_remediation_outcome_never_escalated_reemits_that_outcome(clean_db, config, outcome, transition):
    incident_id = open_incident(clean_db, f"NeverEscalated{outcome}")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    remediation_result(clean_db, incident_id, outcome)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.{transition}.0.r1"]
    event = reemitted(clean_db)[f"{incident_id}.{transition}.0.r1"]
    assert event.type == reconcile.EVENT_TYPES[transition]
    assert event.data["remediation"] == {"outcome": outcome, "reason": "dry-run: a human must act", "playbook": "p"}
    complete(clean_db, f"escalated:{incident_id}:0:{transition}", incident_id)
    assert reconcile.run(clean_db, config).reemitted == []


def test_p0_whose_opened_escalation_never_completed_reemits_opened(clean_db, config):
    incident_id = open_incident(clean_db, "NeverPaged", priority="P0")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    remediation_result(clean_db, incident_id, "failed")
    complete(clean_db, f"escalated:{incident_id}:0:remediation_failed", incident_id)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.opened.0.r1"]
    with clean_db.connect() as conn:
        assert reconcile.assess(conn, config) == {("escalation:opened", "due"): 1}


def test_which_openings_are_watched_follows_page_on_open_priorities(clean_db, config):
    incident_id = open_incident(clean_db, "PagedP1", priority="P1")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    complete(clean_db, f"remediation:{incident_id}:0", incident_id)
    assert reconcile.run(clean_db, config).reemitted == []  # P1 does not page by default
    paging_p1 = replace(config, page_on_open_priorities=("P0", "P1"))
    assert reconcile.run(clean_db, paging_p1).reemitted == [f"{incident_id}.opened.0.r1"]


def test_resolved_whose_resolved_escalation_never_completed_reemits_resolved(clean_db, config):
    incident_id = open_incident(clean_db, "NeverResolvedPage")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    complete(clean_db, f"remediation:{incident_id}:0", incident_id)  # ran, recorded no result: nothing to escalate
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "t", "/test")
        publish(conn, f"{incident_id}.resolved.0", 600)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.resolved.0.r1"]
    assert reemitted(clean_db)[f"{incident_id}.resolved.0.r1"].data["status"] == "resolved"


def paged(engine, incident_id, ago=600, generation=0, occasion="opened", saw_ack=None):
    """PagerDuty accepted the incident's trigger ``ago`` seconds ago: its
    claim completed and its timeline entry, as escalation records them:
    ``saw_ack``, whether its sender saw the generation acknowledged (None:
    an entry written before escalation recorded it)."""
    key = f"notify:pagerduty:trigger:{incident_id}:{generation}:{occasion}"
    seen = {} if saw_ack is None else {"acknowledged_seen": saw_ack, "decided_before_ack": not saw_ack}
    with engine.begin() as conn:
        svc.add_timeline(conn, incident_id, "notification", {"channel": "pagerduty", "action": "trigger", "transition": occasion,
                                                             "outcome": "sent", "status": 202, "attempts": 1, **seen},
                         "escalation", dedup_key=key)
        conn.execute(sa.text("UPDATE incident_timeline SET at = timezone('utc', now()) - make_interval(secs => :ago) WHERE dedup_key = :k"),
                     {"k": key, "ago": ago})
        conn.execute(sa.text(
            "INSERT INTO work_claims (key, incident_id, claimed_at, completed_at) VALUES (:k, :i, "
            "timezone('utc', now()) - make_interval(secs => :ago), timezone('utc', now()) - make_interval(secs => :ago))"
            " ON CONFLICT (key) DO UPDATE SET claimed_at = excluded.claimed_at, completed_at = excluded.completed_at"),
            {"k": key, "i": incident_id, "ago": ago})


def test_a_page_whose_resolution_came_before_its_trigger_reemits_resolved(clean_db, config):
    """The resolution reached escalation before the page was sent: nothing
    to resolve then, so its escalation completed; the page was sent after."""
    incident_id = open_incident(clean_db, "PageLeftOpen", priority="P0")
    for step in ("diagnostics", "remediation"):
        complete(clean_db, f"{step}:{incident_id}:0", incident_id)
    complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "t", "/test")
        publish(conn, f"{incident_id}.resolved.0", 600)
    complete(clean_db, f"escalated:{incident_id}:0:resolved", incident_id)
    assert reconcile.run(clean_db, config).reemitted == []  # never paged: nothing to resolve
    paged(clean_db, incident_id, ago=5)
    assert reconcile.run(clean_db, config).reemitted == []  # paged just now: its own delivery resolves it
    paged(clean_db, incident_id)
    # Its own id: the escalation:resolved step's re-emissions are counted apart.
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.resolved.0.page.r1"]
    assert reemitted(clean_db)[f"{incident_id}.resolved.0.page.r1"].type == events.INCIDENT_RESOLVED
    complete(clean_db, f"notify:pagerduty:resolve:{incident_id}:0:resolved", incident_id)
    assert reconcile.run(clean_db, config).reemitted == []


def test_a_page_whose_acknowledgement_came_before_its_trigger_reemits_acknowledged(clean_db, config):
    from shared import acknowledge

    incident_id = open_incident(clean_db, "PageNeverAcknowledged", priority="P0")
    for step in ("diagnostics", "remediation"):
        complete(clean_db, f"{step}:{incident_id}:0", incident_id)
    complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
    paged(clean_db, incident_id)
    assert reconcile.run(clean_db, config).reemitted == []  # nobody acknowledged it
    with clean_db.begin() as conn:
        acknowledge.acknowledge(conn, incident_id, "alice", "/test")
        publish(conn, f"{incident_id}.acknowledged.0", 600)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.acknowledged.0.page.r1"]
    assert reemitted(clean_db)[f"{incident_id}.acknowledged.0.page.r1"].type == events.INCIDENT_ACKNOWLEDGED
    complete(clean_db, f"notify:pagerduty:acknowledge:{incident_id}:0:acknowledged", incident_id)
    assert reconcile.run(clean_db, config).reemitted == []


def acknowledged(engine, incident_id, ago):
    """alice took the incident ``ago`` seconds ago, and its event was published."""
    from shared import acknowledge

    with engine.begin() as conn:
        acknowledge.acknowledge(conn, incident_id, "alice", "/test")
        conn.execute(sa.text("UPDATE incident_timeline SET at = timezone('utc', now()) - make_interval(secs => :ago)"
                             " WHERE incident_id = :i AND details->>'acknowledged' = 'true'"), {"i": incident_id, "ago": ago})
        publish(conn, f"{incident_id}.acknowledged.0", ago)


def test_a_failure_page_decided_after_the_acknowledgement_is_not_followed_up(clean_db, config):
    """A P1 is not paged when it opens; alice takes it; then remediation
    fails and PagerDuty is paged. That page is not hers to acknowledge
    (the escalation handler sends no acknowledge for it): nothing is missing."""
    incident_id = open_incident(clean_db, "FailedAfterTheAcknowledgement", priority="P1")
    for step in ("diagnostics", "remediation"):
        complete(clean_db, f"{step}:{incident_id}:0", incident_id)
    acknowledged(clean_db, incident_id, 1200)
    paged(clean_db, incident_id, ago=600, occasion="remediation_failed", saw_ack=True)
    assert reconcile.run(clean_db, config).reemitted == []
    # One whose sender saw no acknowledgement (it was in flight) is hers: missing.
    paged(clean_db, incident_id, ago=1800, occasion="remediation_failed.p-1", saw_ack=False)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.acknowledged.0.page.r1"]


def test_a_raise_to_p0_paged_after_the_acknowledgement_is_not_followed_up(clean_db, config):
    """A P1 opening pages no one; alice takes it; a P0 member raises it and
    PagerDuty is paged under the opening's own key. The person answered no
    page: no acknowledge is missing."""
    incident_id = open_incident(clean_db, "RaisedAfterTheAcknowledgement", priority="P1")
    for step in ("diagnostics", "remediation"):
        complete(clean_db, f"{step}:{incident_id}:0", incident_id)
    complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
    acknowledged(clean_db, incident_id, 1200)
    paged(clean_db, incident_id, ago=600, saw_ack=True)
    for _ in range(3):
        assert reconcile.run(clean_db, config).reemitted == []


def test_a_page_whose_sender_saw_no_acknowledgement_is_followed_up_whatever_the_clocks_say(clean_db, config):
    """alice's acknowledgement waited on the incident's row while the
    opening's page was claimed and sent: its time (its transaction's start)
    is before the page's claim, but the page's sender saw no acknowledgement.
    She answered that page: its acknowledge is missing. An opening's page
    recorded before senders said what they saw is hers too, as it was."""
    for saw_ack in (False, None):
        incident_id = open_incident(clean_db, f"AckWaitedOnTheIncident{saw_ack}", priority="P0")
        for step in ("diagnostics", "remediation"):
            complete(clean_db, f"{step}:{incident_id}:0", incident_id)
        complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
        acknowledged(clean_db, incident_id, 1200)
        paged(clean_db, incident_id, ago=1100, saw_ack=saw_ack)
        assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.acknowledged.0.page.r1"]
        complete(clean_db, f"notify:pagerduty:acknowledge:{incident_id}:0:acknowledged", incident_id)
        assert reconcile.run(clean_db, config).reemitted == []


def test_a_page_claimed_again_after_the_acknowledgement_counts_from_the_new_claim(clean_db, config):
    """The opening's trigger was claimed before alice took the incident, its
    holder died, and a redelivery claimed it again (stale) after her
    acknowledgement and sent it: that page was decided again after she took
    the incident, so her acknowledgement does not cover it."""
    from shared import acknowledge, claims

    incident_id = open_incident(clean_db, "ReclaimedAfterTheAcknowledgement", priority="P0")
    for step in ("diagnostics", "remediation"):
        complete(clean_db, f"{step}:{incident_id}:0", incident_id)
    complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
    key = f"notify:pagerduty:trigger:{incident_id}:0:opened"
    complete(clean_db, key, incident_id, ago=1800, done=False)  # claimed, its holder gone
    acknowledged(clean_db, incident_id, 1200)
    with clean_db.begin() as conn:
        assert claims.claim(conn, key, incident_id, 60).acquired  # stale: taken again now
        claims.complete(conn, key)
    with clean_db.connect() as conn:
        assert not acknowledge.covers_page(conn, incident_id, 0)
    assert reconcile.run(clean_db, config).reemitted == []


def test_a_page_of_an_earlier_generation_needs_no_follow_up_in_this_one(clean_db, config):
    """Generation 0 was paged and resolved; its claims were pruned (they are
    kept 168 h, the timeline a year), the incident reopened and resolved
    again with no page. Nothing of generation 1 was paged: nothing to resolve,
    nothing re-emitted, nothing stuck, however many passes."""
    incident_id = open_incident(clean_db, "PagedLongAgo", priority="P0")
    paged(clean_db, incident_id, ago=1200)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "t", "/test")
        conn.execute(sa.text("DELETE FROM work_claims WHERE incident_id = :i"), {"i": incident_id})  # retention
        svc.transition(conn, incident_id, "investigating", "carol", "/test")  # reopened: generation 1
        svc.transition(conn, incident_id, "resolved", "t", "/test")
        publish(conn, f"{incident_id}.resolved.1", 600)
    complete(clean_db, f"escalated:{incident_id}:1:resolved", incident_id)
    for _ in range(4):
        report = reconcile.run(clean_db, config)
        assert (report.reemitted, report.stuck) == ([], [])


def resolved_event(row, event_id):
    from cloudevents.http import CloudEvent

    spec = events.incident_event(events.INCIDENT_RESOLVED, row, "/test")
    return CloudEvent({"id": event_id, "type": spec["type"], "source": "/test", **spec["extensions"]}, spec["data"])


def paged_then_resolved(engine, name):
    incident_id = open_incident(engine, name, priority="P0")
    paged(engine, incident_id, ago=1200)
    with engine.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "t", "/test")
        publish(conn, f"{incident_id}.resolved.0", 600)
        row = svc.get_incident(conn, incident_id)
    complete(engine, f"escalated:{incident_id}:0:resolved", incident_id)
    return incident_id, row


def resolve_entries(engine, incident_id):
    with engine.connect() as conn:
        return [(t["details"]["outcome"], t["details"].get("reason")) for t in svc.get_timeline(conn, incident_id)
                if t["kind"] == "notification" and t["details"]["action"] == "resolve"]


def test_a_resolve_skipped_by_a_replica_without_pagerduty_is_sent_by_one_with_it(clean_db, config, database_url):
    """Paged while PagerDuty was on. During a rollout the re-emitted
    resolution reaches a replica started without the PagerDuty Secret: it
    cannot send the resolve and cannot know PagerDuty is off on purpose, so
    it records the resolve skipped and leaves its claim open. The next
    re-emission reaches a replica with PagerDuty on, which resolves the page;
    then nothing is missing."""
    from functions.escalation.handler import EscalationHandler
    from loopback.servers import RecordingServer
    from shared.config import load_settings

    incident_id, row = paged_then_resolved(clean_db, "PagedThenPagerDutyOffHere")
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.resolved.0.page.r1"]
    without = EscalationHandler(load_settings({"DATABASE_URL": database_url}))
    assert without.handle(resolved_event(row, f"{incident_id}.resolved.0.page.r1")).status_code == 202
    assert resolve_entries(clean_db, incident_id) == [
        ("skipped", "PagerDuty is off in the replica that handled it; left to one where it is on")]
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.resolved.0.page.r2"]
    pd = RecordingServer(lambda r: (202, {}, b'{"status":"success"}')).start()
    try:
        with_pd = EscalationHandler(load_settings({"DATABASE_URL": database_url, "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue",
                                                   "PAGERDUTY_ROUTING_KEY": "R" * 32}))
        assert with_pd.handle(resolved_event(row, f"{incident_id}.resolved.0.page.r2")).status_code == 202
        assert [r.json()["event_action"] for r in pd.received()] == ["resolve"]
    finally:
        pd.stop()
    assert [o for o, _ in resolve_entries(clean_db, incident_id)] == ["skipped", "sent"]
    for _ in range(3):
        report = reconcile.run(clean_db, config)
        assert (report.reemitted, report.stuck) == ([], [])


def test_a_resolve_pagerduty_is_off_for_everywhere_is_reported_stuck_once(clean_db, config, database_url):
    """PagerDuty is off in every replica now, but it paged: the alert it
    opened is still open there. The sweep re-emits the resolution its K
    times, each recorded skipped once, then reports the step stuck: a person
    resolves it in PagerDuty."""
    from functions.escalation.handler import EscalationHandler
    from shared.config import load_settings

    incident_id, row = paged_then_resolved(clean_db, "PagedThenPagerDutyOff")
    handler = EscalationHandler(load_settings({"DATABASE_URL": database_url}))
    for n in (1, 2):
        assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.resolved.0.page.r{n}"]
        assert handler.handle(resolved_event(row, f"{incident_id}.resolved.0.page.r{n}")).status_code == 202
    report = reconcile.run(clean_db, config)
    assert (report.reemitted, report.stuck) == ([], [("escalation:page_resolved", incident_id, 0)])
    assert reconcile.run(clean_db, config).stuck == []
    assert [o for o, _ in resolve_entries(clean_db, incident_id)] == ["skipped"]


def test_what_is_not_stuck_is_left_alone(clean_db, config):
    recent = open_incident(clean_db, "WithinGrace", published_ago=5)
    running = open_incident(clean_db, "DiagnosticsRunning")
    complete(clean_db, f"diagnostics:{running}:0", running, ago=5, done=False)
    done = open_incident(clean_db, "AllDone")
    complete(clean_db, f"diagnostics:{done}:0", done)
    complete(clean_db, f"remediation:{done}:0", done)
    with clean_db.begin() as conn:
        unsent = svc.record_alerts(conn, [alert("NotPublishedYet", priority="P0")], "/test", "test").outcomes[0].incident_id
        # Reopened by a person: no opened event, so no pipeline to drive.
        svc.transition(conn, done, "resolved", "t", "/test")
        publish(conn, f"{done}.resolved.0", 5)
        svc.transition(conn, done, "investigating", "t", "/test")
    assert reconcile.run(clean_db, config).reemitted == []
    assert {recent, running, unsent}  # named for the reader: each is a reason not to re-emit
    with clean_db.connect() as conn:
        assert reconcile.assess(conn, config) == {}


def test_a_long_gone_resolution_is_beyond_the_horizon(clean_db, config):
    incident_id = open_incident(clean_db, "Ancient")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    complete(clean_db, f"remediation:{incident_id}:0", incident_id)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "t", "/test")
        publish(conn, f"{incident_id}.resolved.0", 600)
        conn.execute(sa.text("UPDATE incidents SET resolved_at = resolved_at - interval '2 days' WHERE id = :i"), {"i": incident_id})
    assert reconcile.run(clean_db, config).reemitted == []


def test_the_batch_bounds_one_pass(clean_db, config):
    for n in range(5):
        open_incident(clean_db, f"Batch{n}")
    assert len(reconcile.run(clean_db, replace(config, reconcile_batch=3)).reemitted) == 3
    assert len(reconcile.run(clean_db, replace(config, reconcile_batch=3)).reemitted) == 3  # 2 left + 1 second round


WATCHED = ("event_outbox", "work_claims", "incident_timeline")


def _whole_scans(plan: dict) -> list[str]:
    """The nodes of a plan that read a watched table whole: a sequential
    scan, or an index scan without an index condition."""
    found = []
    node_type, relation, index = plan.get("Node Type", ""), plan.get("Relation Name", ""), plan.get("Index Name", "")
    if node_type == "Seq Scan" and relation in WATCHED:
        found.append(f"Seq Scan on {relation}")
    if "Index" in node_type and any(t in index or t == relation for t in WATCHED) and "Index Cond" not in plan:
        found.append(f"{node_type} on {index} without an index condition")
    for child in plan.get("Plans", []):
        found += _whole_scans(child)
    return found


def test_the_query_uses_indexes(clean_db, config, database_url):
    """Primary keys and the status index, never a scan of claims or the
    outbox: PostgreSQL's auto_explain hands the plan of every statement a
    pass runs to the client, with sequential scans priced out."""
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)

    @sa.event.listens_for(engine, "begin")
    def explain_every_statement(conn):
        conn.exec_driver_sql("LOAD 'auto_explain'")
        for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_level = notice", "auto_explain.log_format = json",
                        "client_min_messages = notice", "enable_seqscan = off",
                        # Joins as they run at scale, nested loops into the indexes: with merge joins
                        # allowed, the statistics an earlier test left (20,000 claims, emptied since)
                        # made a full scan of work_claims_pkey the cheaper plan for a handful of rows.
                        "enable_mergejoin = off", "enable_hashjoin = off"):
            conn.exec_driver_sql(f"SET LOCAL {setting}")

    from functions.escalation.handler import sent_by
    from shared import acknowledge

    open_incident(clean_db, "Indexed")
    # A page to acknowledge and one to resolve: the page steps read claims
    # and the acknowledgement with data to read.
    taken = open_incident(clean_db, "IndexedAcknowledged", priority="P0")
    paged(clean_db, taken)
    acknowledged(clean_db, taken, 300)
    fixed = open_incident(clean_db, "IndexedResolved", priority="P0")
    paged(clean_db, fixed)
    with clean_db.begin() as conn:
        svc.transition(conn, fixed, "resolved", "t", "/test")
        publish(conn, f"{fixed}.resolved.0", 300)
    # A P0 whose opening was given up on a while ago: its re-send is weighed.
    untold = open_incident(clean_db, "IndexedStuck", priority="P0")
    complete(clean_db, f"diagnostics:{untold}:0", untold)
    remediation_result(clean_db, untold, "failed")
    complete(clean_db, f"escalated:{untold}:0:remediation_failed", untold)
    for _ in range(config.reconcile_max_reemits + 1):
        reconcile.run(clean_db, config)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incident_timeline SET at = at - interval '1 hour' WHERE incident_id = :i AND kind = 'stuck'"),
                     {"i": untold})
    try:
        assert f"{untold}.opened.0.s" in " ".join(reconcile.run(engine, config).reemitted)  # the pool's one connection
        with engine.connect() as conn:
            with conn.begin():
                reconcile.assess(conn, config)
            with conn.begin():
                # What escalation reads of a page: the same claims, by incident.
                assert sent_by(conn, "pagerduty", taken)[0] >= {"trigger:0"}
                assert acknowledge.covers_page(conn, taken, 0)
            # pg8000 keeps the server's notices as their raw fields; a plan
            # comes when its statement ends, the last one with the COMMIT.
            messages = [n.get(b"M", b"").decode() for n in conn.connection.dbapi_connection.notices]
    finally:
        engine.dispose()
    plans = [json.loads(m.split("plan:", 1)[1]) for m in messages if "plan:" in m]
    passes = [p for p in plans if "FROM missing" in p["Query Text"]]
    assert len(passes) == 2, [p["Query Text"][:80] for p in plans]  # the pass and the counts
    assert any("starts_with(key" in p["Query Text"] for p in plans) and any("EXISTS (SELECT 1 FROM work_claims page" in p["Query Text"]
                                                                       and "FROM missing" not in p["Query Text"] for p in plans)
    for p in plans:
        assert _whole_scans(p["Plan"]) == [], p["Query Text"]


def root_took_over(engine, incident_id):
    """Another alert took over as root (migration 0017), and the opening it
    queued for its root was published."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET root_generation = 1 WHERE id = :id"), {"id": incident_id})
        event = events.incident_event(events.INCIDENT_OPENED, svc.get_incident(conn, incident_id), "/test")
        event["id"] += ".root1"
        outbox.enqueue(conn, [event])
        publish(conn, event["id"], 600)


def test_after_a_root_takes_over_the_new_roots_diagnosis_and_remediation_are_watched(clean_db, config):
    """The first root was diagnosed and remediated; another alert took over
    as root (migration 0017) and its own opening was published: its
    diagnosis is what is missing now, then its remediation."""
    incident_id = open_incident(clean_db, "FirstRoot")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    remediation_result(clean_db, incident_id, "failed")
    complete(clean_db, f"escalated:{incident_id}:0:remediation_failed", incident_id)
    complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
    assert reconcile.run(clean_db, config).reemitted == []
    root_took_over(clean_db, incident_id)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.opened.0.root1.r1"]
    complete(clean_db, f"diagnostics:{incident_id}:0.root1", incident_id)
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.diagnosed.0.root1.r1"]


def took_over_then_fixed(engine, name):
    """An incident whose root another alert took over, then resolved by
    remediation: its generation's root generation is 1."""
    incident_id = open_incident(engine, name)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET root_generation = 1, status = 'resolved', resolved_by = 'remediation', "
                             "resolved_at = timezone('utc', now()) WHERE id = :id"), {"id": incident_id})
    return incident_id


@pytest.mark.parametrize("how", ["the alert fires again", "a person reopens it"])
def test_a_reopened_incident_starts_from_its_first_root_and_its_diagnosis_is_watched(clean_db, config, how):
    """A reopen (the fix did not hold, or a person) is a new generation: its
    root generation starts at 0 again, so its plain ``opened.1`` event and
    claims are the ones reconciliation watches."""
    import datetime
    from dataclasses import replace as with_
    incident_id = took_over_then_fixed(clean_db, "FixDidNotHold")
    with clean_db.begin() as conn:
        if how == "the alert fires again":
            again = with_(alert("FixDidNotHold", priority="P1"),
                          starts_at=datetime.datetime(2026, 11, 29, 11, 0, tzinfo=datetime.timezone.utc))
            (outcome,) = svc.record_alerts(conn, [again], "/test", "test", reopen_window_seconds=3600).outcomes
            assert outcome.action == "reopened"
        else:
            svc.transition(conn, incident_id, "investigating", "alice", "/test")
            event = events.incident_event(events.INCIDENT_OPENED, svc.get_incident(conn, incident_id), "/test")
            outbox.enqueue(conn, [event])
        row = svc.get_incident(conn, incident_id)
        publish(conn, f"{incident_id}.opened.1", 600)
    assert (row["generation"], row["root_generation"]) == (1, 0)
    assert f"{incident_id}.opened.1.r1" in reconcile.run(clean_db, config).reemitted


def test_a_new_roots_opening_not_told_is_reemitted_and_reported_stuck_per_root(clean_db, config):
    """The escalation of a new root's opening (``root_changed``) failed:
    its ``.root1`` opening is re-emitted, and once the re-emissions are
    spent it is reported stuck as that root's."""
    incident_id = open_incident(clean_db, "PagedRoot", priority="P0")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
    root_took_over(clean_db, incident_id)
    complete(clean_db, f"diagnostics:{incident_id}:0.root1", incident_id)
    complete(clean_db, f"remediation:{incident_id}:0.root1", incident_id, ago=0, done=False)  # running: not missing yet
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.opened.0.root1.r1"]
    assert reemitted(clean_db)[f"{incident_id}.opened.0.root1.r1"].data["root_generation"] == 1
    reconcile.run(clean_db, config)
    report = reconcile.run(clean_db, config)
    assert report.stuck == [("escalation:root_changed", incident_id, 0)]
    with clean_db.connect() as conn:
        (stuck,) = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "stuck"]
    assert stuck["details"]["root_generation"] == 1


@pytest.mark.parametrize("module, table, message", [
    (reconcile, "incidents", "Reconciliation stopped at its database lock_timeout; the next sweep retries"),
    ("retention", "event_outbox", "Retention stopped at its database lock_timeout; the next sweep retries"),
])
def test_a_sweep_step_stopped_at_its_lock_bound_is_a_warning_without_a_traceback(database_url, clean_db, config, caplog,
                                                                                 module, table, message):
    """A lock a request or a migration holds is routine for the sweep (it
    waits 1 s for one, DB_SWEEP_LOCK_TIMEOUT_SECONDS): no ERROR traceback."""
    if module == "retention":
        from shared import retention as module
    open_incident(clean_db, "Locked")
    swept = db.create_engine_for(database_url, pool_size=1, max_overflow=0, bounds=db.Bounds(0.2, 5.0))
    try:
        with clean_db.connect() as locker:
            locker.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            with caplog.at_level("WARNING"):
                assert module.run_safely(swept, config) is None
            locker.rollback()
    finally:
        swept.dispose()
    logged = [(r.getMessage(), r.levelname, r.exc_info) for r in caplog.records if r.name in ("reconcile", "retention")]
    assert logged == [(message, "WARNING", None)]
