"""Escalation function: every notification channel of functions/escalation/channels/.

    functions-framework --source functions/escalation/main.py --target escalation
"""

import functions_framework

from functions.escalation.handler import ACCEPTED, EscalationHandler
from shared import eventio
from shared.bootstrap import start
from shared.http import Route, dispatch, health, install_json_errors

config = start("escalation")
install_json_errors()
_handler = EscalationHandler(config)

ROUTES = [
    Route("GET", "/health", health, auth=False),
    # Called by the Broker only (a cluster-local Service): no bearer token.
    Route("POST", "/", lambda r: _handler.handle(eventio.receive(r, ACCEPTED)), auth=False),
]


@functions_framework.http
def escalation(request):
    return dispatch(request, ROUTES, config.api_token, "escalation")
