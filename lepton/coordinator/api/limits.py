"""Bounds on every request body: its size, the time it takes to arrive, and on JSON routes
its media type and shape.

A pure ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would buffer whole bodies before
any check. Which rules apply is decided with the router's own matcher, so the rules and the
dispatch cannot disagree about which route a path is:

- a route that parses a JSON body (a FastAPI route with a body model): ``Content-Length``
  over ``max_body_bytes`` is refused with 413 before a byte is read; the body is read here,
  counted (413 at the cap) within ``body_timeout_s`` (408), checked by
  :func:`~lepton.coordinator.api.jsonbody.check_json` (400/422) after a 415 for any media type but
  JSON, and handed on;
- a route that reads its own body (update uploads: they enforce a cap per job): streamed
  through, within ``body_timeout_s`` plus one second per ``upload_min_bytes_per_s`` bytes
  received, so a slow link finishes and a stalled one is cut off;
- a path no route takes: capped like a JSON route, then answered by the router.

Every refusal answers ``{"detail", "reason"}`` with ``Connection: close`` (the rest of the
body is never read), is logged and counted in ``lepton_http_rejects_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import Message as MimeMessage
from typing import Any, Final

from fastapi import params
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lepton.coordinator.api.jsonbody import BodyProblem, check_json
from lepton.coordinator.config import HttpConfig

log = logging.getLogger(__name__)

#: How long and how much of a refused body is read and dropped before the connection closes.
LINGER_S: Final = 2.0
LINGER_BYTES: Final = 16 << 20

# Above this a body is checked in a worker thread, off the event loop.
_INLINE_CHECK_BYTES = 64 << 10


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyLimit:
    """The rules for one request's body."""

    max_bytes: int | None  # None: the route enforces its own cap
    timeout_s: float
    min_bytes_per_s: int | None = None  # each this many bytes received adds a second
    json: bool = False


class _RefusedError(Exception):
    def __init__(self, problem: BodyProblem) -> None:
        self.problem = problem
        super().__init__(problem.detail)


class _DisconnectedError(Exception):
    pass


def _parses_json(route: BaseRoute) -> bool:
    return (
        isinstance(route, APIRoute)
        and route.body_field is not None
        and not isinstance(route.body_field.field_info, params.Form)
    )


class BodyGuard:
    """The middleware; ``routes`` are the app's routes in the order its router tries them,
    ``on_refuse`` gets each refusal's reason."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[BaseRoute],
        config: HttpConfig,
        on_refuse: Callable[[str], None],
    ) -> None:
        self.app = app
        self.routes = routes
        self.on_refuse = on_refuse
        cap, timeout = config.max_body_bytes, config.body_timeout_s
        self._json = BodyLimit(max_bytes=cap, timeout_s=timeout, json=True)
        self._own = BodyLimit(
            max_bytes=None, timeout_s=timeout, min_bytes_per_s=config.upload_min_bytes_per_s
        )
        self._unrouted = BodyLimit(max_bytes=cap, timeout_s=timeout)

    def limit_for(self, scope: Scope) -> BodyLimit:
        """The rules for the route the router will pick for ``scope``."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return self._json if _parses_json(route) else self._own
        return self._unrouted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        exchange = _Exchange(scope, receive, send, limit, self._refuse)
        try:
            if limit.json:
                body = await exchange.read_json()
                receive = _replay(body, receive)
            else:
                exchange.check_declared()
                receive = exchange.receive
        except _RefusedError as exc:
            await self._refuse(scope, send, exc.problem, exchange.unread())
            return
        except _DisconnectedError:
            return
        try:
            await self.app(scope, receive, exchange.send)
        except Exception:
            if exchange.refused is None:
                raise
            # The app saw a disconnect after our refusal and gave up; the client has its answer.
            log.debug("request ended after refusal %s", exchange.refused.reason, exc_info=True)

    async def _refuse(
        self, scope: Scope, send: Send, problem: BodyProblem, unread: Receive | None = None
    ) -> None:
        """Answer ``problem``; with ``unread`` (the body is still coming), read and drop what
        the client goes on sending for a bounded while before the connection closes, so it
        reads the answer instead of a reset (a lingering close, as nginx does)."""
        self.on_refuse(problem.reason)
        client = scope.get("client")
        log.info(
            "refused %s %s from %s: %s %s (%s)",
            scope["method"],
            scope["path"],
            client[0] if client else "?",
            problem.status,
            problem.reason,
            problem.detail,
        )
        response = JSONResponse(
            {"detail": problem.detail, "reason": problem.reason},
            status_code=problem.status,
            headers={"connection": "close"},
        )
        if unread is None:
            await response(scope, _no_body, send)
            return
        await answer_and_linger(response, unread, send)


