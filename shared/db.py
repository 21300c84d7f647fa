"""The SQLAlchemy engine and the transaction helper.

Pool sizing: a Knative function instance serves ``containerConcurrency``
requests at a time and may be one of many replicas, each holding its own
pool, while PostgreSQL's ``max_connections`` is shared by all of them. So
the pool is small (``DB_POOL_SIZE`` 4 + ``DB_MAX_OVERFLOW`` 4 by default, one
connection per request thread of the default ``containerConcurrency`` 8).

A connection that sat idle in the pool is pinged before it is handed out (an
instance woken from scale-to-zero, or a database that restarted, must not
hand out a dead connection); one that was used a moment ago is not, which
saves a round trip on every busy request (``pool_pre_ping`` pings always).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared import schema
from shared.config import Settings, settings

def _cache_pg8000_paramstyle() -> None:
    """pg8000 rewrites ``%s`` to ``$n`` by scanning the statement character by
    character on every execute (about 1 ms for one of our statements, a
    quarter of an intake request). For the ``format`` style SQLAlchemy uses,
    the rewritten text depends on the statement alone, so it is cached.
    tests/test_db.py checks the cache against pg8000's own function."""
    import pg8000.dbapi
    import pg8000.legacy

    original = pg8000.dbapi.convert_paramstyle
    if getattr(original, "cached", False):
        return

    @functools.lru_cache(maxsize=1024)
    def rewrite(query: str) -> str:
        return original("format", query, ())[0]

    def convert_paramstyle(style, query, args):
        if style != "format":
            return original(style, query, args)
        return rewrite(query), args

    convert_paramstyle.cached = True
    convert_paramstyle.original = original
    # SQLAlchemy's dialect drives pg8000's legacy cursor, which imported
    # the function by name; patch both names.
    pg8000.dbapi.convert_paramstyle = convert_paramstyle
    pg8000.legacy.convert_paramstyle = convert_paramstyle


_cache_pg8000_paramstyle()


def _execute_in_one_round_trip() -> None:
    """pg8000 runs a statement with parameters in three round trips (Parse
    and wait; Describe and wait; Bind, Execute and wait). The extended
    query protocol lets a client send Parse, Bind, Describe (portal),
    Execute and Sync together and read the answers once: the same unnamed
    statement and portal, the same text formats, one round trip. A
    transaction of the intake was seven round trips, each a wake-up of the
    database backend and of this thread (the tail under load came largely
    from those); now it is three (BEGIN, the statement, COMMIT).

    Unnamed statements last until the next Parse, so nothing outlives the
    transaction: safe behind PgBouncer in transaction pooling mode. The
    parameters are converted before anything is written, so a value pg8000
    cannot send leaves nothing half-written on the socket.

    The BEGIN pg8000 sends before a transaction's first statement travels
    in the same write as that statement, so a transaction of one statement
    is two round trips (the statement, COMMIT), not three. Statements whose
    answer the caller does not need travel the same way (:func:`later`).
    tests/test_db.py checks the answers and counts the round trips."""
    import pg8000.core as core

    if getattr(core.CoreConnection.execute_unnamed, "one_round_trip", False):
        return

    def execute_unnamed(self, statement, vals=(), oids=(), stream=None):
        context = core.Context(statement, stream=stream)
        if _ends_an_empty_transaction(self, statement):
            return context
        params = core.make_params(self.py_types, vals)
        if self._defer_next:
            # db.later(): sent with the next statement (its answer is read then).
            self._defer_next = False
            self._deferred += ((statement, params, oids),)
            return context
        if self._sock is None:
            raise core.InterfaceError("connection is closed")
        _settle_before_savepoint(self, statement)
        ahead = _send_ahead(self, statement)
        _send_extended(self, statement, params, oids)
        core._flush(self._sock)
        _read_answers(self, ahead, context)
        return context

    def execute_simple(self, statement):
        context = core.Context(statement)
        if statement == BEGIN:
            # Sent with the transaction's first statement (below), with the
            # transaction's bounds (bounds_for) in the same message.
            self._begin_pending = True
            self._in_effect = bounds_for(self._bounds)
            self._begin = self._in_effect.begin if self._in_effect is not None else BEGIN
            self._transaction_status = core.IN_TRANSACTION
            return context
        try:
            if _ends_an_empty_transaction(self, statement):
                return context
            if self._defer_next:
                self._defer_next = False
                self._deferred += ((statement, None, None),)
                return context
            _settle_before_savepoint(self, statement)
            ahead = _send_ahead(self, statement)
            self.send_QUERY(statement)
            core._flush(self._sock)
            _read_answers(self, ahead, context)
            return context
        finally:
            if statement.strip().lower() in ("commit", "rollback"):
                self._in_effect = None  # the SET LOCALs ended with the transaction

    execute_unnamed.one_round_trip = True
    core.CoreConnection.execute_unnamed = execute_unnamed
    core.CoreConnection.execute_simple = execute_simple
    core.CoreConnection._begin_pending = False
    core.CoreConnection._begin = BEGIN
    # When the open transaction's BEGIN was sent (time.monotonic()): the
    # server's now() is that moment, which deadline() measures from.
    core.CoreConnection._begun_at = 0.0
    # When the last answers were read, and how long the open transaction
    # then sat idle before the write being answered (0: none open on the
    # server): what names a session PgBouncer reports lost (_session_bound).
    core.CoreConnection._answered_at = 0.0
    core.CoreConnection._idle_for = 0.0
    # The bounds of the engine that opened the connection (create_engine_for);
    # None: no bounds (the migrations' engine, a remediation target's).
    core.CoreConnection._bounds = None
    # The bounds of the transaction open on the connection (None outside one,
    # or on an engine without bounds): what bound_reached judges an error by.
    core.CoreConnection._in_effect = None
    core.CoreConnection._defer_next = False
    # Statements put aside by later(); a tuple, replaced (never changed in
    # place), so the class-level default is never shared.
    core.CoreConnection._deferred = ()


