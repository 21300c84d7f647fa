"""A step the sweep gives up on is not the end of it: its event becomes a
dead letter, re-drivable from ``/dead-letters`` like any the Broker gave up
on, and a stuck escalation of an incident nobody has taken is re-sent at a
capped interval until it is told, or a person acknowledges or resolves the
incident. The hostile fault this answers: PagerDuty and Slack refusing
while the dead-letter sink was down, every delivery and re-emission of an
acknowledged P0's opening failed, and once everything recovered nothing
paged and nothing was left to redeliver."""

from dataclasses import replace
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from loopback.processes import FunctionProcess, wait_until
from shared import acknowledge, events, reconcile, retention
from shared import incidents as svc
from shared.config import ConfigError, load_settings
from tests.conftest import TEST_TOKEN
from tests.test_reconcile import complete, open_incident, paged, publish, remediation_result

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
ROUTING_KEY = "STUCKROUTINGKEY0123456789abcdefA"
HOUR = 3600


@pytest.fixture
def config(settings_obj):
    return replace(settings_obj, reconcile_grace_seconds=60, reconcile_backoff_seconds=0, reconcile_max_reemits=2,
                   reconcile_stuck_resend_seconds=HOUR, event_source="/test")


def until_stuck(engine, config):
    """Passes until the sweep gives up: K re-emissions, then the give-up."""
    reports = [reconcile.run(engine, config) for _ in range(config.reconcile_max_reemits + 1)]
    assert all(r.reemitted for r in reports[:-1]) and reports[-1].stuck
    return reports[-1]


def letters(engine):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM dead_letters ORDER BY id")).mappings()]


def resends(engine, incident_id):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM event_outbox WHERE subject = :i AND id LIKE '%.s%' ORDER BY created_at"),
                            {"i": incident_id}).scalars().all()


def stuck_a_while_ago(engine, incident_id, ago=2 * HOUR):
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE incident_timeline SET at = at - make_interval(secs => :ago) "
                             "WHERE incident_id = :i AND kind = 'stuck'"), {"i": incident_id, "ago": ago})


def an_interval_passes(engine, incident_id):
    """Every re-send of the incident moved one window and one interval
    back: what they are once the capped interval has passed."""
    with engine.begin() as conn:
        for event_id in resends(engine, incident_id):  # the oldest first: its earlier window is free
            prefix, window = event_id.rsplit(".s", 1)
            conn.execute(sa.text("UPDATE event_outbox SET id = :earlier, created_at = created_at - make_interval(secs => :ago) "
                                 "WHERE id = :id"), {"id": event_id, "earlier": f"{prefix}.s{int(window) - 1}", "ago": HOUR + 1})


def p0_whose_opening_is_never_told(engine, name):
    """Diagnosed, remediation failed and told: its opening alone is missing."""
    incident_id = open_incident(engine, name, priority="P0")
    complete(engine, f"diagnostics:{incident_id}:0", incident_id)
    remediation_result(engine, incident_id, "failed")
    complete(engine, f"escalated:{incident_id}:0:remediation_failed", incident_id)
    return incident_id


def test_a_stuck_escalation_becomes_a_dead_letter_holding_the_event_the_sweep_would_have_resent(clean_db, config):
    incident_id = p0_whose_opening_is_never_told(clean_db, "NeverPagedP0")
    report = until_stuck(clean_db, config)
    assert report.stuck == [("escalation:opened", incident_id, 0)]
    (letter,) = letters(clean_db)
    assert report.dead_letters == [letter["id"]]
    assert (letter["event_id"], letter["event_source"], letter["event_type"]) == (
        f"{incident_id}.opened.0.r3", "/test", events.INCIDENT_OPENED)
    assert (letter["error_destination"], letter["error_code"], letter["incident_id"]) == (
        "reconcile:escalation:opened", "stuck", incident_id)
    for words in ("gave up after 2 re-sends", "escalation:opened", f"escalated:{incident_id}:0:opened", "Redeliver"):
        assert words in letter["error_data"], words
    attributes = letter["attributes"]
    assert attributes["subject"] == incident_id and attributes["specversion"] == "1.0"
    assert (attributes["priority"], attributes["alertname"]) == ("p0", "NeverPagedP0")
    assert '"incident_id": "' + incident_id in letter["data"]
    assert letter["redelivery_status"] is None
    with clean_db.connect() as conn:
        (stuck,) = [t for t in svc.get_timeline(conn, incident_id) if t["kind"] == "stuck"]
    assert stuck["details"]["dead_letter_event_id"] == letter["event_id"]
    # Given up on once: further passes add no letter and no entry.
    for _ in range(2):
        assert reconcile.run(clean_db, config).stuck == []
    assert len(letters(clean_db)) == 1


