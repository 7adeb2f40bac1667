from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lepton.agent import handlers
from lepton.agent.handlers import HandlerRegistry, TaskContext
from lepton.protocol.messages import Task
from lepton.sim import device as sim_device
from lepton.sim.device import SimState, scaled_registry, stretch_factor
from lepton.sim.fleet import FleetSpec, build_devices, run_fleet
from lepton.sim.profiles import PROFILES, assign_profiles, parse_mix
from tests.support.agents import Sink
from tests.support.broker import Broker


def test_profile_mix_proportions_are_exact() -> None:
    profiles = assign_profiles(
        20, parse_mix("rpi4=0.4,rpi5=0.3,jetson-orin-nano=0.1,x86-gateway=0.2")
    )
    assert Counter(p.name for p in profiles) == {
        "rpi4": 8,
        "rpi5": 6,
        "jetson-orin-nano": 2,
        "x86-gateway": 4,
    }


def test_parse_mix_rejects_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        parse_mix("rpi9=1")


def test_stretch_follows_profile_and_throttling() -> None:
    task = Task(task_id="t", kind="infer", params={"precision": "fp32"}, expires_at=1e10)
    cool, hot = SimState(), SimState(temperature=85.0)
    rpi4 = PROFILES["rpi4"]
    assert stretch_factor(rpi4, cool, 60.0, task) == pytest.approx(10.0)
    assert stretch_factor(rpi4, hot, 60.0, task) == pytest.approx(20.0)
    # A device faster than the host cannot be made faster than the host.
    assert stretch_factor(PROFILES["jetson-orin-nano"], cool, 60.0, task) == 1.0


async def test_a_slow_profile_uploads_when_its_work_would_be_done(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The work before a handler's ``pace`` point (a training task's upload) is stretched
    there, the rest at the end: a Raspberry Pi 4 on a 60 GFLOP/s host (10x) that computes
    50 ms, uploads, then works 20 ms more, uploads after >= 0.5 s and ends after >= 0.7 s."""
    loop = asyncio.get_running_loop()
    seen: dict[str, float] = {}

    async def work(task: Task, ctx: TaskContext) -> dict[str, object]:
        started = loop.time()
        await asyncio.sleep(0.05)
        assert ctx.services.pace is not None
        await ctx.services.pace(task)
        seen["upload"] = loop.time() - started
        await asyncio.sleep(0.02)
        return {}

    def registry() -> HandlerRegistry:
        r = HandlerRegistry()
        r.register("train", work)
        return r

    monkeypatch.setattr(sim_device, "default_registry", registry)
    monkeypatch.setitem(sim_device.FIRST_USE_IMPORTS, "train", ())
    handler = scaled_registry(PROFILES["rpi4"], SimState(), 60.0).get("train")
    assert handler is not None
    ctx = handlers.TaskContext(device_id="d", state_dir=tmp_path, agent_version="0")
    task = Task(task_id="t", kind="train", params={}, expires_at=1e10)
    started = loop.time()
    await handler(task, ctx)
    took = loop.time() - started
    rest = took - seen["upload"]
    assert seen["upload"] >= 0.5
    assert rest >= 0.2
    # The part before the upload is not stretched again at the end (that would add >= 4.5 s).
    assert rest < seen["upload"]


def test_battery_drains_and_heat_builds_under_load() -> None:
    state = SimState()
    state.last -= 120  # two minutes at full load
    state.advance(PROFILES["rpi4"], busy=1, slots=1)
    assert state.battery < 100.0
    assert state.temperature > 40.0


async def test_fleet_registers_reports_and_runs_tasks(broker: Broker, tmp_path: Path) -> None:
    spec = FleetSpec(
        devices=8,
        state_root=tmp_path,
        broker_port=broker.port,
        data="digits",
        capacity_interval=0.5,
        seed=3,
        crash_per_min=0.0,
    )
    devices = build_devices(spec)
    ids = [d.config.device.id for d in devices]
    # Every device got its own partition; together they are the training set, disjoint.
    sizes = [len(np.load(tmp_path / i / "data" / "digits.npz")["y"]) for i in ids]
    assert all(s >= 8 for s in sizes)
    stop = asyncio.Event()
    async with Sink(broker.port) as sink:
        fleet = asyncio.create_task(run_fleet(devices, stop))
        try:
            await sink.wait(
                lambda: all(sink.state_of(i) == "online" for i in ids), 20, "all online"
            )
            await sink.wait(lambda: set(ids) <= sink.capacity.keys(), 10, "capacity from all")
            for dev in devices:
                report = sink.capacity[dev.config.device.id]
                assert report.device_class == dev.profile.name
                assert report.cpu.count == dev.profile.cores
                assert report.bench is not None
                assert report.bench.fp32_gflops == dev.profile.fp32_gflops
                assert (report.battery is not None) == dev.profile.battery
                assert report.data_sources == ["digits", "digits-test"]
            task = await sink.send_task(ids[0], payload="hi")
            await sink.wait(lambda: len(sink.results_for({task.task_id})) == 1, 10, "echo result")
        finally:
            stop.set()
            await asyncio.wait_for(fleet, 60)
        await sink.wait(lambda: all(sink.state_of(i) == "offline" for i in ids), 10, "all offline")


async def test_crashed_device_comes_back_and_keeps_its_outbox(
    broker: Broker, tmp_path: Path
) -> None:
    spec = FleetSpec(devices=1, state_root=tmp_path, broker_port=broker.port, capacity_interval=0.5)
    (device,) = build_devices(spec)
    dev_id = device.config.device.id
    stop = asyncio.Event()
    async with Sink(broker.port, ack=False) as sink:
        fleet = asyncio.create_task(run_fleet([device], stop))
        try:
            await sink.wait(lambda: sink.state_of(dev_id) == "online", 20, "online")
            task = await sink.send_task(dev_id)
            await sink.wait(lambda: len(sink.results_for({task.task_id})) == 1, 10, "result")
            first = next(iter(sink.results_for({task.task_id}).values()))
            device._drop_link()  # a flap: the broker publishes the will, the agent reconnects
            await sink.wait(
                lambda: any(s.state == "offline" for _, s in sink.states[dev_id]), 10, "will"
            )
            await sink.wait(lambda: sink.state_of(dev_id) == "online", 20, "back online")
            # Unacknowledged, so re-sent after the reconnect with the same result id.
            deliveries = sink.deliveries
            await sink.wait(lambda: sink.deliveries > deliveries, 10, "re-send after reconnect")
            assert next(iter(sink.results_for({task.task_id}).values())).id == first.id
        finally:
            stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fleet, 60)