# What pg8000's DB-API cursor sends before the first statement of a transaction.
BEGIN = "begin transaction"


@dataclass(frozen=True)
class Bounds:
    """How long one transaction may wait on the database, in seconds (0
    leaves the server's own setting): ``lock_timeout`` bounds each wait for
    a lock (a migration's ACCESS EXCLUSIVE, another replica's row lock),
    ``statement_timeout`` each statement, ``idle_in_transaction`` how long
    the transaction may sit open with nothing sent (the server then ends
    the session, so a stuck request of this process frees the rows it
    locked for the other replicas).

    They are ``SET LOCAL``: they end with the transaction, so a pooled
    connection, or a PgBouncer server connection in transaction pooling
    that another client gets next, carries none of them (a session ``SET``
    would stay there for the next client; a startup ``options=-c`` reaches
    the server through PgBouncer only from 1.20 and only for a parameter it
    tracks per client, ``track_extra_parameters``). They travel in the
    BEGIN's own message, which is itself sent with the transaction's first
    statement: no round trip of their own (:func:`bounds_for`)."""

    lock_timeout: float
    statement_timeout: float
    idle_in_transaction: float = 0.0
    begin: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        settings_ = (("lock_timeout", self.lock_timeout), ("statement_timeout", self.statement_timeout),
                     ("idle_in_transaction_session_timeout", self.idle_in_transaction))
        sets = "".join(f"; set local {name} = '{max(1, round(seconds * 1000))}ms'" for name, seconds in settings_ if seconds > 0)
        object.__setattr__(self, "begin", BEGIN + sets)


# The bounds that replace an engine's own for the transactions begun inside
# bounded() (the sweep's), in this thread or task only.
_bounds_in_effect: ContextVar[Bounds | None] = ContextVar("db_bounds", default=None)


@contextmanager
def bounded(bounds: Bounds) -> Iterator[None]:
    """Transactions begun inside the block, on an engine that has bounds,
    take ``bounds`` instead of the engine's (an engine without bounds, such
    as the migrations', stays without)."""
    token = _bounds_in_effect.set(bounds)
    try:
        yield
    finally:
        _bounds_in_effect.reset(token)


