"""The request body limit on a real uvicorn server: a chunked upload (no Content-Length) is read
only up to the limit, answered 413, and never held in memory whole."""
from __future__ import annotations

import select
import socket
from pathlib import Path

import httpx
import pytest

from conftest import Procs, free_port, wait_for

pytestmark = pytest.mark.e2e
BODY = 50 << 20  # 50 MB, fifty times the 1 MB limit
PIECE = 64 << 10


def _status(proc_pid: int, key: str) -> int:
    for line in Path(f"/proc/{proc_pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _chunked_upload(port: int, path: str, total: int) -> tuple[bytes, int]:
    """POST `total` bytes with Transfer-Encoding: chunked as a careful client would: stop sending
    as soon as the server answers. Returns (the response's head, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    piece = b"%x\r\n" % PIECE + b"[" * PIECE + b"\r\n"
    sent, answer = 0, b""
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(piece)
            sent += PIECE
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while b"\r\n\r\n" not in answer:
            block = sock.recv(65536)
            if not block:
                break
            answer += block
    except ConnectionResetError:
        pass
    sock.close()
    return answer, sent


def test_chunked_upload_stops_at_the_limit(procs: Procs) -> None:
    port = free_port()
    scheduler = procs.start("scheduler", "--port", str(port), name="scheduler")

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/jobs", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 60, "the scheduler to answer")
    rss_before = _status(scheduler.pid, "VmRSS")
    Path(f"/proc/{scheduler.pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
    answer, sent = _chunked_upload(port, "/api/jobs", BODY)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < BODY // 2, f"the server read {sent} bytes before answering"
    grown = _status(scheduler.pid, "VmHWM") - rss_before
    assert grown < 16 << 20, f"the scheduler's peak memory grew by {grown >> 20} MB for a {BODY >> 20} MB body"
    # a small chunked body within the limit still arrives whole
    r = httpx.post(f"http://127.0.0.1:{port}/api/jobs", content=iter([b'{"train": "/nope", ', b'"val": "/nope"}']),
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and "does not exist" in r.text, r.text
    assert scheduler.poll() is None