@pytest.mark.parametrize("step,event_type", [("diagnostics", events.INCIDENT_OPENED),
                                             ("remediation", events.INCIDENT_DIAGNOSED),
                                             ("escalation:remediation_failed", events.INCIDENT_REMEDIATION_FAILED)])
def test_every_kind_of_step_given_up_on_becomes_a_dead_letter(clean_db, config, step, event_type):
    incident_id = open_incident(clean_db, f"Stuck{step}")
    if step != "diagnostics":
        complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    if step == "escalation:remediation_failed":
        remediation_result(clean_db, incident_id, "failed")
    assert until_stuck(clean_db, config).stuck == [(step, incident_id, 0)]
    (letter,) = letters(clean_db)
    assert (letter["event_type"], letter["error_destination"], letter["incident_id"]) == (
        event_type, f"reconcile:{step}", incident_id)


def test_a_stuck_escalation_is_resent_at_the_capped_interval_until_a_person_takes_the_incident(clean_db, config):
    incident_id = p0_whose_opening_is_never_told(clean_db, "StillUntold")
    until_stuck(clean_db, config)
    assert reconcile.run(clean_db, config).reemitted == []  # not before the interval since the give-up
    stuck_a_while_ago(clean_db, incident_id)
    (first,) = reconcile.run(clean_db, config).reemitted
    assert first.startswith(f"{incident_id}.opened.0.s") and resends(clean_db, incident_id) == [first]
    assert reconcile.run(clean_db, config).reemitted == []  # once per interval
    an_interval_passes(clean_db, incident_id)
    (second,) = reconcile.run(clean_db, config).reemitted
    assert second.startswith(f"{incident_id}.opened.0.s")
    with clean_db.connect() as conn:
        resent = conn.execute(sa.text("SELECT type, data FROM event_outbox WHERE id = :id"), {"id": second}).one()
        assert reconcile.assess(conn, config) == {("escalation:opened", "stuck"): 1}  # IncidentEscalationStuck still fires
    # The same event as every re-emission: the same claim keys, so nothing pages twice.
    assert resent.type == events.INCIDENT_OPENED and resent.data["incident_id"] == incident_id
    assert resent.data["generation"] == 0 and resent.data.get("root_generation", 0) == 0

    an_interval_passes(clean_db, incident_id)
    with clean_db.begin() as conn:
        acknowledge.acknowledge(conn, incident_id, "alice", "/test")
    assert reconcile.run(clean_db, config).reemitted == []
    assert len(resends(clean_db, incident_id)) == 2


def test_a_stuck_escalation_is_no_longer_resent_once_told_or_resolved(clean_db, config):
    told = p0_whose_opening_is_never_told(clean_db, "ToldAtLast")
    fixed = p0_whose_opening_is_never_told(clean_db, "ResolvedUntold")
    until_stuck(clean_db, config)
    for incident_id in (told, fixed):
        stuck_a_while_ago(clean_db, incident_id)
    assert len(reconcile.run(clean_db, config).reemitted) == 2  # both still re-sent
    for incident_id in (told, fixed):
        an_interval_passes(clean_db, incident_id)
    complete(clean_db, f"escalated:{told}:0:opened", told)
    with clean_db.begin() as conn:
        svc.transition(conn, fixed, "resolved", "t", "/test")
    assert reconcile.run(clean_db, config).reemitted == []
    assert len(resends(clean_db, told)) == len(resends(clean_db, fixed)) == 1