# When the statements of the transactions begun inside deadline() must end,
# together (time.monotonic()), in this thread or task only.
_deadline: ContextVar[float | None] = ContextVar("db_deadline", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """The statements run inside the block, on an engine that has bounds,
    end ``seconds`` from now at the latest, all of them together, those
    :func:`later` put aside included: each is preceded, in the same write
    (no round trip of its own), by a transaction-local ``statement_timeout``
    set to what is left when it runs (or to the transaction's own statement
    bound, if that is shorter; :func:`_deadline_ahead`). For a reply that
    is many statements and has a deadline of its own (``/metrics``:
    Prometheus's scrape timeout); PostgreSQL before 17 has no bound on a
    whole transaction.
    Running out is a statement_timeout (57014). ``0``: no deadline."""
    token = _deadline.set(time.monotonic() + seconds if seconds > 0 else None)
    try:
        yield
    finally:
        _deadline.reset(token)


def _deadline_ahead(conn, statement: str) -> list:
    """The ``statement_timeout`` of :func:`deadline`, sent ahead of
    ``statement``; nothing outside a bounded transaction, in a failed one (the
    server would refuse it), or before what ends a transaction or a savepoint.

    What is left is reckoned by the server when the statement is about to
    run, from the transaction's start (``now()``, the moment its BEGIN ran):
    the statements :func:`later` put aside travel in the same write as the
    next one, each run after the one before it, and each may have only what
    the ones before it left (a value reckoned here, when they are all sent,
    would give each of them the whole of it). It is at most what is left
    when the write is sent, reckoned here: behind PgBouncer the BEGIN may
    wait in its queue for a server connection, and the server's ``now()``
    starts only after that wait. (A wait in the queue before the
    transaction's first write is answered is not counted for the statements
    of that write, which the server cannot see and this client reckoned
    before it; it is for every later write: PgBouncer's
    ``query_wait_timeout`` bounds that wait.) Spent, it is 1 ms, never 0,
    which would be no bound at all. Still no round trip of its own: one
    more statement in the same write, answered with the others."""
    import pg8000.core as core

    end = _deadline.get()
    if end is None or conn._in_effect is None or conn._transaction_status == core.IN_FAILED_TRANSACTION:
        return []
    if statement.lstrip()[:9].lower().startswith(("commit", "rollback", "savepoint", "release", "end", "abort")):
        return []
    # What is left now, by this client's clock; and when the statement runs, by
    # the server's, which does not count a wait in PgBouncer's queue before BEGIN.
    left = (f"least({round((end - time.monotonic()) * 1000)}, "
            f"round({(end - conn._begun_at) * 1000:.0f} - extract(epoch from clock_timestamp() - now()) * 1000))")
    if conn._in_effect.statement_timeout > 0:
        left = f"least({left}, {max(1, round(conn._in_effect.statement_timeout * 1000))})"
    text = f"select set_config('statement_timeout', greatest(1, {left})::bigint || 'ms', true)"
    conn.send_QUERY(text)
    return [core.Context(text)]


def bounds_for(own: Bounds | None) -> Bounds | None:
    """The bounds of a transaction begun on a connection whose engine has
    ``own`` bounds: those of the enclosing :func:`bounded` block, else
    ``own``; an engine without bounds stays without. They begin it in one
    simple-query message, ``begin transaction; set local ...``
    (``Bounds.begin``; PostgreSQL runs the statements of one message in
    order and answers them together)."""
    if own is None:
        return None
    return _bounds_in_effect.get() or own


def _send_extended(conn, statement, params, oids) -> None:
    import pg8000.core as core

    conn.send_PARSE(core.NULL_BYTE, statement, oids)
    conn.send_BIND(core.NULL_BYTE, params)
    conn._send_message(core.DESCRIBE, core.PORTAL + core.NULL_BYTE)
    conn.send_EXECUTE()
    core._write(conn._sock, core.SYNC_MSG)


def _send_ahead(conn, statement: str | None = None) -> list:
    """BEGIN is not a round trip of its own: it goes out in the same write
    as the transaction's first statement, and so do the statements
    :func:`later` put aside; their answers are read first, in order. (A
    BEGIN cannot fail on a working connection; on a broken one the
    statement fails with it.) Under a :func:`deadline` each of them, and
    ``statement`` after them, is preceded by what is left of it."""
    import pg8000.core as core

    ahead = []
    open_on_the_server = not conn._begin_pending and conn._transaction_status == core.IN_TRANSACTION
    conn._idle_for = time.monotonic() - conn._answered_at if open_on_the_server else 0.0
    if conn._begin_pending:
        conn._begin_pending = False
        conn._begun_at = time.monotonic()
        conn.send_QUERY(conn._begin)
        ahead.append(core.Context(conn._begin))
    deferred, conn._deferred = conn._deferred, ()
    for put_aside, params, oids in deferred:
        ahead += _deadline_ahead(conn, put_aside)
        if params is None:
            conn.send_QUERY(put_aside)
        else:
            _send_extended(conn, put_aside, params, oids)
        ahead.append(core.Context(put_aside))
    if statement is not None:
        ahead += _deadline_ahead(conn, statement)
    return ahead


def _settle_before_savepoint(conn, statement: str) -> None:
    """Statements :func:`later` put aside belong to the transaction level
    they were made in. Before a SAVEPOINT or its RELEASE they are sent on
    their own (a failure is theirs, not the savepoint's); a ROLLBACK TO
    SAVEPOINT drops them unsent, as the rollback would undo them (they were
    made inside the savepoint: anything earlier was sent at its SAVEPOINT)."""
    import pg8000.core as core

    if not conn._deferred:
        return
    verb = statement.lstrip()[:12].lower()
    if verb.startswith("rollback to"):
        conn._deferred = ()
    elif verb.startswith(("savepoint", "release")):
        ahead = _send_ahead(conn)
        core._flush(conn._sock)
        _read_answers(conn, ahead[:-1], ahead[-1])


def _read_answers(conn, ahead, context) -> None:
    """Read the answers of what was sent ahead and the statement's, always
    all of them, so the connection stays in step whichever fails; the first
    failure is raised (after a failed statement the server refuses the
    rest of the transaction, so later failures only repeat it)."""
    failure = None
    try:
        for earlier in ahead:
            try:
                conn.handle_messages(earlier)
            except Exception as exc:  # noqa: BLE001 - raised below, after every answer is read
                failure = failure or exc
        try:
            conn.handle_messages(context)
        except Exception:
            if failure is None:
                raise
        if failure is not None:
            raise failure
    finally:
        conn._answered_at = time.monotonic()


def _ends_an_empty_transaction(conn, statement: str) -> bool:
    """COMMIT or ROLLBACK with no transaction open on the server (its BEGIN
    was never sent because no statement ran, or the server said it is idle)
    has nothing to end there: PostgreSQL would only warn. A ROLLBACK drops
    the statements put aside for the next round trip (never sent)."""
    import pg8000.core as core

    verb = statement.strip().lower()
    if verb not in ("commit", "rollback"):
        return False
    if verb == "rollback":
        conn._deferred = ()
    elif conn._deferred:
        return False
    if not conn._begin_pending and conn._transaction_status != core.IDLE:
        return False
    conn._begin_pending = False
    conn._transaction_status = core.IDLE
    return True


_execute_in_one_round_trip()


def _wrap_every_failed_read() -> None:
    """pg8000 (1.31.6) turns an OSError of every read of a message into its
    InterfaceError("network error") but the first: a connection the server
    reset (a terminated backend, a restart, a proxy giving up) failed there
    with a bare ConnectionResetError, which SQLAlchemy does not take for the
    driver's, so the request answered 500 instead of 503 (caught by
    tests/test_query_hostile_http.py under load). The same read, wrapped
    whole."""
    import pg8000.core as core

    if not hasattr(core, "_read") or getattr(core._read, "wraps_every_read", False):
        return  # another pg8000 than the pinned one reads its own way

    def _read(sock, size):
        try:
            buff = bytearray(sock.read(size))
            while len(buff) < size:
                block = sock.read(size - len(buff))
                if block == b"":
                    raise core.InterfaceError("network error")
                buff.extend(block)
        except OSError as e:
            raise core.InterfaceError("network error") from e
        return bytes(buff)

    _read.wraps_every_read = True
    core._read = _read


_wrap_every_failed_read()


def _keep_the_servers_last_word() -> None:
    """A server that ends a session sends an ErrorResponse of severity FATAL
    and closes the socket: an idle_in_transaction_session_timeout (25P03),
    pg_terminate_backend or a shutdown (57P01). pg8000 reads the FATAL, keeps
    it until ReadyForQuery, which never comes, and raises only the
    InterfaceError("network error") of the read that met the end: the
    SQLSTATE was lost, so the idle bound could not be named (the 503 said
    "the database is unavailable") and SQLAlchemy took it for a lost
    database (the whole pool discarded). The FATAL is raised instead, with
    the network error as its cause; :func:`_discard_connections_out_of_step`
    still discards the connection.

    Every error the server reports also carries the bounds of the
    transaction it ended (``bounds``), so :func:`bound_reached` names a bound
    only when one was set, and how long the transaction had sat idle before
    the statement that met it (``idle_for``, :func:`_session_bound`)."""
    import pg8000.core as core

    if getattr(core.CoreConnection.handle_messages, "keeps_the_last_word", False):
        return
    original = core.CoreConnection.handle_messages

    def handle_messages(self, context):
        try:
            original(self, context)
        except core.InterfaceError as exc:
            error = context.error
            if isinstance(error, core.DatabaseError) and _severity(error) == "FATAL":
                error.bounds, error.idle_for = self._in_effect, self._idle_for
                raise error from exc
            raise
        except core.DatabaseError as exc:
            exc.bounds, exc.idle_for = self._in_effect, self._idle_for
            raise

    handle_messages.keeps_the_last_word = True
    core.CoreConnection.handle_messages = handle_messages


def _severity(orig: BaseException | None) -> str:
    """The severity of a server's error (ERROR, FATAL, PANIC); '' for any
    other. ``V`` is the one PostgreSQL never translates."""
    fields = orig.args[0] if orig is not None and orig.args and isinstance(orig.args[0], dict) else {}
    return str(fields.get("V") or fields.get("S") or "")


_keep_the_servers_last_word()

_engine: Engine | None = None
_engine_lock = threading.Lock()

# SQLSTATE classes that a retry can cure: connection exceptions (08),
# serialization failure and deadlock (40), insufficient resources (53),
# operator intervention such as a shutdown or a statement_timeout (57),
# system errors (58); and of their classes, a lock_timeout (55P03) and an
# idle_in_transaction_session_timeout (25P03).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57", "58", "55P03", "25P03")

# The SQLSTATEs of a Bounds that ran out, named as the setting that did it.
LOCK_TIMEOUT, STATEMENT_TIMEOUT, IDLE_TIMEOUT = "lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout"

# PgBouncer's own bounds, named as its settings (pgbouncer.ini), by the fixed
# text of the FATAL 08P01 with which it closes the client's connection when
# one runs out (PgBouncer has no translations; tests/test_pgbouncer.py).
PGBOUNCER_IDLE_TRANSACTION_TIMEOUT = "pgbouncer.idle_transaction_timeout"
PGBOUNCER_QUERY_TIMEOUT = "pgbouncer.query_timeout"
PGBOUNCER_QUERY_WAIT_TIMEOUT = "pgbouncer.query_wait_timeout"
_PGBOUNCER_BOUNDS = {"idle transaction timeout": PGBOUNCER_IDLE_TRANSACTION_TIMEOUT,
                     "query timeout": PGBOUNCER_QUERY_TIMEOUT,
                     "query_wait_timeout": PGBOUNCER_QUERY_WAIT_TIMEOUT}


def split_unix_sock(url: str) -> tuple[str, dict]:
    """pg8000 takes ``unix_sock`` as a connect argument, not a URL field."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    connect_args = {k: v for k, v in query if k == "unix_sock"}
    rest = [(k, v) for k, v in query if k != "unix_sock"]
    return urlunsplit(parts._replace(query=urlencode(rest))), connect_args


def create_engine_for(url: str, pool_size: int = 2, max_overflow: int = 3, timeout: float = 10.0,
                      bounds: Bounds | None = None, **options) -> Engine:
    """``bounds``: every transaction of the engine begins with them (the
    functions' engine, :func:`engine`); none for the migrations' engine."""
    url, connect_args = split_unix_sock(url)
    connect_args["timeout"] = timeout
    connect_args.setdefault("application_name", "incident-response")
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=300,
        pool_timeout=timeout,
        connect_args=connect_args,
        **options,
    )
    _ping_idle_connections(engine)
    _discard_connections_out_of_step(engine)
    _discard_dead_connections_in_one_line(engine)
    _connect_without_the_ca_bundle(engine)
    if bounds is not None:
        _bound_every_transaction(engine, bounds)
    return engine


def _bound_every_transaction(engine: Engine, bounds: Bounds) -> None:
    """Each connection of the engine begins its transactions with
    ``bounds`` (bounds_for), however SQLAlchemy began them (``begin()``,
    or ``connect()`` and its first statement)."""

    @sa.event.listens_for(engine, "connect")
    def _connected(dbapi_connection, connection_record):
        dbapi_connection._bounds = bounds


def _connect_without_the_ca_bundle(engine: Engine) -> None:
    """Each new connection's socket made by shared/pgsocket.py: pg8000's
    own, without the ~50 ms of CPU its TLS context spends loading a CA
    bundle it never reads."""
    from shared import pgsocket

    @sa.event.listens_for(engine, "do_connect")
    def _connect(dialect, connection_record, cargs, cparams):
        args = pgsocket.driver_args(cparams)
        if args is cparams:
            return None  # a connection pg8000 makes its own way (unix_sock, ...): SQLAlchemy's connect
        # The dialect's pg8000.connect() passes its keywords on to this class, whose
        # keyword sock it does not take itself. A connection returned here is the one
        # the pool keeps; cparams is left as it is.
        return dialect.loaded_dbapi.Connection(*cargs, **args)


def _discard_connections_out_of_step(engine: Engine) -> None:
    """Never pool a connection whose protocol state is unknown.

    pg8000 can fail half-way through writing a message (a lone surrogate it
    cannot encode, a value it cannot pack, a socket error): what it already
    buffered or sent is then out of step with the server, and every later use
    of that connection fails in odd ways. Only an error the server reported
    (it carries a SQLSTATE, and pg8000 read on to ReadyForQuery) leaves the
    connection usable; anything else invalidates this one connection (not
    the whole pool)."""

    @sa.event.listens_for(engine, "handle_error")
    def _handle_error(context):
        if context.is_disconnect or context.connection is None:
            return
        orig = context.original_exception
        state = _sqlstate(orig)
        if state and _severity(orig) != "FATAL":
            return
        # Out of step, or a session the server ended (FATAL: it has closed
        # the socket). A session ended by a bound (the idle bound, one of
        # PgBouncer's own) is this connection's alone; any other FATAL (a
        # shutdown, a backend terminated) is taken, as before it was raised,
        # for the database's.
        context.is_disconnect = True
        if not state or _session_bound(orig) is not None:
            context.invalidate_pool_on_disconnect = False


def _discard_dead_connections_in_one_line(engine: Engine) -> None:
    """A connection whose session the server ended (the idle bound's
    25P03, a terminated backend, a restart; PgBouncer's FATAL) is discarded
    by SQLAlchemy, which first tries a rollback if the connection was not
    rolled back already and then closes it: pg8000 says goodbye (Terminate)
    on a socket the server has shut, the write fails, and the pool logged
    that at ERROR with the whole traceback of the statement that found the
    session gone ("Exception terminating connection", "Exception during
    reset or similar"), under a request already answered 503 naming it.

    Instead the pool's ``invalidate`` event, which SQLAlchemy emits before
    that close with the error that condemned the connection, logs one
    WARNING line naming why the server ended the session; the pool's own
    records of a rollback or close failing on such a connection are left
    out (the socket is closed all the same). A rollback or close failing
    any other way, on any connection, is logged as before. SQLAlchemy has
    no setting for it: a filter on the pool's logger, the one it logs with."""

    @sa.event.listens_for(engine, "invalidate")
    def _invalidated(dbapi_connection, connection_record, exception):
        if _ended_by_the_other_end(exception):
            _log.warning("Discarded a database connection the server had already closed (%s)", _why_ended(exception))

    logger = engine.pool.logger
    getattr(logger, "logger", logger).addFilter(_NOTHING_MORE_OF_A_DEAD_CONNECTION)


_log = logging.getLogger(__name__)


def _why_ended(exception: BaseException) -> str:
    """'25P03 idle_in_transaction_session_timeout: terminating connection
    ...' for a session the server ended, naming the bound if it is one;
    '08P01 server conn crashed? after 1.5 s idle in transaction (idle bound
    1 s): presumed idle_in_transaction_session_timeout' for the idle bound
    presumed behind PgBouncer (_idle_presumed)."""
    state = _sqlstate(exception)
    if not state:
        return f"{type(exception).__name__}: {str(exception).splitlines()[0] if str(exception) else ''}"
    presumed = _idle_presumed(exception)
    if presumed is not None:
        idle_for, idle_bound = presumed
        return (f"{state} {_message(exception)} after {idle_for:.1f} s idle in transaction (idle bound {idle_bound:g} s): "
                f"presumed {IDLE_TIMEOUT}")
    bound = _session_bound(exception)
    return f"{state}{' ' + bound if bound else ''}: {_message(exception)}"


def _ended_by_the_other_end(exc: BaseException | None) -> bool:
    """The server (or PgBouncer) ended the session (its FATAL), or the
    socket met its end shut: pg8000's InterfaceError("network error") of a
    read that found the end (no cause), or raised from a ConnectionError
    (reset, broken pipe). Only what ``exc`` is counts, its ``__cause__``
    chain, not what was being handled when it was raised (``__context__``:
    a reset failing on a healthy connection while another connection's
    FATAL propagates is a failure of its own). Not this client's own read
    timeout (``DB_TIMEOUT_SECONDS``, a TimeoutError, which pg8000 reports as
    a network error too), nor any other OSError (a file of ours missing),
    nor pg8000's "connection is closed" (this client closed it already:
    using it again is a bug here, not the server's doing)."""
    import pg8000.core as core

    chain = []
    while exc is not None and len(chain) < 5:
        chain.append(exc)
        exc = exc.__cause__
    if any(_severity(e) == "FATAL" for e in chain):
        return True
    root = chain[-1] if chain else None
    return isinstance(root, ConnectionError) or (isinstance(root, core.InterfaceError) and root.args == ("network error",))


class _NothingMoreOfADeadConnection(logging.Filter):
    FAILED = ("Exception terminating connection", "Exception closing connection", "Exception during reset or similar")

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.FAILED) and record.exc_info):
            return True
        return not _ended_by_the_other_end(record.exc_info[1])


_NOTHING_MORE_OF_A_DEAD_CONNECTION = _NothingMoreOfADeadConnection()


IDLE_PING_SECONDS = 10.0


def _ping_idle_connections(engine: Engine) -> None:
    """SQLAlchemy's pessimistic disconnect handling, applied only to
    connections idle longer than IDLE_PING_SECONDS."""

    @sa.event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection, record):
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, proxy):
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        except Exception as exc:  # any failure means: use a new connection
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc
        finally:
            try:
                cursor.close()
            except Exception:  # noqa: BLE001
                pass


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
                    cfg.database_url, cfg.db_pool_size, cfg.db_max_overflow, cfg.db_timeout_seconds,
                    bounds=request_bounds(cfg),
                )
    return _engine


