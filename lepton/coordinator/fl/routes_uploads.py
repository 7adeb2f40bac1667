"""``PUT /v1/fl/uploads/{job}/{round}/{device}``: where devices send model updates.

Each selected device gets its own upload URL in its train task, and in the task's message
(never in its stored params) the credential of that slot, sent back in the
``X-Lepton-Upload-Token`` header (:data:`lepton.protocol.routes.UPLOAD_TOKEN_HEADER`,
:mod:`.credentials`): only that device can fill the slot, and a credential opens no other
slot. ``Authorization: Bearer`` carries the enrolled device's own token (the guard refuses a
request without one: 401). Checks, cheapest first, each refusal counted by reason
(``lepton_fl_upload_rejects_total`` and the round's ``rejects``):

==================== ====== ===========================================================
reason               status when
==================== ====== ===========================================================
device_only          403    the caller is an operator, not an enrolled device
wrong_device         403    the caller's device token is another device's than the URL's
bad_digest_header    400    ``X-Lepton-Digest: sha256:<hex>`` missing or malformed
unknown_job          404    no such job
job_not_running      409    the job is not running (stopped, done, failed)
wrong_round          409    the round does not exist (a future round, say)
late                 409    the round has closed (and the job does not fold late updates,
                            or this one is more than ``late.max_rounds`` rounds late)
not_selected         403    the device was not selected for this round
bad_token            403    no credential, or not the credential of this slot
oversized            413    over the job's cap (from Content-Length, before reading)
digest_mismatch      400    the body does not hash to the declared digest
malformed            400    not a valid weights blob (``lepton.protocol.weights``)
not_update           400    a blob of full weights, not an update
wrong_base           400    an update of other global weights than the round's
wrong_job            400    the blob names another job or round
shape_mismatch       400    tensor names or shapes differ from the model's
conflict             409    this slot already holds a different update
==================== ====== ===========================================================

With ``[late] policy = "fold"``, an update for a closed round at most ``late.max_rounds``
rounds back passes the same checks (its round's slot credential and base weights) and is recorded
under its own round; the next round to close aggregates it (:mod:`.closing`).

An accepted update is stored in the blob store and recorded in ``fl_updates`` in one
transaction before the 200 answer; sending the same update again answers 200 and changes
nothing, so a device that retried after a lost answer is counted once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from lepton.common.errors import LeptonError
from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.records import Principal
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.fl.credentials import UploadSigner
from lepton.coordinator.fl.jobs.spec import LateSpec
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.protocol import routes
from lepton.protocol.errors import DecodeError
from lepton.protocol.weights import decode_weights

log = logging.getLogger(__name__)

DIGEST_HEADER: Final = "X-Lepton-Digest"
_DIGEST_RE: Final = re.compile(r"\Asha256:([0-9a-fA-F]{64})\Z")
MAX_TOKEN_CHARS: Final = 128
#: The cap when a job has none recorded yet.
DEFAULT_MAX_BYTES: Final = 64 << 20

Ident = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:/-]+$")]


class UploadRefusedError(LeptonError):
    """An upload refused: HTTP ``status`` and a reason token."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class UploadContext:
    store: FLStore
    registry: ModelRegistry
    metrics: FLMetrics
    signer: UploadSigner
    on_update: Callable[[], None] = lambda: None  # any thread


def make_upload_router(ctx: UploadContext) -> APIRouter:
    router = APIRouter(tags=["federated"])

    @router.put(routes.FL_UPLOAD, dependencies=[require(Scope.FL_WRITE, devices=True)])
    async def put_update(
        job_id: Ident,
        round_no: Annotated[int, Path(ge=0, le=2**31 - 1)],
        device_id: Ident,
        request: Request,
    ) -> JSONResponse:
        # A missing slot credential is refused by the checks below (403 bad_token, counted).
        token = request.headers.get(routes.UPLOAD_TOKEN_HEADER, "").strip()
        round_known = False
        try:
            _check_caller(request.state.principal, device_id)
            digest = _declared_digest(request)
            cap, late_ok = await _check_slot(ctx, job_id, round_no, device_id, token)
            round_known = True
            body = await _read_capped(request, cap)
            outcome = await _accept(
                ctx, job_id, round_no, device_id, digest, body, cap, late_ok=late_ok
            )
        except UploadRefusedError as exc:
            ctx.metrics.rejects.labels(exc.reason).inc()
            if round_known or exc.reason in ("late", "not_selected", "bad_token"):
                await asyncio.to_thread(ctx.store.note_reject, job_id, round_no, exc.reason)
            log.info("update from %s for %s round %d refused: %s", device_id, job_id, round_no, exc)
            return JSONResponse(
                {"detail": exc.detail, "reason": exc.reason}, status_code=exc.status
            )
        ctx.on_update()
        return JSONResponse(
            {"accepted": True, "duplicate": outcome == "duplicate", "digest": digest}
        )

    return router


def _check_caller(principal: object, device_id: str) -> None:
    """Only the device the slot is for uploads to it (an operator token uploads nothing;
    ``--insecure`` has no device identities to compare)."""
    assert isinstance(principal, Principal)
    if principal.kind == "operator":
        raise UploadRefusedError(403, "device_only", "updates are uploaded by devices only")
    if principal.kind == "device" and principal.device_id != device_id:
        raise UploadRefusedError(
            403, "wrong_device", f"this device's token cannot upload for {device_id}"
        )


