"""Intake function: AlertManager webhooks and CloudEvent incident reports.

    functions-framework --source functions/intake/main.py --target intake
"""

import functions_framework

from functions.intake.handlers import Intake
from shared.bootstrap import start
from shared.http import Route, install_json_errors, dispatch, health
from shared.publisher import Publisher

config = start("intake")
install_json_errors()
_intake = Intake(config, Publisher(config))

ROUTES = [
    Route("GET", "/health", health, auth=False),
    Route("POST", "/webhook/alert", lambda r: _intake.webhook(r)),
    # CloudEvents from the Broker (incident.report) and the PingSource sweep;
    # the handler applies EVENTS_REQUIRE_TOKEN itself.
    Route("POST", "/", lambda r: _intake.cloudevent(r), auth=False),
    Route("POST", "/events", lambda r: _intake.cloudevent(r), auth=False),
    Route("POST", "/outbox/sweep", lambda r: _intake.sweep(r)),
]


@functions_framework.http
def intake(request):
    return dispatch(request, ROUTES, config.api_token, "intake")
