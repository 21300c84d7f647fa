"""Events of a generation the incident has left, and generations it never
had, over real HTTP: the functions served, loopback PagerDuty, Slack and
Kubernetes. The database decides which generation and root an incident is
at; an event's ``data.generation`` / ``data.root_generation`` only say which
one it is of. A stale one is acknowledged (2xx) with nothing done; one the
database never had is forged and refused for good (400), as is one that is
not a whole number in range."""

from __future__ import annotations

import pytest
import requests
import sqlalchemy as sa
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from functions.escalation.handler import taken_by_a_person
from shared import events, lifecycle
from shared import incidents as svc
from tests.conftest import TEST_TOKEN
from tests.factories import alert
from tests.test_escalation import ROUTING_KEY, SLACK_PATH
from loopback.kube import deployment, pod
from loopback.processes import functions_running


@pytest.fixture
def cluster(kube):
    kube.clear()
    kube.rollout_delay = 0.0
    kube.add_deployment(deployment("email-service", 1))
    kube.pods.extend([pod("email-service-a", {"app": "email-service"})])
    return kube


@pytest.fixture(scope="module")
def functions(base_env, kube, pd, slack_hook):
    """The chain's consumers and the query API, remediation live against
    the loopback cluster so that a run is a Kubernetes call."""
    env = {
        **base_env,
        "KUBECONFIG": str(kube.kubeconfig_path),
        "REMEDIATION_MODE": "live",
        "REMEDIATION_ALLOWED_NAMESPACES": "production",
        "REMEDIATION_VERIFY_TIMEOUT_SECONDS": "5",
        "PAGERDUTY_EVENTS_URL": pd.url + "/v2/enqueue",
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "SLACK_WEBHOOK_URL": slack_hook.url + SLACK_PATH,
        "NOTIFY_TIMEOUT_SECONDS": "2",
        "NOTIFY_MAX_ATTEMPTS": "2",
    }
    with functions_running(("diagnostics", "remediation", "escalation", "query"), env) as started:
        yield started


@pytest.fixture
def receivers(pd, slack_hook):
    pd.reset(), slack_hook.reset()
    yield pd, slack_hook
    assert pd.invalid == [] and slack_hook.invalid == [], (pd.invalid, slack_hook.invalid)


def open_incident(engine, name="EmailServiceDown"):
    with engine.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert(name, priority="P0", service="email", namespace="production")],
                                        "/test", "test").outcomes[0].incident_id
        return svc.get_incident(conn, incident_id)


def current(engine, incident_id):
    with engine.connect() as conn:
        return svc.get_incident(conn, incident_id)


def timeline(engine, incident_id, kind):
    with engine.connect() as conn:
        return [t["details"] for t in svc.get_timeline(conn, incident_id) if t["kind"] == kind]


def event_of(event_type, row, **data):
    """The event the outbox sends for ``row`` (its id, attributes and
    data), with ``data`` changed as a sender might."""
    spec = events.incident_event(event_type, row, "/test")
    spec["data"].update(data)
    return to_binary(CloudEvent({"id": spec["id"], "type": spec["type"], "source": "/test", "subject": row["id"],
                                 **spec["extensions"]}, spec["data"]))


def post(proc, event):
    headers, body = event
    return requests.post(proc.url + "/", data=body, headers=headers, timeout=60)


def as_redelivered(response):
    """A function's reply as the Broker delivers it onward (binary mode)."""
    headers = {k: v for k, v in response.headers.items() if k.lower().startswith("ce-") or k.lower() == "content-type"}
    return headers, response.content


def sent(receivers):
    pd, slack = receivers
    return [b["event_action"] for b in pd.bodies()], len(slack.requests)


# --------------------------------------------------------------------------- a late generation 0 after a reopen


