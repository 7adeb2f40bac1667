"""HTTP routes of tasks: submit, list, show, explain and cancel (``/v1/tasks...``).

Mounted through :meth:`lepton.coordinator.tasks.feature.TasksFeature.routers` (the app's
error handlers and body guard apply to them as to every route). Handlers are plain
functions (FastAPI runs them in its thread pool), so store calls never block the event loop.
``POST /v1/tasks`` answers 201 with the task, 409 for a taken task id, 422 for an invalid
request; a show, explain or cancel of an unknown id is a 404.

``POST /v1/tasks/{id}/cancel`` cancels a task, idempotently:

- a pending task is ``cancelled`` at once: 200 with the task;
- an assigned or running task is marked and the scheduling leader sends the cancel to its
  device (again until the device answers): 202 with the task, which ends ``cancelled`` when
  the device answers; no result of it is applied, a success included;
- a task already ``cancelled``: 200 again, nothing changes;
- a task that ended otherwise: 409 ``{"detail", "reason": "task_finished", "state"}``;
- an unknown id: 404.

The optional JSON body ``{"reason": "..."}`` (one printable line, at most 200 characters)
goes through the app's body guard like every JSON body. Every request is counted in
``lepton_task_cancels_total`` by outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Query, Response
from fastapi.responses import JSONResponse

from lepton.coordinator.api.schemas import (
    AttemptOut,
    ExplainOut,
    ResultOut,
    TaskCancelIn,
    TaskDetail,
    TaskOut,
    TaskStateName,
    TaskSubmit,
)
from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.config import Config
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.results import ResultRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.coordinator.tasks.submit import SubmissionError, build_task
from lepton.protocol import routes

log = logging.getLogger(__name__)

TaskId = Annotated[str, Path(min_length=1, max_length=64)]


def make_router(
    config: Config,
    tasks: TaskRepo,
    cancels: CancelRepo,
    results: ResultRepo,
    metrics: Metrics,
    *,
    on_submit: Callable[[], None] = lambda: None,
) -> APIRouter:
    """The task routes over these repositories. ``on_submit``: a task was submitted or a
    cancel requested, for the scheduling leader to act on (any thread)."""
    router = APIRouter()

    @router.get(routes.TASKS, tags=["tasks"], dependencies=[require(Scope.FLEET_READ)])
    def list_tasks(
        state: TaskStateName | None = None,
        device: str | None = None,
        kind: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[TaskOut]:
        """Tasks, newest first."""
        rows = tasks.list_tasks(
            state=state, device_id=device, kind=kind, limit=limit, offset=offset
        )
        return [TaskOut.of(t) for t in rows]

    @router.post(
        routes.TASKS, status_code=201, tags=["tasks"], dependencies=[require(Scope.TASKS_WRITE)]
    )
    def submit_task(body: TaskSubmit) -> TaskOut:
        """Submit a task; the scheduler places it in its next batch."""
        try:
            new = build_task(config, body.request())
        except SubmissionError as exc:
            metrics.http_rejects.labels("invalid").inc()
            raise HTTPException(
                status_code=422,
                detail=[
                    {"loc": ["body", *exc.field.split(".")], "msg": str(exc), "type": "value_error"}
                ],
            ) from exc
        task = tasks.submit(new)
        metrics.task_transitions.labels("pending").inc()
        on_submit()
        return TaskOut.of(task)

    @router.get(routes.TASK, tags=["tasks"], dependencies=[require(Scope.FLEET_READ)])
    def get_task(task_id: str) -> TaskDetail:
        """One task with its attempts (which device, how each ended) and results received."""
        t = tasks.get_task(task_id)
        base = TaskOut.of(t)
        return TaskDetail(
            **base.model_dump(),
            attempts=[AttemptOut.of(a) for a in tasks.attempts(task_id)],
            results=[ResultOut.of(r) for r in results.results_for(task_id)],
        )

    @router.post(
        routes.TASK_CANCEL,
        tags=["tasks"],
        response_model=TaskOut,
        responses={
            202: {"model": TaskOut, "description": "Assigned or running: its device is told."},
            409: {"description": "The task had ended; the answer names its state."},
        },
        dependencies=[require(Scope.TASKS_WRITE)],
    )
    def cancel_task(
        task_id: TaskId,
        response: Response,
        body: Annotated[TaskCancelIn | None, Body()] = None,
    ) -> TaskOut | JSONResponse:
        """Cancel a task (idempotent). A pending task is ``cancelled`` at once (200); an
        assigned or running one is marked and its device told to stop it (202): the task
        ends ``cancelled`` when the device answers, and no result of it is applied."""
        reason = (body or TaskCancelIn()).reason
        (out,) = cancels.cancel_tasks([task_id], reason, time.time())
        metrics.task_cancels.labels(out.outcome).inc()
        if out.outcome == "unknown":
            raise NotFoundError("task", task_id)
        if out.outcome == "finished":
            log.info("cancel of task %s refused: it had %s", task_id, out.state)
            return JSONResponse(
                {
                    "detail": f"task {task_id} has already {out.state}",
                    "reason": "task_finished",
                    "state": out.state,
                },
                status_code=409,
            )
        if out.changed and out.outcome == "cancelled":
            metrics.task_transitions.labels("cancelled").inc()
        if out.outcome == "requested":
            response.status_code = 202
            on_submit()  # the leader sends the cancel in its next cycle
        log.info("task %s: cancel %s (%s)", task_id, out.outcome, reason)
        return TaskOut.of(tasks.get_task(task_id))

    @router.get(routes.TASK_EXPLAIN, tags=["tasks"], dependencies=[require(Scope.FLEET_READ)])
    def explain_task(task_id: str) -> ExplainOut:
        """Why the task went where it went (or why it could not be placed)."""
        t = tasks.get_task(task_id)
        return ExplainOut(
            task_id=t.id, state=t.state, device_id=t.device_id, explanation=t.explanation
        )

    return router
