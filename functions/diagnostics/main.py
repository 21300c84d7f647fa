"""Diagnostics function: triggered by incident.opened, replies incident.diagnosed.

    functions-framework --source functions/diagnostics/main.py --target diagnostics
"""

import functions_framework

from functions.diagnostics.collector import Collector, ProbeConfigError, load_probes
from functions.diagnostics.handler import DiagnosticsHandler
from shared import eventio, events
from shared.bootstrap import fail, start
from shared.http import Route, dispatch, health, install_json_errors

config = start("diagnostics")
install_json_errors()
try:
    _probes = load_probes(config.diagnostics_file)
except ProbeConfigError as exc:
    fail("diagnostics", f"DIAGNOSTICS_FILE: {exc}")
_handler = DiagnosticsHandler(config, Collector(config, _probes))

ROUTES = [
    Route("GET", "/health", health, auth=False),
    # Called by the Broker only (a cluster-local Service): no bearer token.
    Route("POST", "/", lambda r: _handler.handle(eventio.receive(r, (events.INCIDENT_OPENED,))), auth=False),
]


@functions_framework.http
def diagnostics(request):
    return dispatch(request, ROUTES, config.api_token, "diagnostics")
