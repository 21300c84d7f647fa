"""The SQLAlchemy engine and the transaction helper.

Pool sizing: a Knative function instance serves ``containerConcurrency``
requests at a time and may be one of many replicas, each holding its own
pool, while PostgreSQL's ``max_connections`` is shared by all of them. So
the pool is small (``DB_POOL_SIZE`` 2 + ``DB_MAX_OVERFLOW`` 3 by default)
and connections are checked before use (``pool_pre_ping``): an instance
woken from scale-to-zero, or a database that restarted, must not hand out a
dead connection.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared.config import Settings, settings

_engine: Engine | None = None
_engine_lock = threading.Lock()

# SQLSTATE classes that a retry can cure: connection exceptions (08),
# serialization failure and deadlock (40), insufficient resources (53),
# operator intervention such as a shutdown (57), system errors (58).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57", "58")


def split_unix_sock(url: str) -> tuple[str, dict]:
    """pg8000 takes ``unix_sock`` as a connect argument, not a URL field."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    connect_args = {k: v for k, v in query if k == "unix_sock"}
    rest = [(k, v) for k, v in query if k != "unix_sock"]
    return urlunsplit(parts._replace(query=urlencode(rest))), connect_args


def create_engine_for(url: str, pool_size: int = 2, max_overflow: int = 3, timeout: float = 10.0, **options) -> Engine:
    url, connect_args = split_unix_sock(url)
    connect_args["timeout"] = timeout
    connect_args.setdefault("application_name", "incident-response")
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=300,
        pool_timeout=timeout,
        connect_args=connect_args,
        **options,
    )


def run_outside_transaction(url: str, statement: str) -> None:
    """For CREATE/DROP DATABASE, which PostgreSQL refuses inside a transaction."""
    url, connect_args = split_unix_sock(url)
    eng = sa.create_engine(url, connect_args=connect_args, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql(statement)
    finally:
        eng.dispose()


def engine(config: Settings | None = None) -> Engine:
    """The process-wide engine, created on first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                cfg = config or settings()
                _engine = create_engine_for(
                    cfg.database_url, cfg.db_pool_size, cfg.db_max_overflow, cfg.db_timeout_seconds
                )
    return _engine


def dispose_engine() -> None:
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None


@contextmanager
def transaction(bind: Engine | None = None) -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back on error."""
    with (bind or engine()).begin() as conn:
        yield conn


def is_transient(exc: BaseException) -> bool:
    """Would the same statement succeed later (so the caller should retry)?"""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        code = _sqlstate(exc.orig)
        return bool(code) and code.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return isinstance(exc, (ConnectionError, TimeoutError, sa.exc.TimeoutError))


def _sqlstate(orig: BaseException | None) -> str:
    # pg8000 puts the server's error fields in a dict as the first argument.
    if orig is not None and orig.args and isinstance(orig.args[0], dict):
        return str(orig.args[0].get("C", ""))
    return ""


def database_reachable(bind: Engine | None = None) -> bool:
    try:
        with (bind or engine()).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - health reports any failure as disconnected
        return False
