"""What every function does when its process starts: read the settings (and
fail fast with one line naming a bad variable), configure logging, and
register secrets so no log line can show them."""

from __future__ import annotations

import logging
import sys

from shared import log as logs
from shared.config import ConfigError, Settings, settings


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
    for secret in (config.api_token, config.pagerduty_routing_key, config.slack_webhook_url, config.remediation_db_dsn):
        if secret:
            logs.register_secret(secret.reveal())
    if config.remediation_db_dsn:
        logs.register_secret(_password_of(config.remediation_db_dsn.reveal()))
    logs.register_secret(_password_of(config.database_url))
    if config.slack_webhook_url:
        for part in _webhook_path_secrets(config.slack_webhook_url.reveal()):
            logs.register_secret(part)
    logging.getLogger(service).info("Starting", extra={"service": service})
    return config


def _webhook_path_secrets(url: str) -> list[str]:
    """A Slack webhook's secret is its path: an HTTP client's error names the
    path without the host, so masking the whole URL alone would miss it."""
    from urllib.parse import urlsplit

    path = urlsplit(url).path
    token = path.rstrip("/").rsplit("/", 1)[-1]
    return [p for p in (path, token) if len(p) >= 8]


def _password_of(url: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(url).password
