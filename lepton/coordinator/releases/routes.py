"""HTTP routes of the release registry.

``POST /v1/releases`` (scope ``rollouts:write``): the body is a bundle tar, streamed to a
file under the data directory within ``[releases] max_bundle_bytes`` (413 ``oversized``
above it, from ``Content-Length`` before a byte is read, else as the body arrives), then
verified against the trust root and stored (:meth:`.store.ReleaseStore.publish`). Answers
201 with the release records, or 200 when every manifest in it was published before; 422
with the refusal's reason (``bad_signature``, ``tampered``, ``malformed``, ...) for a bundle
that does not verify; 409 ``conflict`` for another manifest of a published version; 409
``no_trust_root`` when ``[releases] root_file`` is not set.

``GET /v1/releases`` (``?name=``) and ``GET /v1/releases/{name}/{version}`` (scope
``fleet:read``): the records, and for one version each manifest's files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from lepton.common.errors import LeptonError
from lepton.common.releases import ReleaseRefused
from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.records import Principal
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.releases.store import ReleaseConflictError, ReleaseStore
from lepton.protocol import routes
from lepton.protocol.releases import RELEASE_NAME_PATTERN, VERSION_PATTERN

log = logging.getLogger(__name__)


def _anchored(pattern: str) -> str:
    r"""A protocol pattern (``\A...\Z``) in the syntax pydantic's regex engine takes."""
    return "^" + pattern.removeprefix(r"\A").removesuffix(r"\Z") + "$"


NAME = _anchored(RELEASE_NAME_PATTERN)
Name = Annotated[str, PathParam(pattern=NAME)]
Version = Annotated[str, PathParam(pattern=_anchored(VERSION_PATTERN))]


class PublishRefusedError(LeptonError):
    """A publish refused before the store saw it (size, no trust root)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status, self.reason, self.detail = status, reason, detail
        super().__init__(detail)


def _refusal(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "reason": reason}, status_code=status)


async def _receive(request: Request, dest: Path, cap: int) -> int:
    """Stream the body into ``dest``, at most ``cap`` bytes; its size."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PublishRefusedError(413, "oversized", f"{declared} bytes > limit {cap}")
    size = 0
    fh = await asyncio.to_thread(dest.open, "wb")
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise PublishRefusedError(413, "oversized", f"more than {cap} bytes")
            await asyncio.to_thread(fh.write, chunk)
    finally:
        await asyncio.to_thread(fh.close)
    if size == 0:
        raise PublishRefusedError(422, "malformed", "the body is empty: send a bundle tar")
    return size


def _scratch_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=directory)
    os.close(fd)
    return Path(name)


def make_router(
    store: ReleaseStore,
    *,
    max_bytes: int,
    enabled: Callable[[], bool],
    on_outcome: Callable[[str], None] = lambda _outcome: None,
) -> APIRouter:
    """Routes over ``store``; ``enabled()``: whether a trust root is configured;
    ``on_outcome(label)`` counts each publish (``published``, ``unchanged`` or why not)."""
    router = APIRouter(tags=["releases"])

    @router.post(routes.RELEASES, status_code=201, dependencies=[require(Scope.ROLLOUTS_WRITE)])
    async def publish(request: Request) -> JSONResponse:
        """Publish a signed bundle (the body: the tar ``lepton release build`` writes)."""
        principal = request.state.principal
        assert isinstance(principal, Principal)
        if not enabled():
            on_outcome("no_trust_root")
            return _refusal(409, "no_trust_root", "publishing is off: set [releases] root_file")
        upload = await asyncio.to_thread(_scratch_file, store.work_dir)
        started = time.time()
        try:
            await _receive(request, upload, max_bytes)
            records = await asyncio.to_thread(store.publish, upload, published_by=principal.actor)
        except PublishRefusedError as exc:
            on_outcome(exc.reason)
            log.info("release bundle refused: %s: %s", exc.reason, exc.detail)
            return _refusal(exc.status, exc.reason, exc.detail)
        except ReleaseRefused as exc:
            on_outcome(exc.reason)
            log.info("release bundle refused: %s", exc)
            return _refusal(422, exc.reason, str(exc))
        except ReleaseConflictError as exc:
            on_outcome("conflict")
            return _refusal(409, "conflict", str(exc))
        finally:
            await asyncio.to_thread(upload.unlink, missing_ok=True)
        new = any(r.published_at >= started for r in records)
        on_outcome("published" if new else "unchanged")
        return JSONResponse(
            {"releases": [r.to_dict() for r in records]}, status_code=201 if new else 200
        )

    @router.get(routes.RELEASES, dependencies=[require(Scope.FLEET_READ)])
    def list_releases(
        name: Annotated[str | None, Query(pattern=NAME)] = None,
    ) -> dict[str, Any]:
        return {"releases": [r.to_dict() for r in store.list(name)]}

    @router.get(routes.RELEASE, dependencies=[require(Scope.FLEET_READ)])
    def get_release(name: Name, version: Version) -> dict[str, Any]:
        found = store.get(name, version)
        if not found:
            raise HTTPException(status_code=404, detail=f"release {name} {version} not found")
        return {
            "name": name,
            "version": version,
            "manifests": [
                r.to_dict() | {"files": [f.to_dict() for f in store.files(r.id)]} for r in found
            ],
        }

    return router