def test_a_late_generation_after_a_reopen_runs_nothing_and_pages_no_one(functions, cluster, receivers, clean_db):
    """Generation 0 goes opened -> diagnosed -> remediated (which resolves
    it); a person reopens it: generation 1, never diagnosed. Generation 0's
    events, redelivered by the Broker or re-driven from a dead letter, are
    acknowledged with nothing done: no remediation on generation 0's
    diagnosis, no page, no chat message, no second diagnosis."""
    row = open_incident(clean_db)
    opened = event_of(events.INCIDENT_OPENED, row)
    assert post(functions["escalation"], opened).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    diagnosed = post(functions["diagnostics"], opened)
    assert diagnosed.status_code == 200 and diagnosed.headers["ce-id"] == f"{row['id']}.diagnosed.0"
    remediated = post(functions["remediation"], as_redelivered(diagnosed))
    assert remediated.status_code == 200 and remediated.headers["ce-id"] == f"{row['id']}.remediated.0"
    assert current(clean_db, row["id"])["status"] == "resolved"

    reopened = requests.patch(f"{functions['query'].url}/incidents/{row['id']}", json={"status": "investigating", "note": "not fixed"},
                              headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=30)
    assert reopened.status_code == 200, reopened.text
    assert (current(clean_db, row["id"])["generation"], current(clean_db, row["id"])["status"]) == (1, "investigating")

    receivers[0].reset(), receivers[1].reset()
    kube_calls = len(cluster.requests)
    before = {kind: len(timeline(clean_db, row["id"], kind)) for kind in ("diagnosed", "remediation_action", "remediation_result")}
    late = {
        "remediation": as_redelivered(diagnosed),
        "escalation": opened,
        "diagnostics": opened,
    }
    for name, event in late.items():
        response = post(functions[name], event)
        assert (response.status_code, response.content) == (202, b""), (name, response.status_code, response.text)
    # Nor is generation 0's outcome told as generation 1's.
    assert post(functions["escalation"], as_redelivered(remediated)).status_code == 202

    assert sent(receivers) == ([], 0)
    assert len(cluster.requests) == kube_calls
    assert {kind: len(timeline(clean_db, row["id"], kind)) for kind in before} == before
    assert [r["generation"] for r in timeline(clean_db, row["id"], "remediation_result")] == [0]
    for name in late:
        assert "the event is of generation 0; the incident is at generation 1" in functions[name].logs(), name


def test_a_diagnosed_event_of_a_generation_never_diagnosed_runs_no_playbook(functions, cluster, receivers, clean_db):
    row = open_incident(clean_db)
    response = post(functions["remediation"], event_of(events.INCIDENT_DIAGNOSED, row))
    assert (response.status_code, response.content) == (202, b"")
    assert cluster.requests == [] and timeline(clean_db, row["id"], "remediation_result") == []
    assert "the incident's generation was not diagnosed" in functions["remediation"].logs()
    # Once diagnostics has run, the same event runs the playbook.
    assert post(functions["diagnostics"], event_of(events.INCIDENT_OPENED, row)).status_code == 200
    assert post(functions["remediation"], event_of(events.INCIDENT_DIAGNOSED, row)).status_code == 200
    assert len(cluster.calls("PATCH")) == 1


# --------------------------------------------------------------------------- generations the database never had


@pytest.mark.parametrize("root_generation", [1, 2, 7])
def test_a_forged_root_generation_sends_nothing(functions, receivers, clean_db, root_generation):
    """Event routes carry no token: whatever can reach escalation could
    claim a root change the database never recorded."""
    row = open_incident(clean_db)
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    response = post(functions["escalation"], event_of(events.INCIDENT_OPENED, row, root_generation=root_generation))
    assert response.status_code == 400 and "data.root_generation" in response.json()["message"]
    assert sent(receivers) == (["trigger"], 1)
    assert timeline(clean_db, row["id"], "root_changed") == []


@pytest.mark.parametrize("name, event_type", [("diagnostics", events.INCIDENT_OPENED), ("remediation", events.INCIDENT_DIAGNOSED),
                                              ("escalation", events.INCIDENT_OPENED)])
def test_a_generation_above_the_databases_is_400(functions, cluster, receivers, clean_db, name, event_type):
    row = open_incident(clean_db)
    for data in ({"generation": 1}, {"generation": 5, "root_generation": 0}, {"generation": 0, "root_generation": 3}):
        response = post(functions[name], event_of(event_type, row, **data))
        assert response.status_code == 400, (data, response.status_code, response.text)
    # Dropped for good, so logged with why (the 400s are not otherwise).
    logs = functions[name].logs()
    for reason in ("data.generation 1 is above the incident's generation 0", "data.generation 5 is above",
                   "data.root_generation 3 is above the incident's root generation 0"):
        assert f'"reason": "{reason}' in logs and row["id"] in logs, (name, reason)
    assert sent(receivers) == ([], 0) and cluster.requests == []
    assert current(clean_db, row["id"])["status"] == "open"


