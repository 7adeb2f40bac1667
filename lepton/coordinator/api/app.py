"""The HTTP API: fleet and task views, task submission, explanations, health and metrics.

Handlers are plain functions (FastAPI runs them in its thread pool), so store calls never
block the event loop. Errors use FastAPI's ``{"detail": ...}`` shape: 404 for an unknown id,
409 for a taken task id or a cancel of a task that had ended (:mod:`lepton.coordinator.api.cancel`),
422 for an invalid request, 503 when the database is unreachable.
Bodies are bounded before any route sees them (:mod:`lepton.coordinator.api.limits`: 408, 413, 415,
400/422 for JSON too deep or not finite), and no client error becomes a 500
(:mod:`lepton.coordinator.api.errors`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, FastAPI, HTTPException, Query, Response
from starlette.routing import Route

from lepton.coordinator.api import errors
from lepton.coordinator.api.cancel import add_cancel_route
from lepton.coordinator.api.limits import BodyGuard
from lepton.coordinator.api.schemas import (
    AttemptOut,
    DeviceDetail,
    DeviceOut,
    ExplainOut,
    Health,
    ResultOut,
    TaskDetail,
    TaskOut,
    TaskStateName,
    TaskSubmit,
)
from lepton.coordinator.config import Config
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import Store
from lepton.coordinator.tasks.submit import SubmissionError, build_task
from lepton.protocol import routes

log = logging.getLogger(__name__)

try:
    VERSION = version("lepton-fleet")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0+unknown"


@dataclass(frozen=True, slots=True)
class ApiContext:
    """What the API needs from the running service."""

    config: Config
    store: Store
    metrics: Metrics
    started_at: float
    is_leader: Callable[[], bool] = lambda: False
    mqtt_connected: Callable[[], bool] = lambda: False
    on_submit: Callable[[], None] = lambda: None  # any thread
    routers: Sequence[APIRouter] = ()  # mounted as they are (the model registry's, say)


def create_app(ctx: ApiContext) -> FastAPI:
    """The API application for one coordinator process."""
    app = FastAPI(
        title="Lepton coordinator",
        version=VERSION,
        description="Fleet registry, task submission and placement explanations.",
    )
    store, cfg = ctx.store, ctx.config

    def refused(reason: str) -> None:
        ctx.metrics.http_rejects.labels(reason).inc()

    errors.install(app, refused)

    def deadline(interval: float | None) -> float:
        return cfg.heartbeat_deadline_s(interval)

    @app.get(routes.HEALTH, tags=["service"])
    def health(response: Response) -> Health:
        """Liveness of this process and its dependencies, and fleet counts."""
        database = store.ping()
        devices = store.devices.count_devices() if database else {}
        tasks = store.tasks.count_tasks() if database else {}
        mqtt = ctx.mqtt_connected()
        ok = database and mqtt
        if not database:
            response.status_code = 503
        m = ctx.metrics
        return Health(
            status="ok" if ok else "degraded",
            instance_id=cfg.instance_id,
            fleet=cfg.fleet,
            version=VERSION,
            uptime_s=time.time() - ctx.started_at,
            leader=ctx.is_leader(),
            mqtt_connected=mqtt,
            database=database,
            devices=devices,
            tasks=tasks,
            ingest={
                "messages": sum(
                    m.value("lepton_ingest_messages_total", {"channel": c})
                    for c in ("state", "capacity", "task-ack", "result")
                ),
                "rejects": _total(m, "lepton_ingest_rejects_total"),
            },
        )

    @app.get(routes.DEVICES, tags=["devices"])
    def list_devices(
        state: Annotated[str | None, Query(pattern="^(online|offline)$")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[DeviceOut]:
        """Devices of the fleet, by id."""
        rows = store.devices.list_devices(
            state="online" if state == "online" else "offline" if state else None,
            limit=limit,
            offset=offset,
        )
        return [DeviceOut.of(d, deadline(d.report_interval_s)) for d in rows]

    @app.get(routes.DEVICE, tags=["devices"])
    def get_device(device_id: str) -> DeviceDetail:
        """One device: identity, liveness, latest capacity report and its current tasks."""
        d = store.devices.get_device(device_id)
        tasks = [
            TaskOut.of(t)
            for state in ("assigned", "running")
            for t in store.tasks.list_tasks(state=state, device_id=device_id, limit=1000)
        ]
        base = DeviceOut.of(d, deadline(d.report_interval_s))
        return DeviceDetail(**base.model_dump(), report=d.report, tasks=tasks)

    @app.get(routes.TASKS, tags=["tasks"])
    def list_tasks(
        state: TaskStateName | None = None,
        device: str | None = None,
        kind: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[TaskOut]:
        """Tasks, newest first."""
        rows = store.tasks.list_tasks(
            state=state, device_id=device, kind=kind, limit=limit, offset=offset
        )
        return [TaskOut.of(t) for t in rows]

    @app.post(routes.TASKS, status_code=201, tags=["tasks"])
    def submit_task(body: TaskSubmit) -> TaskOut:
        """Submit a task; the scheduler places it in its next batch."""
        try:
            new = build_task(cfg, body.request())
        except SubmissionError as exc:
            refused("invalid")
            raise HTTPException(
                status_code=422,
                detail=[
                    {"loc": ["body", *exc.field.split(".")], "msg": str(exc), "type": "value_error"}
                ],
            ) from exc
        task = store.tasks.submit(new)
        ctx.metrics.task_transitions.labels("pending").inc()
        ctx.on_submit()
        return TaskOut.of(task)

    @app.get(routes.TASK, tags=["tasks"])
    def get_task(task_id: str) -> TaskDetail:
        """One task with its attempts (which device, how each ended) and results received."""
        t = store.tasks.get_task(task_id)
        base = TaskOut.of(t)
        return TaskDetail(
            **base.model_dump(),
            attempts=[AttemptOut.of(a) for a in store.tasks.attempts(task_id)],
            results=[ResultOut.of(r) for r in store.results.results_for(task_id)],
        )

    add_cancel_route(app, ctx)

    @app.get(routes.TASK_EXPLAIN, tags=["tasks"])
    def explain_task(task_id: str) -> ExplainOut:
        """Why the task went where it went (or why it could not be placed)."""
        t = store.tasks.get_task(task_id)
        return ExplainOut(
            task_id=t.id, state=t.state, device_id=t.device_id, explanation=t.explanation
        )

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics in the text exposition format."""
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    for router in ctx.routers:
        app.include_router(router)
    _guard_bodies(app, ctx.routers, cfg, refused)
    return app


def _guard_bodies(
    app: FastAPI, routers: Sequence[APIRouter], cfg: Config, refused: Callable[[str], None]
) -> None:
    # The routes in the order the app's router tries them: its own, then each included
    # router's (FastAPI keeps an included router as one entry of its own).
    routes = [r for r in app.router.routes if isinstance(r, Route)]
    routes += [r for router in routers for r in router.routes if isinstance(r, Route)]
    app.add_middleware(BodyGuard, routes=routes, config=cfg.http, on_refuse=refused)


def _total(m: Metrics, name: str) -> float:
    total = 0.0
    for metric in m.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total
