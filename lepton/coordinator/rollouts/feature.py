"""Staged rollouts as a coordinator feature (see :mod:`lepton.coordinator.feature`).

The leader loop ``rollouts`` steps every live rollout (:class:`~.runner.Runner`) in a worker
thread, again at once while a step changed something, then sleeps until an event or the
earliest time the kernel asked for (a device's timeout, a slot of the rate limit), at most
``idle_s``. Events: device results of the kinds rollouts send (:meth:`on_results`), device
update statuses (:meth:`on_updates`, registered with the releases feature), an operator's
call (:class:`~.control.RolloutControl`). The idle bound covers what sends no event here:
a device coming back online, a late joiner enrolling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from fastapi import APIRouter
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData

from lepton.coordinator.config import Config
from lepton.coordinator.errors import LeaseLostError
from lepton.coordinator.feature import BaseFeature, LeaderLoop
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.rollouts import tables
from lepton.coordinator.rollouts.control import RolloutControl
from lepton.coordinator.rollouts.metrics import RolloutMetrics
from lepton.coordinator.rollouts.routes import make_router
from lepton.coordinator.rollouts.runner import Runner
from lepton.coordinator.rollouts.store import RolloutStore
from lepton.coordinator.rollouts.targets import ReleaseSource, Targets
from lepton.coordinator.store import Lease, ResultOutcome, Store
from lepton.protocol.tasks import DEPLOY, INFER, INSTALL, REVERT

log = logging.getLogger(__name__)

#: Task kinds whose results move a rollout on.
KINDS: Final = frozenset({DEPLOY, INFER, INSTALL, REVERT})
IDLE_S: Final = 15.0
#: Steps of one rollout in a row before the others get their turn.
MAX_STEPS: Final = 20


class RolloutsFeature(BaseFeature):
    """Rollouts over the coordinator's store. ``registry``: model rollouts (None: refused);
    ``releases``: agent-image rollouts (None: refused); ``base_url``: where devices fetch;
    ``on_submit(n)``: tasks were submitted (any thread); ``metrics``: the registry its
    counters join (None: none)."""

    name = "rollouts"

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        registry: ModelRegistry | None,
        releases: ReleaseSource | None,
        base_url: Callable[[], str],
        on_submit: Callable[[int], None],
        metrics: CollectorRegistry | None = None,
        idle_s: float = IDLE_S,
    ) -> None:
        self.metrics = RolloutMetrics(metrics)
        self.store = RolloutStore(store.engine)
        self.targets = Targets(registry, releases, base_url)
        self.runner = Runner(
            config,
            self.store,
            devices=store.devices,
            tasks=store.tasks,
            cancels=store.cancels,
            targets=self.targets,
            on_submit=on_submit,
            metrics=self.metrics,
        )
        self.control = RolloutControl(
            config, self.store, store.devices, self.targets, wake=self.wake_threadsafe
        )
        self.idle_s = idle_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    @property
    def metadata(self) -> MetaData:
        return tables.metadata

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def routers(self) -> Sequence[APIRouter]:
        return [make_router(self.control, self.metrics)]

    def leader_loops(self) -> Mapping[str, LeaderLoop]:
        return {"rollouts": self._lead}

    # ------------------------------------------------------------------ events (any thread)

    def wake_threadsafe(self) -> None:
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                loop.call_soon_threadsafe(event.set)

    def on_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        if any(o.outcome == "applied" and o.task_kind in KINDS for o in outcomes):
            self.wake_threadsafe()

    def on_updates(self, updates: Sequence[Any]) -> None:
        """Device update statuses changed (the releases feature's listener)."""
        if updates:
            self.wake_threadsafe()

    # ------------------------------------------------------------------ the leader

    async def _lead(self, lease: Lease) -> None:
        assert self._event is not None, "start() first"
        event = self._event
        while True:
            event.clear()
            wake_at = await asyncio.to_thread(self.step_all, lease)
            delay = self.idle_s if wake_at is None else min(self.idle_s, wake_at - time.time())
            if delay <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await event.wait()

    def step_all(self, lease: Lease | None = None) -> float | None:
        """Step every live rollout until it settles; the earliest wake-up asked for."""
        wakes: list[float] = []
        for rec in self.store.live():
            try:
                for _ in range(MAX_STEPS):
                    tick = self.runner.tick(rec.id, time.time(), lease=lease)
                    if not tick.acted:
                        break
                else:
                    wakes.append(time.time())  # more to do: come back at once
                if tick.wake_at is not None:
                    wakes.append(tick.wake_at)
            except LeaseLostError:
                raise
            except Exception:
                log.exception("rollout %s: step failed", rec.id)
        return min(wakes, default=None)