@pytest.mark.parametrize("field", ["generation", "root_generation"])
@pytest.mark.parametrize("value", [True, False, "5", "0", 1.0, 1.5, -1, 10**30, 2**31, [0], {"n": 0}])
def test_a_generation_that_is_not_a_whole_number_in_range_is_400(functions, cluster, receivers, clean_db, field, value):
    row = open_incident(clean_db)
    for name, event_type in (("diagnostics", events.INCIDENT_OPENED), ("remediation", events.INCIDENT_DIAGNOSED),
                             ("escalation", events.INCIDENT_OPENED)):
        response = post(functions[name], event_of(event_type, row, **{field: value}))
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert f"data.{field} must be a whole number" in response.json()["message"]
    assert sent(receivers) == ([], 0) and cluster.requests == []


# --------------------------------------------------------------------------- a root change superseded


def test_a_root_change_superseded_by_a_later_one_is_not_told(functions, receivers, clean_db):
    """Two take-overs in a row: the first one's opening arriving late tells
    nothing; the database's current root's is told once."""
    row = open_incident(clean_db)
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, row)).status_code == 202
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET root_generation = 2 WHERE id = :id"), {"id": row["id"]})
        svc.add_timeline(conn, row["id"], "root_changed", {"reason": "TargetDown took over", "root_generation": 2}, "test")
    receivers[0].reset(), receivers[1].reset()
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, row, root_generation=1)).status_code == 202
    assert sent(receivers) == ([], 0)
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, row, root_generation=2)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    assert "is now the root" in receivers[1].bodies()[0]["text"]


# --------------------------------------------------------------------------- an opening nobody was told


def patch(functions, incident_id, status):
    """A person moves the incident over the API (PATCH its status)."""
    response = requests.patch(f"{functions['query'].url}/incidents/{incident_id}", json={"status": status},
                              headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=30)
    assert response.status_code == 200, response.text


def reopened_by_the_intake(engine, row, name="EmailServiceDown", priority="P0"):
    """Remediation resolves the incident and the alert fires again: the
    intake reopens it as the next generation (open), whose own opening
    the outbox has yet to deliver."""
    with engine.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "remediation", "/test", resolved_by="remediation")
        again = svc.record_alerts(conn, [alert(name, priority=priority, service="email", namespace="production")],
                                  "/test", "test", reopen_window_seconds=1800)
        assert again.outcomes[0].action == "reopened"
        return svc.get_incident(conn, row["id"])


def completed(engine, incident_id, like):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT key FROM work_claims WHERE incident_id = :i AND completed_at IS NOT NULL "
                                    "AND key LIKE :k ORDER BY key"), {"i": incident_id, "k": like}).scalars().all()