def request_bounds(config: Settings) -> Bounds:
    """The bounds of a function's transactions (``DB_LOCK_TIMEOUT_SECONDS``
    and the rest; their defaults depend on the function, shared/config.py)."""
    return Bounds(config.db_lock_timeout_seconds, config.db_statement_timeout_seconds,
                  config.db_idle_in_transaction_timeout_seconds)


def sweep_bounds(config: Settings) -> Bounds:
    """The sweep's (``DB_SWEEP_*``), for :func:`bounded`."""
    return Bounds(config.db_sweep_lock_timeout_seconds, config.db_sweep_statement_timeout_seconds,
                  config.db_idle_in_transaction_timeout_seconds)


def dispose_engine() -> None:
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None


def later(conn: Connection, statement, params: dict | None = None) -> None:
    """Execute ``statement`` (one that returns no rows) in the same round
    trip as the transaction's next statement, or its COMMIT, instead of one
    of its own: a write whose answer nothing waits for costs no wake-up of
    the database and of this thread. Its failure is raised by that next
    statement (or the COMMIT), which fails the transaction as it would have;
    a rollback drops it unsent. Not on an autocommit connection: nothing
    would be sure to send it."""
    raw = conn.connection.dbapi_connection
    if raw.autocommit:
        raise RuntimeError("db.later() needs a transaction, not an autocommit connection")
    raw._defer_next = True
    try:
        conn.execute(statement, params or {})
    finally:
        raw._defer_next = False


