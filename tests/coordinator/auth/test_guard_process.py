"""The guard on a real ``lepton coordinator run`` process over real sockets: a refused body is
not read into the process, ``lepton tokens revoke`` takes effect on the next request,
``http.metrics_port`` serves metrics apart, and ``--insecure`` opens everything, loudly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lepton.protocol import routes
from tests.coordinator.api.test_http_limits import (
    REPO,
    Proc,
    _read_response,
    _status,
    create_token,
    run_coordinator,
)
from tests.support.broker import Broker, free_port

pytestmark = pytest.mark.slow

METRICS_PORT = free_port()


@pytest.fixture
def proc(broker: Broker, tmp_path: Path) -> Iterator[Proc]:
    yield from run_coordinator(broker, tmp_path, "--set", f"http.metrics_port={METRICS_PORT}")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", routes.TASKS),  # a JSON route
        # A route that reads its own body, with a cap of its own (64 MiB by default).
        ("PUT", routes.path(routes.FL_UPLOAD, job_id="j", round_no=1, device_id="d")),
    ],
)
def test_a_huge_body_without_a_token_is_refused_at_once_and_not_read_in(
    proc: Proc, method: str, path: str
) -> None:
    for _ in range(3):  # warm the refusal's code paths
        r = httpx.request(method, f"{proc.url}{path}", json={"kind": "echo"})
        assert r.status_code == 401
    before = proc.rss()
    size = 256 << 20
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    piece = b"0," * (1 << 19)
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(head + b'{"kind":"echo","params":{"x":[')
        started = time.monotonic()

        def send_body() -> None:
            try:
                for _ in range(size // len(piece)):
                    sock.sendall(piece)
            except OSError:
                pass  # closed after the answer, as it should be

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        response = _read_response(sock, 10)
        took = time.monotonic() - started
    sender.join(15)
    assert _status(response) == 401, response[:300]
    assert b'"reason":"missing_token"' in response
    assert b"www-authenticate: bearer" in response.lower()
    assert took < 2.0, took
    time.sleep(0.5)
    grown = proc.rss() - before
    assert grown < 16 << 20, f"the process grew by {grown / 2**20:.1f} MiB"
    tasks = httpx.get(f"{proc.url}{routes.TASKS}", headers=proc.headers, timeout=5).json()
    assert tasks == []


def test_a_token_revoked_with_the_cli_is_refused_on_the_next_request(proc: Proc) -> None:
    token = create_token(proc.database, "short-lived", "fleet:read")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{proc.url}{routes.DEVICES}", headers=headers).status_code == 200
    subprocess.run(
        [sys.executable, "-m", "lepton.coordinator.cli", "tokens", "revoke", "short-lived",
         "--database", proc.database],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    r = httpx.get(f"{proc.url}{routes.DEVICES}", headers=headers)
    assert (r.status_code, r.json()["reason"]) == (401, "revoked_token")


def test_the_metrics_port_serves_metrics_without_a_token(proc: Proc) -> None:
    r = httpx.get(f"http://127.0.0.1:{METRICS_PORT}{routes.METRICS}", timeout=5)
    assert r.status_code == 200
    assert "lepton_auth_refusals_total" in r.text or "lepton_http" in r.text
    assert httpx.get(f"{proc.url}{routes.METRICS}", timeout=5).status_code == 401


def test_insecure_opens_every_route_and_says_so(broker: Broker, tmp_path: Path) -> None:
    gen = run_coordinator(broker, tmp_path, "--insecure")
    p = next(gen)
    try:
        r = httpx.get(f"{p.url}{routes.DEVICES}", timeout=5)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{p.url}{routes.TASKS}", json={"kind": "echo"}, timeout=5)
        assert r.status_code == 201, r.text
        assert httpx.get(f"{p.url}{routes.METRICS}", timeout=5).status_code == 200
        log = p.log.read_text()
        warning = [ln for ln in log.splitlines() if "AUTHENTICATION IS OFF" in ln]
        assert warning, log[-3000:]
        assert "WARNING" in warning[0]
    finally:
        gen.close()
