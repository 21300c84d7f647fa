"""Escalation function: every notification channel of functions/escalation/channels/.

    functions-framework --source functions/escalation/main.py --target escalation
"""

import logging

import functions_framework

from functions.escalation import channels as registry
from shared.bootstrap import start
from shared.http import Route, built_on_first_request, dispatch, health, install_json_errors

config = start("escalation")
install_json_errors()
# The channels are plain modules: built, and the ones that are off named,
# at start. The handler (SQLAlchemy, requests) is built by the first event.
_channels = registry.build(config)
registry.name_the_ones_off(_channels, logging.getLogger("escalation"))


@built_on_first_request
def ROUTES() -> list[Route]:
    from functions.escalation.handler import ACCEPTED, EscalationHandler
    from shared import eventio

    handler = EscalationHandler(config, _channels)
    return [
        Route("GET", "/health", health, auth=False),
        # Called by the Broker only (a cluster-local Service): no bearer token.
        Route("POST", "/", lambda r: handler.handle(eventio.receive(r, ACCEPTED)), auth=False),
    ]


@functions_framework.http
def escalation(request):
    return dispatch(request, ROUTES, config.api_token, "escalation")