@contextmanager
def transaction(bind: Engine | None = None) -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back on error."""
    with (bind or engine()).begin() as conn:
        yield conn


TRANSIENT, SCHEMA_BEHIND = "transient", "schema_behind"


def for_the_sweep(part: str, work, logger):
    """``work()``'s result, or None when it failed: logged (a bound reached,
    a lock held by a request or a migration, is routine: no traceback), as
    the next sweep tries again. A failed part must not stop the sweep's
    others (the outbox drains after them)."""
    try:
        return work()
    except Exception as exc:  # logged; the next sweep tries again
        bound = bound_reached(exc)
        if bound is not None:
            logger.warning(f"{part} stopped at its database {bound_described(exc)}; the next sweep retries", extra={"bound": bound})
        else:
            logger.exception(f"{part} failed; the next sweep retries")
        return None


def retry_reason(exc: BaseException) -> str | None:
    """Why the same statement would succeed later (so the caller should
    retry): ``SCHEMA_BEHIND`` when it names what the migrations have yet to
    create (:func:`schema_behind`), ``TRANSIENT`` for any other passing
    failure; None when it would not (a bug). One call, so the schema is
    judged once per error."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return TRANSIENT
    if isinstance(exc, DBAPIError):
        if (exc.connection_invalidated or _sqlstate(exc.orig).startswith(_TRANSIENT_SQLSTATE_PREFIXES)
                or _ends_the_session(exc.orig)):
            return TRANSIENT
        return SCHEMA_BEHIND if schema_behind(exc) else None
    return TRANSIENT if isinstance(exc, (ConnectionError, TimeoutError, sa.exc.TimeoutError)) else None


