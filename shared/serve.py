"""The entry point of every function: the one picked by ``FUNCTION_SOURCE``
/ ``FUNCTION_TARGET``, built by functions-framework, served in this one
process by waitress.

Why one process, not gunicorn's master and worker as functions-framework
runs it: Knative sends an instance at most containerConcurrency requests
and scales out by adding pods, and Kubernetes restarts a container whose
process dies, which is the supervision a gunicorn master adds. That master
held a second copy of Flask, functions-framework and the function's
``main.py`` for the life of the instance, and every start paid for a fork
and a second interpreter's worth of setup (docs/benchmarks.md, sections 5
and 6). waitress (the Pylons project's production WSGI server, pure
Python) answers from a pool of ``THREADS`` threads, as gunicorn's gthread
worker did, and reads and writes sockets on its own thread, so a slow
client holds no handler thread.

Without the two variables the process prints one line naming them and
exits 2, instead of functions-framework's traceback.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

REQUIRED = ("FUNCTION_SOURCE", "FUNCTION_TARGET")
# The one proxy whose forwarded headers are read: Knative's queue-proxy, on loopback.
TRUSTED_PROXY = "127.0.0.1"
# How long a stopping instance keeps answering the requests it has. Knative
# drains the pod before its SIGTERM, so this is a bound, not a wait: the
# longest revision timeout of any function (knative/base/services.yaml).
DRAIN_SECONDS = 60.0
# An answer up to this size is kept in memory, not spooled to a file in the
# image's small in-memory /tmp; the API's pages are far below it.
ANSWER_IN_MEMORY = 32 * 1024 * 1024

# How long a thread may hold the interpreter while another waits for it
# (CPython's default is 5 ms). Every request's thread waits for the
# interpreter after each socket read, and the intake's one group-commit
# writer does so after each of its transaction's round trips to PostgreSQL:
# behind a thread parsing a webhook it waited up to the whole interval per
# round trip, and every request of the batch with it. At 1 ms the intake
# served 32 connections with 20% less CPU per webhook and about 40% more
# webhooks a second, with no change at 1 connection (docs/benchmarks.md).
SWITCH_INTERVAL_SECONDS = 0.001

log = logging.getLogger("serve")


def missing(env: Mapping[str, str]) -> list[str]:
    return [name for name in REQUIRED if not env.get(name, "").strip()]


def server_limit(body_cap: int) -> int:
    """The server's own bound on a request body. waitress counts a chunked
    body's bytes as sent, with each chunk's size line, so the bound leaves
    room for that framing (chunks of 8 bytes and up, as senders write them)
    and the function's own check (shared/http.py read_body) refuses a body
    over its limit exactly, with its JSON error."""
    return 2 * body_cap + 64 * 1024


def server_settings(env: Mapping[str, str], body_cap: int) -> dict:
    """waitress's settings for one instance.

    A body far over the function's cap is refused (413) by the server
    without being read past its bound, and a body under it stays in memory
    instead of a temporary file (the image's /tmp is a small in-memory
    volume); answers are kept in memory too. In Knative the queue-proxy in
    front lets at most containerConcurrency requests through at once, which
    bounds what those buffers add up to; the connection limit is gunicorn's
    (1,000), for a sender that keeps many idle connections (at 32, a
    Broker's pool of them stopped new deliveries until waitress closed idle
    ones, two minutes later). Only the proxy in front on loopback
    (Knative's queue-proxy) may say the request came over TLS, as gunicorn's
    default let it, so the board's cookie stays Secure. With
    ``TRUSTED_PROXY_HOPS`` (validated by the query's start, which runs
    first; a wrong value is 0 for any other function, warned by its
    settings: shared/config.py) it may also say who the client is: the X-Forwarded-For entry that
    many places from the right becomes the request's remote address (what
    the board's sign-in limit counts by, and what logs show); the entries
    further left are the client's own word and are never read."""
    threads = int(env.get("THREADS", "8"))
    limit = server_limit(body_cap)
    from shared.config import trusted_proxy_hops

    hops = trusted_proxy_hops(env)
    return {
        "host": env.get("HOST", "0.0.0.0"),
        "port": int(env.get("PORT", "8080")),
        "threads": threads,
        "connection_limit": 1000,
        "max_request_body_size": limit,
        "inbuf_overflow": limit,
        "outbuf_overflow": ANSWER_IN_MEMORY,
        "trusted_proxy": TRUSTED_PROXY,
        "trusted_proxy_headers": "x-forwarded-proto x-forwarded-for" if hops else "x-forwarded-proto",
        "trusted_proxy_count": max(hops, 1),
        "clear_untrusted_proxy_headers": True,
        "ident": "",
    }


# The header's text in a warning: enough to recognise it, never a long one whole.
FORWARDED_SHOWN = 120


def _client_waitress_reads(environ, hops: int) -> str | None:
    """The client address waitress's translation would make of this
    request's X-Forwarded-For (its own code, on a copy), or None when it
    would fail: refuse the request (quoting it cannot read, a 400) or raise
    (``:.``: an IndexError, a 500)."""
    from waitress.proxy_headers import parse_proxy_headers

    probe = {"REMOTE_ADDR": environ.get("REMOTE_ADDR"), "HTTP_X_FORWARDED_FOR": environ["HTTP_X_FORWARDED_FOR"]}
    try:
        parse_proxy_headers(probe, trusted_proxy_count=hops, trusted_proxy_headers={"x-forwarded-for"})
    except Exception:  # noqa: BLE001 - whatever waitress would fail with, the request is served without the header
        return None
    return probe["REMOTE_ADDR"]


def _usable(client: str | None, connection: str | None) -> bool:
    """An IP address with no zone, or the connection's own (an empty entry:
    waitress keeps it). Anything else (``unknown``, ``[2001:db8::1]:x`` kept
    with its brackets and what follows) is no address to count sign-ins by
    or to log. A zone is free text: every entry that names an address has
    it left out by the rewrite, so one still there came from an entry that
    names none (``[fe80::1%zone.5]:x``, which waitress splits at its last
    colon)."""
    if client is None:
        return False
    if client == connection:
        return True
    try:
        ipaddress.ip_address(client)
    except ValueError:
        return False
    return "%" not in client


def _proxies_entries(forwarded: str, hops: int) -> str:
    """The entries of ``forwarded`` that the ``hops`` trusted proxies wrote
    (the last ``hops``; every one when there are fewer), all waitress reads,
    with the first, which it takes as the client, written so that waitress
    reads back the address it names (shared/addresses.py): an IPv4-mapped
    one as its IPv4 address, IPv6 in brackets, a port and a zone left out;
    unchanged when it names no address. The entries further left are the
    client's own word, and go: waitress unquotes every entry before it keeps
    the last ``hops``, so an unbalanced quote the client wrote there (``"x``,
    to which the proxy appends the client's address) failed the whole
    header, and the request counted as the connection's: a guesser held by
    its address's budget got a fresh one, and spent the one every request
    without the header shares."""
    from waitress.utilities import undquote

    from shared import addresses

    entries = forwarded.split(",")[-hops:]
    try:
        entry = addresses.forwarded_entry(undquote(entries[0].strip()))
    except ValueError:  # quoting waitress cannot read: left to the check below
        entry = None
    if entry is not None:
        entries[0] = entry
    return ",".join(entries).strip()


def checked_forwarded_for(app, hops: int, trusted_proxy: str = TRUSTED_PROXY, budget=None):
    """Wrapped around waitress's own proxy-header translation (which
    create_server puts around the function), so it runs first. A request is
    never refused for its X-Forwarded-For: the intake's caller is
    AlertManager, which does not retry a 4xx, so a refusal is a lost page.
    From the trusted proxy only, the header is first cut to the entries the
    proxies wrote, and the client's entry among them (``hops`` from the
    right) written the way waitress reads it right
    (:func:`_proxies_entries`): waitress took ``::ffff:192.0.2.1`` for the
    address ``::ffff`` and the port ``192.0.2.1``, one address for every
    IPv4 client of a dual-stack proxy, and ``[2001:db8::1]:443`` for no
    address. Anything else that makes an address (``192.0.2.1:``,
    ``1.2.3.4:x``) is left to waitress as it is. When the client's entry
    then makes no address, or would make the translation fail (``:.``
    raised an IndexError in it: a 500), the header is dropped for this
    request, which is then served with the connection's own address, and a
    warning says so (at most ten a minute)."""
    if not hops:
        return app
    if budget is None:
        from shared.login_throttle import LogBudget

        budget = LogBudget()

    def guarded(environ, start_response):
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        connection = environ.get("REMOTE_ADDR")
        if forwarded is not None and connection == trusted_proxy:
            environ["HTTP_X_FORWARDED_FOR"] = _proxies_entries(forwarded, hops)
            if not _usable(_client_waitress_reads(environ, hops), connection):
                del environ["HTTP_X_FORWARDED_FOR"]
                left_out = budget.take()
                if left_out is not None:
                    shown = forwarded if len(forwarded) <= FORWARDED_SHOWN else forwarded[:FORWARDED_SHOWN] + "…"
                    log.warning("X-Forwarded-For ignored: the client's entry is no address; served as the connection's",
                                extra={"x_forwarded_for": shown, "length": len(forwarded), "hops": hops,
                                       "path": environ.get("PATH_INFO"), "left_out": left_out})
        return app(environ, start_response)

    return guarded


def _in_hand(channel) -> bool:
    """A request read in part, read and not answered, or an answer not sent."""
    return bool(channel.request is not None or channel.requests or channel.total_outbufs_len)


def _busy(server) -> bool:
    return bool(server.task_dispatcher.queue) or any(_in_hand(c) for c in list(server.active_channels.values()))


def _stop_listening(server) -> None:
    # The listening socket closes at once: a new connection is refused, so
    # its client goes elsewhere, instead of waiting in the backlog for a
    # reset. (waitress's own close() would also close the loop's wake-up.)
    server.accepting = False
    server.del_channel()
    server.socket.close()


def run_until_stopped(server, stop: threading.Event, drain_seconds: float = DRAIN_SECONDS) -> bool:
    """waitress's loop, one turn at a time, until ``stop`` is set; then no
    new connection is taken, and the loop turns on until the requests in
    hand are answered and sent (or ``drain_seconds`` pass). Whether every
    request in hand was answered."""
    adj = server.adj
    deadline = None
    while True:
        if stop.is_set():
            if deadline is None:
                _stop_listening(server)
                deadline = time.monotonic() + drain_seconds
            # A kept-alive connection between requests is closed, so its
            # client asks again elsewhere rather than keep this one busy.
            for channel in list(server.active_channels.values()):
                if not _in_hand(channel):
                    channel.will_close = True
            if not _busy(server):
                break
            if time.monotonic() >= deadline:
                cut = sum(1 for c in list(server.active_channels.values()) if _in_hand(c))
                log.error("Stopped with requests unanswered", extra={"connections": cut, "drain_seconds": drain_seconds})
                server.task_dispatcher.shutdown(timeout=1)
                return False
        server.asyncore.loop(timeout=0.05 if deadline else adj.asyncore_loop_timeout, map=server._map,
                             use_poll=adj.asyncore_use_poll, count=1)
    server.task_dispatcher.shutdown()
    return True


def main(env: Mapping[str, str] = os.environ) -> int:
    absent = missing(env)
    if absent:
        print(f"incident-response: set {' and '.join(absent)} (for example FUNCTION_SOURCE=functions/intake/main.py "
              "FUNCTION_TARGET=intake); the Knative Services set both", file=sys.stderr)
        return 2
    import functions_framework
    from waitress.server import create_server

    app = functions_framework.create_app(env["FUNCTION_TARGET"], env["FUNCTION_SOURCE"],
                                         env.get("FUNCTION_SIGNATURE_TYPE", "http"))
    from shared import http as http_layer

    # What the start built lives as long as the process: the collector's
    # full passes need not walk it again (a pass over it held every thread
    # for 25-30 ms under load). Routes built by the first request are
    # frozen by shared/http.py LazyRoutes.
    gc.freeze()
    http_layer.FREEZE_AFTER_BUILD = True
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)

    # BODY_CAP is set by the function's start (shared/bootstrap.py); an app
    # that has none gets the bound a function without settings would.
    server = create_server(app, **server_settings(env, app.config.get("BODY_CAP", http_layer.LARGEST_FIXED_BODY + 1)))
    from shared.config import trusted_proxy_hops

    server.application = checked_forwarded_for(server.application, trusted_proxy_hops(env))
    # One line per request that waits for a thread: Knative's
    # containerConcurrency already bounds an instance's requests, and the
    # intake's threads wait on the group commit, so it is routine, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    stop = threading.Event()

    def stopping(*_):
        stop.set()
        # Wake the loop from the poll it waits in (up to a second otherwise),
        # from a thread: the trigger's lock may be held by the very frame
        # this handler interrupted.
        threading.Thread(target=server.pull_trigger, daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stopping)
    print(f"incident-response: {env['FUNCTION_TARGET']} serving on {server.effective_host}:{server.effective_port}",
          file=sys.stderr, flush=True)
    # Exit status 1 when the drain's bound cut requests off, for the record.
    return 0 if run_until_stopped(server, stop) else 1


if __name__ == "__main__":
    sys.exit(main())
