"""A small client of the coordinator's HTTP API for the CLI (and scripts)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

import httpx

from lepton.common.errors import LeptonError
from lepton.coordinator.cli.exitcodes import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_UNREACHABLE

DEFAULT_API: Final = "http://127.0.0.1:8080"


class CliError(LeptonError):
    """An error to print (one line) and exit with ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        self.code = code
        super().__init__(message)


def api_url(explicit: str | None) -> str:
    return (explicit or os.environ.get("LEPTON_API") or DEFAULT_API).rstrip("/")


class ApiClient:
    """JSON over HTTP; every failure becomes a :class:`CliError` with an exit code."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

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
        if r.status_code >= 400:
            default = EXIT_NOT_FOUND if r.status_code == 404 else EXIT_ERROR
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
