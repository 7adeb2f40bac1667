"""HTTP routes of enrolment: claims (``POST``/``GET /v1/claims``, ``DELETE
/v1/claims/{name}``, scope ``devices:write``), ``POST /v1/enroll`` (public to the guard: the
claim is its credential, checked by :class:`~.enrolment.EnrolmentService`) and ``POST
/v1/devices/{id}/revoke`` (scope ``devices:write``).

Claim tokens are in the ``POST /v1/claims`` answer only: the database keeps their hashes.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.enrolment import MAX_BODY_BYTES, EnrolmentService, EnrolRefusedError
from lepton.coordinator.auth.enrolment_store import EnrolmentStore
from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.records import Principal
from lepton.coordinator.auth.revocation import Revoker
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.errors import NotFoundError
from lepton.protocol import routes
from lepton.protocol.enrolment import ENROLLED_STATUS

ClassName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
DeviceIdPath = Annotated[
    str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
]
ClaimName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
MAX_EXPIRY_S = 30 * 86400.0


class ClaimsIn(BaseModel):
    """How many claims, each good for ``uses`` enrolments until ``expires_in_s`` from now,
    optionally binding the devices to a class and a group."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    count: int = Field(default=1, ge=1, le=1000)
    uses: int = Field(default=1, ge=1, le=100_000)
    expires_in_s: float = Field(default=86400.0, gt=0, le=MAX_EXPIRY_S)
    device_class: ClassName | None = None
    device_group: ClassName | None = None


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=256)


def make_router(
    store: EnrolmentStore,
    service: EnrolmentService,
    revoker: Revoker,
    *,
    ca_sha256: str | None = None,
) -> APIRouter:
    """The enrolment routes (``ca_sha256``: the fleet CA's fingerprint, shown with claims so
    the operator's command pins it)."""
    router = APIRouter(tags=["enrolment"])
    write = require(Scope.DEVICES_WRITE)

    @router.post(routes.CLAIMS, status_code=201, dependencies=[write])
    def create_claims(body: ClaimsIn, request: Request) -> dict[str, Any]:
        """New claims; their tokens are shown in this answer only."""
        principal = _caller(request)
        expires_at = time.time() + body.expires_in_s
        tokens = [credentials.new("claim") for _ in range(body.count)]
        rows = [
            {
                "name": f"claim-{secrets.token_hex(6)}",
                "token_hash": credentials.digest(tok),
                "created_by": principal.actor,
                "expires_at": expires_at,
                "max_uses": body.uses,
                "device_class": body.device_class,
                "device_group": body.device_group,
            }
            for tok in tokens
        ]
        made = store.create_claims(rows)
        now = time.time()
        return {
            "claims": [
                {**c.to_dict(now), "token": tok} for c, tok in zip(made, tokens, strict=True)
            ],
            "coordinator_url": service.endpoints.coordinator_url(),
            "ca_sha256": ca_sha256,
        }

    @router.get(routes.CLAIMS, dependencies=[write])
    def list_claims() -> list[dict[str, Any]]:
        """Every claim, without its secret."""
        now = time.time()
        return [c.to_dict(now) for c in store.list_claims()]

    @router.delete(routes.CLAIM, dependencies=[write])
    def revoke_claim(name: ClaimName) -> dict[str, Any]:
        """Revoke a claim: it enrols no more devices (those it enrolled stay)."""
        try:
            return store.revoke_claim(name).to_dict(time.time())
        except NotFoundError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc

    @router.post(routes.ENROLL, status_code=ENROLLED_STATUS)
    async def enroll(request: Request) -> JSONResponse:
        """A device exchanges a claim (``Authorization: Bearer lpc_...``) for its identity
        (:mod:`lepton.protocol.enrolment`)."""
        remote = request.client.host if request.client else ""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
        try:
            try:
                body = await _read_capped(request)
            except EnrolRefusedError as exc:
                await service.refused(exc, remote)
                raise
            out = await service.enroll(token or None, body, remote)
        except EnrolRefusedError as exc:
            headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
            return JSONResponse(
                {"detail": exc.detail, "reason": exc.reason},
                status_code=exc.status,
                headers=headers,
            )
        return JSONResponse(msgspec.to_builtins(out), status_code=ENROLLED_STATUS)

    @router.post(routes.DEVICE_REVOKE, dependencies=[write])
    async def revoke_device(
        device_id: DeviceIdPath, request: Request, body: RevokeIn | None = None
    ) -> dict[str, Any]:
        """Revoke an enrolled device: its token, broker account and tasks (see
        :mod:`lepton.coordinator.auth.revocation`)."""
        principal = _caller(request)
        remote = request.client.host if request.client else ""
        try:
            return await revoker.revoke(
                device_id,
                actor=principal.actor,
                reason=body.reason if body else "",
                remote=remote,
            )
        except NotFoundError as exc:
            raise HTTPException(
                status_code=404, detail=f"device {device_id!r} was never enrolled"
            ) from exc

    return router


def _caller(request: Request) -> Principal:
    principal = request.state.principal
    assert isinstance(principal, Principal)  # the guard put it there
    return principal


async def _read_capped(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes the enrolment cap."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise EnrolRefusedError("oversized", f"the body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise EnrolRefusedError("oversized", f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
