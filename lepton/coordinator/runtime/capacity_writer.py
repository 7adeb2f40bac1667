"""The registry writer: the latest capacity report per device, written in batches.

Capacity reports are the high-volume stream (every device, every few seconds). The network
thread only records the newest report per device in a dictionary; a flush task writes the
dictionary to the store in one transaction at most ``flush_interval_s`` after the first
report of a batch arrived, or as soon as ``flush_max_batch`` devices are waiting. Reports of
one device arriving faster than that are coalesced (the newest wins). If the database is
unreachable the batch is kept and merged with newer reports until a write succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

from lepton.coordinator.config import RegistryConfig
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import CapacitySample
from lepton.coordinator.store.devices import DeviceRepo
from lepton.protocol.messages import CapacityReport

log = logging.getLogger(__name__)

_Pending = dict[str, tuple[CapacityReport, float]]
OnFlush = Callable[[Sequence[tuple[str, CapacityReport, float]], float], None]


class Registry:
    """Buffers capacity reports (any thread) and writes them in batches (event loop)."""

    def __init__(
        self,
        devices: DeviceRepo,
        metrics: Metrics,
        cfg: RegistryConfig,
        *,
        fleet: str,
        on_flush: OnFlush | None = None,
    ) -> None:
        self.devices = devices
        self.metrics = metrics
        self.cfg = cfg
        self.fleet = fleet
        self.on_flush = on_flush
        self.flushes = 0
        self._pending: _Pending = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nonempty = asyncio.Event()
        self._full = asyncio.Event()
        self._signalled_full = False
        self._stopping = False
        self._waiting = False

    def request_stop(self) -> bool:
        """Stop after the flush in progress; True when idle (the caller may cancel run())."""
        self._stopping = True
        return self._waiting

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # ------------------------------------------------------------------ network thread

    def offer(self, device_id: str, report: CapacityReport, received_at: float) -> None:
        """Record a report; only the newest per device is kept until the next flush."""
        with self._lock:
            was_empty = not self._pending
            cur = self._pending.get(device_id)
            if cur is None or report.ts >= cur[0].ts:
                self._pending[device_id] = (report, received_at)
            full = len(self._pending) >= self.cfg.flush_max_batch and not self._signalled_full
            if full:
                self._signalled_full = True
        if (was_empty or full) and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: shutting down
                self._loop.call_soon_threadsafe(self._signal, full)

    def _signal(self, full: bool) -> None:
        self._nonempty.set()
        if full:
            self._full.set()

    def __len__(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ event loop

    async def run(self) -> None:
        """Flush forever: wait for a first report, give the batch ``flush_interval_s`` to
        fill (less if it fills up), write it."""
        backoff = self.cfg.flush_interval_s
        while not self._stopping:
            self._waiting = True
            try:
                await self._nonempty.wait()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.flush_interval_s):
                        await self._full.wait()
            finally:
                self._waiting = False
            try:
                await self.flush()
                backoff = self.cfg.flush_interval_s
            except Exception:
                log.exception("capacity batch not written; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def flush(self) -> int:
        """Write everything buffered now; return how many devices were written."""
        with self._lock:
            batch, self._pending = self._pending, {}
            self._signalled_full = False
            self._nonempty.clear()
            self._full.clear()
        if not batch:
            return 0
        try:
            started = time.perf_counter()
            await asyncio.to_thread(self._write, batch)
        except BaseException:
            self._restore(batch)
            raise
        committed = time.time()
        self.flushes += 1
        self.metrics.registry_flush_seconds.observe(time.perf_counter() - started)
        self.metrics.registry_flush_devices.observe(len(batch))
        for _report, received_at in batch.values():
            self.metrics.registry_lag_seconds.observe(max(0.0, committed - received_at))
        if self.on_flush is not None:
            self.on_flush([(d, r, t) for d, (r, t) in batch.items()], committed)
        return len(batch)

    def _write(self, batch: _Pending) -> None:
        samples = [
            CapacitySample.from_report(device_id, self.fleet, report, received_at)
            for device_id, (report, received_at) in batch.items()
        ]
        self.devices.record_capacity(samples)

    def _restore(self, batch: _Pending) -> None:
        """Put an unwritten batch back, unless newer reports arrived meanwhile."""
        with self._lock:
            for device_id, item in batch.items():
                cur = self._pending.get(device_id)
                if cur is None or item[0].ts > cur[0].ts:
                    self._pending[device_id] = item
            if self._pending:
                self._nonempty.set()
