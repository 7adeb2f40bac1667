"""The one small HTTP server of the tests: a stdlib server on 127.0.0.1 in a background
thread that serves content-addressed blobs (``GET /blobs/<sha256>``, with Range) and accepts
uploads (``PUT``), with fault injection on both.

``with HttpServer() as server: digest = server.add(data); url = server.url(digest)`` serves a
blob; ``server.upload_url("job/1/dev")`` is where a client PUTs one, ``server.body(url)`` what
it sent. A PUT must carry ``Content-Length`` (411 otherwise) and ``X-Lepton-Digest:
sha256:<hex>`` matching the body (400 otherwise); it is answered 201 and the body is kept by
path.

Faults are queued (GETs per digest with :meth:`HttpServer.fault`, PUTs with
:meth:`HttpServer.fault_puts`) and each applies to the next ``times`` requests:

- ``status``: answers ``status`` and ``body`` (a PUT after reading its body, so the client
  sees the answer);
- ``drop``: a GET announces the full length and the connection is closed after byte ``at``;
  a PUT's connection is closed without an answer;
- GETs only: ``truncate`` (the blob is served ``at`` bytes long, with an honest, short
  Content-Length), ``wrong_bytes`` (same length, a flipped byte), ``oversize`` (``extra``
  bytes more, with a matching Content-Length), ``oversize_chunked`` (the same without a
  Content-Length, so only the bytes give it away), ``ignore_range`` (a Range request gets the
  whole blob and 200), ``slow`` (1 KiB pieces ``delay`` seconds apart), ``redirect`` (302 to
  ``location``).

``HttpServer(tls=context)`` serves HTTPS with a server-side :class:`ssl.SSLContext` (the
handshake runs in the request's thread); its URLs are then ``https://``.

Every request is recorded (method, path, headers, Range, fault applied, status, body bytes
sent or received).

``POST`` goes to ``server.post_handler`` (``(path, headers, body) -> (status, json bytes)``;
404 when none is set): the enrolment contract's test double
(:class:`tests.support.enrolserver.FakeEnrolment`) plugs in there.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

DIGEST_HEADER = "X-Lepton-Digest"

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
    range: str | None = None
    fault: str | None = None
    status: int = 0
    sent: int = 0  # body bytes sent (GET)
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0  # body bytes received (PUT)


def _take(queue: list[Fault]) -> Fault | None:
    if not queue:
        return None
    fault = queue[0]
    if fault.times > 0:
        fault.times -= 1
        if fault.times == 0:
            queue.pop(0)
    return fault


@dataclass
class _State:
    blobs: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    put_faults: list[Fault] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    post_handler: Callable[[str, dict[str, str], bytes], tuple[int, bytes]] | None = None

    def take_fault(self, digest: str) -> Fault | None:
        with self.lock:
            return _take(self.faults.get(digest) or [])

    def take_put_fault(self) -> Fault | None:
        with self.lock:
            return _take(self.put_faults)

    def record(self, request: Request) -> Request:
        with self.lock:
            self.requests.append(request)
        return request


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive), no access log on stderr."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        digest = self.path.rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        blob = state.blobs.get(digest)
        fault = state.take_fault(digest) if blob is not None else None
        record = state.record(
            Request(
                self.path, rng, fault.kind if fault else None, headers=dict(self.headers.items())
            )
        )
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

    def do_POST(self) -> None:
        state = self.server.state
        record = state.record(Request(self.path, method="POST", headers=dict(self.headers.items())))
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._answer(record, 411, close=True)
            return
        body = self.rfile.read(int(length))
        record.size = len(body)
        if state.post_handler is None:
            self._answer(record, 404)
            return
        status, answer = state.post_handler(self.path, dict(self.headers.items()), body)
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_PUT(self) -> None:
        state = self.server.state
        record = Request(self.path, method="PUT", headers=dict(self.headers.items()))
        state.record(record)
        fault = state.take_put_fault()
        record.fault = fault.kind if fault else None
        if fault and fault.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._answer(record, 411, close=True)
            return
        body = self.rfile.read(int(length))
        record.size = len(body)
        if fault and fault.kind == "status":
            self._answer(record, fault.status, fault.body)
            return
        declared = self.headers.get(DIGEST_HEADER, "")
        if declared != f"sha256:{hashlib.sha256(body).hexdigest()}":
            self._answer(record, 400, b"digest mismatch")
            return
        with state.lock:
            state.bodies[self.path] = body
        self._answer(record, 201)

    def _empty(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(
        self, record: Request, status: int, text: bytes = b"", *, close: bool = False
    ) -> None:
        record.status = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        if close:  # the body was not read, so the connection cannot be reused
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (tests cut connections on purpose) is not an error."""
        # A client that refused the certificate is not one either.
        if isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            return
        super().handle_error(request, client_address)


class HttpServer:
    """``with``: serves from a daemon thread; ``port`` is the ephemeral port it bound."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.state = _State()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self.tls = tls
        if tls is not None:
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server.state = self.state
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    # ------------------------------------------------------------------ blobs (GET)

    def add(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.state.blobs[digest] = data
        return digest

    def put(self, digest: str, data: bytes) -> None:
        """Serve ``data`` under a digest it may not have (a corrupted artifact)."""
        self.state.blobs[digest] = data

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, digest: str) -> str:
        return f"{self.origin}/blobs/{digest}"

    def fault(self, digest: str, fault: Fault) -> None:
        with self.state.lock:
            self.state.faults.setdefault(digest, []).append(fault)

    def sent(self, digest: str | None = None) -> int:
        """Body bytes sent (for ``digest``, or in all)."""
        return sum(r.sent for r in self.requests if digest is None or r.path.endswith(digest))

    # ------------------------------------------------------------------ uploads (PUT)

    def upload_url(self, name: str) -> str:
        return f"{self.origin}/uploads/{name}"

    def fault_puts(self, fault: Fault) -> None:
        """``status`` or ``drop`` for the next ``fault.times`` PUTs."""
        with self.state.lock:
            self.state.put_faults.append(fault)

    def body(self, url_or_path: str) -> bytes:
        path = url_or_path.split(f":{self.port}", 1)[-1]
        with self.state.lock:
            return self.state.bodies[path]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def post_handler(self) -> Callable[[str, dict[str, str], bytes], tuple[int, bytes]] | None:
        return self.state.post_handler

    @post_handler.setter
    def post_handler(
        self, handler: Callable[[str, dict[str, str], bytes], tuple[int, bytes]] | None
    ) -> None:
        self.state.post_handler = handler

    # ------------------------------------------------------------------ both

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)

    def reset(self) -> None:
        """No faults queued, no requests recorded, no uploads kept (blobs stay)."""
        with self.state.lock:
            self.state.faults.clear()
            self.state.put_faults.clear()
            self.state.requests.clear()
            self.state.bodies.clear()
