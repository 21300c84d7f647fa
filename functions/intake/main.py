"""Intake function: every alert source of functions/intake/sources/
(AlertManager and Grafana webhooks, CloudEvent incident reports).

    functions-framework --source functions/intake/main.py --target intake
"""

import functions_framework

from functions.intake.handlers import Intake
from shared import kube
from shared.bootstrap import fail, start
from shared.correlation.plan import Correlator
from shared.correlation.rules import CorrelationConfigError, load
from shared.correlation.topology import Topology
from shared.http import Route, install_json_errors, dispatch, health
from shared.publisher import Publisher

config = start("intake")
install_json_errors()
try:
    _rules = load(config.correlation_file)
except CorrelationConfigError as exc:
    fail("intake", f"CORRELATION_FILE: {exc}")
_intake = Intake(config, Publisher(config), correlator=Correlator(_rules, Topology(kube.api_client)))

ROUTES = [
    Route("GET", "/health", health, auth=False),
    # One route per path each source declares; the CloudEvent routes also
    # take the PingSource's sweep.
    *_intake.routes(),
    Route("POST", "/outbox/sweep", lambda r: _intake.sweep(r)),
]


@functions_framework.http
def intake(request):
    return dispatch(request, ROUTES, config.api_token, "intake")
