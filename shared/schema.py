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

HEAD_REVISION = "0028"
# What a statement meets when the object it names is not there yet.
MISSING_OBJECT_SQLSTATES = frozenset({"42883", "42P01", "42703"})  # undefined function, table, column
REVISION_SQL = "SELECT max(version_num) FROM alembic_version"
# How long a reading of the revision is trusted: errors come in bursts
# (every request while the schema is behind), the revision changes once per
# deployment, and a migrated database should be served again within seconds.
RECHECK_SECONDS = 5.0
# A reading that failed (the pool exhausted, the database gone) is trusted
# too, for less: otherwise every request meeting the missing object would
# try again, each through the pool.
FAILED_RECHECK_SECONDS = 1.0
BEHIND_MESSAGE = "database schema older than this code: run the migrations"

log = logging.getLogger("schema")
_monotonic = time.monotonic  # tests move it
_changed = threading.Condition()
# "at": monotonic time of the last reading, "trusted": for how long,
# "behind": the answer; "reading": a thread is reading the revision now.
_last: dict = {}


def behind(revision: str | None) -> bool:
    """Is a database at ``revision`` (None: never migrated) older than this code?"""
    return revision is None or revision < HEAD_REVISION


def database_behind(read_revision) -> bool:
    """Whether the database is behind, read with ``read_revision()`` (returns
    the revision; raises the missing-table error when there is no revision
    table) at most once per ``RECHECK_SECONDS``, by one thread at a time:
    while it reads, the others take the last answer (or wait for its, when
    there is none yet). The I/O holds no lock. Logs the deployment error with
    each reading that finds it behind; a reading that fails otherwise keeps
    the last answer (False if none: the error the caller has stays what it
    was) for ``FAILED_RECHECK_SECONDS``."""
    with _changed:
        if "behind" not in _last and _last.get("reading"):
            _changed.wait_for(lambda: not _last.get("reading"))
        if "behind" in _last and (_last.get("reading") or _monotonic() - _last["at"] < _last["trusted"]):
            return _last["behind"]
        _last["reading"] = True
        found, trusted = _last.get("behind", False), FAILED_RECHECK_SECONDS
    revision = None
    try:
        try:
            revision = read_revision()
            found, trusted = behind(revision), RECHECK_SECONDS
        except Exception as exc:  # noqa: BLE001 - judged here; any other failure says nothing about the schema
            if sqlstate(exc) == "42P01":
                found, trusted = True, RECHECK_SECONDS  # never migrated
    finally:
        with _changed:
            _last.update(at=_monotonic(), trusted=trusted, behind=found, reading=False)
            _changed.notify_all()
    if found and trusted == RECHECK_SECONDS:  # a reading that found it behind, not a failed one keeping that answer
        log.error(BEHIND_MESSAGE.capitalize(), extra={"database_revision": revision, "code_revision": HEAD_REVISION})
    return found


def forget() -> None:
    """Read the revision again at the next question (tests)."""
    with _changed:
        _last.clear()
        _changed.notify_all()


def sqlstate(exc: BaseException | None) -> str:
    """The SQLSTATE of a pg8000 error, or of the one a SQLAlchemy error wraps."""
    orig = getattr(exc, "orig", None) or exc
    # pg8000 puts the server's error fields in a dict as the first argument.
    if orig is not None and orig.args and isinstance(orig.args[0], dict):
        return str(orig.args[0].get("C", ""))
    return ""
