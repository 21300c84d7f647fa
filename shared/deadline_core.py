"""A wall-clock bound on a whole HTTP exchange made with urllib3: the
connection machinery under shared.deadline (for ``requests``) and
shared.kubebound (for the Kubernetes client), without ``requests`` itself,
so a pod that reads only its service account for the Kubernetes client does
not load it.

A per-call socket timeout bounds each socket operation, not the exchange: a
peer (or a broken proxy) that sends its status line and then a byte every
few seconds, of headers or of body, keeps a call open for as long as it
likes. Inside :func:`within`, everything an exchange waits on fits in what
is left of the bound: the name lookup, the connect, the TLS handshake, every
send and every read. A wait once the bound is spent raises
:class:`DeadlinePassed` (a ``TimeoutError``, so urllib3 reports it as the
timeout it is). The socket's own timeout is shortened before each call; the
one wait a socket timeout cannot shorten, ``getaddrinfo``, runs on a small
shared pool of resolver threads (:class:`_Resolver`) and is waited on at
most what is left.

A name with several addresses is connected to staggered, in
``getaddrinfo``'s order with the address families interleaved (its first
IPv6 address, its first IPv4 one, its second IPv6 one…; the connection
attempts of RFC 8305, Happy Eyeballs, without its parallel lookups): the
first address alone, the next one also after
:data:`CONNECT_STAGGER_SECONDS` (at once when one is refused), and so on;
the first to answer is used and the others are dropped. An address that
stays silent (a host that is down) costs the stagger, not the bound, so a
name whose first address is dead is still delivered to within the bound
through a later one, and a name whose addresses are all dead fails at the
bound, not at one bound per address.

What the bound does not shorten is local work between the waits: a new TLS
connection loads the CA bundle after the connect and before the handshake
(tens of milliseconds), and the handshake may wait what was left when the
connect ended, so such an exchange can end that much past its bound.

The bound reaches the connection through a context variable; a pool keeps
it when its connection class is :func:`bounded_class` of urllib3's (direct
or through an HTTP(S) proxy, TLS or not). A connection class with a connect
of its own (a SOCKS proxy's) is refused with a ``TypeError``: the bounded
connect would replace it and go straight to the target, past the proxy. An
answer keeps the bound it was asked within: its body, read after the
``with within(...)`` block has ended, is still read within it.
"""

from __future__ import annotations

import errno
import functools
import http.client
import io
import ipaddress
import os
import queue
import selectors
import socket
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import urllib3.connection
import urllib3.exceptions
from urllib3.util.connection import allowed_gai_family

# How long one address of a name is given alone before the next is tried
# alongside it: the 250 ms RFC 8305 recommends.
CONNECT_STAGGER_SECONDS = 0.25
# Names looked up at once. A lookup past its bound keeps its thread until
# the system resolver gives up (its own timeouts): one per stalled name, so
# this many distinct names whose DNS stalls at once leave the next name
# waiting for a thread (at most its bound). Threads are started only when
# a lookup would wait for one and live on idle (a few KiB resident each).
RESOLVER_THREADS = 32


@dataclass(frozen=True)
class _Bound:
    at: float        # time.monotonic() when it is spent
    seconds: float   # its length, to name it in an error


_bound: ContextVar[_Bound | None] = ContextVar("http_exchange_bound", default=None)


class _Heard:
    """The status line of an answer whose headers never came whole (a
    timeout or a dropped connection after it), and the last answer whose
    headers did (``response``, set by :func:`read_at_most`), for
    :func:`request`: an error raised after it is the answer's, never the
    URL's."""

    status: int | None = None
    response: object = None  # a requests.Response: shared.deadline sets it


_heard: ContextVar[_Heard | None] = ContextVar("http_exchange_heard", default=None)


