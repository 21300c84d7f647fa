"""One rule for which service an alert belongs to: the list filter finds
exactly the service that Slack, PagerDuty, diagnostics and remediation use."""

import pytest

from functions.diagnostics.collector import resolve_target
from functions.escalation.channels.text import service_of as shown_service
from shared import incidents as svc
from shared.domain import current_actions, service_of
from tests.factories import alert


@pytest.mark.parametrize("labels, service", [
    ({"service": "email", "app": "mail-app", "job": "mail-job"}, "email"),
    ({"app": "checkout", "job": "kube-state-metrics"}, "checkout"),
    ({"service": " ", "deployment": "billing-api"}, "billing-api"),
    ({"job": "node-exporter"}, "node-exporter"),
    ({"namespace": "shop"}, None),
])
def test_the_service_filter_finds_what_every_view_shows(clean_db, labels, service):
    row = alert("SomethingBroke", **labels)
    with clean_db.begin() as conn:
        incident_id = svc.record_alerts(conn, [row], "/test", "test").outcomes[0].incident_id
        incident = svc.get_incident(conn, incident_id)
    assert service_of(incident["labels"]) == shown_service(incident) == service
    assert resolve_target(incident["labels"], "SomethingBroke", {}).service == (service or "")
    if service is not None:
        with clean_db.connect() as conn:
            found, _ = svc.list_incidents(conn, svc.IncidentFilter(services=(service,)))
        assert [i["id"] for i in found] == [incident_id]


def test_the_current_remediation_actions_are_this_generations_and_roots_newest_first():
    incident = {"generation": 1, "root_generation": 0, "remediation_actions": [
        {"action": "scale", "generation": 0, "root_generation": 0},
        {"action": "restart", "generation": 1, "root_generation": 0},
        {"action": "cordon", "generation": 1, "root_generation": 0},
    ]}
    current, earlier = current_actions(incident)
    assert [a["action"] for a in current] == ["cordon", "restart"] and earlier == 1


def test_records_the_previous_release_left_unstamped_count_as_current_until_one_is_stamped():
    # An incident reopened before the upgrade: its unstamped failure may be
    # this round's, so it is listed rather than counted as earlier.
    incident = {"generation": 1, "root_generation": 0, "remediation_actions": [
        {"action": "scale", "success": True}, {"action": "restart", "success": False}]}
    current, earlier = current_actions(incident)
    assert [a["action"] for a in current] == ["restart", "scale"] and earlier == 0
    incident["remediation_actions"].append({"action": "cordon", "generation": 1, "root_generation": 0})
    current, earlier = current_actions(incident)
    assert [a["action"] for a in current] == ["cordon"] and earlier == 2
