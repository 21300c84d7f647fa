"""The socket pg8000 opens to the database, opened here without loading the
system's CA certificates, which pg8000's TLS context loads and never uses.

Without an ``ssl_context`` pg8000 asks the server for TLS and, when the
server accepts, wraps the socket in ``ssl.create_default_context()`` with
certificate checks off (``CERT_NONE``, no host name check); a server that
refuses gets a plain connection. Building that context reads and parses the
whole CA bundle (about 56 ms of CPU here), for certificates a context
that verifies nothing never looks at: a new instance paid it on its first
``/health``, and the engine on each connection it opened. :func:`connect_socket`
does what pg8000 does (the same request, the same answer handling, a
context with the same settings, the same error when the host cannot be
reached) without the bundle; pg8000 is handed the result with
``ssl_context=False`` so it does not ask again.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import sys

# What pg8000 sends to ask for TLS: Int32(8), the length; Int32(80877103), the SSLRequest code.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
# Arguments with which pg8000 makes a socket other than a TCP one with
# keep-alive and opportunistic TLS: those connections are left to it.
_ITS_OWN = {"unix_sock", "sock", "ssl_context", "source_address", "tcp_keepalive"}


def handled(args: dict) -> bool:
    """Whether :func:`connect_socket` makes the socket pg8000 would for these connect arguments."""
    return not _ITS_OWN & set(args)


def tls_context() -> ssl.SSLContext:
    """``ssl.create_default_context()`` as pg8000 sets it (no certificate or
    host name check), without loading the CA bundle it would not use."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # create_default_context honours SSLKEYLOGFILE; so does this.
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


def connect_socket(host: str, port: int, timeout: float | None) -> socket.socket:
    from pg8000.exceptions import InterfaceError

    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError as exc:
        # pg8000's own error, word for word: SQLAlchemy wraps it as a driver error.
        raise InterfaceError(f"Can't create a connection to host {host} and port {port} "
                             f"(timeout is {timeout} and source_address is None).") from exc
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.sendall(SSL_REQUEST)
            accepted = sock.recv(1) == b"S"
        except OSError as exc:
            # A server (or proxy) that drops the connection at once: pg8000,
            # slower to get here, met the drop on its first message, "network
            # error", a driver error SQLAlchemy wraps (503); a bare
            # ConnectionResetError would be a 500.
            raise InterfaceError("network error") from exc
        if accepted:
            sock = tls_context().wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


def driver_args(args: dict) -> dict:
    """pg8000's connect arguments ``args`` with the socket made here, when it
    is one :func:`connect_socket` makes; else ``args`` as they are."""
    if not handled(args):
        return args
    host, port = args.get("host", "localhost"), args.get("port", 5432)
    return {**args, "sock": connect_socket(host, port, args.get("timeout")), "ssl_context": False}
