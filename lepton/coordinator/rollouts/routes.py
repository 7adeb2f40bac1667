"""HTTP routes of staged rollouts.

- ``POST /v1/rollouts`` (``rollouts:write``): body a :class:`~.plan.Plan`; 201 with the
  rollout. 422 for a plan that cannot run (its reason in ``detail``), 404 for an unknown
  model version or device id.
- ``GET /v1/rollouts`` (``fleet:read``): newest first, ``state``, ``limit``, ``offset``.
- ``GET /v1/rollouts/{id}`` (``fleet:read``): the rollout, devices per state and a page of
  device rows with their reasons (``devices``, ``state``, ``limit``, ``offset``).
- ``POST /v1/rollouts/{id}/{pause|resume|abort|approve}`` (``rollouts:write``): 200 with
  the rollout; 409 when its state does not allow the move. ``abort`` takes an optional body
  ``{"revert": bool}``: take back the devices already updated.

Bodies pass the API's body guard first (size, depth, finite numbers); the plan is then
decoded strictly (unknown fields refused, every bound checked).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict

from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.records import Principal
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.model_registry.deploy import DeployError
from lepton.coordinator.rollouts.control import RolloutControl
from lepton.coordinator.rollouts.engine import DEVICE_STATES, ROLLOUT_STATES
from lepton.coordinator.rollouts.metrics import RolloutMetrics
from lepton.coordinator.rollouts.plan import PlanError, plan_of
from lepton.coordinator.rollouts.targets import TargetError
from lepton.coordinator.tasks.submit import SubmissionError
from lepton.protocol import routes

RolloutId = Annotated[str, Path(pattern=r"^ro-[0-9a-f]{1,32}$", max_length=40)]
Action = Literal["pause", "resume", "abort", "approve"]
DeviceStateQ = Annotated[
    str | None, Query(pattern="^(" + "|".join(DEVICE_STATES) + ")$", max_length=16)
]
RolloutStateQ = Annotated[
    str | None, Query(pattern="^(" + "|".join(ROLLOUT_STATES) + ")$", max_length=20)
]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]


class AbortIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revert: bool = False


def _actor(request: Request) -> str:
    principal = getattr(request.state, "principal", None)
    return principal.actor if isinstance(principal, Principal) else "anonymous"


def _unprocessable(exc: Exception) -> HTTPException:
    return HTTPException(
        status_code=422, detail=[{"loc": ["body"], "msg": str(exc), "type": "value_error"}]
    )


def make_router(control: RolloutControl, metrics: RolloutMetrics | None = None) -> APIRouter:
    """The rollout routes over ``control`` (handlers run in the thread pool); creations are
    counted in ``metrics``."""
    router = APIRouter(tags=["rollouts"])
    counted = metrics or RolloutMetrics(CollectorRegistry())

    @router.post(routes.ROLLOUTS, status_code=201, dependencies=[require(Scope.ROLLOUTS_WRITE)])
    def create_rollout(
        request: Request,
        body: Annotated[dict[str, Any], Body(description="the plan (see lepton rollout create)")],
    ) -> dict[str, Any]:
        try:
            plan = plan_of(body)
            rec = control.create(plan, created_by=_actor(request))
        except (PlanError, SubmissionError) as exc:
            counted.requests.labels("invalid_plan").inc()
            raise _unprocessable(exc) from exc
        except (TargetError, DeployError) as exc:
            counted.requests.labels("no_target").inc()
            raise _unprocessable(exc) from exc
        except ConflictError:
            counted.requests.labels("conflict").inc()
            raise
        except NotFoundError:
            counted.requests.labels("not_found").inc()
            raise
        counted.requests.labels("created").inc()
        return control.status(rec.id, devices=False)

    @router.get(routes.ROLLOUTS, dependencies=[require(Scope.FLEET_READ)])
    def list_rollouts(
        state: RolloutStateQ = None, limit: Limit = 100, offset: Offset = 0
    ) -> dict[str, Any]:
        states = [state] if state else None
        records = control.store.list_rollouts(states=states, limit=limit, offset=offset)
        return {
            "rollouts": [{**r.to_dict(), "counts": control.store.counts(r.id)} for r in records]
        }

    @router.get(routes.ROLLOUT, dependencies=[require(Scope.FLEET_READ)])
    def get_rollout(
        rollout_id: RolloutId,
        devices: bool = True,
        state: DeviceStateQ = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        return control.status(rollout_id, devices=devices, state=state, limit=limit, offset=offset)

    @router.post(routes.ROLLOUT_ACTION, dependencies=[require(Scope.ROLLOUTS_WRITE)])
    def move_rollout(
        rollout_id: RolloutId,
        action: Action,
        request: Request,
        body: Annotated[AbortIn | None, Body()] = None,
    ) -> dict[str, Any]:
        revert = body.revert if body is not None else False
        if revert and action != "abort":
            raise _unprocessable(ValueError("revert is an abort's option"))
        rec = control.move(rollout_id, action, actor=_actor(request), revert=revert)
        return control.status(rec.id, devices=False)

    return router