def test_an_opening_never_told_is_told_once_ever_when_re_driven_after_the_intake_reopened_the_incident(functions, receivers, clean_db):
    """Every alert the intake acknowledged reaches a human. PagerDuty is
    down when the P0 opens (generation 0): escalation answers 502 and the
    Broker dead-letters the opening (Slack did post it). Remediation
    resolves it, the alert fires again and the intake reopens it as
    generation 1, whose opening is not delivered yet. The dead letter
    re-driven is of generation 0, stale; but nobody was paged in any
    generation, so PagerDuty pages now, as generation 1's opening, once;
    Slack, which told it, says nothing again. Generation 1's own opening
    then pages no one twice. Reopened again (generation 2) the same letter,
    re-driven again, tells nothing: a letter pages at most once, ever.
    While the incident is resolved it tells nothing either."""
    pd, slack = receivers
    row = open_incident(clean_db)
    opened = event_of(events.INCIDENT_OPENED, row)
    pd.script.extend([(503, {}, b"down")] * 2)  # NOTIFY_MAX_ATTEMPTS
    assert post(functions["escalation"], opened).status_code == 502
    assert (len(pd.requests), len(slack.requests)) == (2, 1)

    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "remediation", "/test", resolved_by="remediation")
    pd.reset(), slack.reset()
    assert post(functions["escalation"], opened).status_code == 202  # resolved: nothing to page about
    assert sent(receivers) == ([], 0)

    with clean_db.begin() as conn:
        again = svc.record_alerts(conn, [alert("EmailServiceDown", priority="P0", service="email", namespace="production")],
                                  "/test", "test", reopen_window_seconds=1800)
        assert again.outcomes[0].action == "reopened"
    reopened = current(clean_db, row["id"])
    assert (reopened["generation"], reopened["status"]) == (1, "open")
    logged = len(functions["escalation"].logs())
    for _ in range(2):  # re-driven twice: paged once
        response = post(functions["escalation"], opened)
        assert (response.status_code, response.content) == (202, b"")
    assert sent(receivers) == (["trigger"], 0)
    assert pd.bodies()[0]["dedup_key"] == row["id"] and pd.bodies()[0]["payload"]["custom_details"]["status"] == "open"
    assert "told as the current generation's" in functions["escalation"].logs()[logged:]
    assert completed(clean_db, row["id"], "notify:pagerduty:%") == [f"notify:pagerduty:trigger:{row['id']}:1:opened"]
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, reopened)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)  # Slack tells generation 1's opening; PagerDuty paged it already

    reopened = reopened_by_the_intake(clean_db, reopened)
    assert reopened["generation"] == 2
    pd.reset(), slack.reset()
    assert post(functions["escalation"], opened).status_code == 202
    assert sent(receivers) == ([], 0)
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, reopened)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)  # generation 2's own opening pages

    # The page is PagerDuty's alert of generation 2: resolving it resolves the page.
    patch(functions, row["id"], "resolved")
    assert post(functions["escalation"], event_of(events.INCIDENT_RESOLVED, current(clean_db, row["id"]))).status_code == 202
    assert [b["event_action"] for b in pd.bodies()] == ["trigger", "resolve"]


@pytest.mark.parametrize("taken", ["reopened by hand", "acknowledged", "acknowledged after diagnostics moved it"])
def test_an_opening_never_told_stays_stale_when_a_person_has_the_generation(functions, receivers, clean_db, taken):
    """The page of generation 0 dead-lettered; a person reopened the
    incident by hand (resolved -> investigating), or acknowledged the
    generation the intake reopened: a human has it, and a page now would be
    one nobody ever acknowledges. The letter re-driven stays stale: 2xx,
    nothing sent, logged."""
    pd, slack = receivers
    row = open_incident(clean_db)
    opened = event_of(events.INCIDENT_OPENED, row)
    pd.script.extend([(503, {}, b"down")] * 2)
    assert post(functions["escalation"], opened).status_code == 502
    if taken == "reopened by hand":
        patch(functions, row["id"], "resolved"), patch(functions, row["id"], "investigating")
    else:
        reopened_by_the_intake(clean_db, row)
        if taken == "acknowledged after diagnostics moved it":
            # Its acknowledgement changes no status: the timeline kind is acknowledged.
            with clean_db.begin() as conn:
                lifecycle.mark_investigating(conn, row["id"], "diagnostics")
        acknowledged = requests.post(f"{functions['query'].url}/incidents/{row['id']}/acknowledge",
                                     headers={"Authorization": f"Bearer {TEST_TOKEN}"}, timeout=30)
        assert acknowledged.status_code == 200, acknowledged.text
    assert current(clean_db, row["id"])["generation"] == 1
    pd.reset(), slack.reset()
    logged = len(functions["escalation"].logs())
    response = post(functions["escalation"], opened)
    assert (response.status_code, response.content) == (202, b"")
    assert sent(receivers) == ([], 0)
    assert "a person has the incident" in functions["escalation"].logs()[logged:]
    assert completed(clean_db, row["id"], "escalated:%:1:%") == []


def test_a_reopen_by_hand_is_marked_so_and_one_recorded_before_the_mark_still_counts(clean_db):
    """The transition marks a person's reopen ``by_hand``; an entry written
    before the mark (resolved -> investigating, no mark) is a person's too,
    while the intake's (to open) is not."""
    row = open_incident(clean_db)
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "api:bob", "/t")
        svc.transition(conn, row["id"], "investigating", "api:alice", "/t")
    assert timeline(clean_db, row["id"], "reopened")[-1]["by_hand"] is True
    assert taken_by_a_person_now(clean_db, row["id"]) == "api:alice reopened generation 1 by hand"
    for details, taken in (({"from": "resolved", "to": "investigating"}, "api:carol reopened generation 1 by hand"),
                           ({"from": "resolved", "to": "open"}, None)):
        with clean_db.begin() as conn:
            svc.add_timeline(conn, row["id"], "reopened", details, "api:carol" if taken else "alertmanager")
        assert taken_by_a_person_now(clean_db, row["id"]) == taken


