"""The Kubernetes client's calls, each bounded as a whole exchange.

The official client hands ``_request_timeout`` to urllib3, which bounds each
socket read, not the exchange: an API server (or a proxy in front of it)
that sends its status line and then a byte every so often, of headers or of
body, would hold a diagnostics probe or a remediation action (and the claim
that guards it) for as long as it went on. Here every request the client
makes runs inside shared.deadline_core's bound of its ``_request_timeout``:
the connect, each send and each read of the answer, its body too (read
after the call returns, with ``_preload_content=False`` or by the generated
method), end within it; a bound spent is urllib3's timeout error
(``ReadTimeoutError``, ``ConnectTimeoutError``: a GET is not retried once
the bound is spent), the failure every caller already handles as a
timeout. A request made inside an enclosing ``within()`` (a caller's own
bound) ends within whichever of the two ends first.

What urllib3 waits for between attempts is not a socket wait, and no socket
timeout shortens it: an answer ``429`` or ``503`` with ``Retry-After`` (up to
six hours, three times over). urllib3 retries such an answer only for the
methods it deems idempotent (``GET``, ``PUT``, ``DELETE``…; never ``POST``
or ``PATCH``). Within a bound the wait is made when it ends inside the
bound (kube-apiserver's priority and fairness answers ``429`` with
``Retry-After: 1`` under load), and the request asked again; a wait that
would pass the bound is not begun: that answer is the answer (the client's
``ApiException`` with its status). A back-off that would pass the bound
raises :class:`DeadlinePassed` instead of sleeping.

A request without a timeout is refused (``TypeError``): it would have no
bound. So are, when the client is built (shared.kube then turns the
integration off and says why), a kubeconfig whose proxy is SOCKS (its
connection connects in its own way, which the bound cannot keep) and a
configuration with the client's ``client_go_retries`` (they sleep between
attempts outside urllib3; off by default, never set here).

Imported by shared.kube when it builds the client, never at a function's
start: it imports the client's REST module (already loaded by then) and
urllib3, not requests.
"""

from __future__ import annotations

import copy
import functools
import time

from kubernetes.client import rest
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from shared.deadline_core import DeadlinePassed, _bound, bounded_class, within


class _BoundedRetry(Retry):
    """urllib3's retries, never waiting past the bound of the exchange."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        bound = _bound.get()
        if bound is not None and error is not None and time.monotonic() >= bound.at:
            # The bound is spent: another attempt would fail at its connect
            # and name that as the cause. The timeout that spent it is the error.
            raise error.with_traceback(_stacktrace)
        if bound is not None and response is not None and response.status in self.RETRY_AFTER_STATUS_CODES:
            wait = self.get_retry_after(response) if self.respect_retry_after_header else None
            if wait is not None and time.monotonic() + wait >= bound.at:
                # A wait the bound has no room for is not begun: with
                # raise_on_status off, urlopen hands back this answer (the
                # 429 or 503 itself, for the caller to judge).
                cause = ResponseError.SPECIFIC_ERROR.format(status_code=response.status)
                raise MaxRetryError(_pool, url, ResponseError(cause))
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep_for_retry(self, response) -> bool:
        self._within_bound(self.get_retry_after(response) or 0, answered=True)
        return super().sleep_for_retry(response)

    def _sleep_backoff(self) -> None:
        self._within_bound(self.get_backoff_time(), answered=False)
        super()._sleep_backoff()

    @staticmethod
    def _within_bound(seconds: float, answered: bool) -> None:
        # What increment left through (a back-off; a Retry-After that fit
        # when it was read) and the bound no longer has room for.
        bound = _bound.get()
        if bound is not None and seconds > 0 and time.monotonic() + seconds >= bound.at:
            raise DeadlinePassed(bound.seconds, answered)


def _bounded_retries(retries) -> Retry:
    """``retries`` as the client would use them (None: urllib3's default,
    an int: that many), as a :class:`_BoundedRetry` with the same settings,
    except that an answer retries were given up on is handed back rather
    than raised (``raise_on_status``): the caller's ``ApiException`` with
    its status, as without retries."""
    bounded = copy.copy(Retry.from_int(retries))
    bounded.__class__ = _BoundedRetry
    bounded.raise_on_status = False
    return bounded


@functools.cache
def _bounded_pool(pool_class: type) -> type:
    # Its own name: urllib3's errors name the pool, and what they say stays the same.
    return type(pool_class.__name__, (pool_class,), {"ConnectionCls": bounded_class(pool_class.ConnectionCls)})


def _seconds(timeout) -> float:
    """The whole exchange's bound for a ``_request_timeout``: a number is
    it; a pair (connect, read) allows their sum."""
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return float(timeout)
    if isinstance(timeout, tuple) and len(timeout) == 2 and all(isinstance(t, (int, float)) and t > 0 for t in timeout):
        return float(sum(timeout))
    raise TypeError(f"a Kubernetes call needs a timeout (seconds, or a pair of them) to be bounded; got {timeout!r}")


class BoundedRESTClient(rest.RESTClientObject):
    """The client's REST layer, its pools' connections keeping the bound
    and each request made within its own timeout."""

    def __init__(self, configuration) -> None:
        if getattr(configuration, "client_go_retries", False):
            raise TypeError("client_go_retries sleep between attempts past any bound: leave them off")
        super().__init__(configuration)
        manager = self.pool_manager
        # A new mapping: urllib3's is shared by every PoolManager. A redirect
        # to another host gets a pool of these too. Refuses SOCKS (TypeError).
        manager.pool_classes_by_scheme = {scheme: _bounded_pool(pool) for scheme, pool in manager.pool_classes_by_scheme.items()}
        manager.connection_pool_kw["retries"] = _bounded_retries(manager.connection_pool_kw.get("retries"))
        manager.clear()

    def request(self, method, url, headers=None, body=None, post_params=None, _request_timeout=None):
        with within(_seconds(_request_timeout)):
            return super().request(method, url, headers=headers, body=body, post_params=post_params,
                                   _request_timeout=_request_timeout)


def api_client(configuration=None):
    """An ``ApiClient`` for ``configuration`` whose every request is
    bounded (:class:`BoundedRESTClient`)."""
    from kubernetes import client

    api = client.ApiClient(configuration)
    api.rest_client = BoundedRESTClient(api.configuration)
    return api
