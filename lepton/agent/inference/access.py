"""Who may reach the local endpoint: loopback-only TCP, the Unix socket's mode and group,
and an optional bearer token.

The checks that can run before anything listens (a host that is not loopback, a socket mode
or group that does not exist, a token file others can read) run at config load
(:class:`lepton.agent.config.EndpointConfig`) and raise :class:`ConfigError` naming the key,
so a wrong setting stops the agent instead of opening the endpoint wider than meant.
:class:`TokenGuard` then checks each request's ``Authorization`` header.

Only the standard library is used: ``ipaddress`` and ``getaddrinfo`` for loopback,
``grp`` for groups, ``hmac.compare_digest`` for a comparison whose time does not depend on
where the tokens differ.
"""

from __future__ import annotations

import grp
import hmac
import ipaddress
import logging
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import Final

from lepton.agent.metrics import Counters
from lepton.common.errors import ConfigError

LOCALHOST: Final = "localhost"
#: Shorter tokens are refused: a guessable token is worse than none, it looks safe.
MIN_TOKEN_CHARS: Final = 16
_MODE_RE: Final = re.compile(r"0?[0-7]{3}|0o[0-7]{3}")
#: Seconds between two log lines about refused requests (each line says how many there were).
AUTH_LOG_INTERVAL_S: Final = 30.0


# ---------------------------------------------------------------- config-time checks


def _is_loopback_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def non_loopback_addresses(host: str, port: int = 0) -> list[str]:
    """The addresses ``host`` resolves to that are not loopback (empty: loopback only).

    An address literal is checked as it is; a name (``localhost`` included) is resolved as a
    listener would resolve it, and every address must be loopback. An empty host (every
    interface to asyncio) is never loopback. A name that does not resolve is a
    :class:`ConfigError`.
    """
    if not host.strip():
        return ["every interface"]
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return [] if _is_loopback_address(literal) else [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(
            f"endpoint.host: {host!r} does not resolve: {exc}", key="endpoint.host"
        ) from exc
    found = {str(info[4][0]) for info in infos}
    return sorted(a for a in found if not _is_loopback_address(a))


def is_loopback_peer(sockname: object) -> bool:
    """Whether a bound TCP socket's ``getsockname()`` is a loopback address."""
    return isinstance(sockname, tuple) and _is_loopback_address(str(sockname[0]))


def parse_socket_mode(value: int | str) -> int:
    """``"0660"``, ``"660"``, ``"0o660"`` or an int (TOML ``0o660``) -> permission bits.

    A decimal int such as ``660`` is refused rather than read as ``0o1224``: TOML has no
    leading-zero octal, so the value almost certainly meant ``"0660"``.
    """
    if isinstance(value, bool):
        raise ConfigError("endpoint.socket_mode: must be octal bits", key="endpoint.socket_mode")
    if isinstance(value, int):
        if not 0 <= value <= 0o777:
            raise ConfigError(
                f"endpoint.socket_mode: {value} is not permission bits; write it as an octal "
                f'string ("0660") or a TOML octal (0o660)',
                key="endpoint.socket_mode",
            )
        return value
    text = value.strip().lower()
    if not _MODE_RE.fullmatch(text):
        raise ConfigError(
            f'endpoint.socket_mode: {value!r} is not an octal mode such as "0660"',
            key="endpoint.socket_mode",
        )
    return int(text.removeprefix("0o"), 8)


def resolve_group(group: str | int | None) -> int:
    """A group name or gid (``"1000"`` too) -> a gid that exists; None: this process's
    effective group."""
    if group is None:
        return os.getegid()
    text = str(group).strip()
    try:
        if text.isdigit():
            return grp.getgrgid(int(text)).gr_gid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(
            f"endpoint.socket_group: no group {text!r} on this system", key="endpoint.socket_group"
        ) from None


def check_token(token: str, key: str) -> str:
    """The token without surrounding whitespace, or a :class:`ConfigError` if it is too short
    or could not travel in a header."""
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{key}: the token must be at least {MIN_TOKEN_CHARS} characters "
            "(e.g. `openssl rand -hex 32`)",
            key=key,
        )
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{key}: the token must be printable ASCII without spaces", key=key)
    return token


def read_token_file(path: Path) -> str:
    """The token in ``path``, refused (like ssh refuses a private key) when the file is not a
    regular file or its group or others may read or write it."""
    key = "endpoint.token_file"
    try:
        with path.open("rb") as fh:  # one open: the mode checked is the file's read
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{key}: {path} is not a regular file", key=key)
            if st.st_mode & 0o077:
                raise ConfigError(
                    f"{key}: {path} has mode {stat.S_IMODE(st.st_mode):04o}; the token must be "
                    f"readable by its owner only (chmod 600 {path})",
                    key=key,
                )
            raw = fh.read(4096)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}", key=key) from exc
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} must hold an ASCII token", key=key) from None
    return check_token(text, key)


# ---------------------------------------------------------------- per request

_REFUSALS: Final = {
    "missing": "this endpoint needs an Authorization: Bearer <token> header",
    "malformed": "the Authorization header must be 'Bearer <token>'",
    "wrong": "the bearer token is not accepted",
}


def refusal_answer(reason: str) -> tuple[str, str]:
    """(``WWW-Authenticate`` value, message) for a 401 refused for ``reason`` (RFC 6750:
    ``error="invalid_token"`` once a token was sent)."""
    challenge = 'Bearer realm="lepton-agent"'
    if reason != "missing":
        challenge += ', error="invalid_token"'
    return challenge, _REFUSALS[reason]


class TokenGuard:
    """Checks ``Authorization: Bearer <token>``; counts and logs (rate-limited) refusals.

    Refusals are counted as ``endpoint.unauthorized.<reason>`` (``missing``, ``malformed``,
    ``wrong``); a log line is written at most every ``log_interval_s`` seconds, saying how
    many requests were refused since the one before, so a client hammering with a bad token
    cannot flood the log.
    """

    def __init__(
        self,
        token: str,
        *,
        counters: Counters | None = None,
        logger: logging.Logger | None = None,
        log_interval_s: float = AUTH_LOG_INTERVAL_S,
    ) -> None:
        self._token = token.encode("ascii")
        self.counters = counters
        self.log = logger or logging.getLogger(__name__)
        self.log_interval_s = log_interval_s
        self._last_log: float | None = None
        self._unlogged = 0

    def refusal(self, authorization: str | None) -> str | None:
        """None when the header carries the token, else the reason it is refused."""
        if authorization is None:
            return "missing"
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials or not credentials.isascii():
            return "malformed"
        if not hmac.compare_digest(credentials.encode("ascii"), self._token):
            return "wrong"
        return None

    def refused(self, reason: str, peer: str) -> None:
        """Count a refusal and log it, unless a line was written in the last interval."""
        if self.counters is not None:
            self.counters.inc(f"endpoint.unauthorized.{reason}")
        self._unlogged += 1
        now = time.monotonic()
        if self._last_log is not None and now - self._last_log < self.log_interval_s:
            return
        self.log.warning(
            "inference endpoint: refused %d unauthorized request(s) (latest: reason=%s peer=%s)",
            self._unlogged,
            reason,
            peer,
        )
        self._last_log = now
        self._unlogged = 0
