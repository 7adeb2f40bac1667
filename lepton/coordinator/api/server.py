"""Uvicorn inside the coordinator's task group, on a socket bound up front.

Binding first means ``port = 0`` works (the bound port is known before serving) and a port
conflict fails start-up instead of a background task. Signals belong to the coordinator, not
to uvicorn. The ``[http]`` limits bound what a connection may hold: its head's size and time
(:mod:`lepton.coordinator.api.protocol`), and how many connections and requests are served at once
(uvicorn's ``limit_concurrency``: 503 above it). Bodies are bounded in the app
(:mod:`lepton.coordinator.api.limits`).

With ``[http] tls_cert_file``/``tls_key_file`` it serves HTTPS (uvicorn wraps the bound
socket's connections in TLS; the head deadline runs on the decrypted protocol the same
way), and with ``tls_client_ca_file`` it asks every client for a certificate that CA signed.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any, Final

import uvicorn
from fastapi import FastAPI

from lepton.coordinator.api.protocol import protocol_class
from lepton.coordinator.config import HttpConfig

#: How long an idle keep-alive connection stays open. Longer than clients keep idle pooled
#: connections (httpx: 5 s, uvicorn's own default too): with equal figures a client can send
#: a request on a connection at the moment the server closes it, and a POST then fails with
#: "Server disconnected without sending a response" (seen in the demo).
KEEP_ALIVE_S: Final = 65.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the coordinator handles SIGTERM/SIGINT and stops us through should_exit


class HttpServer:
    """Serves one ASGI app on ``host:port`` until :meth:`stop`."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        *,
        limits: HttpConfig | None = None,
        on_head_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        limits = limits or HttpConfig()
        self.app = app  # what it serves (tests walk its routes)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off only on sockets
        # whose protocol says TCP, and accepted sockets inherit it. With Nagle on, uvicorn's
        # answer (head and body written apart) waits for the client's delayed ACK: about
        # 40 ms on every request instead of well under 1 ms (docs/BENCHMARKS.md).
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.tls = limits.tls
        tls: dict[str, Any] = {}
        if limits.tls:
            tls = {"ssl_certfile": limits.tls_cert_file, "ssl_keyfile": limits.tls_key_file}
            if limits.tls_client_ca_file:
                tls["ssl_ca_certs"] = limits.tls_client_ca_file
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            http=protocol_class(limits.head_timeout_s, on_head_timeout),
            h11_max_incomplete_event_size=limits.max_head_bytes,
            limit_concurrency=limits.max_concurrency,
            **tls,
        )
        if limits.tls:
            try:  # a bad certificate or key fails start-up here, not in the serving task
                config.load()
            except (OSError, ssl.SSLError) as exc:
                self.sock.close()
                raise OSError(f"http TLS: cannot load certificate/key: {exc}") from exc
        self._server = _Server(config)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def serve(self) -> None:
        try:
            await self._server.serve(sockets=[self.sock])
        finally:
            self.sock.close()

    def stop(self) -> None:
        self._server.should_exit = True