def test_a_resend_waits_a_whole_interval_after_the_previous_windows_one(clean_db, config):
    incident_id = p0_whose_opening_is_never_told(clean_db, "ResentLateInItsWindow")
    until_stuck(clean_db, config)
    stuck_a_while_ago(clean_db, incident_id)
    (first,) = reconcile.run(clean_db, config).reemitted
    # Sent just now, but in the window before this one (late in it): the new
    # window alone is no reason to send again.
    prefix, window = first.rsplit(".s", 1)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET id = :earlier WHERE id = :id"),
                     {"id": first, "earlier": f"{prefix}.s{int(window) - 1}"})
    assert reconcile.run(clean_db, config).reemitted == []
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET created_at = created_at - make_interval(secs => :ago) WHERE id = :id"),
                     {"id": f"{prefix}.s{int(window) - 1}", "ago": HOUR + 1})
    assert reconcile.run(clean_db, config).reemitted == [first]


def test_a_stuck_remediation_outcome_is_resent_however_long_ago_remediation_finished(clean_db, config):
    incident_id = open_incident(clean_db, "FailedNeverTold", priority="P0")
    complete(clean_db, f"diagnostics:{incident_id}:0", incident_id)
    complete(clean_db, f"escalated:{incident_id}:0:opened", incident_id)
    remediation_result(clean_db, incident_id, "failed")
    assert until_stuck(clean_db, config).stuck == [("escalation:remediation_failed", incident_id, 0)]
    stuck_a_while_ago(clean_db, incident_id)
    with clean_db.begin() as conn:  # past RECONCILE_HORIZON_SECONDS: the incident is still active
        conn.execute(sa.text("UPDATE work_claims SET completed_at = completed_at - make_interval(secs => :ago) WHERE key = :k"),
                     {"k": f"remediation:{incident_id}:0", "ago": config.reconcile_horizon_seconds + HOUR})
    (resent,) = reconcile.run(clean_db, config).reemitted
    assert resent.startswith(f"{incident_id}.remediation_failed.0.s")


def test_a_stuck_opening_is_resent_after_retention_pruned_the_other_events(clean_db, config):
    incident_id = p0_whose_opening_is_never_told(clean_db, "UntoldForAWeek")
    gone = open_incident(clean_db, "ResolvedLongAgo")
    with clean_db.begin() as conn:
        svc.transition(conn, gone, "resolved", "t", "/test")
    until_stuck(clean_db, config)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE event_outbox SET published_at = timezone('utc', now()) - interval '10 days'"))
    retention.run(clean_db, config)
    with clean_db.connect() as conn:
        left = conn.execute(sa.text("SELECT id FROM event_outbox WHERE published_at IS NOT NULL")).scalars().all()
    assert left == [f"{incident_id}.opened.0"]  # the active incident's opening alone
    stuck_a_while_ago(clean_db, incident_id)
    # Still driven: its re-emissions pruned too, they count again from the first.
    assert reconcile.run(clean_db, config).reemitted == [f"{incident_id}.opened.0.r1"]


def test_stuck_resends_do_not_hold_up_newer_work(clean_db, config):
    stuck = [p0_whose_opening_is_never_told(clean_db, f"StuckLongAgo{n}") for n in range(2)]
    until_stuck(clean_db, config)
    for incident_id in stuck:
        stuck_a_while_ago(clean_db, incident_id)
    fresh = open_incident(clean_db, "NewSinceThen")  # its diagnostics is due
    one_a_pass = replace(config, reconcile_batch=1)
    assert reconcile.run(clean_db, one_a_pass).reemitted == [f"{fresh}.opened.0.r1"]
    with clean_db.begin() as conn:
        svc.transition(conn, fresh, "resolved", "t", "/test")
    # Then the re-sends, the longest stuck first.
    assert [e.rsplit(".s", 1)[0] for e in reconcile.run(clean_db, one_a_pass).reemitted] == [f"{stuck[0]}.opened.0"]