class DeadlinePassed(TimeoutError):
    """The exchange was not over within its bound. The text is ours alone
    (never a URL): errors are built from it."""

    def __init__(self, seconds: float, answered: bool, connected: bool = True):
        what = "answer not complete" if answered else "no answer" if connected else "no connection"
        super().__init__(f"{what} within {round(seconds, 2):g}s")
        self.answered = answered
        self.connected = connected


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Every exchange of a :func:`bounded` session inside the block ends
    within ``seconds`` of entering it: name lookup, connect, TLS handshake,
    send and the whole answer. Inside another block, the one that ends
    first bounds them: a call's own timeout never outlasts what its caller
    was given."""
    mine, outer = _Bound(time.monotonic() + seconds, seconds), _bound.get()
    token = _bound.set(outer if outer is not None and outer.at <= mine.at else mine)
    try:
        yield
    finally:
        _bound.reset(token)


def _socket_timeout(bound: _Bound, per_call: float | None, answered: bool, connected: bool = True) -> float:
    """What one socket call may wait: the per-call timeout, never past the bound."""
    left = bound.at - time.monotonic()
    if left <= 0:
        raise DeadlinePassed(bound.seconds, answered, connected)
    return left if per_call is None else min(per_call, left)


class _Resolver:
    """A few daemon threads that run ``getaddrinfo`` for callers that wait
    on the answer at most so long. A thread is added only when a lookup
    would otherwise wait for one (up to ``threads``), and a name already
    being looked up is not looked up again: its callers share the one
    lookup, so a name whose DNS stalls holds one thread however often it is
    asked for, and the other names' lookups go on. Daemon threads, not a
    ThreadPoolExecutor: a lookup stuck in the resolver must not hold the
    process at exit."""

    def __init__(self, threads: int):
        self._threads = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        self._idle = 0      # threads waiting for a job
        self._queued = 0    # jobs no thread has taken yet
        self._in_flight: dict[tuple, Future] = {}

    def after_fork(self) -> None:
        # A forked child has none of its parent's threads.
        self.__init__(self._threads)

    def submit(self, host: str, port: int, family: int) -> Future:
        key = (host, port, family)
        with self._lock:
            future = self._in_flight.get(key)
            if future is not None:
                return future
            future = self._in_flight[key] = Future()
            # Queued before a thread is started for it: a thread finds it.
            self._jobs.put((future, key))
            self._queued += 1
            if self._queued > self._idle and self._started < self._threads:
                self._started += 1
                try:
                    threading.Thread(target=self._work, name="deadline-resolver", daemon=True).start()
                except BaseException as exc:  # noqa: BLE001 - handed to the callers
                    # No thread for it: fail this lookup now rather than
                    # leave every caller of the name waiting out its bound.
                    # The job stays queued, done: a thread skips it.
                    self._started -= 1
                    del self._in_flight[key]
                    future.set_exception(OSError(errno.EAGAIN, f"no thread for the name lookup ({type(exc).__name__})"))
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            future, key = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if future.done():
                continue  # failed when no thread could be started for it
            try:
                future.set_running_or_notify_cancel()
                future.set_result(socket.getaddrinfo(*key, socket.SOCK_STREAM))
            except BaseException as exc:  # noqa: BLE001 - handed to the callers
                future.set_exception(exc)
            finally:
                with self._lock:
                    if self._in_flight.get(key) is future:
                        del self._in_flight[key]


_resolver = _Resolver(RESOLVER_THREADS)
os.register_at_fork(after_in_child=_resolver.after_fork)


def _addresses(host: str, port: int, bound: _Bound) -> list:
    """``getaddrinfo``'s answer for the connect, waited on at most what is
    left of the bound (an address is its own answer: no lookup, no thread)."""
    family = allowed_gai_family()
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    future = _resolver.submit(host, port, family)
    try:
        # Never cancelled: other callers may be waiting on the same lookup.
        return future.result(timeout=_socket_timeout(bound, None, False, connected=False))
    except TimeoutError:
        if time.monotonic() >= bound.at:
            raise DeadlinePassed(bound.seconds, False, connected=False) from None
        raise


def _interleaved(addresses: list) -> list:
    """``getaddrinfo``'s answer with its address families taking turns, the
    first family first (RFC 8305, section 4): a name whose IPv6 addresses
    are all unreachable reaches its IPv4 one after one stagger, not after
    one per IPv6 address."""
    families: dict = {}
    for address in addresses:
        families.setdefault(address[0], []).append(address)
    turns = list(families.values())
    return [group[i] for i in range(max(map(len, turns), default=0)) for group in turns if i < len(group)]


_CONNECTING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR)


def _connect_first(addresses: list, bound: _Bound, source_address, socket_options) -> socket.socket:
    """A socket connected to the first of ``addresses`` to answer, tried
    staggered in the given order, all within the bound. Raises the last address's
    error when none connects, :class:`DeadlinePassed` when the bound ends."""
    waiting = list(addresses)
    if not waiting:
        raise OSError("getaddrinfo returns an empty list")
    selector = selectors.DefaultSelector()
    error: OSError | None = None
    next_start = 0.0
    try:
        while True:
            now = time.monotonic()
            if now >= bound.at:
                raise DeadlinePassed(bound.seconds, False, connected=False)
            if waiting and (now >= next_start or not selector.get_map()):
                family, kind, proto, _, address = waiting.pop(0)
                sock = None
                try:
                    sock = socket.socket(family, kind, proto)
                    for option in socket_options or ():
                        sock.setsockopt(*option)
                    if source_address:
                        sock.bind(source_address)
                    sock.setblocking(False)
                    code = sock.connect_ex(address)
                except OSError as exc:
                    if sock is not None:
                        sock.close()
                    error = exc
                    continue
                if code == 0:
                    return sock
                if code not in _CONNECTING:
                    sock.close()
                    error = OSError(code, os.strerror(code))
                    continue
                selector.register(sock, selectors.EVENT_WRITE)
                next_start = now + CONNECT_STAGGER_SECONDS
                continue
            if not selector.get_map():
                raise error  # every address failed at once
            wait = bound.at - now
            if waiting:
                wait = min(wait, next_start - now)
            for key, _ in selector.select(max(wait, 0)):
                sock = key.fileobj
                selector.unregister(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0:
                    return sock
                sock.close()
                error = OSError(code, os.strerror(code))
                next_start = 0.0  # one refused: the next address now
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()


class _BoundedSocketReader(io.RawIOBase):
    """The socket reader http.client parses the answer from (status line,
    headers, body, chunk sizes), each read shortened to the bound."""

    def __init__(self, raw: io.RawIOBase, sock, bound: _Bound):
        super().__init__()
        self._raw = raw
        self._sock = sock
        self._bound = bound
        self._received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        # What is left of the bound, whatever timeout the socket was left
        # with: the caller's read timeout is the bound itself.
        self._sock.settimeout(_socket_timeout(self._bound, None, self._received > 0))
        try:
            n = self._raw.readinto(buffer)
        except TimeoutError as exc:
            if time.monotonic() >= self._bound.at:
                raise DeadlinePassed(self._bound.seconds, self._received > 0) from exc
            raise
        self._received += n or 0
        return n

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _BoundedResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        bound = _bound.get()
        if bound is not None:
            # makefile("rb") is a BufferedReader over the socket's reader:
            # the same, with the bound between them.
            raw = self.fp.detach()
            self.fp = io.BufferedReader(_BoundedSocketReader(raw, sock, bound))

    def begin(self) -> None:
        try:
            super().begin()
        except BaseException:
            # http.client sets the status before it reads the headers: a
            # receiver that said 2xx may have acted on the request already.
            heard = _heard.get()
            if heard is not None and isinstance(self.status, int):
                heard.status = self.status
            raise


class _BoundedConnection:
    """Mixed into urllib3's connection class of a pool."""

    response_class = _BoundedResponse

    def _new_conn(self) -> socket.socket:
        """The lookup and the connect within the bound, and the socket handed
        on with only what is left of it, which is all a TLS handshake that
        follows may wait."""
        bound = _bound.get()
        if bound is None:
            return super()._new_conn()
        host = self._dns_host.strip("[]")
        try:
            host.encode("idna")
        except UnicodeError:
            raise urllib3.exceptions.LocationParseError(f"'{host}', label empty or too long") from None
        try:
            sock = _connect_first(_interleaved(_addresses(host, self.port, bound)), bound, self.source_address, self.socket_options)
            try:
                sock.settimeout(_socket_timeout(bound, None, False, connected=False))
            except BaseException:
                sock.close()
                raise
        except socket.gaierror as exc:
            raise urllib3.exceptions.NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise urllib3.exceptions.ConnectTimeoutError(self, f"Connection to {self.host} timed out: {exc}") from exc
        except OSError as exc:
            raise urllib3.exceptions.NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def send(self, data) -> None:
        bound = _bound.get()
        if bound is not None and self.sock is not None:
            # sendall() treats the socket timeout as the bound of the whole call.
            self.sock.settimeout(_socket_timeout(bound, self.timeout, False))
        super().send(data)


@functools.cache
def bounded_class(connection_class: type) -> type:
    if issubclass(connection_class, _BoundedConnection):
        return connection_class
    if connection_class._new_conn is not urllib3.connection.HTTPConnection._new_conn:
        # Its own connect (a SOCKS proxy's): the bounded one would replace
        # it and go straight to the target, past the proxy.
        raise TypeError(f"{connection_class.__name__} connects in its own way (a SOCKS proxy?): "
                        "the bound cannot keep it, and would bypass it")
    return type(f"Bounded{connection_class.__name__}", (_BoundedConnection, connection_class), {})
