"""The HTTP app: its factory, error answers, body limits, health and metrics.

Every other route is mounted from the routers it is given (:attr:`ApiContext.routers`): the
fleet registry's (:mod:`lepton.coordinator.runtime.routes`), then each feature's
(:meth:`lepton.coordinator.feature.Feature.routers`: tasks in
:mod:`lepton.coordinator.tasks.routes`, the model registry's, federated jobs'). Handlers
are plain functions (FastAPI runs them in its thread pool), so store calls never block the
event loop. Errors use FastAPI's ``{"detail": ...}`` shape: 404 for an unknown id, 409 for
a taken task id or a cancel of a task that had ended, 422 for an invalid request, 503 when
the database is unreachable.
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

from fastapi import APIRouter, FastAPI, Response
from starlette.routing import Route

from lepton.coordinator.api import errors
from lepton.coordinator.api.limits import BodyGuard
from lepton.coordinator.api.schemas import Health
from lepton.coordinator.config import Config
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.protocol import routes

log = logging.getLogger(__name__)

try:
    VERSION = version("lepton-fleet")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0+unknown"


@dataclass(frozen=True, slots=True)
class ApiContext:
    """What the app needs from the running service: health reads the fleet and task counts
    (``devices``, ``tasks``) and whether the database answers (``ping``)."""

    config: Config
    devices: DeviceRepo
    tasks: TaskRepo
    ping: Callable[[], bool]
    metrics: Metrics
    started_at: float
    is_leader: Callable[[], bool] = lambda: False
    mqtt_connected: Callable[[], bool] = lambda: False
    routers: Sequence[APIRouter] = ()  # mounted as they are, in order (devices, features)


def create_app(ctx: ApiContext) -> FastAPI:
    """The API application for one coordinator process."""
    app = FastAPI(
        title="Lepton coordinator",
        version=VERSION,
        description="Fleet registry, task submission and placement explanations.",
    )
    cfg = ctx.config

    def refused(reason: str) -> None:
        ctx.metrics.http_rejects.labels(reason).inc()

    errors.install(app, refused)

    @app.get(routes.HEALTH, tags=["service"])
    def health(response: Response) -> Health:
        """Liveness of this process and its dependencies, and fleet counts."""
        database = ctx.ping()
        devices = ctx.devices.count_devices() if database else {}
        tasks = ctx.tasks.count_tasks() if database else {}
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
