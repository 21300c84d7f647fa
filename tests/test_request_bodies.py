"""No request body can grow a function's memory: a huge POST, with or
without a token, is answered 413 by the server (shared/serve.py) before any
handler runs, and never buffered.

Real function processes over real HTTP; the body (200 MB) is generated
lazily and streamed, and the worker's peak resident memory is read from
/proc while it is sent."""

import socket
import threading
from pathlib import Path

import pytest

from tests.conftest import TEST_TOKEN
from loopback.processes import FunctionProcess, wait_until

BODY_BYTES = 200 * 1024 * 1024
CHUNK = b"\0" * (1024 * 1024)
# The worker may buffer up to the body limit (2 MiB) and the server's own
# buffers; 200 MB buffered would be far over this.
MAX_GROWTH = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def functions(base_env):
    import requests

    procs = {name: FunctionProcess(name, dict(base_env), threads=2).start() for name in ("intake", "query", "deadletter")}
    # A first request other than /health builds each function's routes and
    # imports its handlers; done here, so the growth measured below is the
    # body's alone.
    for proc in procs.values():
        requests.get(proc.url + "/warm-up", timeout=30)
    yield procs
    for proc in procs.values():
        proc.stop()


def server_pid(proc: FunctionProcess) -> int:
    """One process serves: no worker forked from it."""
    children = Path(f"/proc/{proc.process.pid}/task/{proc.process.pid}/children").read_text().split()
    assert children == [], children
    return proc.process.pid


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def stream_huge_body(port: int, method: str, path: str, headers: dict, chunked: bool) -> tuple[int, bytes]:
    """Send BODY_BYTES lazily while reading the answer; the status and the
    start of the response once the server answered (or closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = {"Host": f"127.0.0.1:{port}", **headers}
    head["Transfer-Encoding" if chunked else "Content-Length"] = "chunked" if chunked else str(BODY_BYTES)
    sock.sendall((f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode())
    stop = threading.Event()

    def send():
        sent = 0
        try:
            while sent < BODY_BYTES and not stop.is_set():
                sock.sendall(b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n" if chunked else CHUNK)
                sent += len(CHUNK)
            if chunked and not stop.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: exactly what is wanted

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    finally:
        stop.set()
        sender.join(60)
        sock.close()
    assert received.startswith(b"HTTP/1.1 "), received[:200]
    return int(received.split(b" ", 2)[1]), received


# Without a token too: the body is over every bound, so the server refuses
# it before a handler (and its token check) runs.
CASES = [
    ("intake", "POST", "/webhook/alert", {}, 413),
    ("intake", "POST", "/webhook/alert", {"Authorization": f"Bearer {TEST_TOKEN}"}, 413),
    ("intake", "POST", "/", {"ce-specversion": "1.0", "ce-type": "io.incidentresponse.incident.report", "ce-source": "/x", "ce-id": "1"}, 413),
    ("query", "PATCH", "/incidents/00000000-0000-4000-8000-000000000000", {}, 413),
    ("query", "PATCH", "/incidents/00000000-0000-4000-8000-000000000000", {"Authorization": f"Bearer {TEST_TOKEN}"}, 413),
    ("query", "POST", "/ui/login", {"Content-Type": "application/x-www-form-urlencoded"}, 413),
    ("deadletter", "POST", "/", {"ce-specversion": "1.0", "ce-type": "io.incidentresponse.incident.opened", "ce-source": "/x", "ce-id": "1"}, 413),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("name, method, path, headers, status", CASES)
def test_a_huge_body_is_refused_without_being_buffered(functions, name, method, path, headers, status, chunked):
    proc = functions[name]
    pid = server_pid(proc)
    reset_peak(pid)
    before = memory_kb(pid, "VmRSS")
    answered, raw = stream_huge_body(proc.port, method, path, {"Content-Type": "application/json", **headers}, chunked)
    assert answered == status, raw[:300]
    peak = memory_kb(pid, "VmHWM")
    assert (peak - before) * 1024 < MAX_GROWTH, f"{name} grew by {(peak - before) // 1024} MB for a {BODY_BYTES // 2**20} MB body"
    # And it still serves.
    import requests

    wait_until(lambda: requests.get(proc.url + "/health", timeout=5).status_code == 200, 10, message=f"{name} to serve again")


def test_a_chunked_body_within_the_limit_is_taken_whatever_its_chunk_size(functions):
    # The server counts a chunked body's framing as well as its bytes: a
    # dead letter just under the sink's 2 MiB, sent in 1 KiB chunks, once
    # got the server's 413, which its sender never retries.
    import json

    pad = 2 * 1024 * 1024 - 2048
    body = json.dumps({"incident_id": "00000000-0000-4000-8000-000000000000", "pad": "x" * pad}).encode()
    proc = functions["deadletter"]
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=60)
    head = (f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            f"ce-specversion: 1.0\r\nce-id: chunked-near-limit\r\nce-source: /test\r\n"
            f"ce-type: io.incidentresponse.incident.opened\r\nAuthorization: Bearer {TEST_TOKEN}\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        sock.sendall(head + b"".join(b"%x\r\n" % len(body[i:i + 1024]) + body[i:i + 1024] + b"\r\n"
                                     for i in range(0, len(body), 1024)) + b"0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1])
    assert 200 <= status < 300, answer[:300]
