"""The shared HTTP layer in-process: routing, the bearer token, body limits,
JSON, and the one place where typed errors become statuses (no database, so
the mutation run uses it with ``--noconftest``; the same contract over real
processes is in tests/test_status_contract.py and the function tests)."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import pytest
from flask import Flask, Response, request
from sqlalchemy.exc import IntegrityError, OperationalError

from shared import errors
from shared.config import Secret
from shared.http import Route, check_bearer, dispatch, json_response, parse_json_body, read_body

APP = Flask(__name__)
TOKEN = "s3cret-token-value"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


TOKEN_SECRET = Secret(TOKEN)


def call(routes, method="GET", path="/things", headers=None, data=None, token=TOKEN_SECRET, content_type=None):
    with APP.test_request_context(path, method=method, headers=headers or {}, data=data, content_type=content_type):
        return dispatch(request, routes, token, "test")


def body(response: Response):
    return json.loads(response.get_data())


def raising(exc):
    def handler(req, **_):
        raise exc
    return handler


ROUTES = [
    Route("GET", "/things", lambda r: {"things": []}),
    Route("GET", "/things/{thing_id}", lambda r, thing_id: {"id": thing_id}),
    Route("PATCH", "/things/{thing_id}", lambda r, thing_id: Response("patched", status=200)),
    Route("GET", "/open", lambda r: {"open": True}, auth=False),
    Route("GET", "/", lambda r: {"root": True}, auth=False),
]


def test_routes_match_with_path_parameters_and_an_optional_trailing_slash():
    assert body(call(ROUTES, path="/things/abc", headers=AUTH)) == {"id": "abc"}
    assert body(call(ROUTES, path="/things/", headers=AUTH)) == {"things": []}
    assert body(call(ROUTES, path="/", headers={})) == {"root": True}
    assert call(ROUTES, path="/things/a/b", headers=AUTH).status_code == 404
    assert call(ROUTES, path="/xthings", headers=AUTH).status_code == 404


def test_a_handler_response_is_returned_as_is_and_a_value_as_json():
    response = call(ROUTES, "PATCH", "/things/x", headers=AUTH)
    assert (response.status_code, response.get_data(as_text=True)) == (200, "patched")
    ok = call(ROUTES, headers=AUTH)
    assert ok.status_code == 200 and ok.mimetype == "application/json"


def test_head_is_served_by_a_get_route():
    assert call(ROUTES, "HEAD", "/open").status_code == 200


def test_unknown_path_is_404_naming_it():
    response = call(ROUTES, path="/nope", headers=AUTH)
    assert response.status_code == 404 and body(response) == {"error": "not_found", "message": "no such endpoint: /nope"}


def test_wrong_method_is_405_with_allow():
    response = call(ROUTES, "DELETE", "/things/x", headers=AUTH)
    assert response.status_code == 405 and response.headers["Allow"] == "GET, PATCH"
    assert body(response)["message"] == "DELETE is not allowed on /things/x; allowed: GET, PATCH"
    assert body(response)["error"] == "method_not_allowed"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": "Bearer "}, {"Authorization": TOKEN}])
def test_missing_or_wrong_token_is_401_with_a_challenge(headers, caplog):
    with caplog.at_level(logging.WARNING, logger="http"):
        response = call(ROUTES, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="incident-response"'
    assert body(response) == {"error": "unauthorized", "message": "a valid bearer token is required"}
    assert [r.getMessage() for r in caplog.records] == ["Unauthorized"]


def test_the_token_scheme_is_case_insensitive_and_spaces_are_trimmed():
    assert call(ROUTES, headers={"Authorization": f"bearer  {TOKEN} "}).status_code == 200


def test_no_configured_token_refuses_everything_but_open_routes():
    assert call(ROUTES, headers=AUTH, token=None).status_code == 401
    assert call(ROUTES, path="/open", token=None).status_code == 200


def test_check_bearer_alone():
    with APP.test_request_context("/", headers=AUTH):
        check_bearer(request, Secret(TOKEN))
        with pytest.raises(errors.Unauthorized):
            check_bearer(request, Secret(TOKEN + "x"))


@pytest.mark.parametrize("exc, status, code", [
    (errors.BadRequest("bad"), 400, "bad_request"),
    (errors.Forbidden("not an approver"), 403, "forbidden"),
    (errors.NotFound("gone"), 404, "not_found"),
    (errors.Conflict("busy"), 409, "conflict"),
    (errors.PayloadTooLarge("big"), 413, "payload_too_large"),
    (errors.UnsupportedMediaType("xml"), 415, "unsupported_media_type"),
    (errors.BadGateway("pd down"), 502, "bad_gateway"),
    (errors.ApiError("boom"), 500, "internal_error"),
])
def test_typed_errors_map_to_their_status_in_one_place(exc, status, code):
    response = call([Route("GET", "/x", raising(exc), auth=False)], path="/x")
    assert response.status_code == status and body(response) == {"error": code, "message": exc.message}
    assert "Retry-After" not in response.headers


def test_service_unavailable_is_503_with_retry_after():
    response = call([Route("GET", "/x", raising(errors.ServiceUnavailable("later")), auth=False)], path="/x")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert body(response) == {"error": "unavailable", "message": "later"}


def test_invalid_transition_names_what_is_allowed():
    exc = errors.InvalidTransition("closed", "open", [])
    response = call([Route("GET", "/x", raising(exc), auth=False)], path="/x")
    assert response.status_code == 409
    assert body(response) == {
        "error": "invalid_transition",
        "message": "cannot move an incident from closed to open; allowed from closed: none (closed is final)",
        "current_status": "closed", "requested_status": "open", "allowed": [],
    }
    assert errors.InvalidTransition("open", "closed", ["investigating", "resolved"]).message.endswith("allowed from open: investigating, resolved")


def test_a_transient_database_error_is_503_and_a_permanent_one_500(caplog):
    transient = OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    with caplog.at_level(logging.ERROR, logger="http"):
        response = call([Route("GET", "/x", raising(transient), auth=False)], path="/x")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert body(response) == {"error": "unavailable", "message": "the database is unavailable, retry later"}
    (record,) = [r for r in caplog.records if r.getMessage() == "Database error"]
    assert record.transient is True and record.error.startswith("OperationalError: ")
    permanent = IntegrityError("INSERT", {}, Exception({"C": "23505", "M": "duplicate"}))
    response = call([Route("GET", "/x", raising(permanent), auth=False)], path="/x")
    assert response.status_code == 500 and "Retry-After" not in response.headers
    assert body(response) == {"error": "internal_error", "message": "internal error"}


def test_an_unexpected_exception_is_a_logged_500_and_the_next_request_is_served(caplog):
    routes = [Route("GET", "/x", raising(KeyError("surprise")), auth=False), Route("GET", "/y", lambda r: {"ok": 1}, auth=False)]
    with caplog.at_level(logging.ERROR, logger="http"):
        response = call(routes, path="/x")
    assert response.status_code == 500 and body(response) == {"error": "internal_error", "message": "internal error"}
    assert [r.getMessage() for r in caplog.records] == ["Unhandled error"] and caplog.records[0].exc_info
    assert call(routes, path="/y").status_code == 200


def test_server_errors_are_logged_client_errors_are_not(caplog):
    with caplog.at_level(logging.ERROR, logger="http"):
        call([Route("GET", "/x", raising(errors.BadRequest("bad")), auth=False)], path="/x")
        assert caplog.records == []
        call([Route("GET", "/x", raising(errors.BadGateway("pd")), auth=False)], path="/x")
    (record,) = caplog.records
    assert (record.getMessage(), record.status, record.error) == ("Request failed", 502, "pd")


def _body_of(data, limit, content_type="application/json", headers=None):
    with APP.test_request_context("/", method="POST", data=data, content_type=content_type, headers=headers or {}):
        return read_body(request, limit)


def test_read_body_takes_up_to_the_limit_and_refuses_more():
    assert _body_of(b"x" * 10, 10) == b"x" * 10
    with pytest.raises(errors.PayloadTooLarge, match="body of 11 bytes is over the limit of 10 bytes"):
        _body_of(b"x" * 11, 10)


def test_read_body_refuses_an_undeclared_oversized_stream():
    import io

    from flask import Request
    from werkzeug.test import EnvironBuilder

    # A chunked upload: no Content-Length, the server marks the input terminated.
    environ = EnvironBuilder(path="/", method="POST", input_stream=io.BytesIO(b"x" * 16)).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input_terminated"] = True
    chunked = Request(environ)
    assert chunked.content_length is None
    with pytest.raises(errors.PayloadTooLarge, match="^body is over the limit of 10 bytes$"):
        read_body(chunked, 10)


def _json_of(data, content_type="application/json"):
    with APP.test_request_context("/", method="POST", data=data, content_type=content_type):
        return parse_json_body(request, 1000)


def test_parse_json_body_accepts_json_and_plus_json():
    assert _json_of(b'{"a": 1}') == {"a": 1}
    assert _json_of(b'{"a": 1}', "application/cloudevents+json") == {"a": 1}
    assert _json_of(b'[1]', None) == [1]


def test_parse_json_body_names_the_problem():
    with pytest.raises(errors.UnsupportedMediaType, match="expected Content-Type application/json, got text/plain"):
        _json_of(b"{}", "text/plain")
    with pytest.raises(errors.BadRequest, match=r"^the body is not valid JSON: Expecting value at line 2 column 1$"):
        _json_of(b'\n')
    with pytest.raises(errors.BadRequest, match="^the body is not UTF-8 text$"):
        _json_of(b'{"a": "\xff"}')


def test_json_response_keeps_unicode_and_formats_times():
    response = json_response({"name": "café", "at": datetime(2026, 11, 27, 10, 0, 0)}, 201, {"X-A": "b"})
    assert response.status_code == 201 and response.headers["X-A"] == "b"
    assert "café" in response.get_data(as_text=True)
    assert body(response)["at"] == "2026-11-27T10:00:00Z"


def test_api_error_keeps_its_details():
    err = errors.Conflict("busy", holder="other")
    assert err.body() == {"error": "conflict", "message": "busy", "holder": "other"} and str(err) == "busy"
    assert errors.Unauthorized("x").status == 401 and errors.MethodNotAllowed("x").status == 405
    assert issubclass(errors.InvalidTransition, errors.Conflict) and issubclass(errors.ServiceUnavailable, errors.ApiError)


def test_an_internal_error_is_logged_at_500_too(caplog):
    with caplog.at_level(logging.ERROR, logger="http"):
        call([Route("GET", "/x", raising(errors.ApiError("boom")), auth=False)], path="/x")
    assert [(r.getMessage(), r.status) for r in caplog.records] == [("Request failed", 500)]


def test_every_request_is_timed_in_milliseconds(caplog):
    import time

    def slow(req):
        time.sleep(0.05)
        return {"ok": True}

    with caplog.at_level(logging.DEBUG, logger="http"):
        call([Route("GET", "/x", slow, auth=False)], path="/x")
    (record,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert record.path == "/x" and 50 <= record.ms < 1000 and record.ms == round(record.ms, 2)


def test_routes_built_on_first_request_are_built_once_for_concurrent_requests():
    import threading as _threading

    from shared.http import Route, built_on_first_request

    calls = []
    gate = _threading.Event()

    def build():
        calls.append(1)
        gate.wait(5)
        return [Route("GET", "/x", lambda r: {"ok": True}, auth=False)]

    routes = built_on_first_request(build)
    results = []
    threads = [_threading.Thread(target=lambda: results.append(routes())) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert calls == [1] and len(results) == 8 and all(r is results[0] for r in results)


@pytest.mark.parametrize("served", [True, False])
def test_what_the_first_request_builds_is_kept_out_of_the_collectors_passes_when_served(monkeypatch, served):
    import gc

    import shared.http as http_layer
    from shared.http import Route, built_on_first_request

    made = []

    @built_on_first_request
    def routes():
        # As a handler's imports do: objects that live as long as the process.
        made.extend([i] for i in range(5_000))
        return [Route("GET", "/x", lambda r: {"ok": True}, auth=False)]

    def collectable(obj) -> bool:
        # gc.get_objects() lists the generations the collector walks, not the frozen.
        return any(o is obj for o in gc.get_objects())

    # The entry point (shared/serve.py) sets it; unset, a process that
    # builds routes in-process (a test run) keeps its heap collectable.
    monkeypatch.setattr(http_layer, "FREEZE_AFTER_BUILD", served)
    routes()
    assert collectable(made[0]) is not served and collectable(made[-1]) is not served
    # Only the build freezes: a built set of routes answers without it.
    later = [0]
    routes()
    assert collectable(later)


def test_health_is_answered_before_the_routes_are_built_and_any_other_request_builds_them(database_url):
    from shared.http import built_on_first_request

    builds = []

    @built_on_first_request
    def routes():
        builds.append(1)
        return [Route("GET", "/things", lambda r: {"built": True}, auth=False)]

    for method in ("GET", "HEAD"):
        assert call(routes, method=method, path="/health").status_code == 200
    assert builds == [] and not routes.built
    # Another method on /health is not the health check: the routes answer it.
    assert call(routes, method="POST", path="/health").status_code == 404
    assert builds == [1]
    assert body(call(routes, path="/things")) == {"built": True} and builds == [1]


@pytest.mark.parametrize("method", ["DELETE", "CONNECT", "POST", "PUT", "PATCH", "OPTIONS"])
def test_any_method_on_health_but_get_and_head_builds_the_routes(method):
    from shared.http import built_on_first_request

    builds = []

    @built_on_first_request
    def routes():
        builds.append(1)
        return []

    call(routes, method=method, path="/health")
    assert builds == [1]
