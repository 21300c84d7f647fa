"""What every function does when its process starts: read the settings (and
fail fast with one line naming a bad variable), configure logging, and
register secrets so no log line can show them."""

from __future__ import annotations

import logging
import sys

from shared import log as logs
from shared.config import ConfigError, Settings, secret_fields, settings


def fail(service: str, message: str) -> None:
    """One clear line, then stop: a function with bad settings must not serve."""
    print(f"{service}: configuration error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def start(service: str) -> Settings:
    try:
        config = settings()
    except ConfigError as exc:
        fail(service, str(exc))
    logs.configure(config.log_level)
    register_secrets(config)
    _bound_request_bodies(config)
    logging.getLogger(service).info("Starting", extra={"service": service})
    return config


def register_secrets(config: Settings) -> None:
    """Mask every secret the settings declare (and the password of one that
    is a database URL) in every log line; a new secret field needs nothing here."""
    for f in secret_fields(type(config)):
        value = getattr(config, f.name)
        if value:
            logs.register_secret(value.reveal())
            logs.register_secret(_password_of(value.reveal()))
    logs.register_secret(_password_of(config.database_url))


def _bound_request_bodies(config: Settings) -> None:
    """functions-framework imports the function's module inside the context
    of the app it created, so that app is reachable here, before it serves."""
    import flask

    from shared.http import LARGEST_FIXED_BODY, bound_request_bodies

    if flask.has_app_context():
        bound_request_bodies(flask.current_app, max(config.max_body_bytes, LARGEST_FIXED_BODY) + 1)


def _password_of(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password
    except ValueError:
        return None
