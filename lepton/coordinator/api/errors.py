"""Error answers that hold for every route, whatever a client sends.

404 for an unknown id, 409 for a conflict, 503 while the database is unreachable.

FastAPI's own validation handler echoes each offending input back, and fails on inputs JSON
cannot hold (a NaN, bytes that are not UTF-8), turning a client error into a 500. Here an
error names where and what (``loc``, ``msg``, ``type``) and never echoes input. A structure
deep enough to exhaust the recursion limit anywhere is the client's error too (400).
Anything else unexpected is a 500 whose body says only that; the server logs the traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from lepton.coordinator.errors import ConflictError, NotFoundError

log = logging.getLogger(__name__)


def _error(e: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
        "msg": str(e.get("msg", "")),
        "type": str(e.get("type", "value_error")),
    }
    ctx = e.get("ctx")
    if isinstance(ctx, dict):
        out["ctx"] = {str(k): str(v)[:200] for k, v in ctx.items()}
    return out


def install(app: FastAPI, on_refuse: Callable[[str], None]) -> None:
    """Register the handlers on ``app``; ``on_refuse`` gets the reason of each client error."""

    @app.exception_handler(NotFoundError)
    def _not_found(_req: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ConflictError)
    def _conflict(_req: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(OperationalError)
    def _db_down(_req: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error serving a request: %s", exc)
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_refuse("invalid")
        errors = [_error(e) for e in exc.errors()]
        log.info("invalid request %s %s: %s", request.method, request.url.path, errors[:3])
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, _exc: RecursionError) -> JSONResponse:
        on_refuse("too_deep")
        log.warning("request %s %s nested too deeply", request.method, request.url.path)
        return JSONResponse(
            {"detail": "the request is nested too deeply", "reason": "too_deep"}, status_code=400
        )

    @app.exception_handler(Exception)
    async def _internal(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette raises the exception on after this answer; the server logs it once.
        return JSONResponse({"detail": "internal error", "reason": "internal"}, status_code=500)
