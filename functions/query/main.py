"""Query function: the engineers' HTTP API (incidents, lifecycle, health,
metrics, OpenAPI).

    functions-framework --source functions/query/main.py --target query
"""

from pathlib import Path

import functions_framework
from flask import Response
from sqlalchemy.exc import SQLAlchemyError

from functions.query.api import QueryApi
from functions.query.backlog_api import BacklogApi
from functions.query.noise_api import NoiseApi
from functions.query.proposals_api import ProposalsApi
from shared import db
from shared.bootstrap import start
from shared.errors import ServiceUnavailable
from shared.http import Route, install_json_errors, check_bearer, dispatch, health, json_response
from shared.publisher import Publisher

config = start("query")
install_json_errors()
_publisher = Publisher(config)
_api = QueryApi(config, _publisher)
_backlog = BacklogApi(config, _publisher, _api.actor)
_noise = NoiseApi(config, _publisher, _api.actor)
_proposals = ProposalsApi(config, _publisher, _api.actor)
OPENAPI_FILE = Path(__file__).with_name("openapi.yaml")
# The board (Jinja2), the metrics registry (prometheus_client) and the
# OpenAPI document (YAML) load on first use: a cold start serving the API or
# an alert pays for none of them.
_lazy: dict = {}


def _board():
    if "board" not in _lazy:
        from functions.query.board import Board

        _lazy["board"] = Board(config, _publisher)
    return _lazy["board"]


def _ui(method: str):
    return lambda request, **params: getattr(_board(), method)(request, **params)


def _backlog_ui(method: str):
    def call(request, **params):
        if "backlog_board" not in _lazy:
            from functions.query.backlog_board import BacklogBoard

            _lazy["backlog_board"] = BacklogBoard(_board())
        return getattr(_lazy["backlog_board"], method)(request, **params)

    return call


def _noise_ui(method: str):
    def call(request, **params):
        if "noise_board" not in _lazy:
            from functions.query.noise_board import NoiseBoard

            _lazy["noise_board"] = NoiseBoard(_board(), _noise)
        return getattr(_lazy["noise_board"], method)(request, **params)

    return call


def _proposals_ui(method: str):
    def call(request, **params):
        if "proposals_board" not in _lazy:
            from functions.query.proposals_board import ProposalsBoard

            _lazy["proposals_board"] = ProposalsBoard(_board())
        return getattr(_lazy["proposals_board"], method)(request, **params)

    return call


def _metrics(request):
    if not config.metrics_public:
        check_bearer(request, config.api_token)
    from functions.query import metrics

    if "registry" not in _lazy:
        _lazy["registry"] = metrics.build_registry()
    try:
        body = metrics.render(_lazy["registry"])
    except SQLAlchemyError as exc:
        if db.is_transient(exc):
            raise ServiceUnavailable("the database is unavailable; metrics cannot be computed") from None
        raise
    return Response(body, mimetype="text/plain", headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _openapi(request):
    if "openapi" not in _lazy:
        import yaml

        _lazy["openapi"] = yaml.safe_load(OPENAPI_FILE.read_text())
    return json_response(_lazy["openapi"])


ROUTES = [
    Route("GET", "/health", health, auth=False),
    Route("GET", "/metrics", _metrics, auth=False),  # the handler applies METRICS_PUBLIC
    Route("GET", "/openapi.json", _openapi),
    Route("GET", "/incidents", _api.list),
    Route("GET", "/incidents/{incident_id}", _api.get),
    Route("PATCH", "/incidents/{incident_id}", _api.patch),
    # Noise control (functions/query/noise_api.py).
    Route("POST", "/incidents/{incident_id}/acknowledge", _noise.acknowledge),
    Route("GET", "/incidents/{incident_id}/silences", _noise.list_silences),
    Route("POST", "/incidents/{incident_id}/silences", _noise.create_silence),
    Route("DELETE", "/incidents/{incident_id}/silences/{silence_id}", _noise.expire_silence),
    Route("GET", "/maintenance-windows", _noise.list_windows),
    Route("POST", "/maintenance-windows", _noise.create_window),
    Route("GET", "/maintenance-windows/{window_id}", _noise.get_window),
    Route("POST", "/maintenance-windows/{window_id}/end", _noise.end_window),
    Route("DELETE", "/maintenance-windows/{window_id}", _noise.delete_window),
    Route("GET", "/suppressed-alerts", _noise.suppressed),
    Route("GET", "/incidents/{incident_id}/proposals", _proposals.list),
    Route("GET", "/incidents/{incident_id}/proposals/{proposal_id}", _proposals.get),
    Route("POST", "/incidents/{incident_id}/proposals/{proposal_id}/approve", _proposals.approve),
    Route("POST", "/incidents/{incident_id}/proposals/{proposal_id}/reject", _proposals.reject),
    Route("GET", "/dead-letters", _backlog.dead_letters),
    Route("POST", "/dead-letters/{letter_id}/redeliver", _backlog.redeliver_dead_letter),
    Route("GET", "/outbox/parked", _backlog.parked),
    Route("POST", "/outbox/parked/{event_id}/redeliver", _backlog.redeliver_parked),
    # The board authenticates with its own session cookie (functions/query/board.py).
    Route("GET", "/", lambda r: Response(status=303, headers={"Location": "/ui"}), auth=False),
    Route("GET", "/ui", _ui("index"), auth=False),
    Route("GET", "/ui/login", _ui("login_form"), auth=False),
    Route("POST", "/ui/login", _ui("login"), auth=False),
    Route("POST", "/ui/logout", _ui("logout"), auth=False),
    Route("GET", "/ui/static/board.css", _ui("stylesheet"), auth=False),
    Route("GET", "/ui/incidents/{incident_id}", _ui("incident"), auth=False),
    Route("POST", "/ui/incidents/{incident_id}/status", _ui("transition"), auth=False),
    Route("GET", "/ui/incidents/{incident_id}/report.md", _ui("report"), auth=False),
    Route("POST", "/ui/incidents/{incident_id}/proposals/{proposal_id}/approve", _proposals_ui("approve"), auth=False),
    Route("POST", "/ui/incidents/{incident_id}/proposals/{proposal_id}/reject", _proposals_ui("reject"), auth=False),
    Route("GET", "/ui/backlog", _backlog_ui("page"), auth=False),
    Route("POST", "/ui/dead-letters/{letter_id}/redeliver", _backlog_ui("redeliver_dead_letter"), auth=False),
    Route("POST", "/ui/outbox/parked/{event_id}/redeliver", _backlog_ui("redeliver_parked"), auth=False),
    Route("GET", "/ui/maintenance", _noise_ui("page"), auth=False),
    Route("POST", "/ui/maintenance", _noise_ui("create_window"), auth=False),
    Route("POST", "/ui/maintenance/{window_id}/end", _noise_ui("end_window"), auth=False),
    Route("POST", "/ui/maintenance/{window_id}/delete", _noise_ui("delete_window"), auth=False),
    Route("POST", "/ui/incidents/{incident_id}/silences", _noise_ui("silence"), auth=False),
    Route("POST", "/ui/incidents/{incident_id}/silences/{silence_id}/expire", _noise_ui("expire_silence"), auth=False),
]


@functions_framework.http
def query(request):
    return dispatch(request, ROUTES, config.api_token, "query")
