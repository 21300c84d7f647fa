"""Query function: the engineers' HTTP API (incidents, lifecycle, health,
metrics, OpenAPI).

    functions-framework --source functions/query/main.py --target query
"""

from pathlib import Path

import functions_framework
from flask import Response
from sqlalchemy.exc import SQLAlchemyError

from functions.query import metrics
from functions.query.api import QueryApi
from functions.query.board import Board
from shared import db
from shared.bootstrap import start
from shared.errors import ServiceUnavailable
from shared.http import Route, install_json_errors, check_bearer, dispatch, health, json_response
from shared.publisher import Publisher

config = start("query")
install_json_errors()
_publisher = Publisher(config)
_api = QueryApi(config, _publisher)
_board = Board(config, _publisher)
_registry = metrics.build_registry()
OPENAPI_FILE = Path(__file__).with_name("openapi.yaml")
_openapi_cache: dict = {}


def _metrics(request):
    if not config.metrics_public:
        check_bearer(request, config.api_token)
    try:
        body = metrics.render(_registry)
    except SQLAlchemyError as exc:
        if db.is_transient(exc):
            raise ServiceUnavailable("the database is unavailable; metrics cannot be computed") from None
        raise
    return Response(body, mimetype="text/plain", headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _openapi(request):
    if "spec" not in _openapi_cache:
        import yaml  # only this endpoint needs it; keep it off the cold start

        _openapi_cache["spec"] = yaml.safe_load(OPENAPI_FILE.read_text())
    return json_response(_openapi_cache["spec"])


ROUTES = [
    Route("GET", "/health", health, auth=False),
    Route("GET", "/metrics", _metrics, auth=False),  # the handler applies METRICS_PUBLIC
    Route("GET", "/openapi.json", _openapi),
    Route("GET", "/incidents", _api.list),
    Route("GET", "/incidents/{incident_id}", _api.get),
    Route("PATCH", "/incidents/{incident_id}", _api.patch),
    # The board authenticates with its own session cookie (functions/query/board.py).
    Route("GET", "/", lambda r: Response(status=303, headers={"Location": "/ui"}), auth=False),
    Route("GET", "/ui", _board.index, auth=False),
    Route("GET", "/ui/login", _board.login_form, auth=False),
    Route("POST", "/ui/login", _board.login, auth=False),
    Route("POST", "/ui/logout", _board.logout, auth=False),
    Route("GET", "/ui/static/board.css", _board.stylesheet, auth=False),
    Route("GET", "/ui/incidents/{incident_id}", _board.incident, auth=False),
    Route("POST", "/ui/incidents/{incident_id}/status", _board.transition, auth=False),
    Route("GET", "/ui/incidents/{incident_id}/report.md", _board.report, auth=False),
]


@functions_framework.http
def query(request):
    return dispatch(request, ROUTES, config.api_token, "query")
