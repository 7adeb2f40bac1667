"""A small client of the coordinator's HTTP API for the CLI (and scripts)."""

from __future__ import annotations

import argparse
import os
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import httpx

from lepton.common.errors import LeptonError
from lepton.coordinator.cli.exitcodes import (
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_UNAUTHORIZED,
    EXIT_UNREACHABLE,
)

DEFAULT_API: Final = "http://127.0.0.1:8080"


class CliError(LeptonError):
    """An error to print (one line) and exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        self.code = code
        super().__init__(message)


TOKEN_ENV: Final = "LEPTON_TOKEN"  # noqa: S105 - a variable name, not a secret
HOW_TO_GET_A_TOKEN: Final = (
    "an operator token is needed: on the coordinator host run"
    " `lepton tokens create NAME --save` (or ask an administrator for one), then pass it with"
    f" --token, ${TOKEN_ENV}, or save it to {{path}} (mode 0600)"
)


def api_url(explicit: str | None) -> str:
    return (explicit or os.environ.get("LEPTON_API") or DEFAULT_API).rstrip("/")


def token_path() -> Path:
    """Where the CLI keeps the operator token: ``$XDG_CONFIG_HOME/lepton/token``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lepton" / "token"


def api_token(explicit: str | None) -> str | None:
    """The operator token: ``--token``, else ``$LEPTON_TOKEN``, else the token file, which
    must be readable by its owner only (a :class:`CliError` otherwise, as ssh does)."""
    if explicit:
        return explicit.strip()
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = token_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CliError(
            f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}",
            EXIT_ERROR,
        )
    return path.read_text().strip() or None


def client_options(parser: argparse.ArgumentParser) -> None:
    """``--api``, ``--token`` and ``--json`` after a subcommand too. ``SUPPRESS``: given
    there they override the top-level ones; absent, they leave them alone."""
    parser.add_argument("--api", default=argparse.SUPPRESS, help="API URL (env LEPTON_API)")
    parser.add_argument(
        "--token", default=argparse.SUPPRESS, help="operator token (env LEPTON_TOKEN)"
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output for scripts"
    )


def client_of(args: Any) -> ApiClient:
    """The client a command's parsed arguments ask for (``--api``, ``--token``,
    ``--ca-file``, ``--timeout``, each with its environment variable)."""
    ca = getattr(args, "ca_file", None) or os.environ.get("LEPTON_CA_FILE")
    return ApiClient(
        api_url(getattr(args, "api", None)),
        timeout=getattr(args, "timeout", 10.0),
        token=api_token(getattr(args, "token", None)),
        verify=ssl.create_default_context(cafile=ca) if ca else True,
    )


def save_token(token: str) -> Path:
    """Write ``token`` to :func:`token_path`, created 0600 (never readable by others)."""
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    return path


class ApiClient:
    """JSON over HTTP; every failure becomes a :class:`CliError` with an exit code."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        verify: Any = True,
    ) -> None:
        self.base_url = base_url
        self.has_token = bool(token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=headers, verify=verify
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def request(
        self, method: str, path: str, *, codes: Mapping[int, int] | None = None, **kw: Any
    ) -> Any:
        """The decoded JSON answer; an error status raises :class:`CliError` with the exit
        code ``codes`` maps it to (default: 3 for 404, else 1)."""
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise CliError(
                f"coordinator at {self.base_url} did not answer in time", EXIT_UNREACHABLE
            ) from exc
        except httpx.TransportError as exc:
            raise CliError(
                f"cannot reach the coordinator at {self.base_url} ({exc}); "
                "is it running? (--api URL or LEPTON_API)",
                EXIT_UNREACHABLE,
            ) from exc
        if r.status_code == 401 and not self.has_token:
            raise CliError(HOW_TO_GET_A_TOKEN.format(path=token_path()), EXIT_UNAUTHORIZED)
        if r.status_code >= 400:
            default = {404: EXIT_NOT_FOUND, 401: EXIT_UNAUTHORIZED, 403: EXIT_UNAUTHORIZED}.get(
                r.status_code, EXIT_ERROR
            )
            raise CliError(_error_text(r), (codes or {}).get(r.status_code, default))
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(
        self, path: str, body: dict[str, Any], *, codes: Mapping[int, int] | None = None
    ) -> Any:
        return self.request("POST", path, json=body, codes=codes)


def _error_text(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = r.text.strip() or r.reason_phrase
    if isinstance(detail, list):  # validation errors
        parts = []
        for item in detail:
            loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
            parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
        detail = "; ".join(parts)
    return f"{r.status_code} {r.reason_phrase}: {detail}"
