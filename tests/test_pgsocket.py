"""pg8000's socket made without the CA bundle (shared/pgsocket.py): the same
TLS request, the same answer handling, a context set as pg8000 sets its
own, and /health's check no longer builds ssl.create_default_context()."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared import pgsocket

ROOT = Path(__file__).resolve().parent.parent


def _pg8000s_context() -> ssl.SSLContext:
    # What pg8000.core._make_socket builds when no ssl_context is given.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_the_tls_context_is_pg8000s_without_the_ca_bundle():
    mine, theirs = pgsocket.tls_context(), _pg8000s_context()
    for attribute in ("protocol", "options", "verify_mode", "check_hostname", "minimum_version", "maximum_version",
                      "verify_flags", "post_handshake_auth", "keylog_filename"):
        assert getattr(mine, attribute) == getattr(theirs, attribute), attribute
    assert mine.get_ciphers() == theirs.get_ciphers()
    assert mine.cert_store_stats()["x509_ca"] == 0


class FakeServer:
    """Answers the SSLRequest with ``answer``; with b"S", completes a TLS handshake."""

    def __init__(self, answer: bytes, context: ssl.SSLContext | None = None):
        self.answer, self.context = answer, context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            while len(self.received) < 8:
                self.received += conn.recv(8 - len(self.received))
            conn.sendall(self.answer)
            if self.context is not None:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            else:
                conn.sendall(b"plain")

    def close(self):
        self.thread.join(timeout=10)
        self.listener.close()


def test_a_server_that_refuses_tls_gets_a_plain_connection():
    server = FakeServer(b"N")
    sock = pgsocket.connect_socket("127.0.0.1", server.port, 5.0)
    try:
        assert not isinstance(sock, ssl.SSLSocket) and sock.recv(5) == b"plain"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1 and sock.gettimeout() == 5.0
    finally:
        sock.close()
        server.close()
    assert server.received == pgsocket.SSL_REQUEST


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a certificate")
def test_a_server_that_accepts_tls_gets_it_unverified(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=not-the-host"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = FakeServer(b"S", context)
    sock = pgsocket.connect_socket("127.0.0.1", server.port, 5.0)
    try:
        # A self-signed certificate for another name: accepted, as pg8000 accepts it.
        assert isinstance(sock, ssl.SSLSocket) and sock.recv(5) == b"hello"
    finally:
        sock.close()
        server.close()


def test_connections_pg8000_makes_otherwise_are_left_to_it():
    for extra in ({"unix_sock": "/run/x"}, {"ssl_context": True}, {"sock": object()}, {"tcp_keepalive": False},
                  {"source_address": ("127.0.0.1", 0)}):
        args = {"host": "db", "port": 5432, "user": "u", **extra}
        assert pgsocket.driver_args(args) is args


PROBE = """
import ssl, sys
def refuse(*args, **kwargs):
    raise AssertionError("the CA bundle was loaded")
ssl.create_default_context = refuse
from shared import dbcheck
print(dbcheck.database_state())
"""


def test_health_connects_without_building_a_default_tls_context(base_env):
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **base_env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "connected"


ENGINE_PROBE = """
import ssl, sys
def refuse(*args, **kwargs):
    raise AssertionError("the CA bundle was loaded")
ssl.create_default_context = refuse
import sqlalchemy as sa
from shared import db
engine = db.create_engine_for(sys.argv[1])
with engine.connect() as conn:
    print(conn.execute(sa.text("SELECT 1")).scalar())
"""


def test_the_engine_connects_without_building_a_default_tls_context(database_url):
    done = subprocess.run([sys.executable, "-c", ENGINE_PROBE, database_url], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"


def test_an_unreachable_database_is_the_error_pg8000_gives():
    import sqlalchemy as sa

    from shared import db

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    url = f"postgresql+pg8000://postgres@127.0.0.1:{port}/x"
    errors = []
    for engine in (db.create_engine_for(url, timeout=2), sa.create_engine(url, connect_args={"timeout": 2})):
        with pytest.raises(sa.exc.DBAPIError) as err:
            engine.connect()
        errors.append((type(err.value), type(err.value.orig), str(err.value.orig), db.is_transient(err.value)))
        engine.dispose()
    assert errors[0] == errors[1]


def test_a_database_that_drops_new_connections_is_the_driver_error_pg8000_gives(database_url):
    """Through a proxy that accepts and closes at once, pg8000 (slowed by
    its CA bundle) wrote its first message into the closed connection:
    "network error", which the functions answer 503. Without the bundle the
    drop came at the TLS request, a bare ConnectionResetError (a 500)."""
    import sqlalchemy as sa

    from shared import db
    from tests.conftest import proxied_database

    with proxied_database(database_url) as (proxy, url):
        proxy.cut()
        errors = []
        for engine in (db.create_engine_for(url, timeout=2), sa.create_engine(url, connect_args={"timeout": 2})):
            for _ in range(3):
                with pytest.raises(sa.exc.DBAPIError) as err:
                    engine.connect()
                errors.append((type(err.value), type(err.value.orig), str(err.value.orig), db.is_transient(err.value)))
            engine.dispose()
    assert set(errors) == {(sa.exc.InterfaceError, errors[0][1], "network error", True)}
