"""A wall-clock bound on a whole HTTP exchange made with ``requests``.

``requests``' ``timeout`` bounds each socket operation, not the exchange: a
peer (or a broken proxy) that sends its status line and then a byte every
few seconds, of headers or of body, keeps a POST open for as long as it
likes, past the claim that guards the notification. Inside :func:`within`,
everything an exchange waits on fits in what is left of the bound: the
name lookup, the connect, the TLS handshake, every send and every read. A
wait once the bound is spent raises :class:`DeadlinePassed` (a
``TimeoutError``, so urllib3 and requests report it as the timeout it is).
The socket's own timeout is shortened before each call; the one wait a
socket timeout cannot shorten, ``getaddrinfo``, runs on a small shared pool
of resolver threads (:class:`_Resolver`) and is waited on at most what is
left.

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

The bound reaches the connection through a context variable, so a session
needs :class:`DeadlineAdapter` mounted (:func:`bounded` does it once, when
the session is built; :func:`request` refuses a session without it); the
adapter swaps each pool's connection class for a subclass that keeps the
bound: direct or through an HTTP(S) proxy, TLS or not. A connection class
with a connect of its own (a SOCKS proxy's) is refused with a
``TypeError``: the bounded connect would replace it and go straight to the
target, past the proxy.

Every sender that waits on a peer uses it: the escalation's notifications,
the outbox's and a redelivery's publishes to the Broker, the Prometheus
queries, the AlertManager silences, the local Broker's deliveries. With
``stream=True`` and the :func:`read_at_most` response hook, the body is
read inside the bound too, at most so many bytes of it, and a bound spent
while reading it is reported as the timeout it is (requests itself would
call it a ConnectionError).

Imported by whatever sends, never on a function's start path: it imports
requests.
"""

from __future__ import annotations

import codecs
import errno
import functools
import http.client
import io
import ipaddress
import json
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

import requests
import urllib3.connection
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.connection import allowed_gai_family

READ_CHUNK_BYTES = 16 * 1024
# How long one address of a name is given alone before the next is tried
# alongside it: the 250 ms RFC 8305 recommends.
CONNECT_STAGGER_SECONDS = 0.25
# Names looked up at once. A lookup past its bound keeps its thread until
# the system resolver gives up (its own timeouts): one per stalled name, so
# this many distinct names whose DNS stalls at once leave the next name
# waiting for a thread (at most its bound). Threads are started only when
# a lookup would wait for one and live on idle (a few KiB resident each).
RESOLVER_THREADS = 32

# A URL no request can be made to: a host name urllib3 or the ssl module
# cannot encode (a label empty or over 63 characters, refused by IDNA), one
# requests cannot parse, no scheme, a scheme with no adapter. A setting to
# fix, not a peer to wait for: :func:`request` raises one of these (never
# urllib3's ``LocationParseError`` or a bare ``UnicodeError``, which are no
# ``requests.RequestException``), and each sender says what it means to it.
# Only raised for what failed before any answer came: an answer that points
# nowhere a request can go (a redirect's Location that is not UTF-8) is
# :class:`UnusableAnswer`, the peer's fault, not the setting's.
UNUSABLE_URL = (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema)


class UnusableAnswer(requests.exceptions.RequestException):
    """An answer requests could not go on from (a redirect's ``Location``
    that is not UTF-8 or no URL, raised while requests resolves it), when
    the redirect was to be followed. Carries the answer as ``response``."""


def answered(exc: BaseException) -> bool:
    """Did the peer answer before ``exc`` (its status line and headers came:
    a body that broke, a refusal, an answer requests could not go on from)?
    One rule for every sender: an error that carries the answer as its
    ``response`` was answered, whatever its class (an ``SSLError`` inside a
    body is a ``ConnectionError`` too)."""
    return getattr(exc, "response", None) is not None


def unusable_setting(exc: BaseException, setting: str) -> str:
    """The setting to fix for one of :data:`UNUSABLE_URL`: ``setting``
    (K_SINK, a channel's URL), or the proxy's when it is the proxy URL that
    cannot be used (``InvalidProxyURL``, from HTTP(S)_PROXY)."""
    return "HTTP_PROXY/HTTPS_PROXY" if isinstance(exc, requests.exceptions.InvalidProxyURL) else setting


# Codecs for host names, never a body's charset: punycode "decodes" ASCII
# into other letters, idna cannot decode with replacement (UnicodeError).
_HOST_NAME_CODECS = frozenset({"idna", "punycode"})