def taken_by_a_person_now(engine, incident_id):
    with engine.connect() as conn:
        return taken_by_a_person(conn, svc.get_incident(conn, incident_id))


def test_a_stale_opening_of_a_priority_pagerduty_does_not_page_tells_nothing_and_escalates_nothing(functions, receivers, clean_db):
    """A P1 (PagerDuty pages no P1) told by Slack in generation 0; the
    intake reopens it. Its opening re-driven is simply stale: no channel
    that would tell it left it untold, so nothing is told, and generation
    1 is not marked escalated (reconciliation still looks for its own
    opening)."""
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("EmailLatencyHigh", priority="P1", service="email", namespace="production")],
                                        "/test", "test").outcomes[0].incident_id
        row = svc.get_incident(conn, incident_id)
    opened = event_of(events.INCIDENT_OPENED, row)
    assert post(functions["escalation"], opened).status_code == 202
    assert sent(receivers) == ([], 1)
    assert reopened_by_the_intake(clean_db, row, "EmailLatencyHigh", "P1")["generation"] == 1
    receivers[0].reset(), receivers[1].reset()
    logged = len(functions["escalation"].logs())
    assert post(functions["escalation"], opened).status_code == 202
    assert sent(receivers) == ([], 0)
    assert "told as the current generation's" not in functions["escalation"].logs()[logged:]
    assert completed(clean_db, incident_id, "escalated:%:1:%") == []


def test_a_stale_opening_is_told_by_a_new_roots_opening_of_a_later_generation(functions, receivers, clean_db):
    """The page of generation 0 dead-lettered; the intake reopened the
    incident and another alert took over as root in generation 1, whose
    opening PagerDuty and Slack told (``….root1``). The old letter re-driven
    tells nothing: the on-call was paged for this generation already."""
    pd, slack = receivers
    row = open_incident(clean_db)
    opened = event_of(events.INCIDENT_OPENED, row)
    pd.script.extend([(503, {}, b"down")] * 2)
    assert post(functions["escalation"], opened).status_code == 502
    reopened_by_the_intake(clean_db, row)
    with clean_db.begin() as conn:  # the take-over, as shared.correlation.store records it
        conn.execute(sa.text("UPDATE incidents SET root_generation = 1 WHERE id = :id"), {"id": row["id"]})
        svc.add_timeline(conn, row["id"], "root_changed", {"reason": "TargetDown took over", "root_generation": 1}, "test")
    pd.reset(), slack.reset()
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, current(clean_db, row["id"]))).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    pd.reset(), slack.reset()
    assert post(functions["escalation"], opened).status_code == 202
    assert sent(receivers) == ([], 0)


def test_an_opening_every_channel_told_stays_stale_after_a_reopen(functions, receivers, clean_db):
    """Told in generation 0 by PagerDuty and Slack, then resolved and
    reopened: the same opening redelivered tells nothing (the on-call was
    paged in its generation)."""
    row = open_incident(clean_db)
    opened = event_of(events.INCIDENT_OPENED, row)
    assert post(functions["escalation"], opened).status_code == 202
    assert sent(receivers) == (["trigger"], 1)
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "test", "/test")
        svc.transition(conn, row["id"], "investigating", "test", "/test")
    receivers[0].reset(), receivers[1].reset()
    assert post(functions["escalation"], opened).status_code == 202
    assert sent(receivers) == ([], 0)


