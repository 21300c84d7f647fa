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
        # Two replicas starting at once must not both migrate.
        connection.exec_driver_sql("SELECT pg_advisory_lock(727005)")
        try:
            context.configure(connection=connection, transaction_per_migration=True)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            connection.exec_driver_sql("SELECT pg_advisory_unlock(727005)")
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
