"""The JSON log format and the masking, in-process: one JSON object per
line, fields kept, secrets masked wherever they appear. (Through real
processes: tests/test_log_masking.py.)"""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from shared import log


@pytest.fixture
def registry():
    """A registry of secrets of the test's own: the values registered here
    mask nothing in later tests."""
    return log.Secrets()


@pytest.fixture
def captured(registry):
    """A logger whose lines go to a buffer through the JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log.JsonFormatter(secrets=registry))
    logger = logging.getLogger("test-log-format")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def entries(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_fields(captured):
    logger, stream = captured
    logger.info("Received webhook", extra={"alerts": 2, "source": "am", "_private": "x"})
    logger.warning("Second %s", "line")
    first, second = entries(stream)
    assert (first["level"], first["logger"], first["message"], first["alerts"], first["source"]) == ("INFO", "test-log-format", "Received webhook", 2, "am")
    assert "_private" not in first and "args" not in first and "levelno" not in first
    assert first["time"].endswith("+00:00") and len(first["time"].split("T")[1]) == len("00:00:00.000+00:00")
    assert second["message"] == "Second line" and second["level"] == "WARNING"


def test_exceptions_are_one_field_of_the_same_line(captured):
    logger, stream = captured
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("Failed")
    (entry,) = entries(stream)
    assert "ValueError: boom" in entry["exception"] and entry["level"] == "ERROR"


def test_unicode_and_odd_values_survive(captured):
    logger, stream = captured
    logger.info("café", extra={"obj": object.__new__(type("X", (), {"__str__": lambda self: "x-value"}))})
    (entry,) = entries(stream)
    assert entry["message"] == "café" and entry["obj"] == "x-value"
    assert "café" in stream.getvalue()


def test_registered_secrets_are_masked_in_message_fields_and_tracebacks(captured, registry):
    logger, stream = captured
    registry.register("hunter2-secret")
    logger.info("token hunter2-secret in message", extra={"path": "/x/hunter2-secret", "nested": {"k": "hunter2-secret"}})
    try:
        raise RuntimeError("failed with hunter2-secret")
    except RuntimeError:
        logger.exception("Failed")
    text = stream.getvalue()
    assert "hunter2-secret" not in text and text.count("****") >= 4
    assert entries(stream)[0]["message"] == "token **** in message"


def test_short_or_empty_values_are_not_registered(captured, registry):
    logger, stream = captured
    for value in (None, "", "abc"):
        registry.register(value)
    registry.register("abcd")
    logger.info("abc abcd")
    assert entries(stream)[0]["message"] == "abc ****"


def test_every_registered_secret_is_masked(captured, registry):
    logger, stream = captured
    registry.register("first-secret")
    registry.register("second-secret")
    logger.info("first-secret and second-secret")
    assert entries(stream)[0]["message"] == "**** and ****"


def test_configure_installs_one_json_handler_and_quietens_werkzeug():
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        root.handlers[:] = [logging.NullHandler()]  # whatever was there is replaced
        log.configure("WARNING")
        log.configure("DEBUG")
        handlers = [h for h in root.handlers if isinstance(h.formatter, log.JsonFormatter)]
        assert len(handlers) == 1 and len(root.handlers) == 1 and root.level == logging.DEBUG
        assert logging.getLogger("werkzeug").level == logging.WARNING
        assert log.get_logger("x") is logging.getLogger("x")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_a_record_formatted_by_another_handler_first_keeps_its_fields(captured):
    """A plain handler next to the JSON one sets ``message`` and ``asctime``
    on the shared record: they are the formatter's, not fields."""
    logger, stream = captured
    plain = logging.StreamHandler(io.StringIO())
    plain.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.handlers.insert(0, plain)
    logger.info("Received %s", "webhook")
    (entry,) = entries(stream)
    assert entry["message"] == "Received webhook" and "asctime" not in entry


SLACK = "https://hooks.slack.com/services/T0001/B0002/XXXXXXXXXXXXXXXXXXXXXXXX"


