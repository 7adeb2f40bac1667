"""HTTP routes of the model registry: blobs by content address, model metadata as JSON.

``GET``/``HEAD /v1/blobs/{sha256}`` serve a stored blob with ``Content-Length``, a strong
``ETag`` (the digest, quoted as HTTP requires), ``Accept-Ranges: bytes`` and an immutable
cache policy (the content of a digest never changes). A single ``Range`` gives 206 with
``Content-Range``; an unsatisfiable one 416 with ``Content-Range: bytes */size``; an
``If-Range`` that does not match the ETag gives the whole blob. Range handling is
Starlette's ``FileResponse``. A malformed digest is a 422, an unknown one a 404. An operator
token with ``fleet:read`` reads any blob; an enrolled device only those its own tasks name
(:mod:`.grants`): any other answers 404 as an unknown blob would, counted as
``lepton_auth_refusals_total{reason="blob_not_granted"}``.

``POST /v1/models/{name}/deploy`` (mounted when a :class:`~.deploy.Deployer` is given)
submits one ``deploy`` task per chosen device (:mod:`.deploy`) and answers 201 with the model
version and the tasks; 404 for an unknown model version or device id, 422 for an invalid
body, a version devices cannot serve or a selection that matches no device.

Mount with ``app.include_router(make_router(registry, deployer))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from lepton.coordinator.api.schemas import Ident, Name, TaskOut
from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.records import Principal
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.model_registry.blobstore import DIGEST_PATTERN
from lepton.coordinator.model_registry.deploy import (
    MAX_DEVICE_IDS,
    Deployer,
    DeployError,
    DeviceSelector,
)
from lepton.coordinator.model_registry.grants import BlobGrants
from lepton.coordinator.model_registry.registry import NAME_PATTERN, ModelRegistry, Precision
from lepton.coordinator.tasks.submit import SubmissionError
from lepton.protocol import routes

Digest = Annotated[str, Path(pattern=DIGEST_PATTERN, description="sha256, lowercase hex")]
ModelName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=128)]
CACHE_CONTROL = "public, max-age=31536000, immutable"


class DeployIn(BaseModel):
    """Which version goes to which devices; every given device criterion must hold."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="default: the latest servable version"
    )
    precision: Precision | None = Field(default=None, description="latest of this precision")
    device_class: Name | None = Field(default=None, description="only devices of this class")
    tag: Name | None = Field(default=None, description="only devices with this tag")
    device_ids: list[Ident] = Field(
        default_factory=list,
        max_length=MAX_DEVICE_IDS,
        description="only these devices (whatever their state); default: the online ones",
    )
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    expires_in_s: float | None = Field(default=None, gt=0, le=30 * 86400)


class DeployOut(BaseModel):
    model: dict[str, Any]
    tasks: list[TaskOut]


def make_router(
    registry: ModelRegistry,
    deployer: Deployer | None = None,
    *,
    grants: BlobGrants | None = None,
    on_refused: Callable[[str], None] = lambda _reason: None,
) -> APIRouter:
    """Routes serving ``registry``'s blobs and metadata, and deploying its models when
    ``deployer`` is given (handlers run in the thread pool). ``grants``: which blobs a device
    may fetch (None: none); ``on_refused(reason)`` counts a device refused a blob."""
    router = APIRouter(tags=["models"])

    # Two routes, not one with methods=["GET", "HEAD"]: that would give both operations the
    # same OpenAPI operation id.
    @router.head(
        routes.BLOB,
        response_class=FileResponse,
        operation_id="head_blob",
        dependencies=[require(Scope.FLEET_READ, devices=True)],
    )
    @router.get(
        routes.BLOB,
        response_class=FileResponse,
        operation_id="get_blob",
        dependencies=[require(Scope.FLEET_READ, devices=True)],
    )
    def get_blob(digest: Digest, request: Request) -> FileResponse:
        principal = request.state.principal
        assert isinstance(principal, Principal)
        if principal.device_id is not None and not (
            grants is not None and grants.granted(principal.device_id, digest)
        ):
            on_refused("blob_not_granted")
            raise HTTPException(status_code=404, detail=f"blob {digest} not found")
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

    @router.get(routes.MODELS, dependencies=[require(Scope.FLEET_READ)])
    def list_models(
        name: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=128)] = None,
    ) -> dict[str, Any]:
        return {"models": [r.to_dict() for r in registry.list(name)]}

    @router.get(routes.MODEL, dependencies=[require(Scope.FLEET_READ)])
    def get_model(name: ModelName) -> dict[str, Any]:
        versions = registry.list(name)
        if not versions:
            raise HTTPException(status_code=404, detail=f"model {name} not found")
        return {
            "name": name,
            "latest": versions[-1].to_dict(),
            "versions": [r.to_dict() for r in versions],
        }

    @router.get(routes.MODEL_VERSION, dependencies=[require(Scope.FLEET_READ)])
    def get_model_version(
        name: ModelName,
        version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    ) -> dict[str, Any]:
        try:
            return registry.get(name, version).to_dict()
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    if deployer is not None:

        @router.post(
            routes.MODEL_DEPLOY, status_code=201, dependencies=[require(Scope.MODELS_WRITE)]
        )
        def deploy_model(name: ModelName, body: DeployIn) -> DeployOut:
            """Deploy a version of ``name`` to the chosen devices: one pinned ``deploy`` task
            each, placed and retried like any task."""
            selector = DeviceSelector(
                device_class=body.device_class, tag=body.tag, device_ids=tuple(body.device_ids)
            )
            try:
                done = deployer.deploy(
                    name,
                    body.version,
                    selector,
                    precision=body.precision,
                    max_attempts=body.max_attempts,
                    expires_in_s=body.expires_in_s,
                )
            except (DeployError, SubmissionError) as exc:
                raise HTTPException(
                    status_code=422,
                    detail=[{"loc": ["body"], "msg": str(exc), "type": "value_error"}],
                ) from exc
            return DeployOut(model=done.model.to_dict(), tasks=[TaskOut.of(t) for t in done.tasks])

    return router
