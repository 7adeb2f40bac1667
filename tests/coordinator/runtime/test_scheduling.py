"""The scheduler loop without a broker: a store, a recording link, and cycles run by hand."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from lepton.coordinator.config import load
from lepton.coordinator.errors import UnavailableError
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.dispatcher import DeviceViews, Scheduler, jsonable, unplaced_retry_s
from lepton.coordinator.scheduler import CostModel, ThroughputEstimator
from lepton.coordinator.store import RetryPolicy, Store
from lepton.protocol import codec
from lepton.protocol.messages import Result, Task, TaskAck
from tests.coordinator.factories import new_task, sample


class RecordingLink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Task]] = []
        self.down = False
        self._up = asyncio.Event()
        self._up.set()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self) -> bool:
        await self._up.wait()
        return True

    def set_connected(self, up: bool) -> None:
        if up:
            self._up.set()
        else:
            self._up.clear()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        if self.down:
            raise UnavailableError("broker", "down for the test")
        self.sent.append((topic, codec.decode(payload, Task)))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(
        f"sqlite:///{tmp_path / 's.db'}",
        retry=RetryPolicy(base_s=0.01, max_s=0.01),
        sqlite_synchronous="normal",
    )


def make(store: Store, **overrides: object) -> tuple[Scheduler, RecordingLink]:
    cfg = load(env={}, overrides={"instance_id": "t", **overrides})
    link = RecordingLink()
    scheduler = Scheduler(
        cfg,
        link,  # type: ignore[arg-type]
        Metrics(),
        devices=store.devices,
        tasks=store.tasks,
        cancels=store.cancels,
        estimates=store.estimates,
    )
    return scheduler, link


def model(s: Scheduler) -> CostModel:
    return CostModel(s.weights, s.estimator)


async def test_cycle_places_publishes_and_explains(store: Store) -> None:
    now = time.time()
    # Different classes: within one class a claim above the peers' median is not believed.
    fast = sample("fast", received_at=now, gflops=100.0, device_class="jetson-orin-nano")
    store.devices.record_capacity([fast, sample("slow", received_at=now, gflops=1.0)])
    store.tasks.submit(new_task("t1", demand_gops=10.0))
    s, link = make(store)
    assert await s.cycle(None, model(s)) == 1
    ((topic, msg),) = link.sent
    assert topic == "lepton/v1/default/cmd/fast/task"
    assert (msg.task_id, msg.attempt, msg.kind) == ("t1", 1, "echo")
    task = store.tasks.get_task("t1")
    assert task.state == "assigned"
    assert task.dispatched_at is not None
    e = task.explanation
    assert e is not None
    assert e["complete"] is True
    assert [c["device_id"] for c in e["candidates"]] == ["fast", "slow"]
    assert e["candidates"][0]["terms"]["compute_s"] < e["candidates"][1]["terms"]["compute_s"]


async def test_unsent_tasks_are_resent_as_the_same_message(store: Store) -> None:
    store.devices.record_capacity([sample("a")])
    store.tasks.submit(new_task("t1"))
    s, link = make(store, **{"tasks.redispatch_after_s": 0.01})
    link.down = True
    await s.cycle(None, model(s))
    assert store.tasks.get_task("t1").dispatched_at is None
    link.down = False
    time.sleep(0.02)
    await s.cycle(None, model(s))
    ((_, msg),) = link.sent
    assert msg.id == store.tasks.get_task("t1").dispatch_id
    assert store.tasks.get_task("t1").dispatched_at is not None


async def test_no_cycle_runs_while_the_broker_link_is_down(store: Store) -> None:
    store.devices.record_capacity([sample("a")])
    store.tasks.submit(new_task("t1"))
    s, link = make(store, **{"scheduler.batch_interval_s": 0.01})
    link.set_connected(False)
    leading = asyncio.create_task(s.lead(None))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.3)  # some thirty batch intervals
        assert (s.cycles, link.sent) == (0, [])
        assert store.tasks.get_task("t1").state == "pending"
        link.set_connected(True)
        async with asyncio.timeout(10):
            while not link.sent:
                await asyncio.sleep(0.01)
        assert link.sent[0][1].task_id == "t1"
    finally:
        leading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leading


async def test_large_batches_keep_only_the_chosen_terms(store: Store) -> None:
    now = time.time()
    store.devices.record_capacity([sample(f"d{i}", received_at=now) for i in range(5)])
    for i in range(5):
        store.tasks.submit(new_task(f"t{i}"))
    s, _ = make(store, **{"scheduler.time_budget_s": 1e-9})
    assert await s.cycle(None, model(s)) == 5
    e = store.tasks.get_task("t0").explanation
    assert e is not None
    assert e["complete"] is False
    assert len(e["candidates"]) == 1
    assert e["candidates"][0]["chosen"] is True


async def test_measured_durations_reach_the_estimator(store: Store) -> None:
    store.devices.record_capacity([sample("a", gflops=10.0)])
    store.tasks.submit(new_task("t1", demand_gops=8.0, model_class="cnn"))
    s, _ = make(store)
    await s.cycle(None, model(s))
    store.tasks.apply_acks("a", [TaskAck(task_id="t1", accepted=True)], time.time())
    res = Result(task_id="t1", status="succeeded", attempt=1, started_at=100.0, finished_at=104.0)
    store.results.apply_results("a", [res], time.time())
    await s.cycle(None, model(s))
    assert store.estimates.pending_observations() == []
    snap = store.estimates.load_estimates()
    assert snap is not None
    ((dev, mc, prec, rate, n, _prior),) = snap["rates"]
    assert (dev, mc, prec, n) == ("a", "cnn", "fp32", 1)
    assert rate == pytest.approx(2.0, rel=0.6)  # moved from the bench prior toward 8 GOP / 4 s
    fresh = ThroughputEstimator()
    fresh.load(snap)
    assert fresh.observations("a", "cnn", "fp32") == 1


def test_device_views_count_placed_load() -> None:
    rec = sample("a", slots=2, busy=0)
    from lepton.coordinator.store import DeviceRecord

    row = DeviceRecord(
        id="a",
        fleet="default",
        state="online",
        state_at=0.0,
        offline_reason=None,
        device_class=rec.device_class,
        device_model="",
        agent_version="",
        runtimes=[],
        accelerators=[],
        tags=[],
        groups=[],
        first_seen=0.0,
        last_seen=0.0,
        report=rec.report,
        report_ts=rec.report_ts,
        report_interval_s=5.0,
        reports=1,
    )
    (state,) = DeviceViews().build([row], {"a": 3})
    assert (state.slots_total, state.slots_busy, state.queued) == (2, 2, 1)
    (state,) = DeviceViews().build([row], {})
    assert (state.slots_busy, state.queued) == (0, 0)


def test_jsonable_drops_non_finite() -> None:
    assert jsonable({"a": float("inf"), "b": [1.0, float("nan")], "c": (1, "x")}) == {
        "a": None,
        "b": [1.0, None],
        "c": [1, "x"],
    }


def test_unplaceable_tasks_are_retried_less_often_as_they_wait() -> None:
    assert unplaced_retry_s(0.0, 1.0) == 1.0
    assert unplaced_retry_s(50.0, 1.0) == 5.0
    assert unplaced_retry_s(10_000.0, 1.0) == 10.0
