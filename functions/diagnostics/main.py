"""Diagnostics function: triggered by incident.opened, replies incident.diagnosed.

    functions-framework --source functions/diagnostics/main.py --target diagnostics
"""

import functions_framework

from functions.diagnostics.probes import ProbeConfigError, load_probes
from shared.bootstrap import fail, start
from shared.http import Route, built_on_first_request, dispatch, health, install_json_errors

config = start("diagnostics")
install_json_errors()
# The probes are checked at start (PyYAML only, functions/diagnostics/
# probes.py): a wrong file stops the function before it takes any event.
# The collector and the handler (SQLAlchemy, the kubernetes client,
# requests) are built by the first event.
try:
    _probes = load_probes(config.diagnostics_file)
except ProbeConfigError as exc:
    fail("diagnostics", f"DIAGNOSTICS_FILE: {exc}")


@built_on_first_request
def ROUTES() -> list[Route]:
    from functions.diagnostics.collector import Collector
    from functions.diagnostics.handler import DiagnosticsHandler
    from shared import eventio, events

    handler = DiagnosticsHandler(config, Collector(config, _probes))
    return [
        Route("GET", "/health", health, auth=False),
        # Called by the Broker only (a cluster-local Service): no bearer token.
        Route("POST", "/", lambda r: handler.handle(eventio.receive(r, (events.INCIDENT_OPENED,))), auth=False),
    ]


@functions_framework.http
def diagnostics(request):
    return dispatch(request, ROUTES, config.api_token, "diagnostics")
