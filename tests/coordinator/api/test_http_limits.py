"""Finding 8 of the hardening review, on a real coordinator process over real sockets: a
huge body is refused from its Content-Length without the process growing, connections that
trickle their headers are closed at the head deadline, a body that never finishes gets 408,
and ordinary requests are served meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.broker import Broker, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_BODY = 1 << 20


@dataclass
class Proc:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    database: str
    token: str = ""  # an admin token, made with `lepton tokens create` once it has started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def auth_line(self) -> bytes:
        """The header line raw socket requests send."""
        return f"Authorization: Bearer {self.token}\r\n".encode()

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def rejects(self, reason: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=5).text
        key = f'lepton_http_rejects_total{{reason="{reason}"}} '
        for line in text.splitlines():
            if line.startswith(key):
                return float(line.removeprefix(key))
        return 0.0


@pytest.fixture
def coordinator_proc(broker: Broker, tmp_path: Path) -> Iterator[Proc]:
    yield from run_coordinator(broker, tmp_path)


def create_token(database: str, name: str, *scopes: str) -> str:
    """``lepton tokens create NAME --scope ... --database URL --json``: the token it printed."""
    cmd = [sys.executable, "-m", "lepton.coordinator.cli", "tokens", "create", name]
    for scope in scopes:
        cmd += ["--scope", scope]
    out = subprocess.run(
        [*cmd, "--database", database, "--json"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return str(json.loads(out.stdout)["token"])


def run_coordinator(broker: Broker, tmp_path: Path, *extra: str) -> Iterator[Proc]:
    """``lepton coordinator run`` (with ``extra`` arguments), once it answers; stopped after."""
    port = free_port()
    log = tmp_path / "coordinator.log"
    database = f"sqlite:///{tmp_path / 'data' / 'coordinator.db'}"
    cmd = [
        sys.executable, "-m", "lepton.coordinator.cli", "coordinator", "run",
        "--instance-id", "limits",
        "--mqtt-port", str(broker.port),
        "--http-port", str(port),
        "--data-dir", str(tmp_path / "data"),
        "--set", f"http.head_timeout_s={HEAD_TIMEOUT_S}",
        "--set", f"http.body_timeout_s={BODY_TIMEOUT_S}",
        "--set", f"http.max_body_bytes={MAX_BODY}",
        "--set", "database.sqlite_synchronous=normal",
        *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    p = Proc(port, proc, log, database)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{p.url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "coordinator did not start\n" + log.read_text()
            time.sleep(0.2)
        p.token = create_token(database, "limits-test", "admin")
        yield p
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    """The head and as much of the body as its Content-Length declares (or until close)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length is None or len(body) >= int(length.group(1)):
                return data
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_64_mib_json_body_gets_413_without_growing_the_process(coordinator_proc: Proc) -> None:
    """It grew the coordinator by 334 MB before its 422; now Content-Length settles it."""
    task = {"kind": "echo", "params": {"x": 1}}
    for _ in range(3):  # warm the code paths the big request goes through
        assert (
            httpx.post(
                f"{coordinator_proc.url}/v1/tasks", json=task, headers=coordinator_proc.headers
            ).status_code
            == 201
        )
    before = coordinator_proc.rss()
    size = 64 << 20
    head = (
        (
            f"POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n"
        ).encode()
        + coordinator_proc.auth_line
        + b"\r\n"
    )
    piece = b"[0," + b"0," * ((1 << 20) // 2 - 4) + b"0]"
    with socket.create_connection(("127.0.0.1", coordinator_proc.port)) as sock:
        sock.sendall(head + b'{"kind":"echo","params":{"x":[')

        def send_body() -> None:
            try:
                for _ in range(64):
                    sock.sendall(piece + b",")
            except OSError:
                pass  # the server answered and closed, as it should

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        response = _read_response(sock, 10)
    sender.join(10)
    assert _status(response) == 413, response
    assert b'"reason":"too_large"' in response
    time.sleep(0.5)
    grown = coordinator_proc.rss() - before
    assert grown < 16 << 20, f"the process grew by {grown / 2**20:.1f} MiB"
    assert coordinator_proc.rejects("too_large") >= 1


def test_a_streamed_body_is_cut_at_the_cap(coordinator_proc: Proc) -> None:
    """Without a Content-Length the bytes are counted: 413 at the cap, not at the end."""
    with socket.create_connection(("127.0.0.1", coordinator_proc.port)) as sock:
        sock.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n" + coordinator_proc.auth_line + b"\r\n"
        )
        chunk = b"a" * 65536
        for _ in range(MAX_BODY // len(chunk) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = _read_response(sock, 10)
    assert _status(response) == 413, response


def test_a_body_that_never_finishes_gets_408_within_the_deadline(
    coordinator_proc: Proc,
) -> None:
    with socket.create_connection(("127.0.0.1", coordinator_proc.port)) as sock:
        sock.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n" + coordinator_proc.auth_line + b'\r\n{"kind": "echo", '
        )
        start = time.monotonic()
        response = _read_response(sock, BODY_TIMEOUT_S + 5)
        took = time.monotonic() - start
    assert _status(response) == 408, response
    assert took < BODY_TIMEOUT_S + 2, took
    assert coordinator_proc.rejects("body_timeout") == 1


