"""``/health``'s database check, without SQLAlchemy until something needs it.

The first request a new instance answers is ``/health`` (the readiness
probe; a cold start is measured to its first ``2xx``), and it needs only to
know that the database takes a connection. Importing SQLAlchemy and
initialising its dialect cost a cold start more than the rest of the
function's start together, so until anything else has imported
``shared.db`` the check is pg8000's own connection (the same driver, URL and
connect arguments as the engine's), kept open for the next check. Once
``shared.db`` is imported (the first real request), the check asks the
engine's pool, as every request then does, and the driver's connection is
closed.

The check reads the schema's revision rather than ``SELECT 1`` (the same one
round trip): a database whose schema is older than this code
(shared/schema.py) fails readiness too, so Knative keeps routing to the
revision that still matches it until the migrations have run.
"""

from __future__ import annotations

import sys
import threading
from urllib.parse import parse_qsl, unquote, urlsplit

from shared import schema
from shared.config import settings

_lock = threading.Lock()
_parked: list = []  # the driver's connection between two checks


def connect_args(url: str, timeout: float) -> dict:
    """pg8000's keyword arguments for ``url``, as SQLAlchemy's pg8000
    dialect and ``shared.db.create_engine_for`` build them."""
    parts = urlsplit(url)
    args: dict = {}
    if parts.username is not None:
        args["user"] = unquote(parts.username)
    if parts.password is not None:
        args["password"] = unquote(parts.password)
    if parts.hostname:
        args["host"] = parts.hostname
    if parts.port:
        args["port"] = parts.port
    if parts.path.strip("/"):
        args["database"] = unquote(parts.path.lstrip("/"))
    args.update(parse_qsl(parts.query))
    args["timeout"] = timeout
    args.setdefault("application_name", "incident-response")
    return args


CONNECTED, DISCONNECTED, SCHEMA_BEHIND = "connected", "disconnected", "schema_behind"


def database_state() -> str:
    """``connected``, ``disconnected``, or ``schema_behind`` (reachable, but
    the migrations this code needs have not run)."""
    engine_db = sys.modules.get("shared.db")
    if engine_db is not None:
        _close_parked()
        return engine_db.database_state()
    with _lock:
        try:
            if not _parked:
                import pg8000.dbapi

                from shared import pgsocket

                config = settings()
                args = connect_args(config.database_url, config.db_timeout_seconds)
                # pg8000's socket without the CA bundle its TLS context loads and never reads (shared/pgsocket.py).
                _parked.append(pg8000.dbapi.connect(**pgsocket.driver_args(args)))
            cursor = _parked[0].cursor()
            try:
                cursor.execute(schema.REVISION_SQL)
                revision = cursor.fetchall()[0][0]
            except Exception as exc:
                if schema.sqlstate(exc) != "42P01":
                    raise
                revision = None  # never migrated
            _parked[0].rollback()
            return SCHEMA_BEHIND if schema.behind(revision) else CONNECTED
        except Exception:  # noqa: BLE001 - health reports any failure as disconnected
            _close_parked_locked()
            return DISCONNECTED


def _close_parked() -> None:
    if _parked:
        with _lock:
            _close_parked_locked()


def _close_parked_locked() -> None:
    while _parked:
        try:
            _parked.pop().close()
        except Exception:  # noqa: BLE001 - a broken connection is gone either way
            pass