def test_stuck_page_follow_ups_become_dead_letters_and_are_not_resent(clean_db, config):
    """A page's resolve is the follow-up of an incident a person or the
    system resolved: given up on, it is a dead letter, not re-sent."""
    incident_id = open_incident(clean_db, "PagedResolved", priority="P0")
    paged(clean_db, incident_id, ago=1200)
    with clean_db.begin() as conn:
        svc.transition(conn, incident_id, "resolved", "t", "/test")
        publish(conn, f"{incident_id}.resolved.0", 600)
    complete(clean_db, f"escalated:{incident_id}:0:resolved", incident_id)
    assert until_stuck(clean_db, config).stuck == [("escalation:page_resolved", incident_id, 0)]
    (letter,) = letters(clean_db)
    assert (letter["event_id"], letter["error_destination"]) == (
        f"{incident_id}.resolved.0.page.r3", "reconcile:escalation:page_resolved")
    stuck_a_while_ago(clean_db, incident_id)
    assert reconcile.run(clean_db, config).reemitted == []


def test_the_resend_interval_defaults_to_the_longest_backoff_and_is_validated(base_env):
    assert load_settings({**base_env, "RECONCILE_BACKOFF_SECONDS": "300"}).stuck_resend_seconds() == 1200
    assert load_settings({**base_env, "RECONCILE_STUCK_RESEND_SECONDS": "600"}).stuck_resend_seconds() == 600
    for bad in ("0", "-5", "soon", "inf"):
        with pytest.raises(ConfigError, match="RECONCILE_STUCK_RESEND_SECONDS"):
            load_settings({**base_env, "RECONCILE_STUCK_RESEND_SECONDS": bad})


@pytest.fixture(scope="module")
def pipeline(base_env, pd):
    """The query function redelivers to the local Broker wired from the
    shipped Triggers; escalation is real, the other subscribers record."""
    from deploy.services import SERVICES
    from local.broker import LocalBroker, load_brokers
    from loopback.servers import RecordingServer

    started = []
    try:
        escalation = FunctionProcess("escalation", {
            **base_env, "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue", "PAGERDUTY_ROUTING_KEY": ROUTING_KEY}).start()
        started.append(escalation)
        others = RecordingServer().start()
        started.append(others)
        services = {name: others.url for name in SERVICES} | {"escalation": escalation.url}
        broker = LocalBroker(load_brokers(ROOT / "knative" / "base", services), port=0, backoff_scale=0.05).start()
        started.append(broker)
        query = FunctionProcess("query", {**base_env, "K_SINK": broker.ingress_url("default", "incidents")}).start()
        started.append(query)
        yield query, broker
    finally:
        for proc in reversed(started):
            proc.stop()


def test_redelivering_the_stuck_escalations_letter_pages_once(pipeline, pd, clean_db, config):
    query, broker = pipeline
    pd.reset()
    incident_id = p0_whose_opening_is_never_told(clean_db, "RedrivenP0")
    until_stuck(clean_db, config)
    listed = requests.get(query.url + "/dead-letters", params={"incident_id": incident_id}, headers=AUTH, timeout=30)
    (letter,) = listed.json()
    assert letter["destination"] == "reconcile:escalation:opened" and letter["redelivered"] is False
    sent = requests.post(query.url + f"/dead-letters/{letter['id']}/redeliver", headers={**AUTH, "X-Actor": "alice"}, timeout=30)
    assert sent.status_code == 200 and sent.json()["sent"] is True, sent.text

    def triggers():
        return [b for b in pd.bodies() if b["event_action"] == "trigger" and b["dedup_key"] == incident_id]

    wait_until(triggers, 30, message="the redelivered opening to page PagerDuty")
    broker.wait_idle(30)
    with clean_db.connect() as conn:
        assert conn.execute(sa.text("SELECT completed_at IS NOT NULL FROM work_claims WHERE key = :k"),
                            {"k": f"escalated:{incident_id}:0:opened"}).scalar()
    # Told now: the sweep stops watching it, and a second redelivery pages nobody again.
    stuck_a_while_ago(clean_db, incident_id)
    assert reconcile.run(clean_db, config).reemitted == []
    again = requests.post(query.url + f"/dead-letters/{letter['id']}/redeliver?force=true", headers=AUTH, timeout=30)
    assert again.json()["sent"] is True
    broker.wait_idle(30)
    assert len(triggers()) == 1