async def test_header_trickling_connections_are_closed_and_others_are_served(
    coordinator_proc: Proc,
) -> None:
    """400 connections each sending a header line every half second, never the blank line
    that ends the head: all are closed at the deadline, and a normal request meanwhile is
    answered."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(400):
        reader, writer = await asyncio.open_connection("127.0.0.1", coordinator_proc.port)
        writer.write(b"GET /v1/tasks HTTP/1.1\r\nHost: t\r\n")
        conns.append((reader, writer))
    opened = time.monotonic()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        n = 0
        while not writer.is_closing():
            await asyncio.sleep(0.5)
            n += 1
            try:
                writer.write(b"X-Trickle-%d: 1\r\n" % n)
                await writer.drain()
            except (ConnectionError, RuntimeError):
                return

    async def closed_after(reader: asyncio.StreamReader) -> float:
        try:
            data = await reader.read()  # to EOF
        except ConnectionError:
            data = b""
        if data:
            assert _status(data) == 408, data[:200]
        return time.monotonic() - opened

    trickles = [asyncio.create_task(trickle(w)) for _, w in conns]
    waits = [asyncio.create_task(closed_after(r)) for r, _ in conns]
    try:
        async with httpx.AsyncClient(
            base_url=coordinator_proc.url, headers=coordinator_proc.headers
        ) as client:
            r = await client.get("/v1/tasks", timeout=5)
            assert r.status_code == 200
            assert time.monotonic() - opened < HEAD_TIMEOUT_S  # they were all still open
        async with asyncio.timeout(HEAD_TIMEOUT_S + 8):
            times = await asyncio.gather(*waits)
    finally:
        for t in trickles:
            t.cancel()
        for _, w in conns:
            w.close()
    assert max(times) < HEAD_TIMEOUT_S + 4, max(times)
    assert min(times) >= HEAD_TIMEOUT_S - 0.5, min(times)
    assert await asyncio.to_thread(coordinator_proc.rejects, "head_timeout") >= 400


def test_a_deeply_nested_fl_job_gets_a_400(coordinator_proc: Proc) -> None:
    """Finding 10: a job whose strategy nested 5,000 deep reset the connection."""
    body = '{"name": "j", "strategy": ' + '{"x": ' * 5000 + "{}" + "}" * 5000 + "}"
    r = httpx.post(
        f"{coordinator_proc.url}/v1/fl/jobs",
        content=body,
        headers={"content-type": "application/json", **coordinator_proc.headers},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert r.json().get("reason") == "too_deep", r.text
