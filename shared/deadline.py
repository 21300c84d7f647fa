"""A wall-clock bound on a whole HTTP exchange made with ``requests``.

``requests``' ``timeout`` bounds each socket operation, not the exchange: a
peer (or a broken proxy) that sends its status line and then a byte every
few seconds, of headers or of body, keeps a POST open for as long as it
likes, past the claim that guards the notification. Inside :func:`within`,
everything an exchange waits on fits in what is left of the bound: the
name lookup, the connect, the TLS handshake, every send and every read. A
wait once the bound is spent raises :class:`DeadlinePassed` (a
``TimeoutError``, so urllib3 and requests report it as the timeout it is).
How each wait is bounded (the lookup on resolver threads, the staggered
connects of RFC 8305, every send and read, and what the bound does not
shorten) is urllib3's business, in shared.deadline_core, which the
Kubernetes client shares (shared.kubebound) without requests; this module
is its requests side.

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
import json

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

# The connection machinery is urllib3's alone (shared.deadline_core): the
# Kubernetes client keeps the same bound without requests.
from shared.deadline_core import (  # noqa: F401 - names of this module's API and its tests'
    CONNECT_STAGGER_SECONDS,
    RESOLVER_THREADS,
    DeadlinePassed,
    _Bound,
    _BoundedConnection,
    _BoundedResponse,
    _BoundedSocketReader,
    _Heard,
    _heard,
    _interleaved,
    _Resolver,
    _resolver,
    bounded_class,
    within,
)

READ_CHUNK_BYTES = 16 * 1024
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


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections keep the bound of :func:`within`."""

    def get_connection_with_tls_context(self, *args, **kwargs):
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        pool.ConnectionCls = bounded_class(pool.ConnectionCls)
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
