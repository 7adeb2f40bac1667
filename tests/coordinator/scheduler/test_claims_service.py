"""Finding 12 of the hardening review through a real broker and a running coordinator:
absurd bench claims are refused at ingest, implausible ones are counted and not believed,
and a lying device gets no more than its share of the work."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

import pytest

from lepton.coordinator.service import Coordinator
from lepton.coordinator.store import TaskRecord
from lepton.protocol import codec, topics
from lepton.protocol.messages import MAX_BENCH_GOPS
from tests.coordinator.conftest import eventually
from tests.coordinator.factories import new_task, report
from tests.coordinator.test_service import online
from tests.support.broker import Broker
from tests.support.device import FakeDevice

HONEST_GFLOPS = 10.0
TASKS = 16


def rejects(c: Coordinator, reason: str) -> float:
    return c.metrics.value("lepton_ingest_rejects_total", {"reason": reason})


async def run_batch(c: Coordinator, tag: str) -> Counter[str]:
    """Store TASKS tasks at once (one scheduling cycle sees them together) and count where
    they ran."""
    tasks = [
        new_task(f"{tag}-{j}", demand_gops=1.0, model_class="cnn", params={"sleep_s": 0.1})
        for j in range(TASKS)
    ]

    def submit_all() -> None:
        for t in tasks:
            c.store.tasks.submit(t)

    await asyncio.to_thread(submit_all)

    def done() -> list[TaskRecord] | None:
        got = [c.store.tasks.get_task(t.id) for t in tasks]
        return got if all(t.state == "succeeded" for t in got) else None

    records: list[TaskRecord] = await eventually(lambda: asyncio.to_thread(done), timeout=30)
    return Counter(str(t.device_id) for t in records)


@pytest.mark.timeout(90)
async def test_lying_device_is_held_to_its_peers(
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
    broker: Broker,
) -> None:
    # All four devices really take the same time per task; "liar" claims 80,000x more.
    devices = [
        FakeDevice(broker.port, f"pi-{i}", slots=1, gflops=HONEST_GFLOPS, device_class="rpi5")
        for i in range(3)
    ]
    devices.append(FakeDevice(broker.port, "liar", slots=1, gflops=800_000.0, device_class="rpi5"))
    async with (
        make_coordinator(scheduler__batch_interval_s=1.0) as c,
        contextlib.AsyncExitStack() as stack,
    ):
        for d in devices:
            await stack.enter_async_context(d)
        # A claim past the wire bound is refused at decode and counted; the device is never
        # registered from it.
        absurd = report(gflops=MAX_BENCH_GOPS * 10, device_class="rpi5")
        devices[0].client.publish(
            topics.device_topic("default", "absurd", topics.CAPACITY), codec.encode(absurd)
        )
        await eventually(lambda: rejects(c, "invalid") >= 1)
        assert not c.store.devices.device_exists("absurd")
        await online(c, *(d.device_id for d in devices))

        first = await run_batch(c, "a")  # before any observation: claims only
        assert first["liar"] <= TASKS // 4 + 1, first
        assert rejects(c, "bench_claim_above_class_limit") >= 1
        second = await run_batch(c, "b")  # after observations of every device
        assert second["liar"] <= TASKS // 4 + 1, second
        assert c.link.connected
