"""Remediation function: triggered by incident.diagnosed (and
incident.remediation_approved), replies incident.remediated or
incident.remediation_failed.

    functions-framework --source functions/remediation/main.py --target remediation
"""

import functions_framework

from functions.remediation import playbooks
from functions.remediation.handler import RemediationHandler
from shared import eventio, events
from shared.bootstrap import fail, start
from shared.http import Route, dispatch, health, install_json_errors
from shared.publisher import Publisher

config = start("remediation")
install_json_errors()
try:
    _playbooks = playbooks.load(config.playbooks_file)
except playbooks.PlaybookError as exc:
    fail("remediation", f"PLAYBOOKS_FILE: {exc}")
_handler = RemediationHandler(config, _playbooks, Publisher(config))

ROUTES = [
    Route("GET", "/health", health, auth=False),
    # Called by the Broker only (a cluster-local Service): no bearer token.
    Route("POST", "/", lambda r: _handler.handle(eventio.receive(r, (events.INCIDENT_DIAGNOSED, events.INCIDENT_REMEDIATION_APPROVED))), auth=False),
]


@functions_framework.http
def remediation(request):
    return dispatch(request, ROUTES, config.api_token, "remediation")
