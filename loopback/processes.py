"""Real processes for the tests: functions served as the image serves them
(shared/serve.py: functions-framework's app in one waitress process), and
helpers to wait on them by polling."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ProcessExited(RuntimeError):
    """The process being waited for died: waiting longer cannot help."""


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except ProcessExited:
            raise
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}" + (f" (last error: {last_error!r})" if last_error else ""))


def stays(predicate, duration: float, interval: float = 0.02, message: str = "condition") -> None:
    """Assert that ``predicate`` holds throughout ``duration`` seconds, checked
    continuously (for "nothing else arrives"), failing at the first breach."""
    deadline = time.monotonic() + duration
    while True:
        assert predicate(), f"{message} stopped holding"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def settled(snapshot, quiet: float = 1.5, timeout: float = 30.0, interval: float = 0.1, message: str = "state"):
    """Poll ``snapshot()`` until it has not changed for ``quiet`` seconds (late
    duplicates have landed); return it. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = snapshot(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"{message} still changing after {timeout}s")


@dataclass
class FunctionProcess:
    name: str
    env: dict
    port: int = field(default_factory=free_port)
    threads: int = 8
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_path: str = "/health", timeout: float = 30.0) -> "FunctionProcess":
        # free_port() only finds a port that was free a moment ago; if another
        # process took it meanwhile, the server exits at once: try another one.
        for attempt in range(3):
            try:
                started = self._start(wait_path, timeout)
                RUNNING.add(self)
                if _phase["in_test_body"]:
                    STARTED_IN_TEST_BODY.append(self)
                return started
            except ProcessExited as exc:
                self.stop()
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                self.port = free_port()
            except BaseException as exc:
                # Still starting after the timeout (or interrupted): nothing
                # may outlive the test, and the log goes into the error.
                tail = self.logs()[-3000:]
                self.stop()
                if isinstance(exc, AssertionError):
                    raise AssertionError(f"{exc}\n{self.name} log:\n{tail}") from None
                raise
        raise AssertionError("unreachable")

    def _start(self, wait_path: str, timeout: float) -> "FunctionProcess":
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT), "THREADS": str(self.threads), "PYTHONUNBUFFERED": "1",
               "FUNCTION_SOURCE": str(ROOT / "functions" / self.name / "main.py"), "FUNCTION_TARGET": self.name,
               "HOST": "127.0.0.1", "PORT": str(self.port)}
        handle, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        os.close(handle)
        self.log_path = Path(path)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.serve"],
            env=env,
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
        wait_until(lambda: self._ready(wait_path), timeout, message=f"{self.name} to answer {wait_path}")
        return self

    def _ready(self, path: str) -> bool:
        if self.process.poll() is not None:
            raise ProcessExited(f"{self.name} exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
        try:
            return requests.get(self.url + path, timeout=1).status_code < 500
        except requests.ConnectionError:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        RUNNING.discard(self)
        terminate(self.process)
        if self.log_path:
            self.log_path.unlink(missing_ok=True)

    __hash__ = object.__hash__
    __eq__ = object.__eq__


@contextmanager
def functions_running(names, env: dict, threads: int = 2):
    """The named functions served with ``env``, by name; all stopped after,
    also when one fails to start."""
    started: dict[str, FunctionProcess] = {}
    try:
        for name in names:
            started[name] = FunctionProcess(name, env, threads=threads).start()
        yield started
    finally:
        for proc in started.values():
            proc.stop()


# Every started function process, until stopped.
RUNNING: set[FunctionProcess] = set()
# Started by a test's own body (not a fixture, whose teardown stops it): the
# test hook stops these as the test ends, so none can write while the next
# test truncates the database.
STARTED_IN_TEST_BODY: list[FunctionProcess] = []
_phase = {"in_test_body": False}


def enter_test_body() -> None:
    _phase["in_test_body"] = True


def leave_test_body() -> list[str]:
    """Stop what the test body started and left running; their names."""
    _phase["in_test_body"] = False
    leaked = [p for p in STARTED_IN_TEST_BODY if p.running]
    STARTED_IN_TEST_BODY.clear()
    for proc in leaked:
        proc.stop()
    return [p.name for p in leaked]