def test_a_secret_url_is_masked_whole_and_by_its_significant_parts(registry):
    registry.register(SLACK)
    assert registry.redact(f"POST {SLACK} failed") == "POST **** failed"
    assert registry.redact("host hooks.slack.com/services/T0001/B0002/XXXXXXXXXXXXXXXXXXXXXXXX") == "host ****"
    assert registry.redact("Max retries exceeded with url: /services/T0001/B0002/XXXXXXXXXXXXXXXXXXXXXXXX (x)") == "Max retries exceeded with url: **** (x)"
    # The path's tails, as a library may quote them without the start.
    assert registry.redact("at T0001/B0002/XXXXXXXXXXXXXXXXXXXXXXXX") == "at ****"
    assert registry.redact("at B0002/XXXXXXXXXXXXXXXXXXXXXXXX") == "at ****"
    assert registry.redact("token XXXXXXXXXXXXXXXXXXXXXXXX alone") == "token **** alone"
    # Short segments and plain words are not secrets on their own.
    assert registry.redact("T0001 B0002 services hooks.slack.com") == "T0001 B0002 services hooks.slack.com"


def test_text_without_a_secret_is_returned_unchanged(registry):
    registry.register(SLACK)
    text = "Error creating incident: connection refused (127.0.0.1:5432) /services/"
    assert registry.redact(text) == text
    assert log.scrub(text, secrets=registry) == text


@pytest.mark.parametrize(
    ("segment", "masked"),
    [
        ("Ab1cd2E", False),  # 7, not a plain word: too short
        ("Ab1cd2Ef", True),  # 8, not a plain word
        ("Ab1cd2Efg", True),  # 9
        ("services", False),  # 8, a plain word
        ("q" * 15, False),  # a plain word under 16
        ("with-dash-words", False),
        ("r" * 16, True),  # any part of 16 is a token
        ("s" * 17, True),
        ("hooks", False),
    ],
)
def test_a_path_segment_is_a_token_when_long_or_not_a_plain_word(registry, segment, masked):
    registry.register(f"https://h.example/x/{segment}")
    text = f"at {segment} end"
    assert registry.redact(text) == ("at **** end" if masked else text)


@pytest.mark.parametrize(
    ("value", "masked"),
    [("Abc123XYZ", True), ("notatoken", False), ("q" * 16, True)],
)
def test_a_query_value_is_a_token_by_the_same_rule(registry, value, masked):
    registry.register(f"https://h.example/hook?token={value}")
    text = f"token={value};"
    assert registry.redact(f"v {value} .") == ("v **** ." if masked else f"v {value} .")
    assert registry.redact(text) == ("token=****;" if masked else text)


def test_the_path_with_its_query_is_masked_from_six_characters(registry):
    registry.register("https://h.example/hook?a=1")
    registry.register("https://h.example/abcdef")
    registry.register("https://h.example/abcdefg")
    registry.register("https://h.example/abcde")
    assert registry.redact("url: /hook?a=1 (x)") == "url: **** (x)"
    assert registry.redact("GET /abcdef HTTP") == "GET **** HTTP"
    assert registry.redact("GET /abcdefg HTTP") == "GET **** HTTP"
    assert registry.redact("GET /abcde HTTP") == "GET /abcde HTTP"


def test_a_path_without_a_query_is_masked_as_quoted(registry):
    registry.register("https://h.example/services/abc")
    assert registry.redact("url: /services/abc failed") == "url: **** failed"


@pytest.mark.parametrize(
    ("url", "tail", "masked"),
    [
        ("https://h.example/x/ab/cdef", "ab/cdef", False),  # 7
        ("https://h.example/x/ab/cdefg", "ab/cdefg", True),  # 8
        ("https://h.example/x/ab/cdefgh", "ab/cdefgh", True),  # 9
    ],
)
def test_a_tail_of_the_path_is_masked_from_eight_characters(registry, url, tail, masked):
    registry.register(url)
    text = f"at {tail} end"
    assert registry.redact(text) == ("at **** end" if masked else text)


def test_the_url_without_its_scheme_is_masked_even_when_short(registry):
    registry.register("https://h.example/ab")
    assert registry.redact("connect h.example/ab now") == "connect **** now"
    assert registry.redact("https and /ab and ab") == "https and /ab and ab"


def test_a_url_quoting_another_url_is_masked_whole(registry):
    registry.register("https://h.example/r?u=http://x")
    assert registry.redact("see h.example/r?u=http://x") == "see ****"


