"""HTTP routes of the model registry: blobs by content address, model metadata as JSON.

``GET``/``HEAD /v1/blobs/{sha256}`` serve a stored blob with ``Content-Length``, a strong
``ETag`` (the digest, quoted as HTTP requires), ``Accept-Ranges: bytes`` and an immutable
cache policy (the content of a digest never changes). A single ``Range`` gives 206 with
``Content-Range``; an unsatisfiable one 416 with ``Content-Range: bytes */size``; an
``If-Range`` that does not match the ETag gives the whole blob. Range handling is
Starlette's ``FileResponse``. A malformed digest is a 422, an unknown one a 404.

Mount with ``app.include_router(make_router(registry))``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.model_registry.blobstore import DIGEST_PATTERN
from lepton.coordinator.model_registry.registry import NAME_PATTERN, ModelRegistry
from lepton.protocol import routes

Digest = Annotated[str, Path(pattern=DIGEST_PATTERN, description="sha256, lowercase hex")]
ModelName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=128)]
CACHE_CONTROL = "public, max-age=31536000, immutable"


def make_router(registry: ModelRegistry) -> APIRouter:
    """Routes serving ``registry``'s blobs and metadata (handlers run in the thread pool)."""
    router = APIRouter(tags=["models"])

    # Two routes, not one with methods=["GET", "HEAD"]: that would give both operations the
    # same OpenAPI operation id.
    @router.head(routes.BLOB, response_class=FileResponse, operation_id="head_blob")
    @router.get(routes.BLOB, response_class=FileResponse, operation_id="get_blob")
    def get_blob(digest: Digest) -> FileResponse:
        try:
            path = registry.blob_path(digest)
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=f"blob {digest} not found") from exc
        return FileResponse(
            path,
            stat_result=path.stat(),
            media_type="application/octet-stream",
            headers={"ETag": f'"{digest}"', "Cache-Control": CACHE_CONTROL},
        )

    @router.get(routes.MODELS)
    def list_models(
        name: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=128)] = None,
    ) -> dict[str, Any]:
        return {"models": [r.to_dict() for r in registry.list(name)]}

    @router.get(routes.MODEL)
    def get_model(name: ModelName) -> dict[str, Any]:
        versions = registry.list(name)
        if not versions:
            raise HTTPException(status_code=404, detail=f"model {name} not found")
        return {
            "name": name,
            "latest": versions[-1].to_dict(),
            "versions": [r.to_dict() for r in versions],
        }

    @router.get(routes.MODEL_VERSION)
    def get_model_version(
        name: ModelName,
        version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    ) -> dict[str, Any]:
        try:
            return registry.get(name, version).to_dict()
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    return router