async def answer_and_linger(response: JSONResponse, unread: Receive, send: Send) -> None:
    """Send ``response`` whole, then read and drop what the client goes on sending of its
    body (bounded by :func:`discard_body`) before the connection closes, so the client reads
    the answer instead of a reset (a lingering close, as nginx does)."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    await discard_body(unread)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Exchange:
    """One request's body accounting, and the send that tells whether a response began."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        limit: BodyLimit,
        refuse: Callable[[Scope, Send, BodyProblem, Receive | None], Any],
    ) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.limit = limit
        self._refuse = refuse
        self.headers = Headers(scope=scope)
        self.deadline = asyncio.get_running_loop().time() + limit.timeout_s
        self.received = 0
        self.complete = False
        self.started = False
        self.refused: BodyProblem | None = None

    def check_declared(self) -> None:
        declared = self.headers.get("content-length")
        if declared is None:
            return
        try:
            length = int(declared)
        except ValueError:  # h11 refuses these first; kept for other servers
            raise _RefusedError(
                BodyProblem(400, "bad_length", "Content-Length is not a number")
            ) from None
        cap = self.limit.max_bytes
        if cap is not None and length > cap:
            raise _RefusedError(_too_large(cap, f"{length} bytes declared"))

    def unread(self) -> Receive | None:
        """The receive still holding body bytes, or None once the body is in."""
        return None if self.complete or not self.has_body() else self._receive

    def has_body(self) -> bool:
        length = self.headers.get("content-length")
        return "transfer-encoding" in self.headers or (length is not None and length != "0")

    async def read_json(self) -> bytes:
        """The whole body of a JSON route, within the limits, checked."""
        self.check_declared()
        if not self.has_body():
            return b""
        if not _is_json(self.headers.get("content-type")):
            got = self.headers.get("content-type") or "none"
            raise _RefusedError(
                BodyProblem(415, "unsupported_media_type", f"expected application/json, got {got}")
            )
        chunks = bytearray()
        while not self.complete:
            message = await self._next()
            chunks += message.get("body", b"")
        body = bytes(chunks)
        if len(body) > _INLINE_CHECK_BYTES:
            problem = await asyncio.to_thread(check_json, body)
        else:
            problem = check_json(body)
        if problem is not None:
            raise _RefusedError(problem)
        return body

    async def _next(self) -> Message:
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            raise _RefusedError(
                BodyProblem(
                    408,
                    "body_timeout",
                    f"the body did not arrive within the deadline ({self.received} bytes came)",
                )
            ) from None
        if message["type"] == "http.disconnect":
            raise _DisconnectedError
        size = len(message.get("body", b""))
        self.received += size
        if self.limit.min_bytes_per_s:
            self.deadline += size / self.limit.min_bytes_per_s
        cap = self.limit.max_bytes
        if cap is not None and self.received > cap:
            raise _RefusedError(_too_large(cap, f"more than {cap} bytes sent"))
        self.complete = not message.get("more_body", False)
        return message

    async def receive(self) -> Message:
        """The app's receive on a route that reads its own body."""
        if self.refused is not None:
            return {"type": "http.disconnect"}
        if self.complete:  # the body is in; what is left is waiting for a disconnect
            return await self._receive()
        try:
            return await self._next()
        except _DisconnectedError:
            return {"type": "http.disconnect"}
        except _RefusedError as exc:
            self.refused = exc.problem
            if not self.started:
                self.started = True
                await self._refuse(self.scope, self._send, exc.problem, self.unread())
            return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.refused is not None:
            return  # our answer went out instead
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _too_large(cap: int, what: str) -> BodyProblem:
    return BodyProblem(413, "too_large", f"{what}; this route takes at most {cap} bytes")


def _is_json(content_type: str | None) -> bool:
    # As FastAPI decides whether to parse a body as JSON (it leaves anything else as bytes).
    if not content_type:
        return False
    mime = MimeMessage()
    mime["content-type"] = content_type
    subtype = mime.get_content_subtype()
    return mime.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def discard_body(receive: Receive) -> None:
    """Read and drop the rest of a refused body, for at most LINGER_S and LINGER_BYTES."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while dropped < LINGER_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))


async def _no_body() -> Message:  # pragma: no cover - responses never receive
    return {"type": "http.disconnect"}
