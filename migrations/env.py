"""Alembic environment: the URL comes from DATABASE_URL or ``-x url=...``."""

import logging
import os
import time
from logging.config import fileConfig

from alembic import context
from sqlalchemy.exc import DBAPIError

from shared.config import parse_database_url
from shared.db import create_engine_for, sqlstate

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = context.get_x_argument(as_dictionary=True).get("url") or config.attributes.get("url") or os.environ.get(
    "DATABASE_URL", ""
)
url = parse_database_url(url)
log = logging.getLogger("migrate")


def run_migrations_offline() -> None:
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


# How long the migration waits for each lock, and how often it tries again
# (docs/deploy.md, "Bounds on waiting for the database"). A migration that
# waits for ACCESS EXCLUSIVE behind a long reader (pg_dump holds ACCESS SHARE
# on every table for the whole dump) queues every request that needs the
# table behind itself for as long as it waits; with a lock_timeout it steps
# back (its transaction rolls back whole, DDL included), the requests go on,
# and it tries again after a pause.
def _setting(attribute: str, variable: str, default: str) -> str:
    value = config.attributes.get(attribute)
    return str(value) if value is not None else (os.environ.get(variable) or default)


def _seconds(attribute: str, variable: str, default: str) -> float:
    raw = _setting(attribute, variable, default)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{variable}: expected a number of seconds, got {raw!r}") from None
    # PostgreSQL's largest lock_timeout is 2147483647 ms; nan would turn the bound off unseen.
    if not (0 <= value <= 2147483.647):
        raise ValueError(f"{variable}: must be between 0 and 2147483.647 seconds, got {raw!r}")
    return value


def _attempts(attribute: str, variable: str, default: str) -> int:
    raw = _setting(attribute, variable, default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{variable}: expected a whole number of attempts, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{variable}: must be at least 1, got {raw!r}")
    return value


# 0: no lock_timeout (wait as long as it takes, as before). 1 s is below the
# requests' own lock bound (2 s for the intake and the query, 5 s for the
# functions the Broker calls, shared/config.py): a request queued behind the
# migration's pending ACCESS EXCLUSIVE is let through by the migration
# stepping back before its own bound answers 503.
LOCK_TIMEOUT_SECONDS = _seconds("lock_timeout_seconds", "MIGRATION_LOCK_TIMEOUT_SECONDS", "1")
LOCK_ATTEMPTS = _attempts("lock_attempts", "MIGRATION_LOCK_ATTEMPTS", "10")
# Pause before the next attempt: doubling from 1 s, at most 30 s (about 3 minutes
# in all with the defaults); a test sets a fixed one.
RETRY_PAUSE_SECONDS = config.attributes.get("lock_retry_seconds")


def run_migrations_online() -> None:
    engine = create_engine_for(url, pool_size=1, max_overflow=0, timeout=60)
    try:
        for attempt in range(1, LOCK_ATTEMPTS + 1):
            try:
                with engine.connect() as connection:
                    _migrate(connection)
                return
            except DBAPIError as exc:
                if sqlstate(exc) != "55P03" or attempt == LOCK_ATTEMPTS:
                    raise
                pause = RETRY_PAUSE_SECONDS if RETRY_PAUSE_SECONDS is not None else min(30.0, 2.0 ** (attempt - 1))
                log.warning("Migration gave up waiting %g s for a lock (attempt %d of %d); rolled back, trying again in %g s",
                            LOCK_TIMEOUT_SECONDS, attempt, LOCK_ATTEMPTS, pause)
                time.sleep(pause)
    finally:
        engine.dispose()


def _migrate(connection) -> None:
    # Every pending migration in one transaction, which first takes a
    # transaction-scoped advisory lock: two replicas starting at once do
    # not both migrate, and nothing outlives the transaction, so this
    # works through PgBouncer in transaction pooling mode too (a session
    # lock could be taken on one server connection and "released" on
    # another). PostgreSQL's DDL is transactional: a failure rolls back all.
    context.configure(connection=connection, transaction_per_migration=False)
    with context.begin_transaction():
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727005)")
        # After the advisory lock: a replica waits for another's whole
        # migration there, which is no lock to give up on.
        if LOCK_TIMEOUT_SECONDS > 0:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{max(1, round(LOCK_TIMEOUT_SECONDS * 1000))}ms'")
        context.run_migrations()
    connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
