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

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

REQUIRED = ("FUNCTION_SOURCE", "FUNCTION_TARGET")
# How long a stopping instance keeps answering the requests it has: Knative
# drains the pod before its SIGTERM, so this is a bound, not a wait.
DRAIN_SECONDS = 20.0
# The default before the function's own limit is known (shared/http.py).
DEFAULT_BODY_CAP = 2 * 1024 * 1024 + 1


def missing(env: Mapping[str, str]) -> list[str]:
    return [name for name in REQUIRED if not env.get(name, "").strip()]


def server_settings(env: Mapping[str, str], body_cap: int) -> dict:
    """waitress's settings for one instance.

    A body over the function's cap is refused (413) by the server before it
    is buffered, and a body under it stays in memory instead of a temporary
    file (the image's /tmp is a small in-memory volume). The connection
    limit bounds what those buffers can add up to. Only the proxy in front
    on loopback (Knative's queue-proxy) may say the request came over TLS,
    as gunicorn's default let it, so the board's cookie stays Secure."""
    threads = int(env.get("THREADS", "8"))
    return {
        "host": env.get("HOST", "0.0.0.0"),
        "port": int(env.get("PORT", "8080")),
        "threads": threads,
        "connection_limit": max(32, 4 * threads),
        "max_request_body_size": body_cap,
        "inbuf_overflow": body_cap,
        "trusted_proxy": "127.0.0.1",
        "trusted_proxy_headers": "x-forwarded-proto",
        "clear_untrusted_proxy_headers": True,
        "ident": "",
    }


def _busy(server) -> bool:
    queued = server.task_dispatcher.queue
    return bool(queued) or any(channel.requests or channel.total_outbufs_len
                               for channel in list(server.active_channels.values()))


def run_until_stopped(server, stop: threading.Event, drain_seconds: float = DRAIN_SECONDS) -> None:
    """waitress's loop, one turn at a time, until ``stop`` is set; then no
    new connection is taken, and the loop turns on until the requests in
    hand are answered and sent (or ``drain_seconds`` pass)."""
    adj = server.adj
    deadline = None
    while True:
        if stop.is_set():
            if deadline is None:
                server.accepting = False
                deadline = time.monotonic() + drain_seconds
            # A kept-alive connection between requests is closed, so its
            # client asks again elsewhere rather than keep this one busy.
            for channel in list(server.active_channels.values()):
                if not channel.requests and not channel.total_outbufs_len:
                    channel.will_close = True
            if not _busy(server) or time.monotonic() >= deadline:
                break
        server.asyncore.loop(timeout=0.05 if deadline else adj.asyncore_loop_timeout, map=server._map,
                             use_poll=adj.asyncore_use_poll, count=1)
    server.task_dispatcher.shutdown()


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
    server = create_server(app, **server_settings(env, app.config.get("BODY_CAP", DEFAULT_BODY_CAP)))
    # One line per request that waits for a thread: Knative's
    # containerConcurrency already bounds an instance's requests, and the
    # intake's threads wait on the group commit, so it is routine, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"incident-response: {env['FUNCTION_TARGET']} serving on {server.effective_host}:{server.effective_port}",
          file=sys.stderr, flush=True)
    run_until_stopped(server, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
