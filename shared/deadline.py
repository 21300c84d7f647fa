"""A wall-clock bound on a whole HTTP exchange made with ``requests``.

``requests``' ``timeout`` bounds each socket operation, not the exchange: a
peer (or a broken proxy) that sends its status line and then a byte every
few seconds, of headers or of body, keeps a POST open for as long as it
likes, past the claim that guards the notification. Inside :func:`within`,
every send and every read on the connection waits at most what is left of
the bound, and a read once the bound is spent raises :class:`DeadlinePassed`
(a ``TimeoutError``, so urllib3 and requests report it as the timeout it
is). No thread: the socket's own timeout is shortened before each call.

The bound reaches the connection through a context variable, so a session
needs :class:`DeadlineAdapter` mounted (:func:`bounded` does it once); the
adapter swaps each pool's connection class for a subclass that keeps the
bound, whatever the pool is (direct, through a proxy, TLS or not).

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

import functools
import http.client
import io
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

READ_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True)
class _Bound:
    at: float        # time.monotonic() when it is spent
    seconds: float   # its length, to name it in an error


_bound: ContextVar[_Bound | None] = ContextVar("http_exchange_bound", default=None)


class DeadlinePassed(TimeoutError):
    """The exchange was not over within its bound. The text is ours alone
    (never a URL): errors are built from it."""

    def __init__(self, seconds: float, answered: bool):
        what = "answer not complete" if answered else "no answer"
        super().__init__(f"{what} within {round(seconds, 2):g}s")
        self.answered = answered


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Every exchange of a :func:`bounded` session inside the block ends
    within ``seconds`` of entering it: connect, send and the whole answer."""
    token = _bound.set(_Bound(time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _bound.reset(token)


def _socket_timeout(bound: _Bound, per_call: float | None, answered: bool) -> float:
    """What one socket call may wait: the per-call timeout, never past the bound."""
    left = bound.at - time.monotonic()
    if left <= 0:
        raise DeadlinePassed(bound.seconds, answered)
    return left if per_call is None else min(per_call, left)


class _BoundedSocketReader(io.RawIOBase):
    """The socket reader http.client parses the answer from (status line,
    headers, body, chunk sizes), each read shortened to the bound."""

    def __init__(self, raw: io.RawIOBase, sock, bound: _Bound):
        super().__init__()
        self._raw = raw
        self._sock = sock
        self._bound = bound
        # urllib3 set the per-read timeout just before the answer is read.
        self._per_read = sock.gettimeout()
        self._received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(_socket_timeout(self._bound, self._per_read, self._received > 0))
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


class _BoundedConnection:
    """Mixed into urllib3's connection class of a pool."""

    response_class = _BoundedResponse

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


def read_at_most(limit: int | None):
    """A response hook (for a request made with ``stream=True``): at most
    ``limit`` bytes of the answer's body (all of it for None) become its
    content, read inside the bound of :func:`within`. It runs before
    requests would read a redirect's whole body itself (it does, to release
    the connection, even when it does not follow the redirect). A failure
    while reading raises what requests would, a timeout as a timeout. An
    answer read to its end leaves the connection to be reused; one cut
    short closes it."""

    def hook(response: requests.Response, *args, **kwargs) -> requests.Response:
        data = bytearray()
        try:
            while limit is None or len(data) < limit:
                want = READ_CHUNK_BYTES if limit is None else min(READ_CHUNK_BYTES, limit - len(data))
                chunk = response.raw.read(want, decode_content=True)
                if not chunk:
                    break
                data += chunk
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.ReadTimeout(exc) from exc
        except urllib3.exceptions.SSLError as exc:
            raise requests.exceptions.SSLError(exc) from exc
        except urllib3.exceptions.DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise requests.ConnectionError(exc) from exc
        finally:
            response.close()
        response._content = bytes(data)
        response._content_consumed = True
        return response

    return hook


def request(http: requests.Session, method: str, url: str, timeout: float, max_bytes: int | None = None,
            **kwargs) -> requests.Response:
    """One request and its answer (at most ``max_bytes`` of its body, all
    for None) within ``timeout`` as a whole, on ``http`` made
    :func:`bounded`; ``kwargs`` go to requests (``allow_redirects`` too:
    each sender says whether it follows one). Raises requests' errors, a
    bound spent as ``requests.Timeout``; the answer's content is read."""
    bounded(http)
    # Through the session's own get()/post()/..., which a subclass may extend.
    send = getattr(http, method.lower())
    with within(timeout):
        return send(url, timeout=timeout, stream=True, hooks={"response": read_at_most(max_bytes)}, **kwargs)
