"""The registry writer: coalescing, batching, and keeping a batch the database refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from lepton.coordinator.config import RegistryConfig
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.capacity_writer import Registry
from lepton.coordinator.store import CapacitySample
from tests.coordinator.factories import report


class FlakyStore:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[list[CapacitySample]] = []

    def record_capacity(self, samples: Sequence[CapacitySample]) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError("database away")
        self.batches.append(list(samples))
        return len(samples)


def make(store: FlakyStore, **cfg: float) -> Registry:
    r = Registry(store, Metrics(), RegistryConfig(**cfg), fleet="default")  # type: ignore[arg-type]
    r.bind(asyncio.get_running_loop())
    return r


async def test_newest_report_per_device_wins() -> None:
    store = FlakyStore()
    r = make(store)
    now = time.time()
    r.offer("a", report(ts=now, slots=1), now)
    r.offer("a", report(ts=now - 10, slots=9), now)  # older: ignored
    r.offer("a", report(ts=now + 1, slots=3), now)
    r.offer("b", report(ts=now), now)
    assert await r.flush() == 2
    (batch,) = store.batches
    assert {s.device_id: s.report["slots"]["total"] for s in batch} == {"a": 3, "b": 2}
    assert await r.flush() == 0


async def test_run_flushes_within_the_interval_and_when_full() -> None:
    store = FlakyStore()
    r = make(store, flush_interval_s=0.2, flush_max_batch=3)
    task = asyncio.create_task(r.run())
    now = time.time()
    r.offer("a", report(), now)
    await asyncio.sleep(0.05)
    assert store.batches == []
    await asyncio.sleep(0.3)
    assert len(store.batches) == 1
    for d in ("x", "y", "z"):
        r.offer(d, report(), now)
    await asyncio.sleep(0.05)  # full: written without waiting for the interval
    assert len(store.batches) == 2
    task.cancel()


async def test_refused_batch_is_kept_and_merged_with_newer_reports() -> None:
    store = FlakyStore(failures=1)
    r = make(store, flush_interval_s=0.05)
    task = asyncio.create_task(r.run())
    now = time.time()
    r.offer("a", report(ts=now, slots=1), now)
    r.offer("b", report(ts=now, slots=1), now)
    await asyncio.sleep(0.1)  # first write fails
    r.offer("a", report(ts=now + 1, slots=5), now + 1)
    deadline = time.monotonic() + 3
    while not store.batches and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    task.cancel()
    written = {s.device_id: s.report["slots"]["total"] for b in store.batches for s in b}
    assert written == {"a": 5, "b": 1}
