"""The running coordinator against a real mosquitto, driven by simulated devices."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

from lepton.coordinator.service import Coordinator
from lepton.coordinator.store import TaskRecord
from tests.coordinator.conftest import eventually
from tests.support.api import api_client
from tests.support.broker import Broker
from tests.support.device import FakeDevice

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


async def submit(c: Coordinator, **body: object) -> str:
    async with api_client(c) as http:
        r = await http.post("/v1/tasks", json={"kind": "echo", **body})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


async def task_in(c: Coordinator, task_id: str, *states: str, timeout: float = 10) -> TaskRecord:
    def check() -> TaskRecord | None:
        t = c.store.tasks.get_task(task_id)
        return t if t.state in states else None

    return await eventually(lambda: asyncio.to_thread(check), timeout=timeout)  # type: ignore[no-any-return]


async def online(c: Coordinator, *device_ids: str) -> None:
    def check() -> bool:
        return all(
            c.store.devices.device_exists(d)
            and c.store.devices.get_device(d).report is not None
            and c.store.devices.get_device(d).state == "online"
            for d in device_ids
        )

    await eventually(lambda: asyncio.to_thread(check))


async def test_device_appears_with_its_capacity(coordinator: Coordinator, broker: Broker) -> None:
    async with FakeDevice(broker.port, "pi-1", slots=3, interval_s=0.2):
        await online(coordinator, "pi-1")
        dev = coordinator.store.devices.get_device("pi-1")
        assert dev.agent_version == "sim-1"
        assert dev.device_class == "rpi5"
        assert dev.report_interval_s == 0.2
        assert dev.report is not None
        assert dev.report["slots"]["total"] == 3
        history = coordinator.store.devices.capacity_history("pi-1")
        assert history


async def test_echo_task_end_to_end(coordinator: Coordinator, broker: Broker) -> None:
    async with FakeDevice(broker.port, "pi-1", interval_s=0.2) as dev:
        await online(coordinator, "pi-1")
        tid = await submit(coordinator, params={"payload": {"x": [1, 2]}}, demand_gops=2.0)
        task = await task_in(coordinator, tid, "succeeded")
        assert task.output == {"echo": {"x": [1, 2]}}
        assert task.device_id == "pi-1"
        assert task.attempt == 1
        assert task.explanation is not None
        assert task.explanation["device_id"] == "pi-1"
        # The result was acknowledged after it was applied, so the device dropped it.
        await dev.wait_until(lambda: not dev.outbox and bool(dev.acked))
        assert dev.executions[tid] == 1
        (attempt,) = coordinator.store.tasks.attempts(tid)
        assert (attempt.outcome, attempt.acked_at is not None) == ("succeeded", True)
        # The measured duration reached the estimator and was persisted.
        snapshot = await eventually(coordinator.store.estimates.load_estimates)
        assert any(row[0] == "pi-1" for row in snapshot["rates"])
        assert coordinator.store.estimates.pending_observations() == []
        m = coordinator.metrics
        assert m.value("lepton_ingest_messages_total", {"channel": "capacity"}) >= 1
        assert m.value("lepton_results_total", {"outcome": "applied"}) == 1
        assert m.value("lepton_scheduler_solve_seconds_count") >= 1
        assert m.value("lepton_leader") == 1
        async with api_client(coordinator) as http:
            text = (await http.get("/metrics")).text
        assert 'lepton_tasks{state="succeeded"} 1.0' in text
        assert 'lepton_devices{state="online"} 1.0' in text


async def test_tasks_spread_over_devices(coordinator: Coordinator, broker: Broker) -> None:
    async with (
        FakeDevice(broker.port, "a", slots=1, interval_s=0.2, run_s=0.3) as a,
        FakeDevice(broker.port, "b", slots=1, interval_s=0.2, run_s=0.3) as b,
    ):
        await online(coordinator, "a", "b")
        ids = [await submit(coordinator) for _ in range(6)]
        for tid in ids:
            await task_in(coordinator, tid, "succeeded", timeout=15)
        assert a.executions
        assert b.executions
        assert sum(a.executions.values()) + sum(b.executions.values()) == 6


async def test_last_will_requeues_to_another_device(
    coordinator: Coordinator, broker: Broker
) -> None:
    # A long report interval: the will, not the report deadline, must take it offline.
    stuck = FakeDevice(broker.port, "stuck", interval_s=5.0, behaviour="ack_only")
    await stuck.__aenter__()
    try:
        await online(coordinator, "stuck")
        tid = await submit(coordinator)
        await task_in(coordinator, tid, "running")
    finally:
        await stuck.close(graceful=False)  # the broker publishes the Last Will
    await eventually(lambda: coordinator.store.devices.get_device("stuck").state == "offline")
    assert coordinator.store.devices.get_device("stuck").offline_reason == "last will"
    async with FakeDevice(broker.port, "healthy", interval_s=0.2):
        task = await task_in(coordinator, tid, "succeeded")
    assert task.device_id == "healthy"
    assert task.attempt == 2
    assert [(a.device_id, a.outcome) for a in coordinator.store.tasks.attempts(tid)] == [
        ("stuck", "device_offline"),
        ("healthy", "succeeded"),
    ]


async def test_missed_reports_mark_offline_and_requeue(
    coordinator: Coordinator, broker: Broker
) -> None:
    async with FakeDevice(broker.port, "quiet", interval_s=0.2, behaviour="ack_only") as dev:
        await online(coordinator, "quiet")
        tid = await submit(coordinator)
        await task_in(coordinator, tid, "running")
        dev.reporting = False  # alive on the broker, but silent
        await eventually(
            lambda: coordinator.store.devices.get_device("quiet").state == "offline", timeout=5
        )
        assert coordinator.store.devices.get_device("quiet").offline_reason == "missed reports"
        task = coordinator.store.tasks.get_task(tid)
        assert task.state in ("pending", "assigned")  # taken back; no other device to run it
        assert coordinator.store.tasks.attempts(tid)[0].outcome == "device_offline"
        dev.reporting = True
        await eventually(lambda: coordinator.store.devices.get_device("quiet").state == "online")


async def test_refusals_retry_with_backoff_then_fail(
    coordinator: Coordinator, broker: Broker
) -> None:
    async with FakeDevice(broker.port, "busy", interval_s=0.2, behaviour="refuse"):
        await online(coordinator, "busy")
        tid = await submit(coordinator, max_attempts=3)
        task = await task_in(coordinator, tid, "failed")
    assert task.attempt == 3
    assert "queue_full" in (task.last_error or "")
    attempts = coordinator.store.tasks.attempts(tid)
    assert [a.outcome for a in attempts] == ["refused"] * 3
    # Exponential backoff between attempts (0.1 s, then 0.2 s, less jitter).
    gaps = [b.assigned_at - (a.finished_at or 0.0) for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.08
    assert gaps[1] >= 0.16


async def test_failed_results_retry_then_fail(coordinator: Coordinator, broker: Broker) -> None:
    async with FakeDevice(broker.port, "flaky", interval_s=0.2, behaviour="fail") as dev:
        await online(coordinator, "flaky")
        tid = await submit(coordinator, max_attempts=2)
        task = await task_in(coordinator, tid, "failed")
        assert task.last_error == "simulated failure"
        await dev.wait_until(lambda: not dev.outbox)
    assert [r.status for r in coordinator.store.results.results_for(tid)] == ["failed", "failed"]


async def test_pending_task_expires(coordinator: Coordinator) -> None:
    tid = await submit(coordinator, expires_in_s=0.3)
    task = await task_in(coordinator, tid, "expired", timeout=5)
    assert task.attempt == 0


async def test_unplaceable_task_says_why(coordinator: Coordinator, broker: Broker) -> None:
    async with FakeDevice(broker.port, "pi-1", interval_s=0.2):
        await online(coordinator, "pi-1")
        tid = await submit(coordinator, runtime="tflite")
        await eventually(lambda: coordinator.store.tasks.get_task(tid).explanation is not None)
        task = coordinator.store.tasks.get_task(tid)
        assert task.state == "pending"
        assert task.last_error == "no feasible device: runtime x1"
        async with api_client(coordinator) as http:
            body = (await http.get(f"/v1/tasks/{tid}/explain")).json()
        assert body["explanation"]["reason"] == "no feasible device: runtime x1"
        assert body["explanation"]["filtered"][0]["reason"] == "runtime"


async def test_survives_broker_restart(coordinator: Coordinator, broker: Broker) -> None:
    async with FakeDevice(broker.port, "pi-1", interval_s=0.2):
        await online(coordinator, "pi-1")
    broker.stop()
    await eventually(lambda: not coordinator.link.connected)
    broker.start()
    assert await coordinator.link.wait_connected(15)
    async with FakeDevice(broker.port, "pi-2", interval_s=0.2):
        await online(coordinator, "pi-2")
        tid = await submit(coordinator, device_id="pi-2")
        await task_in(coordinator, tid, "succeeded")


async def test_stop_drains_and_releases_the_lease(
    make_coordinator: MakeCoordinator, broker: Broker
) -> None:
    async with make_coordinator() as c:
        await eventually(lambda: c.leadership.is_leader)
        store = c.store
        async with FakeDevice(broker.port, "pi-1", interval_s=0.2):
            await online(c, "pi-1")
    lease = store.leases.lease_holder("scheduler")
    assert lease is not None
    assert lease.expires_at == 0.0  # released on a clean stop


# pytest's filterwarnings = error (pyproject) turns FastAPI's "Duplicate Operation ID"
# warning into a failure here.
async def test_model_registry_routes_are_served(coordinator: Coordinator) -> None:
    async with api_client(coordinator) as http:
        assert (await http.get("/v1/models")).json() == {"models": []}
        assert (await http.get("/v1/blobs/" + "0" * 64)).status_code == 404
        assert (await http.head("/v1/blobs/" + "0" * 64)).status_code == 404
        spec = (await http.get("/openapi.json")).json()
    assert set(spec["paths"]["/v1/blobs/{digest}"]) == {"get", "head"}
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
