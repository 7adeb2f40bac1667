"""A real HTTP server for content-addressed blobs, with Range support and fault injection.

``with BlobServer() as server: digest = server.add(data); url = server.url(digest)``.
Faults are queued per digest and each applies to the next ``times`` requests for it:

- ``truncate``: the blob is served ``at`` bytes long (an honest, short Content-Length);
- ``drop``: the full length is announced, the connection is closed after byte ``at``;
- ``wrong_bytes``: same length, different content (a flipped byte);
- ``oversize``: ``extra`` bytes more than the blob, with a matching Content-Length;
- ``oversize_chunked``: as ``oversize`` but without a Content-Length (chunked), so only the
  bytes themselves give it away;
- ``ignore_range``: answers a Range request with the whole blob and status 200;
- ``slow``: sends in 1 KiB pieces with ``delay`` seconds between them;
- ``status``: answers with ``status`` and ``body`` (none by default);
- ``redirect``: answers ``302`` with ``Location: <location>``.

Every request is recorded (path, Range header, fault applied, body bytes sent).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from tests.support.httpserver import QuietHandler, ThreadedServer

FaultKind = Literal[
    "truncate",
    "drop",
    "wrong_bytes",
    "oversize",
    "oversize_chunked",
    "ignore_range",
    "slow",
    "status",
    "redirect",
]


@dataclass
class Fault:
    kind: FaultKind
    at: int = 0
    times: int = 1  # -1: every request
    delay: float = 0.0
    extra: int = 1024
    status: int = 500
    body: bytes = b""
    location: str = ""


@dataclass
class Request:
    path: str
    range: str | None
    fault: str | None
    status: int = 0
    sent: int = 0


@dataclass
class _State:
    blobs: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fault(self, digest: str) -> Fault | None:
        with self.lock:
            queue = self.faults.get(digest) or []
            if not queue:
                return None
            fault = queue[0]
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    queue.pop(0)
            return fault


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server names)
        state: _State = self.server.state
        digest = self.path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        blob = state.blobs.get(digest)
        fault = state.take_fault(digest) if blob is not None else None
        record = Request(self.path, rng, fault.kind if fault else None)
        with state.lock:
            state.requests.append(record)
        if blob is None:
            record.status = 404
            self._empty(404)
            return
        if fault and fault.kind == "status":
            record.status = fault.status
            self._empty(fault.status, fault.body)
            return
        if fault and fault.kind == "redirect":
            record.status = 302
            self.send_response(302)
            self.send_header("Location", fault.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = blob
        if fault and fault.kind == "truncate":
            data = blob[: fault.at]
        elif fault and fault.kind == "wrong_bytes":
            data = bytes([blob[0] ^ 0xFF]) + blob[1:]
        elif fault and fault.kind in ("oversize", "oversize_chunked"):
            data = blob + b"\0" * fault.extra
        start = 0
        status = 200
        match = _RANGE.match(rng or "")
        if match and not (fault and fault.kind == "ignore_range"):
            start = int(match.group(1))
            if start >= len(data):
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if fault and fault.kind == "oversize_chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 4096):
                piece = body[i : i + 4096]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                record.sent += len(piece)
            self.wfile.write(b"0\r\n\r\n")
            return
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault and fault.kind == "drop":
            cut = max(0, fault.at - start)
            self.wfile.write(body[:cut])
            self.wfile.flush()
            record.sent += cut
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault and fault.kind == "slow":
            for i in range(0, len(body), 1024):
                self.wfile.write(body[i : i + 1024])
                self.wfile.flush()
                record.sent += len(body[i : i + 1024])
                time.sleep(fault.delay)
            return
        self.wfile.write(body)
        record.sent += len(body)

    def _empty(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class BlobServer(ThreadedServer[_State]):
    """Serves blobs at ``/blobs/<sha256>`` on 127.0.0.1 from a background thread."""

    def __init__(self) -> None:
        super().__init__(_Handler, _State())

    def add(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.state.blobs[digest] = data
        return digest

    def put(self, digest: str, data: bytes) -> None:
        """Serve ``data`` under a digest it may not have (a corrupted artifact)."""
        self.state.blobs[digest] = data

    def url(self, digest: str) -> str:
        return f"http://127.0.0.1:{self.port}/blobs/{digest}"

    def fault(self, digest: str, fault: Fault) -> None:
        with self.state.lock:
            self.state.faults.setdefault(digest, []).append(fault)

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)

    def sent(self, digest: str | None = None) -> int:
        """Body bytes sent (for ``digest``, or in all)."""
        return sum(r.sent for r in self.requests if digest is None or r.path.endswith(digest))
