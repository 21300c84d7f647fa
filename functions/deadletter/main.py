"""Dead-letter function: the Broker's deadLetterSink.

    functions-framework --source functions/deadletter/main.py --target deadletter
"""

import functions_framework

from shared.bootstrap import start
from shared.http import Route, built_on_first_request, dispatch, health, install_json_errors

config = start("deadletter")
install_json_errors()



@built_on_first_request
def ROUTES() -> list[Route]:
    from functions.deadletter.handler import handle

    return [
        Route("GET", "/health", health, auth=False),
        # Called by the Broker only (a cluster-local Service): no bearer token.
        Route("POST", "/", handle, auth=False),
    ]


@functions_framework.http
def deadletter(request):
    return dispatch(request, ROUTES, config.api_token, "deadletter")
