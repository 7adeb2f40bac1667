"""Uvicorn's HTTP/1.1 protocol (h11) with a deadline on the request head.

Uvicorn bounds an idle keep-alive connection, a head's size (``h11_max_incomplete_event_size``)
and the connections it serves requests on (``limit_concurrency``), but not the time a head
takes: a connection that sends a byte of headers now and then, or nothing at all, is held
for ever. Here a connection whose request head is not complete ``head_timeout_s`` after its
first byte (or after the connection opened) gets a 408 and is closed. Once a response is
sent, uvicorn's keep-alive timer covers the idle wait for the next request; its first byte
starts the deadline again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_TIMEOUT_BODY = b'{"detail":"the request head did not arrive in time","reason":"head_timeout"}'
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\n"
    b"connection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)


class HeadDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose request head is late."""

    head_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def on_head_timeout(self) -> None:
        """Called once per connection closed for a late head (a subclass counts it)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is in (or the connection is done)
        elif self._head_timer is None:
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.on_head_timeout()
        if self.client:
            log.info(
                "closed %s:%d: no request head within %.1fs", *self.client, self.head_timeout_s
            )
        # h11 cannot frame a response before a request; these bytes are one, complete.
        self.transport.write(_TIMEOUT_RESPONSE)
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def protocol_class(head_timeout_s: float, on_timeout: Callable[[], None]) -> type[H11Protocol]:
    """The protocol class for one server: uvicorn builds it with its own arguments."""

    class _Protocol(HeadDeadlineProtocol):
        def on_head_timeout(self) -> None:
            on_timeout()

    _Protocol.head_timeout_s = head_timeout_s
    return _Protocol