def is_transient(exc: BaseException) -> bool:
    """Would the same statement succeed later (:func:`retry_reason`)?"""
    return retry_reason(exc) is not None


def schema_behind(exc: BaseException, bind: Engine | None = None) -> bool:
    """Is ``exc`` an undefined function, table or column of a database whose
    schema is older than this code (shared/schema.py)? Only those errors
    read the revision (on a connection of the pool, at most every few
    seconds); against an up-to-date schema they are bugs."""
    if not isinstance(exc, DBAPIError) or _sqlstate(exc.orig) not in schema.MISSING_OBJECT_SQLSTATES:
        return False

    def read_revision():
        with (bind or engine()).connect() as conn:
            return conn.exec_driver_sql(schema.REVISION_SQL).scalar()

    return schema.database_behind(read_revision)


def bound_reached(exc: BaseException) -> str | None:
    """Which of a transaction's :class:`Bounds` ``exc`` is (LOCK_TIMEOUT,
    STATEMENT_TIMEOUT, IDLE_TIMEOUT), for the log line and the 503; None for
    any other error. Judged by the SQLSTATE and the bounds the transaction
    had (``bounds``, _keep_the_servers_last_word), not by the message's
    (translatable) text: a 55P03 is a lock_timeout when the transaction had
    one (no statement of ours locks NOWAIT); a 57014 is a statement_timeout
    when it had one (an operator's pg_cancel_backend in such a transaction
    is named so too); a 25P03 is only ever the idle bound. A bound the
    server has from elsewhere (``ALTER ROLE ... SET``) is not named: the
    error is transient all the same. Behind PgBouncer, what ended the
    session is judged as :func:`_session_bound` says."""
    if not isinstance(exc, DBAPIError):
        return None
    ended_by = _session_bound(exc.orig)
    if ended_by is not None:
        return ended_by
    state = sqlstate(exc)
    in_effect = _bounds_of(exc.orig)
    if in_effect is None:
        return None
    if state == "55P03" and in_effect.lock_timeout > 0:
        return LOCK_TIMEOUT
    if state == "57014" and in_effect.statement_timeout > 0:
        return STATEMENT_TIMEOUT
    return None


