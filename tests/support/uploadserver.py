"""A real HTTP server accepting content-addressed uploads (``PUT``), with fault injection.

``with UploadServer() as server: url = server.url("job/1/dev"); ...; body = server.body(path)``.
A PUT must carry ``Content-Length`` (411 otherwise) and ``X-Lepton-Digest: sha256:<hex>``
matching the body (400 otherwise); it is answered 201 and the body is kept by path.
Faults are queued and each applies to the next ``times`` PUTs:

- ``status``: answer ``status`` (after reading the body, so the client sees the answer);
- ``drop``: close the connection without an answer.

Every request is recorded (path, headers, fault applied, status, body size).
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from typing import Literal

from tests.support.httpserver import QuietHandler, ThreadedServer

DIGEST_HEADER = "X-Lepton-Digest"


@dataclass
class UploadFault:
    kind: Literal["status", "drop"]
    status: int = 503
    times: int = 1


@dataclass
class Upload:
    path: str
    headers: dict[str, str]
    fault: str | None = None
    status: int = 0
    size: int = 0


@dataclass
class _State:
    bodies: dict[str, bytes] = field(default_factory=dict)
    faults: list[UploadFault] = field(default_factory=list)
    requests: list[Upload] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fault(self) -> UploadFault | None:
        with self.lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            fault.times -= 1
            if fault.times <= 0:
                self.faults.pop(0)
            return fault


class _Handler(QuietHandler):
    def do_PUT(self) -> None:  # noqa: N802 (http.server names)
        state: _State = self.server.state
        record = Upload(path=self.path, headers=dict(self.headers.items()))
        with state.lock:
            state.requests.append(record)
        fault = state.take_fault()
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
            self._answer(record, fault.status)
            return
        declared = self.headers.get(DIGEST_HEADER, "")
        if declared != f"sha256:{hashlib.sha256(body).hexdigest()}":
            self._answer(record, 400, b"digest mismatch")
            return
        with state.lock:
            state.bodies[self.path] = body
        self._answer(record, 201)

    def _answer(
        self, record: Upload, status: int, text: bytes = b"", *, close: bool = False
    ) -> None:
        record.status = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        if close:  # the body was not read, so the connection cannot be reused
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(text)


class UploadServer(ThreadedServer[_State]):
    """Accepts PUTs on 127.0.0.1 from a background thread."""

    def __init__(self) -> None:
        super().__init__(_Handler, _State())

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/uploads/{name}"

    def fault(self, fault: UploadFault) -> None:
        with self.state.lock:
            self.state.faults.append(fault)

    def body(self, url_or_path: str) -> bytes:
        path = url_or_path.split(f":{self.port}", 1)[-1]
        with self.state.lock:
            return self.state.bodies[path]

    @property
    def requests(self) -> list[Upload]:
        with self.state.lock:
            return list(self.state.requests)
