"""Apply the Alembic migrations from code (``make run``, the tests, the Job)."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str, **attributes) -> Config:
    """``attributes``: read by migrations/env.py (``lock_timeout_seconds``,
    ``lock_attempts``, ``lock_retry_seconds``; the environment's otherwise)."""
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    config.attributes.update(attributes)
    return config


def upgrade(url: str, revision: str = "head", **attributes) -> None:
    command.upgrade(alembic_config(url, **attributes), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


if __name__ == "__main__":
    from shared.config import ConfigError, settings

    try:
        upgrade(settings().database_url)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
