"""Intake function: every alert source of functions/intake/sources/
(AlertManager and Grafana webhooks, CloudEvent incident reports).

    functions-framework --source functions/intake/main.py --target intake
"""

import functions_framework

from shared.bootstrap import fail, start
from shared.correlation.rulefile import CorrelationConfigError, check
from shared.http import Route, built_on_first_request, dispatch, health, install_json_errors

config = start("intake")
install_json_errors()
# The correlation rules are checked at start: a wrong file stops the intake
# with one line naming file, rule and field, before it takes any alert. The
# check needs no pydantic for a valid file; the rules' models are built by
# the first request (shared/correlation/rulefile.py).
try:
    _rules = check(config.correlation_file)
except CorrelationConfigError as exc:
    fail("intake", f"CORRELATION_FILE: {exc}")


@built_on_first_request
def ROUTES() -> list[Route]:
    from functions.intake.handlers import Intake
    from shared import kube
    from shared.correlation.plan import Correlator
    from shared.correlation import topology
    from shared.publisher import Publisher

    intake_ = Intake(config, Publisher(config), correlator=Correlator(_rules.model(), topology.from_settings(config, kube.api_client)))
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
