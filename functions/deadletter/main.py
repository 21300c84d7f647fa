"""Dead-letter function: the Broker's deadLetterSink.

    functions-framework --source functions/deadletter/main.py --target deadletter
"""

import functions_framework

from functions.deadletter.handler import handle
from shared.bootstrap import start
from shared.http import Route, dispatch, health, install_json_errors

config = start("deadletter")
install_json_errors()

ROUTES = [
    Route("GET", "/health", health, auth=False),
    # Called by the Broker only (a cluster-local Service): no bearer token.
    Route("POST", "/", handle, auth=False),
]


@functions_framework.http
def deadletter(request):
    return dispatch(request, ROUTES, config.api_token, "deadletter")
