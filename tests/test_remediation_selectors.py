"""An alert label that is present but empty must never widen a remediation
action: ``delete_pods`` with ``pod: ""`` once listed the whole namespace."""

import pytest
from pydantic import ValidationError

from functions.remediation.actions import DeletePodsParams
from tests.test_remediation import actions_of, cluster, deliver, incident, live, reply_of  # noqa: F401 - fixtures
from shared import events


def test_an_empty_pod_label_deletes_nothing_and_hands_the_incident_to_a_human(live, cluster, clean_db):  # noqa: F811
    # KubePodNotReady's playbook deletes "{{ labels.pod }}" in any state.
    row = incident(clean_db, "KubePodNotReady", namespace="production", pod="")
    assert reply_of(deliver(live, row))["type"] == events.INCIDENT_REMEDIATION_FAILED
    assert cluster.calls("DELETE") == []
    (action,) = actions_of(clean_db, row["id"])
    assert action["success"] is False and "pod is empty" in action["error"]


def test_an_empty_job_name_label_never_becomes_a_selector(live, cluster, clean_db):  # noqa: F811
    row = incident(clean_db, "KubeJobFailed", namespace="production", job_name="")
    assert reply_of(deliver(live, row))["type"] == events.INCIDENT_REMEDIATION_FAILED
    assert cluster.calls("DELETE") == [] and cluster.calls("GET", "pods") == []
    assert "empty value" in actions_of(clean_db, row["id"])[0]["error"]


@pytest.mark.parametrize("params", [
    {"pod": ""}, {"pod": "  "}, {"selector": ""}, {"selector": "job-name="}, {"selector": "app=x,"},
    {"selector": "app in ()"}, {"selector": "app!=x"}, {"selector": "app notin (a)"}, {"selector": "!app"}, {"reasons": ["*"]},
])
def test_parameters_that_would_select_a_whole_namespace_are_refused(params):
    with pytest.raises(ValidationError):
        DeletePodsParams(namespace="production", **params)


@pytest.mark.parametrize("params", [
    {"pod": "email-service-b", "reasons": ["*"]}, {"selector": "app=email-service"}, {"selector": "app in (a, b)"},
    {"reasons": ["Evicted"]},
])
def test_narrow_parameters_are_accepted(params):
    from functions.remediation.actions import selector_problem

    DeletePodsParams(namespace="production", **params)
    assert selector_problem(params.get("selector", "app")) is None


@pytest.mark.parametrize("selector, problem", [
    ("", "it has an empty term"), ("app=x,", "it has an empty term"), ("app=x,,tier=db", "it has an empty term"),
    ("job-name=", "term 'job-name=' has an empty value"), ("app in ( , )", "term 'app in ( , )' has an empty set"),
    ("app notin (a)", "term 'app notin (a)' selects by exclusion"),
])
def test_a_refused_selector_says_why(selector, problem):
    from functions.remediation.actions import selector_problem

    assert selector_problem(selector) == problem
