"""Query function: the engineers' HTTP API (incidents, lifecycle, health,
metrics, OpenAPI).

    functions-framework --source functions/query/main.py --target query
"""

import logging
from pathlib import Path

from functools import cache

import functions_framework
from flask import Response

from shared.bootstrap import fail, start
from shared.errors import ServiceUnavailable
from shared.users import UsersError
from shared.http import (MAX_QUERY_STRING, Route, built_on_first_request, install_json_errors, check_bearer, dispatch, health,
                         json_response)

config = start("query")
MIN_TOKEN_LENGTH = 32
install_json_errors()
try:
    # Only this function reads the personal token list: a mistake in it stops the query alone.
    _users = config.api_users.load()
except UsersError as exc:
    fail("query", str(exc))
# An approver with no personal token can never decide (only verified people do): say so now, not at 3 a.m.
_tokenless = [name for name in config.remediation_approvers if name not in _users.names]
if _tokenless:
    logging.getLogger("query").warning("REMEDIATION_APPROVERS names people without a personal token in INCIDENT_API_USERS: "
                                       "they cannot approve or reject", extra={"approvers_without_token": _tokenless})
# The API answers every wrong bearer token (no limit: callers are scripts and
# AlertManager), so only the shared token's length keeps it from being guessed.
if config.api_token and len(config.api_token.reveal()) < MIN_TOKEN_LENGTH:
    logging.getLogger("query").warning(f"INCIDENT_API_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters: the API does not "
                                       "limit wrong tokens, so a short one can be guessed; make a long random one "
                                       "(python -m shared.users NAME prints one)")
OPENAPI_FILE = Path(__file__).with_name("openapi.yaml")
# The board (Jinja2), the metrics registry (prometheus_client) and the
# OpenAPI document (YAML) load on first use: a cold start serving the API or
# an alert pays for none of them.
_lazy: dict = {}


@cache
def _publisher():
    from shared.publisher import Publisher

    return Publisher(config)


@cache
def _query_api():
    from functions.query.api import QueryApi

    return QueryApi(config, _publisher())


@cache
def _noise_api():
    from functions.query.noise_api import NoiseApi

    return NoiseApi(config, _publisher(), _query_api().actor)


def _board():
    if "board" not in _lazy:
        from functions.query.board import Board

        _lazy["board"] = Board(config, _publisher())
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

            _lazy["noise_board"] = NoiseBoard(_board(), _noise_api())
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
        check_bearer(request, config.api_token, config.api_users)
    from functions.query import metrics

    if "registry" not in _lazy:
        _lazy["registry"] = metrics.build_registry()
    from sqlalchemy.exc import SQLAlchemyError

    from shared import db

    try:
        # Its ~15 statements together within the query's statement bound (8 s),
        # inside Prometheus's scrape timeout (10 s), not each of them.
        with db.deadline(config.db_statement_timeout_seconds):
            body = metrics.render(_lazy["registry"])
    except SQLAlchemyError as exc:
        bound = db.bound_reached(exc)
        if bound is not None:
            raise ServiceUnavailable(f"the database did not answer within this request's {db.bound_described(exc)}; "
                                     "metrics cannot be computed, retry later", bound=bound) from None
        if db.is_transient(exc):
            raise ServiceUnavailable("the database is unavailable; metrics cannot be computed") from None
        raise
    return Response(body, mimetype="text/plain", headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _openapi(request):
    if "openapi" not in _lazy:
        import yaml

        _lazy["openapi"] = yaml.safe_load(OPENAPI_FILE.read_text())
    return json_response(_lazy["openapi"])


@built_on_first_request
def ROUTES() -> list[Route]:
    from functions.query.backlog_api import BacklogApi
    from functions.query.proposals_api import ProposalsApi

    api = _query_api()
    backlog = BacklogApi(config, _publisher(), api.actor)
    noise = _noise_api()
    proposals = ProposalsApi(config, _publisher(), api.actor)
    return [
        Route("GET", "/health", health, auth=False),
        Route("GET", "/metrics", _metrics, auth=False),  # the handler applies METRICS_PUBLIC
        Route("GET", "/openapi.json", _openapi),
        Route("GET", "/incidents", api.list),
        Route("GET", "/incidents/{incident_id}", api.get),
        Route("PATCH", "/incidents/{incident_id}", api.patch),
        # Noise control (functions/query/noiseapi.py).
        Route("POST", "/incidents/{incident_id}/acknowledge", noise.acknowledge),
        Route("GET", "/incidents/{incident_id}/silences", noise.list_silences),
        Route("POST", "/incidents/{incident_id}/silences", noise.create_silence),
        Route("DELETE", "/incidents/{incident_id}/silences/{silence_id}", noise.expire_silence),
        Route("GET", "/maintenance-windows", noise.list_windows),
        Route("POST", "/maintenance-windows", noise.create_window),
        Route("GET", "/maintenance-windows/{window_id}", noise.get_window),
        Route("POST", "/maintenance-windows/{window_id}/end", noise.end_window),
        Route("DELETE", "/maintenance-windows/{window_id}", noise.delete_window),
        Route("GET", "/suppressed-alerts", noise.suppressed),
        Route("GET", "/incidents/{incident_id}/proposals", proposals.list),
        Route("GET", "/incidents/{incident_id}/proposals/{proposal_id}", proposals.get),
        Route("POST", "/incidents/{incident_id}/proposals/{proposal_id}/approve", proposals.approve),
        Route("POST", "/incidents/{incident_id}/proposals/{proposal_id}/reject", proposals.reject),
        Route("GET", "/dead-letters", backlog.dead_letters),
        Route("POST", "/dead-letters/{letter_id}/redeliver", backlog.redeliver_dead_letter),
        Route("GET", "/outbox/parked", backlog.parked),
        Route("POST", "/outbox/parked/{event_id}/redeliver", backlog.redeliver_parked),
        # The board authenticates with its own session cookie (functions/query/board.py).
        Route("GET", "/", lambda r: Response(status=303, headers={"Location": "/ui"}), auth=False),
        Route("GET", "/ui", _ui("index"), auth=False),
        Route("GET", "/ui/login", _ui("login_form"), auth=False),
        Route("POST", "/ui/login", _ui("login"), auth=False),
        Route("POST", "/ui/logout", _ui("logout"), auth=False),
        Route("GET", "/ui/static/board.css", _ui("stylesheet"), auth=False),
        Route("GET", "/ui/incidents/{incident_id}", _ui("incident"), auth=False),
        Route("POST", "/ui/incidents/{incident_id}/status", _ui("transition"), auth=False),
        Route("POST", "/ui/incidents/{incident_id}/acknowledge", _ui("acknowledge"), auth=False),
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
    if len(request.query_string) > MAX_QUERY_STRING and (request.path == "/ui" or request.path.startswith("/ui/")):
        # A person reads the board's answer: its error page, not the API's JSON 400.
        return _board().query_too_long(request, MAX_QUERY_STRING)
    return dispatch(request, ROUTES, config.api_token, "query", MAX_QUERY_STRING, users=config.api_users)
