"""HTTP API of federated jobs: start, list, inspect, stop.

- ``POST /v1/fl/jobs`` (body: the job, as in a job file, as JSON within the app's body
  limits: ``http.max_body_bytes``, the codec's depth, finite numbers): 201 with the job; 422
  naming the bad key, including code or files the operator's ``[fl]`` policy does not allow
  (:mod:`.admission`) and specs nested too deep or too large; 400 for a body that is not a
  JSON object.
- ``GET /v1/fl/jobs``: every job, newest last, with its latest figures.
- ``GET /v1/fl/jobs/{id}``: one job with its spec and per-round figures (selected,
  accepted, rejected, accuracy, loss, wall time, bytes up) and the final model.
- ``POST /v1/fl/jobs/{id}/stop``: stop after cancelling the open round; the weights of the
  last closed round are registered as the final model.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, HTTPException, Path

from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.spec import FLJob, JobError
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.records import JobRecord, RoundRecord
from lepton.coordinator.fl.store import FLStore
from lepton.protocol import routes

log = logging.getLogger(__name__)

_KNOWN_KEYS: Final = frozenset(FLJob.__dataclass_fields__) | {"job", "body"}

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


@dataclass(frozen=True, slots=True)
class JobsContext:
    store: FLStore
    policy: JobPolicy
    metrics: FLMetrics
    on_change: Callable[[], None] = lambda: None  # any thread


def _refuse(ctx: JobsContext, status: int, key: str, msg: str) -> HTTPException:
    """A refused submission: logged, counted by key (a known key, so the label set stays
    bounded), answered with the reason."""
    top = key.split(".", 1)[0]
    ctx.metrics.job_refusals.labels(top if top in _KNOWN_KEYS else "unknown_key").inc()
    log.info("fl job refused: %s", msg)
    return HTTPException(
        status_code=status,
        detail=[{"loc": ["body", *key.split(".")], "msg": msg, "type": "value_error"}],
    )


def new_job_id(name: str) -> str:
    """``<name>-<8 hex>``: readable, unique, and a valid job name on the wire."""
    return f"{name}-{secrets.token_hex(4)}"


def round_view(r: RoundRecord, live: dict[str, int] | None = None) -> dict[str, Any]:
    """One round's figures (``live``: counts of an open round's updates so far)."""
    m = r.metrics or {}
    accepted = m.get("accepted") if live is None else live.get("accepted", 0)
    return {
        "round": r.round,
        "state": r.state,
        "attempt": r.attempt,
        "selected": len(r.selected),
        "devices": list(r.selected),
        "uploaded": None if live is None else live.get("uploaded", 0),
        "accepted": accepted,
        "late": m.get("late"),  # late updates of earlier rounds folded in ([late] fold)
        "contributors": r.contributors,
        "rejected": m.get("rejected", sum(r.rejects.values())),
        "rejects": dict(r.rejects),
        "rejected_updates": m.get("rejected_updates", {}),
        "accuracy": m.get("accuracy"),
        "loss": m.get("loss"),
        "wall_s": m.get("wall_s"),
        "bytes_up": m.get("bytes_up"),
        "bytes_down": m.get("bytes_down"),
        "expected_round_s": m.get("expected_round_s", (r.selection or {}).get("expected_round_s")),
        "started_at": r.started_at,
        "deadline": r.deadline,
        "closed_at": r.closed_at,
        "metrics": m,
    }


def job_view(job: JobRecord, rounds: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec = job.spec
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "round": job.round,
        "rounds": spec.get("rounds"),
        "strategy": (spec.get("strategy") or {}).get("name"),
        "selection": spec.get("selection"),
        "clients_per_round": spec.get("clients_per_round"),
        "global_digest": job.global_digest,
        "final_model": job.final_model,
        "error": job.error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
    }
    if rounds is not None:
        out["spec"] = spec
        out["history"] = rounds
        closed = [r for r in rounds if r["state"] == "closed"]
        out["accuracy"] = closed[-1]["accuracy"] if closed else None
    return out


def make_jobs_router(ctx: JobsContext) -> APIRouter:
    router = APIRouter(tags=["federated"])
    store = ctx.store

    def detail(job: JobRecord) -> dict[str, Any]:
        views = []
        for r in store.list_rounds(job.id):
            live = None
            if r.state == "open":
                ups = store.updates_for(job.id, r.round)
                live = {"uploaded": len(ups), "accepted": sum(u.complete for u in ups)}
            views.append(round_view(r, live))
        return job_view(job, views)

    @router.post(routes.FL_JOBS, status_code=201, dependencies=[require(Scope.FL_WRITE)])
    async def start_job(body: Annotated[Any, Body()]) -> dict[str, Any]:
        """Start a federated job (the body holds what a job file holds). The app's body guard
        has bounded its size, depth and numbers before it gets here."""
        if not isinstance(body, dict):
            raise _refuse(ctx, 400, "body", "the job must be a JSON object")
        try:
            job = FLJob.from_mapping(body)
            ctx.policy.admit(job)
        except JobError as exc:
            raise _refuse(ctx, 422, exc.key, str(exc)) from None
        record = await asyncio.to_thread(
            store.create_job, new_job_id(job.name), job.name, job.to_dict(), time.time()
        )
        ctx.on_change()
        return await asyncio.to_thread(detail, record)

    @router.get(routes.FL_JOBS, dependencies=[require(Scope.FLEET_READ)])
    def list_jobs() -> list[dict[str, Any]]:
        out = []
        for job in store.list_jobs():
            closed = [r for r in store.list_rounds(job.id) if r.state == "closed"]
            view = job_view(job)
            view["accuracy"] = (closed[-1].metrics or {}).get("accuracy") if closed else None
            out.append(view)
        return out

    @router.get(routes.FL_JOB, dependencies=[require(Scope.FLEET_READ)])
    def get_job(job_id: JobId) -> dict[str, Any]:
        return detail(store.get_job(job_id))

    @router.post(routes.FL_JOB_STOP, dependencies=[require(Scope.FL_WRITE)])
    def stop_job(job_id: JobId) -> dict[str, Any]:
        record = store.request_stop(job_id)
        ctx.on_change()
        return detail(record)

    return router