def _named_charset_unusable(response: requests.Response) -> bool:
    try:
        return bool(response.encoding) and codecs.lookup(response.encoding).name in _HOST_NAME_CODECS
    except LookupError:
        return False  # an unknown charset: requests' .text reads it with replacement


def answer_text(response: requests.Response) -> str:
    """The answer's body as text, never an error: requests' ``text`` decodes
    with the charset the answer names, and one that is a host name's codec
    (``idna``: a ``UnicodeError``; ``punycode``: a ``UnicodeError``, or
    other letters) would raise out of a sender after the receiver had said
    ``2xx``. Such a body is read as UTF-8, what cannot be read replaced."""
    try:
        if not _named_charset_unusable(response):
            return response.text
    except (UnicodeError, LookupError, TypeError):
        pass
    return (response.content or b"").decode("utf-8", errors="replace")


def answer_json(response: requests.Response):
    """``response.json()``, the body read as :func:`answer_text` reads it
    when its charset cannot be used; a body that is not JSON raises
    ``ValueError`` as requests does."""
    if _named_charset_unusable(response):
        return json.loads(answer_text(response))
    try:
        return response.json()
    except (UnicodeError, LookupError, TypeError) as exc:
        if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
            raise  # requests' JSONDecodeError: not JSON
        return json.loads(answer_text(response))


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
    response: requests.Response | None = None


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
    send and the whole answer."""
    token = _bound.set(_Bound(time.monotonic() + seconds, seconds))
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
def _bounded_class(connection_class: type) -> type:
    if issubclass(connection_class, _BoundedConnection):
        return connection_class
    if connection_class._new_conn is not urllib3.connection.HTTPConnection._new_conn:
        # Its own connect (a SOCKS proxy's): the bounded one would replace
        # it and go straight to the target, past the proxy.
        raise TypeError(f"{connection_class.__name__} connects in its own way (a SOCKS proxy?): "
                        "the bound cannot keep it, and would bypass it")
    return type(f"Bounded{connection_class.__name__}", (_BoundedConnection, connection_class), {})


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections keep the bound of :func:`within`."""

    def get_connection_with_tls_context(self, *args, **kwargs):
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        pool.ConnectionCls = _bounded_class(pool.ConnectionCls)
        return pool


def bounded(http: requests.Session) -> requests.Session:
    """``http`` with :class:`DeadlineAdapter` for http:// and https://
    (mounted once; the session's other adapters stay)."""
    for prefix in ("https://", "http://"):
        if not isinstance(http.adapters.get(prefix), DeadlineAdapter):
            http.mount(prefix, DeadlineAdapter())
    return http


def _cut_short(response: requests.Response, error: requests.RequestException, cause: BaseException,
               partial_2xx: bool) -> None:
    """Raise ``error``, or with ``partial_2xx`` leave it on a ``2xx`` as
    ``cut_short``. Either way it carries the answer as ``error.response``:
    the receiver was reached and answered (its status line and headers)."""
    error.response = response
    if not (partial_2xx and 200 <= response.status_code < 300):
        raise error from cause
    error.__cause__ = cause
    response.cut_short = error


def _status_only(url: str, status: int, error: requests.RequestException) -> requests.Response:
    """The answer of a receiver that sent a ``2xx`` status line and no whole
    headers: its status, no headers, no body, ``cut_short``."""
    response = requests.Response()
    response.status_code = status
    response.url = url
    response.request = error.request
    response._content = b""
    response._content_consumed = True
    response.cut_short = error
    return response


