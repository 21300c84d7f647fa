"""Loopback stand-ins for what cannot run here: an HTTP server that records
every request and answers from a script, and a TCP proxy that a test can cut
and restore (to take "the database" away without touching the real server)."""

from __future__ import annotations

import json
import select
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from loopback.processes import free_port


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


# The payload may be a callable instead of bytes: it writes the body itself
# to the connection's file (after the headers, which then say its length if
# anything does), a peer that trickles its answer.
Responder = Callable[[Recorded], tuple[int, dict, bytes]]


def ok(_: Recorded) -> tuple[int, dict, bytes]:
    return 202, {}, b""


class RecordingServer:
    """A threaded HTTP server on 127.0.0.1 that records and answers by ``responder``."""

    def __init__(self, responder: Responder = ok, port: int | None = None):
        self.responder = responder
        self.requests: list[Recorded] = []
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "RecordingServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def setup(self):
                super().setup()
                with outer._lock:
                    outer._connections.add(self.connection)

            def finish(self):
                with outer._lock:
                    outer._connections.discard(self.connection)
                super().finish()

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with outer._lock:
                    outer.requests.append(rec)
                status, headers, payload = outer.responder(rec)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if callable(payload):
                    self.end_headers()
                    self.wfile.flush()
                    payload(self.wfile)
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if payload and self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Kept-alive connections outlive serve_forever; a stopped server must
        # look stopped to its clients.
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def received(self, predicate=lambda r: True) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection
    and refuses new ones until ``restore()``. ``round_trips`` counts the
    times a client spoke first or again after the target answered: what a
    protocol that pipelines its messages saves, seen on the wire."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopped = False
        self.round_trips = 0

    def start(self) -> "TcpProxy":
        self._listen()
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def _listen(self):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock

    def _accept_loop(self):
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._stopped:
                    return
                continue
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket):
        client_spoke_last = False
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is a and not client_spoke_last:
                        with self._lock:
                            self.round_trips += 1
                    client_spoke_last = src is a
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket cut() closed
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self):
        self._up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def restore(self):
        self._up.set()

    def stop(self):
        self._stopped = True
        self.cut()
        if self._listener:
            self._listener.close()
