"""Where the agent may fetch from and upload to: the coordinator's origin and the origins the
device's own config adds, nothing a task names.

A task's URL is checked here before any connection is made, so a hostile or mistaken task
cannot turn the agent into a client of hosts inside the device's network (a port scanner
reading the answers back in its results). An origin is ``scheme://host:port`` (the port
defaults to 80/443); a configured entry may end in ``:*`` for any port of that host, which
suits a simulator on the coordinator's own host, not a device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from lepton.common.errors import LeptonError

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class OriginError(LeptonError, ValueError):
    """A URL or origin that is not ``http(s)://host[:port]`` shaped."""


def origin_of(url: str, *, any_port: bool = False) -> str:
    """``scheme://host:port`` of ``url`` (lower-cased, default port filled in).

    ``any_port``: allow ``:*`` as the port (configured entries only).
    """
    if any_port and url.endswith(":*"):
        return origin_of(url[:-2]).rsplit(":", 1)[0] + ":*"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:  # a port out of range or not a number
        raise OriginError(f"{url[:80]!r} is not a valid URL") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise OriginError(f"{url[:80]!r} is not an http(s) URL")
    host = (parts.hostname or "").lower()
    if not host or parts.username is not None or parts.password is not None:
        raise OriginError(f"{url[:80]!r} has no host, or carries credentials")
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


@dataclass(frozen=True, slots=True)
class Origins:
    """The allowed origins. Empty: nothing may be fetched (the agent was told no
    coordinator URL and no other origin)."""

    allowed: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, coordinator_url: str | None, extra: Iterable[str] = ()) -> Origins:
        """The coordinator's origin plus ``extra``; :class:`OriginError` on a malformed one."""
        found = [origin_of(coordinator_url)] if coordinator_url else []
        found += [origin_of(o, any_port=True) for o in extra]
        return cls(tuple(dict.fromkeys(found)))

    def permits(self, url: str) -> bool:
        """Whether ``url`` is well formed and at an allowed origin."""
        try:
            origin = origin_of(url)
        except OriginError:
            return False
        any_port = origin.rsplit(":", 1)[0] + ":*"
        return origin in self.allowed or any_port in self.allowed

    def describe(self) -> str:
        return ", ".join(self.allowed) or "none configured"
