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
from lepton.coordinator.auth.guard import Authenticator, AuthGuard, require
from lepton.coordinator.auth.scopes import Scope
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
    #: Who may call what (:mod:`lepton.coordinator.auth.guard`); every route but health needs it.
    auth: Authenticator | None = None


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

    # Health, and the API's own description (the schema of an open-source API is no secret);
    # enrolment, whose credential is the claim it checks itself (lepton.coordinator.auth.enrolment).
    public = {routes.HEALTH, routes.ENROLL}
    public |= {
        u
        for u in (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
        if u
    }
    if cfg.http.metrics_public:
        public.add(routes.METRICS)

    @app.get(
        routes.METRICS,
        tags=["service"],
        response_class=Response,
        dependencies=[] if cfg.http.metrics_public else [require(Scope.METRICS_READ)],
    )
    def metrics() -> Response:
        """Prometheus metrics in the text exposition format."""
        return metrics_response(ctx.metrics)

    for router in ctx.routers:
        app.include_router(router)
    _guard_bodies(app, ctx.routers, cfg, refused)
    if ctx.auth is None:
        raise ValueError("the API needs an Authenticator (auth.insecure turns checks off)")
    # Added last, so it runs first: no body is read and no route runs for a caller the guard
    # refuses.
    app.add_middleware(
        AuthGuard, routes=_routes(app, ctx.routers), auth=ctx.auth, public=frozenset(public)
    )
    return app


def metrics_response(metrics: Metrics) -> Response:
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


def create_metrics_app(metrics: Metrics) -> FastAPI:
    """``/metrics`` alone, without a token: for ``http.metrics_port``, a listener a scraper
    reaches on a private network."""
    app = FastAPI(title="Lepton coordinator metrics", openapi_url=None, docs_url=None)

    @app.get(routes.METRICS, response_class=Response)
    def metrics_route() -> Response:
        return metrics_response(metrics)

    return app


def _routes(app: FastAPI, routers: Sequence[APIRouter]) -> list[Route]:
    # The routes in the order the app's router tries them: its own, then each included
    # router's (FastAPI keeps an included router as one entry of its own).
    found = [r for r in app.router.routes if isinstance(r, Route)]
    return found + [r for router in routers for r in router.routes if isinstance(r, Route)]


def _guard_bodies(
    app: FastAPI, routers: Sequence[APIRouter], cfg: Config, refused: Callable[[str], None]
) -> None:
    app.add_middleware(BodyGuard, routes=_routes(app, routers), config=cfg.http, on_refuse=refused)


def _total(m: Metrics, name: str) -> float:
    total = 0.0
    for metric in m.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
    return total
