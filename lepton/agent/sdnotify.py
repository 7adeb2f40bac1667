"""systemd service notifications (``sd_notify``) over the documented datagram protocol.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: a path, or an abstract socket
name written with a leading ``@``. Each notification is one datagram of newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``...). See sd_notify(3).

Everything here is a no-op outside systemd, and nothing raises when a send fails: the first
failure is logged as a warning, later ones at debug level. The protocol is a dozen lines, so it
is written here rather than pulled in as a dependency.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

logger = logging.getLogger(__name__)

_MAX_STATUS: Final = 1024


class Notifier:
    """Sends notifications to the service manager that started this process, if any.

    The environment is read once, at construction (``environ`` defaults to ``os.environ``).
    The socket is opened on the first send and is non-blocking: a service manager that does
    not read cannot stall the agent.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if it was handed to the socket."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", errors="replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("systemd notification failed (further failures at debug): %s", exc)
            else:
                logger.debug("systemd notification failed: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up finished (``READY=1``): systemd starts units ordered after this one."""
        return self.notify("READY=1", *([_status(status)] if status is not None else []))

    def stopping(self) -> bool:
        """Shutdown began (``STOPPING=1``)."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """One-line status shown by ``systemctl status`` (``STATUS=...``)."""
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``); send at least every half :meth:`watchdog_interval`."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to finish starting or stopping (``EXTEND_TIMEOUT_USEC``)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (``WATCHDOG_USEC``), or None when there is none.

        This is the full timeout after which systemd kills the service, as sd_watchdog_enabled(3)
        reports it: ping at least twice per interval. None when not under systemd, when the
        watchdog is off, or when ``WATCHDOG_PID`` names another process (a child that inherited
        the environment must not ping for its parent).
        """
        if self._address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        """Close the socket; later notifications open a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _address(value: str) -> str | bytes | None:
    """The socket address for ``NOTIFY_SOCKET``: ``@name`` is Linux's abstract namespace."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        # vsock: and other transports of newer systemd versions are not used by services.
        logger.warning("NOTIFY_SOCKET %r is not a unix socket path; notifications disabled", value)
    return None


def _status(text: str) -> str:
    # One datagram line per assignment: a newline would start a new (bogus) assignment.
    return "STATUS=" + " ".join(text.splitlines())[:_MAX_STATUS]
