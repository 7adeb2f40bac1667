"""A stdlib HTTP server on 127.0.0.1 in a background thread, holding a state object for its
handler: the base of the test servers for blobs (:mod:`.blobserver`) and uploads
(:mod:`.uploadserver`)."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generic, Self, TypeVar

S = TypeVar("S")


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive), no access log on stderr; ``self.server.state`` is the state."""

    protocol_version = "HTTP/1.1"
    server: StateServer[Any]

    def log_message(self, format: str, *args: Any) -> None:
        pass


class StateServer(ThreadingHTTPServer, Generic[S]):
    daemon_threads = True
    state: S

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (tests cut connections on purpose) is not an error."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ThreadedServer(Generic[S]):
    """``with``: serves from a daemon thread; ``port`` is the ephemeral port it bound."""

    def __init__(self, handler: type[QuietHandler], state: S) -> None:
        self.state = state
        self._server: StateServer[S] = StateServer(("127.0.0.1", 0), handler)
        self._server.state = state
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
