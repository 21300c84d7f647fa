"""Alembic environment: the URL comes from DATABASE_URL or ``-x url=...``."""

import os
from logging.config import fileConfig

from alembic import context

from shared.config import parse_database_url
from shared.db import create_engine_for

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = context.get_x_argument(as_dictionary=True).get("url") or config.attributes.get("url") or os.environ.get(
    "DATABASE_URL", ""
)
url = parse_database_url(url)


def run_migrations_offline() -> None:
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine_for(url, pool_size=1, max_overflow=0, timeout=60)
    with engine.connect() as connection:
        # Every pending migration in one transaction, which first takes a
        # transaction-scoped advisory lock: two replicas starting at once do
        # not both migrate, and nothing outlives the transaction, so this
        # works through PgBouncer in transaction pooling mode too (a session
        # lock could be taken on one server connection and "released" on
        # another). PostgreSQL's DDL is transactional: a failure rolls back all.
        context.configure(connection=connection, transaction_per_migration=False)
        with context.begin_transaction():
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727005)")
            context.run_migrations()
        connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
