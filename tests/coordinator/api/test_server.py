"""The coordinator's HTTP server: idle keep-alive connections outlive clients' pools."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from fastapi import FastAPI

from lepton.coordinator.api.server import HttpServer
from lepton.coordinator.config import HttpConfig


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n")[0]


@contextlib.asynccontextmanager
async def _ping_server(
    limits: HttpConfig | None = None,
) -> AsyncIterator[tuple[HttpServer, asyncio.StreamReader, asyncio.StreamWriter]]:
    """An :class:`HttpServer` serving ``GET /ping``, and one connection open to it."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    server = HttpServer(app, "127.0.0.1", 0, limits=limits)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while True:  # until uvicorn listens on the bound socket
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.05)
        try:
            yield server, reader, writer
        finally:
            writer.close()
    finally:
        server.stop()
        await asyncio.wait_for(serving, 10)


async def test_an_idle_connection_is_still_open_after_a_clients_pool_expiry() -> None:
    """httpx keeps idle pooled connections 5 s, uvicorn's default keep-alive is 5 s: a
    request sent at that moment met a closing connection. The server now waits longer, so
    a request on a connection idle for more than 5 s is answered."""
    async with _ping_server() as (_, reader, writer):
        assert await _request(reader, writer) == b"HTTP/1.1 200 OK"
        await asyncio.sleep(5.5)
        assert await _request(reader, writer) == b"HTTP/1.1 200 OK"


async def test_connections_above_the_concurrency_limit_get_503() -> None:
    """``http.max_concurrency`` reaches uvicorn: with that many connections open, a request
    is answered 503 at once instead of queueing behind them."""
    idle: list[asyncio.StreamWriter] = []
    async with _ping_server(HttpConfig(max_concurrency=5)) as (server, reader, writer):
        try:
            assert await _request(reader, writer) == b"HTTP/1.1 200 OK"
            for _ in range(5):
                idle.append((await asyncio.open_connection("127.0.0.1", server.port))[1])
            await asyncio.sleep(0.2)
            assert await _request(reader, writer) == b"HTTP/1.1 503 Service Unavailable"
        finally:
            for w in idle:
                w.close()


async def test_served_connections_do_not_wait_on_nagle() -> None:
    """Every accepted connection has TCP_NODELAY. Without it (a listening socket whose
    protocol was left 0, which asyncio does not recognise as TCP) uvicorn's answer, written
    as a head and a body, waited for the client's delayed ACK: about 40 ms per request."""
    async with _ping_server() as (server, reader, writer):
        assert await _request(reader, writer) == b"HTTP/1.1 200 OK"
        connections = list(server._server.server_state.connections)
        assert connections, "the server holds no connection"
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")  # type: ignore[attr-defined]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