@pytest.mark.parametrize(
    ("password", "masked"),
    [("abc", False), ("pass", True), ("passw", True)],
)
def test_a_url_password_is_masked_from_four_characters(registry, password, masked):
    registry.register(f"https://user:{password}@h.example/x")
    text = f"pw {password} ."
    assert registry.redact(text) == ("pw **** ." if masked else text)


def test_only_http_urls_are_split_into_parts(registry):
    registry.register("ftp://files.example/some/Secret123token")
    registry.register("http:/no-host/Other456token")
    assert registry.redact("ftp://files.example/some/Secret123token") == "****"
    assert registry.redact("at /some/Secret123token Secret123token") == "at /some/Secret123token Secret123token"
    assert registry.redact("http:/no-host/Other456token") == "****"
    assert registry.redact("at Other456token") == "at Other456token"


def test_a_url_that_cannot_be_parsed_is_still_masked_whole(registry):
    registry.register("http://[::1/Bad123token")
    assert registry.redact("to http://[::1/Bad123token x") == "to **** x"
    assert registry.redact("Bad123token") == "Bad123token"


def test_overlapping_secrets_are_masked_longest_first(registry):
    registry.register("abcd")
    registry.register("abcdefgh")
    assert registry.redact("abcdefgh abcd") == "**** ****"
    registry.register(SLACK)
    assert registry.redact(SLACK) == "****"


def test_scrub_removes_every_url_and_every_secret(registry):
    registry.register("hunter2-secret")
    text = "POST https://hooks.example/x?y=1 failed (timeout) with hunter2-secret; 'http://b.example/z'"
    assert log.scrub(text, secrets=registry) == "POST <url> failed (timeout) with ****; '<url>'"
    assert log.scrub(None, secrets=registry) is None
    assert log.scrub("", secrets=registry) == ""


def test_scrub_cuts_at_the_limit_with_an_ellipsis(registry):
    assert log.scrub("a" * 300, secrets=registry) == "a" * 300
    assert log.scrub("a" * 301, secrets=registry) == "a" * 299 + "…"
    assert log.scrub("abcde", limit=6, secrets=registry) == "abcde"
    assert log.scrub("abcdef", limit=6, secrets=registry) == "abcdef"
    assert log.scrub("abcdefg", limit=6, secrets=registry) == "abcde…"


def test_scrub_replaces_control_characters_but_the_newline_and_the_tab(registry):
    # PostgreSQL refuses a NUL in JSONB: an error quoting one could not be recorded.
    text = "bad\x00key\x1b[31m red\x7f\r\nline two\tcolumn"
    assert log.scrub(text, secrets=registry) == "bad\ufffdkey\ufffd[31m red\ufffd\ufffd\nline two\tcolumn"


def test_scrub_masks_a_secret_holding_a_control_character(registry):
    registry.register("pass\x01word-secret")
    assert log.scrub("auth with pass\x01word-secret failed", secrets=registry) == "auth with **** failed"


def test_scrub_cuts_after_masking(registry):
    registry.register("x" * 40)
    assert log.scrub("x" * 40 + " tail", limit=10, secrets=registry) == "**** tail"


def test_secrets_are_masked_by_their_shape_without_being_registered():
    # Text from outside (a pod's termination message, an event) may carry a
    # credential nobody registered: its shape gives it away.
    line = "login failed: Authorization: Bearer abcdefghijklmnopqrstuvwx0123456789 for sk-proj-" + "a" * 40
    masked = log.redact_patterns(line)
    assert "abcdefghijklmnopqrstuvwx0123456789" not in masked and "a" * 40 not in masked
    assert masked.startswith("login failed: ")


def test_the_process_registry_masks_in_every_formatter_not_given_another():
    # A value of its own (random): registered for the rest of the process,
    # it can appear in no other test's text.
    secret = f"process-secret-{uuid.uuid4().hex}"
    log.register_secret(secret)
    assert log.redact(f"x {secret} y") == "x **** y"
    assert log.scrub(f"x {secret} y") == "x **** y"
    record = logging.makeLogRecord({"msg": f"leaked {secret}", "levelno": logging.INFO, "levelname": "INFO"})
    assert json.loads(log.JsonFormatter().format(record))["message"] == "leaked ****"
    assert json.loads(log.JsonFormatter(secrets=log.Secrets()).format(record))["message"] == f"leaked {secret}"