def test_a_late_resolution_after_the_intake_reopened_the_incident_resolves_no_page(functions, receivers, clean_db):
    """Remediation resolved generation 0; the alert fires again and the
    intake reopens the incident as generation 1, which pages. Generation 0's
    incident.resolved arriving only now (a Broker retry, a re-drive) is
    stale: the page of generation 1 stays open, and Slack is not told the
    incident is resolved."""
    row = open_incident(clean_db)
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, row)).status_code == 202
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "remediation", "/test", resolved_by="remediation")
        resolved = event_of(events.INCIDENT_RESOLVED, svc.get_incident(conn, row["id"]))
        again = svc.record_alerts(conn, [alert("EmailServiceDown", priority="P0", service="email", namespace="production")],
                                  "/test", "test", reopen_window_seconds=1800)
        assert again.outcomes[0].action == "reopened"
    reopened = current(clean_db, row["id"])
    assert (reopened["generation"], reopened["status"]) == (1, "open")
    receivers[0].reset(), receivers[1].reset()
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, reopened)).status_code == 202
    assert sent(receivers) == (["trigger"], 1)

    response = post(functions["escalation"], resolved)
    assert (response.status_code, response.content) == (202, b"")
    assert sent(receivers) == (["trigger"], 1)
    assert current(clean_db, row["id"])["status"] == "open"


def test_a_take_over_in_a_generation_reopened_by_hand_is_diagnosed_and_remediated(functions, cluster, receivers, clean_db):
    """A reopen by hand sends no opening, so its generation is not
    diagnosed at first; another alert taking over as root in it sends the
    new root's opening, which is diagnosed, and remediation runs on that
    diagnosis, once."""
    row = open_incident(clean_db)
    with clean_db.begin() as conn:
        svc.transition(conn, row["id"], "resolved", "test", "/test")
        svc.transition(conn, row["id"], "investigating", "test", "/test")
    assert post(functions["remediation"], event_of(events.INCIDENT_DIAGNOSED, current(clean_db, row["id"]))).status_code == 202
    assert cluster.requests == []
    with clean_db.begin() as conn:  # the take-over, as shared.correlation.store records it
        conn.execute(sa.text("UPDATE incidents SET root_generation = 1 WHERE id = :id"), {"id": row["id"]})
    taken_over = current(clean_db, row["id"])
    assert (taken_over["generation"], taken_over["root_generation"]) == (1, 1)
    diagnosed = post(functions["diagnostics"], event_of(events.INCIDENT_OPENED, taken_over))
    assert diagnosed.status_code == 200 and diagnosed.headers["ce-id"] == f"{row['id']}.diagnosed.1.root1"
    for _ in range(2):  # a redelivery replays
        remediated = post(functions["remediation"], as_redelivered(diagnosed))
        assert remediated.status_code == 200 and remediated.headers["ce-id"] == f"{row['id']}.remediated.1.root1"
    assert len(cluster.calls("PATCH")) == 1
    assert [(r["generation"], r["root_generation"]) for r in timeline(clean_db, row["id"], "remediation_result")] == [(1, 1)]


def test_a_raise_to_p0_whose_page_dead_lettered_pages_when_re_driven_after_the_intake_reopened(functions, receivers, clean_db):
    """A P1 opens (Slack posts it; PagerDuty pages no P1), a member raises
    it to P0 while PagerDuty is down: the raised opening dead-letters.
    Remediated, the alert fires again and the intake reopens it (still
    P0): the letter re-driven pages now."""
    pd, slack = receivers
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [alert("EmailLatencyHigh", priority="P1", service="email", namespace="production")],
                                        "/test", "test").outcomes[0].incident_id
        row = svc.get_incident(conn, incident_id)
    assert post(functions["escalation"], event_of(events.INCIDENT_OPENED, row)).status_code == 202
    assert sent(receivers) == ([], 1)
    with clean_db.begin() as conn:
        conn.execute(sa.text("UPDATE incidents SET priority = 'P0' WHERE id = :id"), {"id": incident_id})
        raised = event_of(events.INCIDENT_OPENED, svc.get_incident(conn, incident_id), raised_to="P0")
    pd.script.extend([(503, {}, b"down")] * 2)
    assert post(functions["escalation"], raised).status_code == 502
    reopened = reopened_by_the_intake(clean_db, row, "EmailLatencyHigh", "P1")
    assert (reopened["generation"], reopened["priority"]) == (1, "P0")
    pd.reset(), slack.reset()
    assert post(functions["escalation"], raised).status_code == 202
    assert sent(receivers) == (["trigger"], 0)
    assert pd.bodies()[0]["payload"]["severity"] == "critical"