def read_at_most(limit: int | None, partial_2xx: bool = False):
    """A response hook (for a request made with ``stream=True``): at most
    ``limit`` bytes of the answer's body (all of it for None) become its
    content, read inside the bound of :func:`within`. It runs before
    requests would read a redirect's whole body itself (it does, to release
    the connection, even when it does not follow the redirect). A failure
    while reading raises what requests would, a timeout as a timeout. An
    answer read to its end leaves the connection to be reused; one cut
    short closes it. With ``partial_2xx``, a ``2xx`` whose body the bound
    cuts off keeps what arrived, and the timeout is left on the response as
    ``cut_short`` for the caller to judge (a receiver that said ``2xx`` may
    have acted on the request: sending it again could do it twice); so does
    one whose connection drops inside the body (``ChunkedEncodingError``,
    as requests names it, raised otherwise), whose TLS fails there
    (``SSLError``) or whose body cannot be decoded (``ContentDecodingError``).
    Any of these raised carries the answer as its ``response`` (requests'
    own attribute): a caller tells "reached, and the answer broke" from
    "never answered" by it."""

    def hook(response: requests.Response, *args, **kwargs) -> requests.Response:
        heard = _heard.get()
        if heard is not None:
            heard.response = response
        data = bytearray()
        try:
            while limit is None or len(data) < limit:
                want = READ_CHUNK_BYTES if limit is None else min(READ_CHUNK_BYTES, limit - len(data))
                # read1: what has arrived, so a read cut off by the bound
                # keeps what came before it (read() waits for the whole chunk).
                chunk = response.raw.read1(want, decode_content=True)
                if not chunk:
                    break
                data += chunk
        except urllib3.exceptions.ReadTimeoutError as exc:
            _cut_short(response, requests.ReadTimeout(exc), exc, partial_2xx)
        except urllib3.exceptions.SSLError as exc:
            # After the status line and headers: the receiver answered, as
            # for a connection dropped inside the body.
            _cut_short(response, requests.exceptions.SSLError(exc), exc, partial_2xx)
        except urllib3.exceptions.DecodeError as exc:
            _cut_short(response, requests.exceptions.ContentDecodingError(exc), exc, partial_2xx)
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead) as exc:
            # The connection dropped inside the body: requests' own name for
            # it. Not a ConnectionError: the peer was reached and answered,
            # so a caller does not take it for a stale kept-alive connection.
            _cut_short(response, requests.exceptions.ChunkedEncodingError(exc), exc, partial_2xx)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise requests.ConnectionError(exc, response=response) from exc
        finally:
            response.close()
        response._content = bytes(data)
        response._content_consumed = True
        return response

    return hook


def request(http: requests.Session, method: str, url: str, timeout: float, max_bytes: int | None = None,
            partial_2xx: bool = False, **kwargs) -> requests.Response:
    """One request and its answer (at most ``max_bytes`` of its body, all
    for None) within ``timeout`` as a whole, on ``http`` made
    :func:`bounded` when it was built (a session without it is refused,
    ``TypeError``); ``kwargs`` go to requests (``allow_redirects`` too:
    each sender says whether it follows one). Raises requests' errors, a
    bound spent as ``requests.Timeout``, a URL no request can be made to as
    one of :data:`UNUSABLE_URL`; the answer's content is read.

    With ``partial_2xx``, a ``2xx`` cut off after its status line (headers
    or body still coming at the bound, or the connection dropped) comes
    back as an answer with what arrived of it and the error as
    ``cut_short`` (see :func:`read_at_most`): for a sender that judges by
    the status, the receiver has acted on the request."""
    # Mounted when the session is built (bounded()), never here: a session
    # may be shared by threads, and mounting is not safe while another sends.
    if not isinstance(http.get_adapter(url), DeadlineAdapter):
        # requests picks the adapter mounted with the longest matching prefix.
        raise TypeError(f"the adapter for this URL's prefix would carry the exchange without the bound "
                        f"({type(http.get_adapter(url)).__name__}; build the session with bounded())")
    # Through the session's own get()/post()/..., which a subclass may extend.
    send = getattr(http, method.lower())
    heard = _Heard()
    token = _heard.set(heard)
    try:
        with within(timeout):
            return send(url, timeout=timeout, stream=True, hooks={"response": read_at_most(max_bytes, partial_2xx)}, **kwargs)
    except (requests.Timeout, requests.ConnectionError) as exc:
        if partial_2xx and heard.status is not None and 200 <= heard.status < 300:
            return _status_only(url, heard.status, exc)
        raise
    except ValueError as exc:
        if heard.response is not None:
            # Raised by requests after the answer came (resolving a redirect
            # whose Location is not UTF-8 or not a URL, or its proxies): the
            # answer's fault, never the URL's. Not followed, the answer is
            # what it is (a 3xx each sender judges); followed, an error
            # carrying it.
            if not kwargs.get("allow_redirects", True):
                return heard.response
            raise UnusableAnswer(f"the answer could not be followed: {type(exc).__name__}",
                                 response=heard.response) from exc
        if isinstance(exc, requests.RequestException) or not isinstance(exc, (urllib3.exceptions.LocationValueError, UnicodeError)):
            raise
        # Before any answer: a host name with a label over 63 characters
        # passes requests' own check and fails in urllib3
        # (LocationParseError) or, behind a proxy, in the TLS handshake's
        # IDNA encoding (UnicodeError): neither is a requests error, and a
        # sender catching those would crash on it.
        raise requests.exceptions.InvalidURL(f"Failed to parse: {type(exc).__name__}: {exc}") from exc
    finally:
        _heard.reset(token)
