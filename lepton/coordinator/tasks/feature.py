"""Tasks as a coordinator feature: the store's tables, and the leader's scheduling and
liveness loops (see :mod:`lepton.coordinator.feature`).

The task and device routes stay on the core HTTP app (:mod:`lepton.coordinator.api`); the
device-message side (acks, results, cancels) is the daemon's runtime.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import MetaData

from lepton.coordinator.feature import BaseFeature, LeaderLoop
from lepton.coordinator.runtime.dispatcher import Scheduler
from lepton.coordinator.runtime.liveness import Liveness
from lepton.coordinator.store.schema import Base


class TasksFeature(BaseFeature):
    """Devices, tasks, leases (the store's own tables); scheduling and liveness (leader)."""

    name = "tasks"

    def __init__(self, scheduler: Scheduler, liveness: Liveness) -> None:
        self.scheduler = scheduler
        self.liveness = liveness

    @property
    def metadata(self) -> MetaData:
        return Base.metadata

    def leader_loops(self) -> Mapping[str, LeaderLoop]:
        return {"scheduler": self.scheduler.lead, "liveness": self.liveness.lead}
