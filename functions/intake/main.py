"""Intake function: every alert source of functions/intake/sources/
(AlertManager and Grafana webhooks, CloudEvent incident reports).

    functions-framework --source functions/intake/main.py --target intake
"""

import functions_framework

from shared.bootstrap import start
from shared.http import Route, built_on_first_request, dispatch, health, install_json_errors

config = start("intake")
install_json_errors()


@built_on_first_request
def ROUTES() -> list[Route]:
    from functions.intake.handlers import Intake
    from shared.publisher import Publisher

    intake_ = Intake(config, Publisher(config))
    return [
        Route("GET", "/health", health, auth=False),
        # One route per path each source declares; the CloudEvent routes also
        # take the PingSource's sweep.
        *intake_.routes(),
        Route("POST", "/outbox/sweep", intake_.sweep),
    ]


@functions_framework.http
def intake(request):
    return dispatch(request, ROUTES, config.api_token, "intake")
