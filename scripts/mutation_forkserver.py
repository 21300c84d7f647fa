"""Starts each mutant's test session from a process that has already
imported the heavy third-party libraries (pytest, SQLAlchemy, requests,
Flask, the Kubernetes client...): a fork costs milliseconds, importing them
costs a second of CPU, which was most of a short session. Nothing of the
project is imported here, so every session imports the (mutated) project
modules afresh from the worker's copy of the tree.

    python scripts/mutation_forkserver.py SOCKET TIMEOUT

scripts/mutation_run.py sends one request per session on the Unix socket:
a JSON line {"args": [...pytest arguments]}; the answer is the session's
exit status as a line, then the end of its output (cosmic-ray keeps it). One session at a time (a worker tests one mutant at
a time). A session that outlives TIMEOUT, or whose client went away
(cosmic-ray stopped it at its own timeout), is killed with its processes.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys
import time

PRELOAD = [
    "pytest", "_pytest.python", "_pytest.fixtures", "_pytest.assertion.rewrite",
    "sqlalchemy", "sqlalchemy.orm", "sqlalchemy.dialects.postgresql", "pg8000", "pydantic", "requests",
    "flask", "werkzeug", "functions_framework", "cloudevents.http", "cloudevents.conversion", "kubernetes.client",
    "yaml", "jsonschema", "aiohttp",
]


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not installed or not needed: the session imports what it needs
            pass
    if any(m == "shared" or m.startswith(("shared.", "functions.", "tests.", "loopback.")) for m in sys.modules):
        raise SystemExit("mutation-forkserver: a preloaded library imported the project; mutants would go unseen")


def session(args: list[str], output: str) -> int:
    """In the forked child: a fresh process group, so a timeout kills what
    the tests started too."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd in (1, 2):
        os.dup2(out, fd)
    import pytest

    try:
        status = int(pytest.main(args))
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a crash of the session fails it
        status = 3
    sys.stdout.flush(), sys.stderr.flush()
    return status


def serve(path: str, timeout: float) -> None:
    output = path + ".out"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                os._exit(session(request["args"], output))
            deadline = time.monotonic() + timeout
            status = None
            while status is None:
                done, code = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(code)
                    break
                readable, _, _ = select.select([conn], [], [], 0.05)
                try:
                    gone = bool(readable) and not conn.recv(1, socket.MSG_PEEK)
                except OSError:
                    gone = True
                if gone or time.monotonic() > deadline:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:  # not yet a group of its own
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status = 124
            try:
                with open(output, "rb") as out:
                    out.seek(0, os.SEEK_END)
                    out.seek(max(0, out.tell() - 3000))
                    tail = out.read()
            except OSError:  # killed before it wrote anything
                tail = b""
            try:
                conn.sendall(f"{status}\n".encode() + tail)
            except OSError:  # the client is gone
                pass


if __name__ == "__main__":
    preload()
    serve(sys.argv[1], float(sys.argv[2]))
