"""Whether the database's schema is older than this code.

Code rolled out before its migrations ran (docs/deploy.md says to migrate
first) meets functions, tables or columns that are not there yet: SQLSTATE
42883, 42P01 or 42703. That is a deployment state the migrations end, not a
bug, so it is answered ``503`` (the sender retries) with a log line that
says what to do; the same errors against a schema that is up to date stay
``500``.

``HEAD_REVISION`` is the migration this code was written against, a string
and not Alembic's answer: importing Alembic costs a cold start about half a
second. tests/test_schema_revision.py keeps it equal to the migrations'
head. Revision ids are zero-padded numbers that grow along the chain (the
same test checks that too), so an older revision sorts before the head and
a newer one (a later release's migrations already run) after it.

Nothing here imports SQLAlchemy: ``/health`` asks :func:`behind` about the
revision it read on its own connection.
"""

from __future__ import annotations

import logging
import threading
import time

HEAD_REVISION = "0018"
# What a statement meets when the object it names is not there yet.
MISSING_OBJECT_SQLSTATES = frozenset({"42883", "42P01", "42703"})  # undefined function, table, column
REVISION_SQL = "SELECT max(version_num) FROM alembic_version"
# How long a reading of the revision is trusted: errors come in bursts
# (every request while the schema is behind), the revision changes once per
# deployment, and a migrated database should be served again within seconds.
RECHECK_SECONDS = 5.0
BEHIND_MESSAGE = "database schema older than this code: run the migrations"

log = logging.getLogger("schema")
_lock = threading.Lock()
_last: dict = {}  # "at": monotonic time of the reading, "behind": its answer


def behind(revision: str | None) -> bool:
    """Is a database at ``revision`` (None: never migrated) older than this code?"""
    return revision is None or revision < HEAD_REVISION


def database_behind(read_revision) -> bool:
    """Whether the database is behind, read with ``read_revision()`` (returns
    the revision; raises the missing-table error when there is no revision
    table) at most once per ``RECHECK_SECONDS``. Logs the deployment error
    with each reading that finds it behind; a reading that fails otherwise
    answers False (the error the caller has stays what it was)."""
    with _lock:
        if _last and time.monotonic() - _last["at"] < RECHECK_SECONDS:
            return _last["behind"]
        try:
            revision = read_revision()
        except Exception as exc:  # noqa: BLE001 - judged below; any other failure says nothing about the schema
            if sqlstate(exc) != "42P01":
                return False
            revision = None
        found = behind(revision)
        _last.update(at=time.monotonic(), behind=found)
    if found:
        log.error(BEHIND_MESSAGE.capitalize(), extra={"database_revision": revision, "code_revision": HEAD_REVISION})
    return found


def forget() -> None:
    """Read the revision again at the next question (tests)."""
    with _lock:
        _last.clear()


def sqlstate(exc: BaseException | None) -> str:
    """The SQLSTATE of a pg8000 error, or of the one a SQLAlchemy error wraps."""
    orig = getattr(exc, "orig", None) or exc
    # pg8000 puts the server's error fields in a dict as the first argument.
    if orig is not None and orig.args and isinstance(orig.args[0], dict):
        return str(orig.args[0].get("C", ""))
    return ""
