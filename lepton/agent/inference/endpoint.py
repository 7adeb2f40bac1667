"""The local inference endpoint: HTTP/1.1 for applications on the device, no web framework.

Served with ``h11`` over asyncio streams on a loopback ``host:port`` (another host only with
``allow_remote``) and/or a Unix socket whose mode and group are set before anyone can connect
(:mod:`lepton.agent.inference.unixsock`). With a ``token``, every request must carry
``Authorization: Bearer <token>`` or is answered 401 with ``WWW-Authenticate: Bearer``
(:mod:`lepton.agent.inference.access`); health stays open (status only, no model names) unless
``open_health`` is False. Routes:

- ``GET /v1/health``: ``{"status": "ok", "models": [...]}``;
- ``GET /v1/models``: every served model with its input/output specs;
- ``GET /v1/models/{name}``: one model;
- ``POST /v1/models/{name}:predict``: a JSON body ``{"inputs": [[...]]}`` (nested lists; or
  ``{"inputs": {"<input name>": [[...]], ...}}`` for several inputs), answered with
  ``{"model", "digest", "outputs": {"<output name>": [[...]]}}``; or a MessagePack body
  (``Content-Type: application/msgpack``) whose inputs are ``{"dtype", "shape", "data"}``
  tensors (:class:`lepton.protocol.tensors.TensorPayload`), answered in kind.

Errors are JSON ``{"error": {"code", "message"}}``: 400 for a body that does not fit the
model (which input, which dimension, expected against got) or nests deeper than a tensor
can (``too_deep``), 404 for an unknown model or
route, 405 for a wrong method, 413 for a body over the cap, 415 for another content type,
408 for a request that did not arrive in time, 503 for a deployed model that is still
loading after a restart (or failed to), or when connections are exhausted.

Slow clients cannot hold the endpoint: each request (the wait for it, its headers and its
body together) must arrive within ``request_timeout`` seconds in total, not per read, and
a reply must be taken within as long. At ``max_connections``, a new connection closes the
connection that has waited longest for its request (once it has waited ``EVICT_AFTER_S``)
rather than being refused, so trickling connections give way to clients that send.

Inference runs in a small thread pool (``concurrency`` workers),
so the agent's event loop never blocks on a model. Connections are kept alive between
requests. Request and answer bodies are converted in :mod:`lepton.agent.inference.bodies`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import h11
import msgspec

from lepton.agent.inference.access import TokenGuard, is_loopback_peer, refusal_answer
from lepton.agent.inference.bodies import (
    HttpError,
    json_inputs,
    outputs_json,
    outputs_msgpack,
    tensor_inputs,
)
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.unixsock import SocketPathError, bind_unix
from lepton.agent.metrics import Counters

if TYPE_CHECKING:
    from lepton.agent.config import EndpointConfig

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S: Final = 10.0
#: A connection waiting this long for (the rest of) its request may be closed for a new one.
EVICT_AFTER_S: Final = 1.0
LINGER_S: Final = 1.0
READ_CHUNK: Final = 256 * 1024
MSGPACK_TYPES: Final = frozenset({"application/msgpack", "application/x-msgpack"})
JSON_TYPE: Final = "application/json"
SERVER_HEADER: Final = ("server", "lepton-agent")
_PREDICT_SUFFIX: Final = ":predict"
HEALTH_PATH: Final = "/v1/health"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


def _error_reply(exc: HttpError, *, close: bool = False) -> Reply:
    body = _json.encode({"error": {"code": exc.code, "message": exc.message}})
    headers = (("allow", exc.allow),) if exc.allow else ()
    return Reply(exc.status, body, headers=headers, close=close)


# ---------------------------------------------------------------- the server


async def _linger(reader: asyncio.StreamReader, seconds: float = LINGER_S) -> None:
    """Read and drop what a refused client is still sending, briefly, before closing.

    Closing with unread data makes the kernel reset the connection, and a client still
    writing its body would see the reset instead of the 413 it was sent.
    """
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while await reader.read(READ_CHUNK):
                pass


class Endpoint:
    """The local API of one agent. ``async with Endpoint(...)`` is the listening lifetime."""

    def __init__(
        self,
        models: ModelManager,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        socket_path: Path | None = None,
        max_body: int = 16 * 1024 * 1024,
        concurrency: int = 2,
        max_connections: int = 64,
        request_timeout: float = REQUEST_TIMEOUT_S,
        counters: Counters | None = None,
        allow_remote: bool = False,
        socket_mode: int = 0o660,
        socket_gid: int | None = None,
        token: str | None = None,
        open_health: bool = True,
    ) -> None:
        if port is None and socket_path is None:
            raise ValueError("the endpoint needs a port, a socket path, or both")
        if allow_remote and token is None:
            raise ValueError("a remote-reachable endpoint needs a token")
        self.models = models
        self.host = host
        self.requested_port = port
        self.allow_remote = allow_remote
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        self.guard = TokenGuard(token, counters=counters) if token is not None else None
        self.open_health = open_health
        self.max_body = max_body
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.counters = counters
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="lepton-infer"
        )
        self._servers: list[asyncio.Server] = []
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # Connections waiting for (the rest of) a request, and since when (loop time).
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self.port: int | None = None
        self.requests = 0
        self.accepted = 0  # connections, over the endpoint's life
        self._bound_socket = False

    @classmethod
    def from_config(
        cls, models: ModelManager, cfg: EndpointConfig, *, counters: Counters | None = None
    ) -> Endpoint:
        """The endpoint ``[endpoint]`` describes (its token read, and checked, now)."""
        return cls(
            models,
            host=cfg.host,
            port=cfg.port,
            socket_path=cfg.socket,
            max_body=cfg.max_body_bytes,
            concurrency=cfg.concurrency,
            max_connections=cfg.max_connections,
            request_timeout=cfg.request_timeout_s,
            counters=counters,
            allow_remote=cfg.allow_remote,
            socket_mode=cfg.mode,
            socket_gid=cfg.gid,
            token=cfg.bearer_token(),
            open_health=cfg.open_health,
        )

    async def __aenter__(self) -> Endpoint:
        try:
            if self.requested_port is not None:
                server = await asyncio.start_server(
                    self._connection,
                    self.host,
                    self.requested_port,
                    limit=READ_CHUNK,
                    start_serving=False,  # not one accept before the addresses are checked
                )
                self._servers.append(server)
                self._check_loopback(server)
                await server.start_serving()
                self.port = int(server.sockets[0].getsockname()[1])
                log.info("inference endpoint on http://%s:%d", self.host, self.port)
            if self.socket_path is not None:
                # Synchronous on purpose: the umask bind_unix sets for its bind() must not
                # overlap another coroutine's file creation on this thread.
                sock = bind_unix(self.socket_path, mode=self.socket_mode, gid=self._gid())
                self._bound_socket = True
                try:
                    server = await asyncio.start_unix_server(
                        self._connection, sock=sock, limit=READ_CHUNK
                    )
                except BaseException:
                    sock.close()
                    raise
                self._servers.append(server)
                log.info(
                    "inference endpoint on unix:%s (mode %04o, gid %d)",
                    self.socket_path,
                    self.socket_mode,
                    self._gid(),
                )
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
        # Closing the transports ends each connection's read loop; cancelling the handler
        # tasks instead trips asyncio's stream callback into logging spurious errors.
        for writer in list(self._connections.values()):
            writer.close()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=LINGER_S + 1)
            for task in pending:
                task.cancel()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._bound_socket and self.socket_path is not None:
            self._bound_socket = False  # only ever remove the socket this endpoint made
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self.socket_path.unlink)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def serve(self) -> None:
        """Listen until cancelled (a named task in the agent's TaskGroup)."""
        async with self:
            await asyncio.Event().wait()

    def _gid(self) -> int:
        return os.getegid() if self.socket_gid is None else self.socket_gid

    def _check_loopback(self, server: asyncio.Server) -> None:
        """Refuse to serve on a non-loopback address unless remote access was allowed.

        The config refused such a host already; this holds for what was actually bound
        (a name that resolved differently since, or an Endpoint built by hand).
        """
        if self.allow_remote:
            return
        for sock in server.sockets:
            name = sock.getsockname()
            if not is_loopback_peer(name):
                raise SocketPathError(
                    errno.EADDRNOTAVAIL,
                    f"endpoint bound {name[0]}, which is not loopback; "
                    "set endpoint.allow_remote = true (with a token) to allow it",
                )

    # ------------------------------------------------------------ connections

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self.accepted += 1
        conn = h11.Connection(h11.SERVER)
        try:
            if len(self._connections) > self.max_connections and not self._evict_one():
                self._count(HttpError(503, "busy", "too many connections"))
                async with asyncio.timeout(self.request_timeout):
                    await self._send(
                        conn,
                        writer,
                        _error_reply(HttpError(503, "busy", "too many connections"), close=True),
                        reader=reader,
                    )
                return
            while await self._one_request(conn, reader, writer):
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(ConnectionError, TimeoutError, h11.LocalProtocolError):
                    exc400 = HttpError(400, "bad_http", str(exc))
                    self._count(exc400)
                    async with asyncio.timeout(self.request_timeout):
                        await self._write(conn, writer, _error_reply(exc400, close=True))
        finally:
            self._connections.pop(task, None)
            self._waiting.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for its request, if it has waited
        ``EVICT_AFTER_S``; True if one was closed (its slot is this new connection's)."""
        if not self._waiting:
            return False
        task, since = min(self._waiting.items(), key=lambda item: item[1])
        if asyncio.get_running_loop().time() - since < EVICT_AFTER_S:
            return False
        del self._waiting[task]
        self._connections[task].close()  # its read ends; its handler cleans up
        if self.counters is not None:
            self.counters.inc("endpoint.evicted")
        return True

    async def _event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(READ_CHUNK))

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, dict[str, str], bytes] | None:
        """The next request with its body, or None when the connection is to be closed
        (the peer closed it, or it was refused with 413)."""
        event = await self._event(conn, reader)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        refusal = self._unauthorized(event.target.decode("latin-1"), headers, writer)
        if refusal is not None:  # before the body: an unknown client cannot make us read it
            await self._write(conn, writer, refusal)
            if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                await _linger(reader)
            return None
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._write(conn, writer, self._too_large(int(length)))
            await _linger(reader)
            return None
        body = bytearray()
        while True:
            part = await self._event(conn, reader)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.max_body:
                    await self._write(conn, writer, self._too_large(len(body)))
                    await _linger(reader)
                    return None
            elif isinstance(part, h11.EndOfMessage):
                return event, headers, bytes(body)
            else:
                return None

    async def _one_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; False when the connection is to be closed."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = asyncio.get_running_loop().time()
        try:
            # One deadline for the wait, the headers and the body together: a client
            # trickling a byte at a time gets no longer than one that sends nothing.
            async with asyncio.timeout(self.request_timeout):
                got = await self._read_request(conn, reader, writer)
        except TimeoutError:
            if conn.their_state is h11.SEND_BODY or conn.trailing_data[0]:
                late = HttpError(408, "request_timeout", "the request did not arrive in time")
                self._count(late)
                with contextlib.suppress(ConnectionError, TimeoutError, h11.LocalProtocolError):
                    async with asyncio.timeout(LINGER_S):
                        await self._write(conn, writer, _error_reply(late, close=True))
            elif self.counters is not None:
                self.counters.inc("endpoint.idle_closed")
            return False
        finally:
            self._waiting.pop(task, None)
        if got is None:
            return False
        event, headers, body = got
        self.requests += 1
        try:
            reply = await self._dispatch(
                event.method.decode("latin-1"), event.target.decode("latin-1"), headers, body
            )
        except HttpError as exc:
            self._count(exc)
            reply = _error_reply(exc)
        except Exception as exc:  # a bug here must cost one answer, not the connection loop
            log.exception("inference endpoint: request failed")
            reply = _error_reply(HttpError(500, "internal", type(exc).__name__))
        async with asyncio.timeout(self.request_timeout):  # a client that does not read
            await self._write(conn, writer, reply)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _unauthorized(
        self, target: str, headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> Reply | None:
        """The 401 for a request without the right token, or None to serve it.

        Health without an ``Authorization`` header is served when ``open_health`` (it then
        says only ``ok``); a header that is present is always checked, on every route.
        """
        if self.guard is None:
            return None
        auth = headers.get("authorization")
        if auth is None and self.open_health and target.split("?", 1)[0] == HEALTH_PATH:
            return None
        reason = self.guard.refusal(auth)
        if reason is None:
            return None
        self.guard.refused(reason, str(writer.get_extra_info("peername") or "unix"))
        challenge, message = refusal_answer(reason)
        body = _json.encode({"error": {"code": f"token_{reason}", "message": message}})
        return Reply(401, body, headers=(("www-authenticate", challenge),), close=True)

    def _too_large(self, size: int) -> Reply:
        exc = HttpError(413, "too_large", f"body of {size} bytes exceeds the {self.max_body} cap")
        self._count(exc)
        return _error_reply(exc, close=True)

    def _count(self, exc: HttpError) -> None:
        """Count (``rejected.endpoint_<code>``) and log, rate-limited, a refused request."""
        if self.counters is not None:
            self.counters.reject(log, f"endpoint_{exc.code}", exc.message, topic="endpoint")

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        reply: Reply,
        *,
        reader: asyncio.StreamReader,
    ) -> None:
        """Answer the next request with ``reply`` whatever it asks (used when refusing)."""
        event = await self._event(conn, reader)
        if isinstance(event, h11.Request):
            await self._write(conn, writer, reply)

    async def _write(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply
    ) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            SERVER_HEADER,
            *reply.headers,
        ]
        if reply.close:
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=reply.status, headers=headers))
        data += conn.send(h11.Data(data=reply.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        writer.write(data)
        await writer.drain()

    # ------------------------------------------------------------ routes

    async def _dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> Reply:
        path = target.split("?", 1)[0]
        if path == HEALTH_PATH:
            self._allow(method, "GET")
            if self.guard is not None and "authorization" not in headers:
                return Reply(200, _json.encode({"status": "ok"}))  # open health: no names
            names = [m.name for m in self.models.served()]
            return Reply(200, _json.encode({"status": "ok", "models": names}))
        if path == "/v1/models":
            self._allow(method, "GET")
            return Reply(
                200, _json.encode({"models": [m.describe() for m in self.models.served()]})
            )
        prefix = "/v1/models/"
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if rest.endswith(_PREDICT_SUFFIX):
                self._allow(method, "POST")
                return await self._predict(rest[: -len(_PREDICT_SUFFIX)], headers, body)
            self._allow(method, "GET")
            model = self.models.get(rest)
            if model is None:
                raise self._unknown(rest)
            return Reply(200, _json.encode(model.describe()))
        raise HttpError(404, "not_found", f"no route {path}")

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise HttpError(405, "method_not_allowed", f"use {allowed}", allow=allowed)

    def _unknown(self, name: str) -> HttpError:
        why = self.models.unavailable(name)
        if why is not None:
            return HttpError(503, "unavailable", f"model {name!r} {why}")
        return HttpError(404, "unknown_model", f"no model named {name!r} is served here")

    async def _predict(self, name: str, headers: dict[str, str], body: bytes) -> Reply:
        ctype = headers.get("content-type", JSON_TYPE).split(";", 1)[0].strip().lower()
        binary = ctype in MSGPACK_TYPES
        if not binary and ctype != JSON_TYPE:
            raise HttpError(415, "unsupported_type", f"use {JSON_TYPE} or application/msgpack")
        try:
            payload = (msgspec.msgpack.decode if binary else msgspec.json.decode)(body)
        except msgspec.DecodeError as exc:
            raise HttpError(400, "bad_body", f"body is not valid {ctype}: {exc}") from exc
        except RecursionError as exc:
            # msgspec stops at the interpreter's recursion limit and raises this cleanly.
            raise HttpError(400, "too_deep", "body nests too deeply to be a tensor") from exc
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise HttpError(400, "bad_body", 'body must be an object {"inputs": ...}')
        with self.models.lease(name) as model:
            if model is None:
                raise self._unknown(name)
            specs = model.runtime.inputs
            convert = tensor_inputs if binary else json_inputs
            inputs = convert(payload["inputs"], specs)
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self._executor, model.runtime.run, inputs)
            except Exception as exc:  # a runtime failure on valid input is the server's fault
                log.warning("inference with %s failed: %s", name, exc)
                raise HttpError(500, "inference_failed", f"{type(exc).__name__}: {exc}") from exc
            digest = model.digest
        if binary:
            out = {"model": name, "digest": digest, "outputs": outputs_msgpack(outputs)}
            return Reply(200, _msgpack.encode(out), content_type="application/msgpack")
        out = {"model": name, "digest": digest, "outputs": outputs_json(outputs)}
        return Reply(200, _json.encode(out))
