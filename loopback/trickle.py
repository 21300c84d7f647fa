"""A peer that trickles its answer: the status line at once, then one byte
every so often for as long as the client listens. ``requests``' timeout
bounds each socket read, so against this peer only a bound on the whole
exchange (shared.deadline) ends the call; :func:`run_bounded` runs the
call in a thread so a test that meets an unbounded sender fails instead of
hanging."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

# The start of an answer that never ends: the headers stay open.
STATUS_LINE = b"HTTP/1.1 200 OK\r\nX-Trickle: "
# Headers complete, a body that is promised and trickled.
HEADERS_THEN_BODY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"


def _read_request(conn: socket.socket) -> bool:
    """One whole request (headers, then Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        body += chunk
    return True


class Trickler:
    """Listens on 127.0.0.1; every request is answered ``start`` at once,
    then ``byte`` every ``pause`` seconds until the client goes or the
    trickler is closed. ``requests`` counts the requests it read."""

    def __init__(self, start: bytes = STATUS_LINE, byte: bytes = b"a", pause: float = 0.2):
        self.start, self.byte, self.pause = start, byte, pause
        self.requests = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True, name="trickler").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                if not _read_request(conn):
                    return
                self.requests += 1
                conn.sendall(self.start)
                while not self._stop.wait(self.pause):
                    conn.sendall(self.byte)
            except OSError:
                return  # the client gave up

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def __enter__(self) -> "Trickler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OneAnswer(Trickler):
    """Every request is answered ``answer`` at once and its connection
    closed: an answer cut short (a Content-Length it never reaches), a body
    that cannot be decoded, a redirect."""

    def __init__(self, answer: bytes):
        super().__init__(start=answer)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                if _read_request(conn):
                    self.requests += 1
                    conn.sendall(self.start)
            except OSError:
                return


class Answers(OneAnswer):
    """The first request is answered the first of ``answers``, the next one
    the next, and so on; the last answers every request after it (a
    ``429`` asking to retry later, then the answer)."""

    def __init__(self, *answers: bytes):
        super().__init__(answers[0])
        self.answers = answers

    def _answer(self, conn: socket.socket) -> None:
        self.start = self.answers[min(self.requests, len(self.answers) - 1)]
        super()._answer(conn)


def run_bounded(call: Callable[[], Any], wait: float) -> tuple[bool, Any, float]:
    """``call()`` in a thread, waited for at most ``wait`` seconds:
    (whether it ended, what it returned or raised, seconds taken)."""
    out: list = []

    def run():
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait)
    return bool(out), (out[0] if out else None), time.monotonic() - started
