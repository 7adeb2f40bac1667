"""Tasks as a coordinator feature: the store's tables, the task routes and the leader's
scheduling and liveness loops (see :mod:`lepton.coordinator.feature`).

The device routes belong to the fleet registry the runtime keeps
(:mod:`lepton.coordinator.runtime.routes`); the device-message side (acks, results,
cancels) is the daemon's runtime too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from fastapi import APIRouter
from sqlalchemy import MetaData

from lepton.coordinator.config import Config
from lepton.coordinator.feature import BaseFeature, LeaderLoop
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.dispatcher import Scheduler
from lepton.coordinator.runtime.liveness import Liveness
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.results import ResultRepo
from lepton.coordinator.store.schema import Base
from lepton.coordinator.store.tasks import TaskRepo
from lepton.coordinator.tasks.routes import make_router


class TasksFeature(BaseFeature):
    """Devices, tasks, leases (the store's own tables); the task routes; scheduling and
    liveness (leader). ``on_submit``: a task was submitted or a cancel requested through
    the API (any thread): wake the scheduler."""

    name = "tasks"

    def __init__(
        self,
        scheduler: Scheduler,
        liveness: Liveness,
        *,
        config: Config,
        tasks: TaskRepo,
        cancels: CancelRepo,
        results: ResultRepo,
        metrics: Metrics,
        on_submit: Callable[[], None] = lambda: None,
    ) -> None:
        self.scheduler = scheduler
        self.liveness = liveness
        self.config = config
        self.tasks = tasks
        self.cancels = cancels
        self.results = results
        self.metrics = metrics
        self.on_submit = on_submit

    @property
    def metadata(self) -> MetaData:
        return Base.metadata

    def routers(self) -> Sequence[APIRouter]:
        return [
            make_router(
                self.config,
                self.tasks,
                self.cancels,
                self.results,
                self.metrics,
                on_submit=self.on_submit,
            )
        ]

    def leader_loops(self) -> Mapping[str, LeaderLoop]:
        return {"scheduler": self.scheduler.lead, "liveness": self.liveness.lead}
