"""Errors Flask raises before a function runs get the same JSON body as
ours (shared.http.install_json_errors), and /health says whether the
database answers - in-process, on a function's real functions-framework app.
Only the healthy /health needs conftest (the session's migrated database:
health reads the schema's revision); the rest runs without a database."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flask import abort
from werkzeug.exceptions import HTTPException, InternalServerError, default_exceptions

from shared import config as config_module
from shared import db
from shared.http import health

ROOT = Path(__file__).resolve().parent.parent
SERVER_URL = os.environ.get("TEST_DATABASE_URL") or "postgresql+pg8000://postgres@127.0.0.1:5432/postgres"
UNREACHABLE = "postgresql+pg8000://postgres@127.0.0.1:1/nowhere"


class ClientClosedRequest(HTTPException):
    code = 499
    description = "the client went away"


def _raise_499():
    raise ClientClosedRequest()


def _crash():
    raise RuntimeError("database password in a traceback")


@pytest.fixture(scope="module")
def app():
    import functions_framework

    saved = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = UNREACHABLE
    config_module.reset_settings_cache()
    db.dispose_engine()
    application = functions_framework.create_app("deadletter", str(ROOT / "functions" / "deadletter" / "main.py"))
    for code in (400, 404, 405, 413, 415, 418, 503):
        application.add_url_rule(f"/raise-{code}", f"raise_{code}", lambda code=code: abort(code))
    application.add_url_rule("/raise-499", "raise_499", _raise_499)
    application.add_url_rule("/crash", "crash", _crash)
    yield application
    if saved is None:
        os.environ.pop("DATABASE_URL", None)
    else:
        os.environ["DATABASE_URL"] = saved
    config_module.reset_settings_cache()
    db.dispose_engine()


def answer(app, path, method="GET"):
    response = app.test_client().open(path, method=method)
    return response.status_code, response.get_json(), response.mimetype


def test_a_path_flask_cannot_route_is_a_json_404(app):
    status, body, mimetype = answer(app, "/a%0Ab")
    assert (status, body["error"], mimetype) == (404, "not_found", "application/json")


@pytest.mark.parametrize("code, error", [(413, "payload_too_large"), (415, "unsupported_media_type")])
def test_flask_errors_with_a_type_of_ours_keep_their_status(app, code, error):
    status, body, _ = answer(app, f"/raise-{code}")
    assert (status, body["error"]) == (code, error) and body["message"]


@pytest.mark.parametrize("code", [400, 418])
def test_other_client_errors_are_bad_requests_with_their_status(app, code):
    status, body, _ = answer(app, f"/raise-{code}")
    assert (status, body["error"]) == (code, "bad_request") and body["message"]


def test_a_server_error_from_flask_says_nothing_more(app):
    status, body, _ = answer(app, "/raise-503")
    assert (status, body) == (503, {"error": "internal_error", "message": "internal error"})


def test_the_function_itself_still_answers_through_dispatch(app):
    status, body, _ = answer(app, "/", "PROPFIND")
    assert (status, body["message"]) == (405, "PROPFIND is not allowed on /; allowed: POST")


def test_health_is_503_when_the_database_does_not_answer(app):
    status, body, _ = answer(app, "/health")
    assert (status, body) == (503, {"status": "unhealthy", "database": "disconnected"})


def test_health_is_200_when_it_does(app, database_url):
    # The session's database: migrated, so its schema is the code's (shared/schema.py).
    engine = db.create_engine_for(database_url, pool_size=1, max_overflow=0)
    try:
        assert db.database_reachable(engine)
        with app.test_request_context("/health"):
            os.environ["DATABASE_URL"] = database_url
            config_module.reset_settings_cache()
            db.dispose_engine()
            try:
                from flask import request

                response = health(request)
            finally:
                os.environ["DATABASE_URL"] = UNREACHABLE
                config_module.reset_settings_cache()
                db.dispose_engine()
        assert (response.status_code, response.get_json()) == (200, {"status": "healthy", "database": "connected"})
    finally:
        engine.dispose()


@pytest.mark.parametrize("code, error", [(404, "not_found"), (405, "method_not_allowed"), (413, "payload_too_large"),
                                         (415, "unsupported_media_type"), (400, "bad_request"), (418, "bad_request")])
def test_a_flask_error_keeps_werkzeugs_description_as_its_message(app, code, error):
    status, body, _ = answer(app, f"/raise-{code}")
    assert (status, body) == (code, {"error": error, "message": default_exceptions[code].description})


def test_a_client_error_just_under_500_is_a_bad_request_with_its_status(app):
    status, body, _ = answer(app, "/raise-499")
    assert (status, body) == (499, {"error": "bad_request", "message": "the client went away"})


def test_a_500_says_nothing_more(app):
    handler = app.error_handler_spec[None][None][HTTPException]
    response = handler(InternalServerError("database password in a traceback"))
    assert (response.status_code, response.get_json()) == (500, {"error": "internal_error", "message": "internal error"})


def test_a_crash_outside_dispatch_is_a_json_500_that_says_nothing_more(app):
    # Flask turns the exception into a 500, for which functions-framework
    # registered its own plain-text crash handler; ours replaces it.
    status, body, mimetype = answer(app, "/crash")
    assert (status, body, mimetype) == (500, {"error": "internal_error", "message": "internal error"}, "application/json")


def test_an_http_error_without_a_code_or_description_is_a_bare_500(app):
    # Flask hands a codeless HTTPException back unhandled; the handler still
    # answers it as an internal error should one ever reach it.
    handler = app.error_handler_spec[None][None][HTTPException]
    response = handler(HTTPException())
    assert (response.status_code, response.get_json()) == (500, {"error": "internal_error", "message": "internal error"})


def test_a_client_error_without_a_description_says_bad_request(app):
    handler = app.error_handler_spec[None][None][HTTPException]
    exc = ClientClosedRequest()
    exc.description = None
    response = handler(exc)
    assert (response.status_code, response.get_json()) == (499, {"error": "bad_request", "message": "bad request"})
