"""HTTP routes of the fleet registry: ``GET /v1/devices`` and ``GET /v1/devices/{id}``.

The registry is runtime state, not a feature: every coordinator keeps it (ingest applies
births and wills, the capacity writer records reports, liveness marks devices offline) and
every feature builds on it. So its read routes live here, beside what writes it, and the
service mounts them ahead of the features' routers (:meth:`Coordinator._app
<lepton.coordinator.service.Coordinator._app>`). Handlers are plain functions (FastAPI runs
them in its thread pool); an unknown device id is a 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lepton.coordinator.api.schemas import DeviceDetail, DeviceOut, TaskOut
from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.config import Config
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.protocol import routes


def make_router(config: Config, devices: DeviceRepo, tasks: TaskRepo) -> APIRouter:
    """The device routes over these repositories (``tasks``: a device's current tasks)."""
    router = APIRouter()

    def deadline(interval: float | None) -> float:
        return config.heartbeat_deadline_s(interval)

    @router.get(routes.DEVICES, tags=["devices"], dependencies=[require(Scope.FLEET_READ)])
    def list_devices(
        state: Annotated[str | None, Query(pattern="^(online|offline)$")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[DeviceOut]:
        """Devices of the fleet, by id."""
        rows = devices.list_devices(
            state="online" if state == "online" else "offline" if state else None,
            limit=limit,
            offset=offset,
        )
        return [DeviceOut.of(d, deadline(d.report_interval_s)) for d in rows]

    @router.get(routes.DEVICE, tags=["devices"], dependencies=[require(Scope.FLEET_READ)])
    def get_device(device_id: str) -> DeviceDetail:
        """One device: identity, liveness, latest capacity report and its current tasks."""
        d = devices.get_device(device_id)
        current = [
            TaskOut.of(t)
            for state in ("assigned", "running")
            for t in tasks.list_tasks(state=state, device_id=device_id, limit=1000)
        ]
        base = DeviceOut.of(d, deadline(d.report_interval_s))
        return DeviceDetail(**base.model_dump(), report=d.report, tasks=current)

    return router
