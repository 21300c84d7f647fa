"""The JSON log format and the masking, in-process: one JSON object per
line, fields kept, secrets masked wherever they appear. (Through real
processes: tests/test_log_masking.py.)"""

from __future__ import annotations

import io
import json
import logging

import pytest

from shared import log


@pytest.fixture
def captured():
    """A logger whose lines go to a buffer through the JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log.JsonFormatter())
    logger = logging.getLogger("test-log-format")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    # No public way to forget a secret: restore the registry so the values
    # registered here mask nothing in later tests.
    # The registry is a list kept longest first; restore it in place, order
    # included, since the module holds the same list object.
    saved = list(log._secrets)
    yield logger, stream
    log._secrets[:] = saved


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


def test_registered_secrets_are_masked_in_message_fields_and_tracebacks(captured):
    logger, stream = captured
    log.register_secret("hunter2-secret")
    logger.info("token hunter2-secret in message", extra={"path": "/x/hunter2-secret", "nested": {"k": "hunter2-secret"}})
    try:
        raise RuntimeError("failed with hunter2-secret")
    except RuntimeError:
        logger.exception("Failed")
    text = stream.getvalue()
    assert "hunter2-secret" not in text and text.count("****") >= 4
    assert entries(stream)[0]["message"] == "token **** in message"


def test_short_or_empty_values_are_not_registered(captured):
    logger, stream = captured
    for value in (None, "", "abc"):
        log.register_secret(value)
    log.register_secret("abcd")
    logger.info("abc abcd")
    assert entries(stream)[0]["message"] == "abc ****"


def test_every_registered_secret_is_masked(captured):
    logger, stream = captured
    log.register_secret("first-secret")
    log.register_secret("second-secret")
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
