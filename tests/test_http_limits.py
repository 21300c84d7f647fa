"""The shared HTTP layer's limits in-process: exact body bounds, the capped
``wsgi.input`` every function is served through, text PostgreSQL can store,
input nested past the parser's stack, and the finer points of routing, the
bearer token and the error mapping. (No database and no conftest: the
mutation run uses it with ``--noconftest``; the same limits over real
processes are in tests/test_request_bodies.py and tests/test_hostile_input.py.)"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import types

import pytest
from flask import Flask, Request, request
from sqlalchemy.exc import OperationalError
from werkzeug.test import EnvironBuilder

from shared import errors, eventio
from shared.config import Secret
from shared.http import (
    LARGEST_FIXED_BODY,
    TOO_DEEP,
    CappedInput,
    Route,
    bound_request_bodies,
    check_bearer,
    dispatch,
    parse_json_body,
    read_body,
    storable_text,
)

APP = Flask(__name__)
TOKEN = "s3cret-token-value"
BODY = b"0123456789"


def call(routes, method="GET", path="/x", headers=None, token=None):
    with APP.test_request_context(path, method=method, headers=headers or {}):
        return dispatch(request, routes, token, "test")


def raising(exc):
    def handler(req, **_):
        raise exc
    return handler


def chunked(data: bytes) -> tuple[Request, io.BytesIO]:
    """A request without Content-Length whose stream is the raw input, as a
    server presents a chunked upload."""
    raw = io.BytesIO(data)
    environ = EnvironBuilder(path="/", method="POST", input_stream=raw).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input_terminated"] = True
    return Request(environ), raw


# --- read_body: the exact limit ------------------------------------------------

def test_a_declared_body_of_exactly_the_limit_is_read():
    with APP.test_request_context("/", method="POST", data=BODY):
        assert read_body(request, 10) == BODY


@pytest.mark.parametrize("limit", [10, 11])
def test_an_undeclared_body_one_byte_over_an_odd_or_even_limit_is_refused(limit):
    req, _ = chunked(b"x" * (limit + 1))
    with pytest.raises(errors.PayloadTooLarge, match=f"^body is over the limit of {limit} bytes$"):
        read_body(req, limit)


def test_an_undeclared_body_at_the_limit_is_read_whole():
    req, _ = chunked(b"x" * 11)
    assert read_body(req, 11) == b"x" * 11


def test_an_oversized_undeclared_body_is_read_no_further_than_one_byte_past_the_limit():
    req, raw = chunked(b"x" * 100)
    with pytest.raises(errors.PayloadTooLarge):
        read_body(req, 10)
    assert raw.tell() == 11


def test_a_body_the_capped_input_cut_is_refused_though_its_declared_length_fits():
    environ = EnvironBuilder(path="/", method="POST", data=b"x" * 20).get_environ()
    environ["wsgi.input"] = CappedInput(environ["wsgi.input"], 10)
    with pytest.raises(errors.PayloadTooLarge, match="^body is over the limit of 100 bytes$"):
        read_body(Request(environ), 100)


def test_the_bound_covers_the_largest_fixed_limit_a_function_reads():
    from functions.deadletter import handler as deadletter

    # Every fixed read_body limit; the query API's 64 KiB PATCH limit is inline.
    assert LARGEST_FIXED_BODY == max(deadletter.MAX_BYTES, eventio.MAX_EVENT_BYTES, 64 * 1024)


# --- CappedInput ---------------------------------------------------------------

def capped(data: bytes = BODY, cap: int = 10) -> tuple[CappedInput, io.BytesIO]:
    raw = io.BytesIO(data)
    return CappedInput(raw, cap), raw


def test_a_body_of_exactly_the_cap_is_read_whole_and_not_truncated():
    stream, _ = capped(BODY, 10)
    assert stream.truncated is False
    assert stream.read() == BODY and stream.truncated is False
    assert stream.read() == b"" and stream.truncated is False


def test_a_body_one_byte_over_the_cap_ends_at_the_cap_and_is_marked_truncated():
    stream, raw = capped(BODY + b"X" + b"Y" * 50, 10)
    assert stream.read() == BODY and stream.truncated is True
    assert stream.read() == b"" and stream.read(5) == b"" and stream.readline() == b""
    # One byte past the cap says it was cut; the rest is never read.
    assert raw.tell() == 11


@pytest.mark.parametrize("size", [-1, -5, None])
def test_read_without_a_positive_size_reads_to_the_cap(size):
    stream, _ = capped(BODY + b"more", 10)
    assert stream.read(size) == BODY


def test_read_takes_at_most_size_and_reads_in_pieces_without_losing_a_byte():
    stream, raw = capped(BODY, 10)
    assert stream.read(0) == b""
    assert stream.read(1) == b"0"
    assert stream.read(3) == b"123"
    assert raw.tell() == 4
    assert stream.read(5) == b"45678"
    assert stream.read(1) == b"9" and stream.truncated is False
    assert stream.read(1) == b""


def test_a_small_body_under_the_cap_is_not_truncated():
    stream, _ = capped(b"abc", 10)
    assert stream.read(100) == b"abc" and stream.truncated is False


def test_readline_stops_at_a_line_end_at_size_and_at_the_cap():
    stream, _ = capped(b"ab\ncdef\nghijklmnop", 12)
    assert stream.readline() == b"ab\n"
    assert stream.readline(0) == b""
    assert stream.readline(1) == b"c"
    assert stream.readline(None) == b"def\n"
    assert stream.readline(-1) == b"ghij" and stream.truncated is True
    assert stream.readline() == b""


def test_readline_with_no_size_reads_a_whole_line():
    stream, _ = capped(b"abcdef\nxyz", 100)
    assert stream.readline() == b"abcdef\n"


def test_iteration_yields_the_lines_up_to_the_cap():
    stream, _ = capped(b"a\nbb\nccc\ndddd\n", 9)
    assert list(stream) == [b"a\n", b"bb\n", b"ccc\n"] and stream.truncated is True


def test_readlines_returns_the_lines_up_to_the_cap():
    # PEP 3333 requires readlines of wsgi.input.
    stream, _ = capped(b"a\nbb\nccc\ndddd\n", 7)
    assert stream.readlines() == [b"a\n", b"bb\n", b"cc"] and stream.truncated is True
    stream, _ = capped(b"a\nbb\nccc\n", 100)
    assert stream.readlines(2) == [b"a\n"]
    assert stream.readlines(1) == [b"bb\n"]
    assert stream.readlines(0) == [b"ccc\n"] and stream.readlines() == [] and stream.truncated is False


def test_readlines_stops_once_the_hint_is_reached_as_io_does():
    body = b"a\nbb\nccc\n"
    for hint in (None, -1, 0):  # no hint: every line
        assert capped(body, 100)[0].readlines(hint) == io.BytesIO(body).readlines(hint) == [b"a\n", b"bb\n", b"ccc\n"]
    for hint, lines in ((2, [b"a\n"]), (3, [b"a\n", b"bb\n"]), (5, [b"a\n", b"bb\n"]), (6, [b"a\n", b"bb\n", b"ccc\n"])):
        assert capped(body, 100)[0].readlines(hint) == io.BytesIO(body).readlines(hint) == lines, hint


def test_bound_request_bodies_caps_what_any_reader_of_the_app_gets():
    app = Flask("capped")

    @app.post("/")
    def echo():
        data = request.stream.read(100)
        return {"read": len(data), "truncated": request.environ["wsgi.input"].truncated}

    bound_request_bodies(app, 10)
    client = app.test_client()
    assert client.post("/", data=b"x" * 10).get_json() == {"read": 10, "truncated": False}
    assert client.post("/", data=b"x" * 50).get_json() == {"read": 10, "truncated": True}


# --- parse_json_body -----------------------------------------------------------

def _json_of(data, content_type="application/json", limit=1000, allow_empty=False):
    with APP.test_request_context("/", method="POST", data=data, content_type=content_type):
        return parse_json_body(request, limit, allow_empty=allow_empty)


def test_a_blank_body_is_no_body_only_where_the_caller_allows_one():
    """An optional body (the noise and proposal endpoints): blank is None
    there, and a body is still parsed; elsewhere blank is not JSON."""
    for blank in (b"", b" \r\n\t"):
        assert _json_of(blank, allow_empty=True) is None
        with pytest.raises(errors.BadRequest, match="^the body is not valid JSON"):
            _json_of(blank)
    assert _json_of(b' {"a": 1} ', allow_empty=True) == {"a": 1}


def test_an_empty_body_sent_with_a_content_length_is_not_told_to_send_one():
    """Content-Length: 0 is framed: the framing hint is for a request with
    neither a Content-Length nor chunked coding (HTTP/1.0 without a length)."""
    with APP.test_request_context("/", method="POST", data=b"", content_type="application/json",
                                  environ_overrides={"CONTENT_LENGTH": "0"}):
        with pytest.raises(errors.BadRequest) as caught:
            parse_json_body(request, 1000)
    assert caught.value.message == "the body is not valid JSON: it is empty"


def test_query_routes_do_not_read_text_plain_or_content_codings():
    """Only webhook routes undo what relays do; a query route reads the body
    as sent, as before codings were read at all."""
    with APP.test_request_context("/", method="POST", data=b"{}", content_type="text/plain"):
        with pytest.raises(errors.UnsupportedMediaType, match="expected Content-Type application/json, got text/plain$"):
            parse_json_body(request, 1000)
    with APP.test_request_context("/", method="POST", data=b'{"a": 1}', content_type="application/json",
                                  headers={"Content-Encoding": "br"}):
        assert parse_json_body(request, 1000) == {"a": 1}


def test_a_webhook_route_names_both_media_types_it_reads():
    with APP.test_request_context("/", method="POST", data=b"{}", content_type="text/csv"):
        with pytest.raises(errors.UnsupportedMediaType, match="expected Content-Type application/json or text/plain, got text/csv$"):
            parse_json_body(request, 1000, webhook=True)


@pytest.mark.parametrize("content_type", ["application/javascript", "application/jsonx", "text/json"])
def test_a_media_type_that_is_not_json_is_refused_whatever_its_spelling(content_type):
    with pytest.raises(errors.UnsupportedMediaType, match=f"got {content_type}$"):
        _json_of(b"{}", content_type)


def test_json_nested_past_the_parsers_stack_is_a_bad_request_saying_so():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(errors.BadRequest, match=f"^{TOO_DEEP}$"):
        _json_of(deep, limit=len(deep))


def test_a_recursion_error_from_a_handler_is_a_400_not_a_500():
    response = call([Route("GET", "/x", raising(RecursionError("deep")), auth=False)])
    assert response.status_code == 400
    assert response.get_json() == {"error": "bad_request", "message": "the request is nested too deeply"}


# --- storable_text -------------------------------------------------------------

def refusal(value, name="summary", max_length=None) -> errors.BadRequest:
    with pytest.raises(errors.BadRequest) as caught:
        storable_text(value, name, max_length)
    return caught.value


def test_a_nul_is_refused_naming_the_field():
    err = refusal("a\x00b", "labels.team")
    assert err.message == "labels.team: contains a NUL character"
    assert err.body() == {"error": "bad_request", "message": err.message, "field": "labels.team"}


@pytest.mark.parametrize("char, code", [("\ud800", "D800"), ("\udbff", "DBFF"), ("\udc00", "DC00"), ("\udfff", "DFFF")])
def test_a_lone_surrogate_is_refused_naming_it(char, code):
    err = refusal(f"x{char}y", "note")
    assert err.message == f"note: contains a lone UTF-16 surrogate (U+{code})" and err.details == {"field": "note"}


def test_the_first_unstorable_character_is_the_one_named():
    assert refusal("\udfffa\x00").message == "summary: contains a lone UTF-16 surrogate (U+DFFF)"
    assert refusal("a\x00\ud800").message == "summary: contains a NUL character"


def test_text_is_returned_unchanged_up_to_max_length_and_refused_past_it():
    assert storable_text("", "s", 0) == ""
    assert storable_text("abc", "s", 3) == "abc"
    assert storable_text("ab", "s", 3) == "ab"
    assert storable_text("x" * 300, "s", 300) == "x" * 300
    err = refusal("abcd", "title", 3)
    assert err.message == "title: longer than 3 characters" and err.details == {"field": "title"}
    assert refusal("x" * 301, "s", 300).message == "s: longer than 300 characters"


def test_without_max_length_any_length_of_ordinary_text_is_storable():
    text = "café \U0001f525 \t\n" * 1000
    assert storable_text(text, "s") is text


# --- check_bearer --------------------------------------------------------------

def bearer(header: str | None, token: str | None = TOKEN) -> bool:
    headers = {} if header is None else {"Authorization": header}
    with APP.test_request_context("/", headers=headers):
        try:
            check_bearer(request, None if token is None else Secret(token))
        except errors.Unauthorized:
            return False
        return True


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"BEARER {TOKEN}", f"bEaReR {TOKEN}", f"Bearer   {TOKEN}  "])
def test_the_scheme_is_any_case_and_spaces_around_the_token_do_not_matter(header):
    assert bearer(header)


@pytest.mark.parametrize("header", [
    f"Token {TOKEN}", f"Zzz {TOKEN}", f"Basic {TOKEN}", f"Bearerx {TOKEN}", f"Bearer{TOKEN}", "Bearer", "Bearer ",
    "Bearer    ", f" Bearer {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "", None,
])
def test_anything_but_the_bearer_scheme_with_the_exact_token_is_refused(header):
    assert not bearer(header)


def test_no_configured_token_refuses_even_a_presented_one():
    assert not bearer(f"Bearer {TOKEN}", None)


# --- routing -------------------------------------------------------------------

def ok(req, **params):
    return {"params": params}


@dataclasses.dataclass
class Tally:
    calls: int = 0


def test_a_route_is_immutable_and_hashable():
    route = Route("GET", "/x", ok)
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.method = "POST"  # type: ignore[misc]
    assert {route: 1}[Route("GET", "/x", ok)] == 1


@pytest.mark.parametrize("pattern, path, params", [
    ("/things", "/things", {}), ("/things", "/things/", {}), ("/things/", "/things", {}),
    ("/things/{id}", "/things/a-b", {"id": "a-b"}), ("/things/{id}/notes", "/things/7/notes/", {"id": "7"}),
    ("/", "/", {}),
])
def test_a_pattern_matches_with_or_without_a_trailing_slash(pattern, path, params):
    assert Route("GET", pattern, ok).match(path) == params


@pytest.mark.parametrize("pattern, path", [
    ("/things", "/things//"), ("/things/{id}", "/things/"), ("/things/{id}", "/things/a/b"), ("/", "/x"),
    ("/things", "/thing"), ("/things", "/things/x"),
])
def test_a_pattern_does_not_match_other_paths(pattern, path):
    assert Route("GET", pattern, ok).match(path) is None


def test_head_is_served_by_a_get_route_whatever_string_object_names_the_method():
    method = "".join(["G", "E", "T"])  # not the interned literal
    response = call([Route(method, "/x", ok, auth=False)], "HEAD")
    assert response.status_code == 200


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH", "PUT", "OPTIONS"])
def test_head_is_not_served_by_a_route_for_another_method(method):
    response = call([Route(method, "/x", ok, auth=False)], "HEAD")
    assert response.status_code == 405 and response.headers["Allow"] == method


def test_the_allow_header_lists_each_method_on_the_path_once_sorted():
    routes = [Route("POST", "/x", ok), Route("GET", "/x", ok), Route("POST", "/x/", ok), Route("DELETE", "/y", ok)]
    response = call(routes, "PUT")
    assert response.status_code == 405 and response.headers["Allow"] == "GET, POST"
    assert response.get_json()["message"] == "PUT is not allowed on /x; allowed: GET, POST"


# --- the error mapping ---------------------------------------------------------

class GatewayTimeout(errors.ApiError):
    status = 504
    code = "gateway_timeout"


class ClientClosedRequest(errors.ApiError):
    status = 499
    code = "client_closed"


def test_only_503_asks_for_a_retry_after():
    response = call([Route("GET", "/x", raising(GatewayTimeout("slow")), auth=False)])
    assert response.status_code == 504 and "Retry-After" not in response.headers
    assert response.get_json() == {"error": "gateway_timeout", "message": "slow"}


def test_a_status_just_under_500_is_not_logged_as_a_failure(caplog):
    with caplog.at_level(logging.ERROR, logger="http"):
        response = call([Route("GET", "/x", raising(ClientClosedRequest("gone")), auth=False)])
    assert response.status_code == 499 and caplog.records == []


def test_a_database_error_is_logged_by_its_first_line_cut_at_300_characters(caplog):
    first = "f" * 400
    exc = OperationalError("SELECT 1", {}, ConnectionRefusedError(f"{first}\nsecond line"))
    with caplog.at_level(logging.ERROR, logger="http"):
        response = call([Route("GET", "/x", raising(exc), auth=False)])
    assert response.status_code == 503
    (record,) = [r for r in caplog.records if r.getMessage() == "Database error"]
    assert record.error == "OperationalError: " + ("(builtins.ConnectionRefusedError) " + first)[:300]
    assert record.transient is True


def test_a_request_is_timed_in_milliseconds_to_two_places(caplog, monkeypatch):
    import shared.http

    ticks = iter([100.0, 100.123456])
    monkeypatch.setattr(shared.http, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    with caplog.at_level(logging.DEBUG, logger="http"):
        call([Route("GET", "/x", ok, auth=False)])
    (record,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert record.ms == 123.46


def test_json_response_bodies_are_json_with_the_status_and_headers():
    from shared.http import json_response

    response = json_response({"a": [1, "é"]})
    assert (response.status_code, response.mimetype, json.loads(response.get_data())) == (200, "application/json", {"a": [1, "é"]})
    assert response.get_data() == '{"a": [1, "é"]}'.encode()
    assert "Retry-After" not in json_response(None, 503).headers
    assert json_response(None, 204, {}).status_code == 204


def test_a_body_is_a_content_length_above_zero_or_a_chunked_one():
    from shared.http import has_body

    def request(headers, data=b""):
        environ = EnvironBuilder(method="POST", path="/", data=data, headers=headers).get_environ()
        if "Content-Length" not in headers:
            environ.pop("CONTENT_LENGTH", None)
        return Request(environ)

    assert has_body(request({"Content-Length": "2"}, b"{}"))
    # Chunked: no Content-Length at all, and still a body.
    assert has_body(request({"Transfer-Encoding": "Chunked"}))
    assert not has_body(request({"Content-Length": "0"}))
    assert not has_body(request({}))
