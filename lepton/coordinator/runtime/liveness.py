"""Liveness (leader only): devices that stop reporting are marked offline.

A device is offline once ``missed_reports`` of its declared report intervals pass without a
report (the Last Will usually says so sooner). Going offline takes back the device's
assigned and running tasks for reassignment. The loop sleeps until the earliest deadline
(at most ``max_check_s``, since other replicas' writes move deadlines).

Silence only means something while this coordinator can hear: while its own broker link is
down nobody is judged, and once it is back every device counts as seen at the moment it
came back, so each has its full ``missed_reports`` intervals to report again (deadlines move
by at least the outage's length). Otherwise a broker restart would read as the whole fleet
going silent, and every requeue would burn an attempt of work that never failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from lepton.coordinator.config import LivenessConfig
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import Lease
from lepton.coordinator.store.devices import DeviceRepo

log = logging.getLogger(__name__)


class Liveness:
    """The deadline sweep; :meth:`link_changed` must hear of every change of the link."""

    def __init__(
        self,
        cfg: LivenessConfig,
        devices: DeviceRepo,
        metrics: Metrics,
        *,
        on_requeue: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.devices = devices
        self.metrics = metrics
        self.on_requeue = on_requeue
        self._wake = asyncio.Event()
        self._link_up = False
        # Devices count as seen at this time at the latest: when the link last came up.
        self.seen_floor = 0.0

    def wake(self) -> None:
        """Re-check now (a device appeared with an interval shorter than the current wait)."""
        self._wake.set()

    def link_changed(self, up: bool) -> None:
        """This coordinator's broker link went up or down (event loop thread)."""
        if up and not self._link_up:
            self.seen_floor = time.time()
            log.info("broker link up: device deadlines count from now")
        elif not up and self._link_up:
            log.warning("broker link down: no device is marked offline until it is back")
        self._link_up = up
        self._wake.set()

    async def lead(self, _lease: Lease) -> None:
        while True:
            self._wake.clear()
            if not self._link_up:
                await self._wake.wait()  # link_changed() sets it
                continue
            try:
                delay = await self.sweep()
            except Exception:
                log.exception("liveness sweep failed")
                delay = self.cfg.max_check_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def sweep(self) -> float:
        """Mark overdue devices offline; return how long to wait before the next sweep."""
        cfg = self.cfg
        if not self._link_up:
            return cfg.max_check_s
        now = time.time()
        offline = await asyncio.to_thread(
            self.devices.mark_stale_offline,
            now,
            missed=cfg.missed_reports,
            default_interval_s=cfg.default_interval_s,
            seen_floor=self.seen_floor,
        )
        requeued = 0
        for device_id, task_ids in offline.items():
            log.info(
                "device %s offline: no report for %g intervals; requeued %d tasks",
                device_id,
                cfg.missed_reports,
                len(task_ids),
            )
            requeued += len(task_ids)
        if offline:
            self.metrics.devices_offline.labels("deadline").inc(len(offline))
        if requeued:
            self.metrics.task_transitions.labels("pending").inc(requeued)
            self.on_requeue()
        nxt = await asyncio.to_thread(
            self.devices.next_deadline,
            missed=cfg.missed_reports,
            default_interval_s=cfg.default_interval_s,
            seen_floor=self.seen_floor,
        )
        if nxt is None:
            return cfg.max_check_s
        return min(cfg.max_check_s, max(0.05, nxt - time.time() + 0.01))
