"""``POST /v1/tasks/{id}/cancel``: cancel a task, idempotently.

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
from typing import TYPE_CHECKING, Annotated

from fastapi import Body, FastAPI, Path, Response
from fastapi.responses import JSONResponse

from lepton.coordinator.api.schemas import TaskCancelIn, TaskOut
from lepton.coordinator.errors import NotFoundError
from lepton.protocol import routes

if TYPE_CHECKING:
    from lepton.coordinator.api.app import ApiContext

log = logging.getLogger(__name__)

TaskId = Annotated[str, Path(min_length=1, max_length=64)]


def add_cancel_route(app: FastAPI, ctx: ApiContext) -> None:
    """Register the cancel route on ``app``."""
    store = ctx.store

    @app.post(
        routes.TASK_CANCEL,
        tags=["tasks"],
        response_model=TaskOut,
        responses={
            202: {"model": TaskOut, "description": "Assigned or running: its device is told."},
            409: {"description": "The task had ended; the answer names its state."},
        },
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
        (out,) = store.cancels.cancel_tasks([task_id], reason, time.time())
        ctx.metrics.task_cancels.labels(out.outcome).inc()
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
            ctx.metrics.task_transitions.labels("cancelled").inc()
        if out.outcome == "requested":
            response.status_code = 202
            ctx.on_submit()  # the leader sends the cancel in its next cycle
        log.info("task %s: cancel %s (%s)", task_id, out.outcome, reason)
        return TaskOut.of(store.tasks.get_task(task_id))
