"""The registry of alert sources: names that fit incidents.source, one owner
per route, and the intake's routes built from it."""

import pytest

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
