"""The registry of alert sources: names that fit incidents.source, one owner
per route, and the intake's routes built from it."""

import pytest

from shared.alerts import InvalidPayload

from functions.intake.sources import REGISTRY, Source, _registry, registered
from functions.intake.sources import alertmanager, grafana


def test_every_registered_source_parses_into_alerts_of_its_own_name():
    assert set(REGISTRY) == {"alertmanager", "cloudevent", "grafana"}
    assert registered("grafana") is grafana.SOURCE
    with pytest.raises(ValueError, match="no alert source named 'nagios'"):
        registered("nagios")


@pytest.mark.parametrize("name", ["Grafana", "1source", "a" * 41, "has-dash", ""])
def test_a_name_that_would_not_fit_incidents_source_is_refused(name):
    with pytest.raises(ValueError, match="must match"):
        Source(name=name, parse=grafana.parse, routes=("/webhook/x",))


def test_two_sources_cannot_share_a_name_or_a_route():
    with pytest.raises(ValueError, match="both claim /webhook/alert"):
        _registry(alertmanager.SOURCE, Source(name="other", parse=grafana.parse, routes=("/webhook/alert",)))
    with pytest.raises(ValueError, match="two sources are named 'grafana'"):
        _registry(grafana.SOURCE, Source(name="grafana", parse=grafana.parse, routes=("/webhook/grafana2",)))


def test_the_intake_serves_every_route_the_sources_declare(settings_obj):
    from functions.intake.handlers import Intake

    intake = Intake(settings_obj, publisher=None)
    routes = {(route.pattern, route.auth) for route in intake.routes()}
    assert routes == {("/webhook/alert", True), ("/webhook/grafana", True), ("/", False), ("/events", False)}
    assert set(intake.batches) == {"alertmanager", "grafana"}


@pytest.mark.parametrize("payload", [{"ruleName": "Disk", "state": "alerting"}, {"ruleId": 7, "evalMatches": []},
                                     {"evalMatches": [], "state": "ok"}])
def test_both_webhook_sources_tell_a_legacy_grafana_notification_apart_the_same_way(payload, settings_obj):
    """The one rule: no alerts list, and ruleName, ruleId or evalMatches."""
    with pytest.raises(InvalidPayload, match="/webhook/grafana"):
        alertmanager.parse(payload, settings_obj)
    try:
        grafana.parse(payload, settings_obj)
    except InvalidPayload as exc:  # read as legacy: only its own fields can be wrong
        assert exc.field in ("ruleName", "state")


@pytest.mark.parametrize("version, source", [(4.0, alertmanager), (3.0, alertmanager), (1.0, grafana)])
def test_a_version_written_as_a_whole_float_is_that_version(version, source, settings_obj):
    """JavaScript and Go's interface{} re-marshal 4 as 4.0 when they relay a group."""
    payload = {"version": version, "alerts": [{"status": "firing", "labels": {"alertname": "Float"}}]}
    assert [a.alert_name for a in source.parse(payload, settings_obj).alerts] == ["Float"]


def test_a_fractional_version_is_still_refused(settings_obj):
    with pytest.raises(InvalidPayload, match="got 4.5"):
        alertmanager.parse({"version": 4.5, "alerts": []}, settings_obj)


def test_grafana_4s_legacy_notification_keeps_its_links(settings_obj):
    """Grafana 4 wrote rule_url and image_url and sent no tags, orgId or message."""
    payload = {"title": "[Alerting] CPU", "ruleId": 3, "ruleName": "CPU", "state": "alerting",
               "evalMatches": [{"metric": "cpu", "value": 97}],
               "rule_url": "https://grafana.example.test/dashboard/db/hosts?fullscreen&panelId=2",
               "image_url": "https://grafana.example.test/render/cpu.png"}
    (alert,) = grafana.parse(payload, settings_obj).alerts
    assert alert.alert_name == "CPU" and alert.status == "firing"
    assert alert.annotations["generator_url"] == payload["rule_url"]
    assert alert.annotations["image_url"] == payload["image_url"]
