"""A real PgBouncer (Debian ``pgbouncer``) in transaction pooling mode in
front of the test or bench PostgreSQL, on a loopback port of its own.

Transaction pooling is what a Knative deployment needs (docs/deploy.md):
every transaction may run on a different server connection, so nothing may
outlive one: no session settings, no server-side prepared statements kept
across transactions, advisory locks only ``pg_advisory_xact_lock``.

PgBouncer refuses to run as root; started by root (CI, the dev machine) it
drops to the ``postgres`` or ``nobody`` user with ``-u``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from loopback.processes import free_port, terminate, wait_until


def binary() -> str | None:
    return shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer",) if os.access(p, os.X_OK)), None)


def _server_of(url: str) -> tuple[str, int, str, str | None]:
    """host (or socket directory), port, user, password of a database URL."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "unix_sock" in query:
        sock = Path(query["unix_sock"])
        return str(sock.parent), int(sock.name.rsplit(".", 1)[-1]), parts.username or "postgres", parts.password
    return parts.hostname or "127.0.0.1", parts.port or 5432, parts.username or "postgres", parts.password


class PgBouncer:
    def __init__(self, server_url: str, pool_size: int = 4, max_client_conn: int = 400, mode: str = "transaction",
                 settings: dict[str, str] | None = None):
        """``settings``: more of the ``[pgbouncer]`` section (its own timeouts)."""
        self.server_url = server_url
        self.settings = dict(settings or {})
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.mode = mode
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.dir: Path | None = None

    def url(self, database: str) -> str:
        """The URL of ``database`` through this PgBouncer (same driver and user)."""
        parts = urlsplit(self.server_url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "unix_sock"]
        auth = parts.username or "postgres"
        if parts.password:
            auth += ":" + parts.password
        return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{self.port}", path="/" + database, query=urlencode(query)))

    def start(self, timeout: float = 15.0) -> "PgBouncer":
        exe = binary()
        if exe is None:
            raise FileNotFoundError("pgbouncer is not installed (scripts/ensure-system-packages.sh installs it)")
        host, port, user, password = _server_of(self.server_url)
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        server = f"host={host} port={port} user={user}" + (f" password={password}" if password else "")
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = {server}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            # The clients are the tests on loopback; the server login is above.
            "auth_type = any\n"
            f"pool_mode = {self.mode}\n"
            f"default_pool_size = {self.pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            f"max_client_conn = {self.max_client_conn}\n"
            # Whatever a driver sends at startup that PgBouncer does not track.
            "ignore_startup_parameters = extra_float_digits,options\n"
            # A client waits this long for a server connection before an error.
            "query_wait_timeout = 60\n"
            "server_reset_query =\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
            "admin_users = pgbouncer\nstats_users = pgbouncer\n"
            + "".join(f"{name} = {value}\n" for name, value in self.settings.items())
        )
        command = [exe, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            account = next((name for name in ("postgres", "nobody") if _exists(name)), "nobody")
            shutil.chown(self.dir, account)
            command[1:1] = ["-u", account]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self._listening, timeout, message="PgBouncer to listen")
        return self

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {self.process.returncode}: {self.log()[-2000:]}")
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        path = self.dir / "pgbouncer.log" if self.dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop(self) -> None:
        terminate(self.process)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False