def _session_bound(orig: BaseException | None) -> str | None:
    """The bound that ended the session, if one did: the server's 25P03 is
    the idle bound. Behind PgBouncer the client gets PgBouncer's FATAL 08P01
    instead: its own bounds say which in a fixed text (_PGBOUNCER_BOUNDS),
    and a server connection lost is ``server conn crashed?`` whatever ended
    it; it is presumed to be the idle bound when the transaction, which had
    one, sat idle at least that long before the statement that found it
    lost (the server's clock of it started earlier than this client's, so
    the server ended the session by then, if nothing did before: an
    inference, which :func:`bound_described` and the log line say)."""
    state = _sqlstate(orig)
    if state == "25P03":
        return IDLE_TIMEOUT
    if state != "08P01" or _severity(orig) != "FATAL":
        return None
    pgbouncers = _PGBOUNCER_BOUNDS.get(_message(orig))
    if pgbouncers is not None:
        return pgbouncers
    return IDLE_TIMEOUT if _idle_presumed(orig) is not None else None


def _idle_presumed(orig: BaseException | None) -> tuple[float, float] | None:
    """How long the transaction had sat idle and its idle bound, in seconds,
    when the idle bound is presumed to have ended the session behind
    PgBouncer (_session_bound): an inference, not the server's word. A
    server connection lost another way (a crash, a failover, a terminated
    backend) after the idle bound's time is named so too, which is why the
    log line and the 503 say "presumed" and give the idle time measured."""
    if _sqlstate(orig) != "08P01" or _severity(orig) != "FATAL" or _message(orig) in _PGBOUNCER_BOUNDS:
        return None
    in_effect, idle_for = _bounds_of(orig), _tag_of(orig, "idle_for") or 0.0
    if in_effect is not None and 0 < in_effect.idle_in_transaction <= idle_for:
        return idle_for, in_effect.idle_in_transaction
    return None