def _declared_digest(request: Request) -> str:
    header = request.headers.get(DIGEST_HEADER, "")
    m = _DIGEST_RE.match(header.strip())
    if m is None:
        raise UploadRefusedError(
            400, "bad_digest_header", f"{DIGEST_HEADER} must be sha256:<64 hex>"
        )
    return m.group(1).lower()


async def _check_slot(
    ctx: UploadContext, job_id: str, round_no: int, device_id: str, token: str
) -> tuple[int, bool]:
    """The job's size cap, once the job, round, device and token check out."""
    try:
        job = await asyncio.to_thread(ctx.store.get_job, job_id)
    except NotFoundError:
        raise UploadRefusedError(404, "unknown_job", f"no federated job {job_id!r}") from None
    if job.state not in ("running", "stopping"):
        raise UploadRefusedError(409, "job_not_running", f"job {job_id} is {job.state}")
    rnd = await asyncio.to_thread(ctx.store.get_round, job_id, round_no)
    if rnd is None:
        raise UploadRefusedError(
            409, "wrong_round", f"job {job_id} has no round {round_no} (at {job.round})"
        )
    late_ok = False
    if rnd.state != "open":
        late = LateSpec(**((job.spec or {}).get("late") or {}))
        if not (
            rnd.state == "closed" and job.state == "running" and late.takes(job.round - round_no)
        ):
            raise UploadRefusedError(409, "late", f"round {round_no} is {rnd.state}")
        late_ok = True
    if device_id not in rnd.tokens:
        raise UploadRefusedError(
            403, "not_selected", f"{device_id} was not selected for round {round_no}"
        )
    if len(token) > MAX_TOKEN_CHARS or not ctx.signer.verify(job_id, round_no, device_id, token):
        raise UploadRefusedError(403, "bad_token", "no upload credential for this slot")
    return int(job.max_update_bytes or DEFAULT_MAX_BYTES), late_ok


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise UploadRefusedError(400, "malformed", "Content-Length is not a number") from None
        if length > cap:
            raise UploadRefusedError(413, "oversized", f"{length} bytes > limit {cap}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise UploadRefusedError(413, "oversized", f"more than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _accept(  # noqa: PLR0917 - the slot's coordinates, in URL order
    ctx: UploadContext,
    job_id: str,
    round_no: int,
    device_id: str,
    digest: str,
    body: bytes,
    cap: int,
    *,
    late_ok: bool = False,
) -> str:
    actual = await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
    if actual != digest:
        raise UploadRefusedError(
            400, "digest_mismatch", f"body hashes to {actual[:12]}..., not {digest[:12]}..."
        )
    job = await asyncio.to_thread(ctx.store.get_job, job_id)
    rnd = await asyncio.to_thread(ctx.store.get_round, job_id, round_no)
    assert rnd is not None
    try:
        meta, arrays = await asyncio.to_thread(decode_weights, body, max_bytes=cap)
    except DecodeError as exc:
        raise UploadRefusedError(400, "malformed", f"{exc.reason}: {exc.detail}") from None
    if meta.kind != "update":
        raise UploadRefusedError(400, "not_update", f"the blob holds {meta.kind}, not an update")
    if meta.base != rnd.base_digest:
        raise UploadRefusedError(
            400, "wrong_base", "the update is not relative to this round's weights"
        )
    if meta.round != round_no or (meta.job is not None and meta.job != job_id):
        raise UploadRefusedError(400, "wrong_job", f"the blob is for {meta.job} round {meta.round}")
    problem = _shape_problem(job.tensors or {}, arrays)
    if problem is not None:
        raise UploadRefusedError(400, "shape_mismatch", problem)
    await asyncio.to_thread(ctx.registry.put_bytes, body, expected=digest)
    outcome = await asyncio.to_thread(
        ctx.store.record_update,
        job_id,
        round_no,
        device_id,
        digest=digest,
        size=len(body),
        compression=meta.compression,
        now=time.time(),
        late_ok=late_ok,
    )
    if outcome == "accepted":
        ctx.metrics.uploads.inc()
        ctx.metrics.upload_bytes.inc(len(body))
        return outcome
    if outcome == "duplicate":
        ctx.metrics.duplicates.inc()
        return outcome
    status, reason = {
        "conflict": (409, "conflict"),
        "closed": (409, "late"),
        "not_selected": (403, "not_selected"),
        "unknown": (409, "wrong_round"),
    }[outcome]
    raise UploadRefusedError(status, reason, f"not recorded: {outcome}")


def _shape_problem(expected: dict[str, Any], arrays: dict[str, Any]) -> str | None:
    if not expected:
        return None
    if set(arrays) != set(expected):
        missing = sorted(set(expected) - set(arrays))[:3]
        extra = sorted(set(arrays) - set(expected))[:3]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    for name, shape in expected.items():
        if list(arrays[name].shape) != list(shape):
            return f"{name} is {list(arrays[name].shape)}, expected {list(shape)}"
    return None
