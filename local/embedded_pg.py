"""A private PostgreSQL cluster inside the project (``.run/pgdata``).

Built from the installed server binaries (Debian's ``postgresql`` package):
no system service is touched and the data survives restarts. PostgreSQL
refuses to run as root, so under root the cluster runs as the ``postgres``
system user that the package creates, and only ``.run/pgdata`` is handed to
it. It listens on 127.0.0.1 only, with trust auth for local connections.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".run" / "pgdata"
SOCKET_DIR = ROOT / ".run" / "pgsocket"
DEFAULT_PORT = 55432


class EmbeddedPostgresError(RuntimeError):
    pass


def _bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()])
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found; install them (apt-get install postgresql) or set DATABASE_URL"
    )


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _prepare_dirs() -> None:
    DATA_DIR.parent.mkdir(parents=True, exist_ok=True)
    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise EmbeddedPostgresError("running as root needs the 'postgres' system user (apt-get install postgresql)") from None
        for path in (DATA_DIR, SOCKET_DIR):
            if path.exists():
                os.chown(path, user.pw_uid, user.pw_gid)


class EmbeddedPostgres:
    def __init__(self, port: int = DEFAULT_PORT):
        self.port = port
        self.bin = _bin_dir()
        self.started_here = False

    @property
    def url(self) -> str:
        return f"postgresql+pg8000://postgres@127.0.0.1:{self.port}/incidents"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(_as_server_user(list(cmd)), check=check, capture_output=True, text=True)

    def ensure_initialised(self) -> None:
        if (DATA_DIR / "PG_VERSION").exists():
            return
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        _prepare_dirs()
        self._run(str(self.bin / "initdb"), "-D", str(DATA_DIR), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")

    def is_running(self) -> bool:
        return self._run(str(self.bin / "pg_ctl"), "-D", str(DATA_DIR), "status", check=False).returncode == 0

    def start(self) -> None:
        self.ensure_initialised()
        _prepare_dirs()
        if not self.is_running():
            log_file = DATA_DIR / "server.log"
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={SOCKET_DIR}"
            result = self._run(str(self.bin / "pg_ctl"), "-D", str(DATA_DIR), "-l", str(log_file), "-o", options, "-w", "start", check=False)
            if result.returncode != 0:
                raise EmbeddedPostgresError(f"PostgreSQL did not start: {result.stderr.strip() or result.stdout.strip()} (see {log_file})")
            self.started_here = True
        self._ensure_database()

    def _ensure_database(self) -> None:
        psql = [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-tAc"]
        for _ in range(50):
            exists = subprocess.run([*psql, "SELECT 1 FROM pg_database WHERE datname = 'incidents'"], capture_output=True, text=True)
            if exists.returncode == 0:
                break
            time.sleep(0.1)
        if exists.stdout.strip() != "1":
            subprocess.run([*psql, "CREATE DATABASE incidents"], check=True, capture_output=True, text=True)

    def stop(self) -> None:
        if self.started_here:
            self._run(str(self.bin / "pg_ctl"), "-D", str(DATA_DIR), "-m", "fast", "-w", "stop", check=False)
            self.started_here = False