def bound_described(exc: BaseException) -> str | None:
    """:func:`bound_reached`, for a log line or a 503's message: its name,
    or for the idle bound presumed behind PgBouncer what it was presumed
    from, ``idle_in_transaction_session_timeout (presumed: 08P01 server conn
    crashed? after 1.5 s idle in transaction, idle bound 1 s)``."""
    bound = bound_reached(exc)
    presumed = _idle_presumed(exc.orig) if bound == IDLE_TIMEOUT else None
    if presumed is None:
        return bound
    idle_for, idle_bound = presumed
    return (f"{bound} (presumed: {_sqlstate(exc.orig)} {_message(exc.orig)} after {idle_for:.1f} s idle in transaction, "
            f"idle bound {idle_bound:g} s)")


def _message(orig: BaseException | None) -> str:
    fields = orig.args[0] if orig is not None and orig.args and isinstance(orig.args[0], dict) else {}
    return str(fields.get("M", ""))


def _bounds_of(orig: BaseException | None) -> Bounds | None:
    """The bounds the failed transaction had."""
    return _tag_of(orig, "bounds")


def _tag_of(orig: BaseException | None, name: str):
    """What _keep_the_servers_last_word put on the error. pg8000's DB-API
    cursor raises its own exception with the server's fields, in the
    handling of the one the connection raised (which has them): the chain
    is followed."""
    for _ in range(3):
        if orig is None:
            return None
        if hasattr(orig, name):
            return getattr(orig, name)
        orig = orig.__context__
    return None


def sqlstate(exc: BaseException) -> str:
    """The SQLSTATE the server reported for ``exc`` ('' when it reported none)."""
    return _sqlstate(exc.orig) if isinstance(exc, DBAPIError) else ""


def _sqlstate(orig: BaseException | None) -> str:
    return schema.sqlstate(orig)


def _ends_the_session(orig: BaseException | None) -> bool:
    """A FATAL (or PANIC) error ends the server session, so no statement of
    it ran: the database refusing new connections (55000 "not currently
    accepting connections", 3D000, 28P01 while a password is rotated) is a
    database this function cannot reach, as a refused socket is, not a bug
    of the request."""
    return _severity(orig) in ("FATAL", "PANIC")


def database_state(bind: Engine | None = None) -> str:
    """``/health``'s answer about the database (shared/dbcheck.py)."""
    try:
        with (bind or engine()).connect() as conn:
            revision = conn.exec_driver_sql(schema.REVISION_SQL).scalar()
    except DBAPIError as exc:
        if _sqlstate(exc.orig) == "42P01":
            return "schema_behind"  # never migrated
        return "disconnected"
    except Exception:  # noqa: BLE001 - health reports any failure as disconnected
        return "disconnected"
    return "schema_behind" if schema.behind(revision) else "connected"


def database_reachable(bind: Engine | None = None) -> bool:
    try:
        with (bind or engine()).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - health reports any failure as disconnected
        return False
