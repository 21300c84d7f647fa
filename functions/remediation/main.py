"""Remediation function: triggered by incident.diagnosed (and
incident.remediation_approved), replies incident.remediated or
incident.remediation_failed.

    functions-framework --source functions/remediation/main.py --target remediation
"""

import functions_framework

from functions.remediation import playbooks
from shared.bootstrap import fail, start
from shared.http import Route, built_on_first_request, dispatch, health, install_json_errors

config = start("remediation")
install_json_errors()
# The playbooks are checked at start (PyYAML and the actions' pydantic
# models): a wrong file stops the function before it takes any event. The
# handler (SQLAlchemy, the kubernetes client, requests) is built by the
# first event.
try:
    _playbooks = playbooks.load(config.playbooks_file)
except playbooks.PlaybookError as exc:
    fail("remediation", f"PLAYBOOKS_FILE: {exc}")


@built_on_first_request
def ROUTES() -> list[Route]:
    from functions.remediation.handler import RemediationHandler
    from shared import eventio, events
    from shared.publisher import Publisher

    handler = RemediationHandler(config, _playbooks, Publisher(config))
    accepted = (events.INCIDENT_DIAGNOSED, events.INCIDENT_REMEDIATION_APPROVED)
    return [
        Route("GET", "/health", health, auth=False),
        # Called by the Broker only (a cluster-local Service): no bearer token.
        Route("POST", "/", lambda r: handler.handle(eventio.receive(r, accepted)), auth=False),
    ]


@functions_framework.http
def remediation(request):
    return dispatch(request, ROUTES, config.api_token, "remediation")
