"""Fixtures for federated jobs end to end: a simulated fleet (real agents) on the test broker,
and helpers to follow a job through the coordinator's API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from lepton.coordinator.service import Coordinator
from lepton.sim.device import VirtualDevice
from lepton.sim.enrol import Enrolment
from lepton.sim.fleet import FleetSpec, build_devices, enrol_devices
from tests.support.api import Endpoint, api_client, endpoint, new_claim
from tests.support.broker import Broker

FAST_MIX: dict[str, float] = {"x86-gateway": 1.0, "jetson-orin-nano": 1.0}


class SimFleet:
    """Virtual devices run as separate tasks, so one can be killed on its own."""

    def __init__(self, devices: list[VirtualDevice], state_root: Path) -> None:
        self.devices = {d.config.device.id: d for d in devices}
        self.state_root = state_root
        self.tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def ids(self) -> list[str]:
        return sorted(self.devices)

    @property
    def eval_path(self) -> Path:
        return self.state_root / "digits-test.npz"

    def start(self) -> None:
        for device_id, device in self.devices.items():
            self.tasks[device_id] = asyncio.create_task(device.run(), name=device_id)

    async def kill(self, device_id: str) -> None:
        """Cut the device's connection (its will fires) and cancel it, without a restart."""
        device = self.devices[device_id]
        device._drop_link()
        task = self.tasks[device_id]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def stop(self) -> None:
        for device in self.devices.values():
            device.stop()
        live = [t for t in self.tasks.values() if not t.done()]
        if not live:
            return
        _done, pending = await asyncio.wait(live, timeout=30)
        for t in pending:
            t.cancel()
        if pending:
            _done, stuck = await asyncio.wait(pending, timeout=10)
            if stuck:  # an error for this test, where waiting on would stall the whole run
                for t in stuck:
                    t.print_stack()
                names = sorted(t.get_name() for t in stuck)
                raise RuntimeError(f"device tasks did not end when cancelled: {names}")
        await asyncio.gather(*live, return_exceptions=True)


class FleetMaker:
    """``await sim_fleet(c, devices=4, mix=..., **spec)``: a started fleet with digits
    partitions whose devices first enrolled with coordinator ``c`` (a running
    :class:`Coordinator` or an :class:`Endpoint`), each with its own identity (broker account,
    HTTP token) from one multi-use claim made through ``c``'s API, as real devices would.
    ``await sim_fleet.enrolled(url, claim, ...)``: the same with a given URL and claim;
    ``sim_fleet.unenrolled(...)``: devices with no identity (tests of the fixture itself)."""

    def __init__(self, broker: Broker, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.fleets: list[SimFleet] = []

    def _spec(self, devices: int, mix: Mapping[str, float] | None, **kw: Any) -> FleetSpec:
        return FleetSpec(
            devices=devices,
            state_root=self.tmp_path / f"fleet{len(self.fleets)}",
            mix=dict(mix or FAST_MIX),
            broker_port=self.broker.port,
            data="digits",
            capacity_interval=0.5,
            keepalive=5,
            seed=kw.pop("seed", 1),
            **kw,
        )

    def _start(self, spec: FleetSpec) -> SimFleet:
        fleet = SimFleet(build_devices(spec), spec.state_root)
        fleet.start()
        self.fleets.append(fleet)
        return fleet

    async def __call__(
        self,
        c: Coordinator | Endpoint,
        devices: int = 4,
        *,
        mix: Mapping[str, float] | None = None,
        **kw: Any,
    ) -> SimFleet:
        claim = await new_claim(c, uses=devices)
        return await self.enrolled(endpoint(c).url, claim, devices, mix=mix, **kw)

    def unenrolled(
        self, devices: int = 4, *, mix: Mapping[str, float] | None = None, **kw: Any
    ) -> SimFleet:
        return self._start(self._spec(devices, mix, **kw))

    async def enrolled(
        self,
        url: str,
        claim: str,
        devices: int = 4,
        *,
        mix: Mapping[str, float] | None = None,
        **kw: Any,
    ) -> SimFleet:
        spec = self._spec(devices, mix, enrolment=Enrolment(url, claim), **kw)
        await enrol_devices(spec)
        return self._start(spec)


@pytest.fixture
async def sim_fleet(broker: Broker, tmp_path: Path) -> AsyncIterator[FleetMaker]:
    """A :class:`FleetMaker`; every fleet it started is stopped at the end."""
    maker = FleetMaker(broker, tmp_path)
    yield maker
    for fleet in maker.fleets:
        await fleet.stop()


def digits_job(eval_path: Path, **overrides: Any) -> dict[str, Any]:
    """A short digits job that converges in a few rounds on a handful of devices."""
    job: dict[str, Any] = {
        "name": "digits",
        "model": "lepton.models.digits:DigitsCNN",
        "data": "digits",
        "rounds": 3,
        "clients_per_round": 4,
        "over_select": 0.0,
        "epochs": 5,
        "batch_size": 16,
        "lr": 0.05,
        "momentum": 0.9,
        "deadline_s": 20.0,
        "result_grace_s": 5.0,
        "eval": str(eval_path),
        "final_format": "torch",
        "compression": "int8",
    }
    job.update(overrides)
    return job


async def wait_for_devices(api: Coordinator | Endpoint, n: int, *, timeout: float = 20.0) -> None:
    """Until ``n`` devices are online with a capacity report that lists the torch runtime."""
    deadline = time.monotonic() + timeout
    async with api_client(api) as client:
        while True:
            devices = (await client.get("/v1/devices", params={"state": "online"})).json()
            ready = [d for d in devices if "torch" in (d.get("runtimes") or [])]
            if len(ready) >= n:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(ready)} of {n} devices ready: {devices}")
            await asyncio.sleep(0.2)


async def wait_job(
    api: Coordinator | Endpoint,
    job_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout: float,
    interval: float = 0.2,
) -> dict[str, Any]:
    """Poll ``GET /v1/fl/jobs/{id}`` until ``predicate(job)`` holds; the job."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    async with api_client(api, timeout=5) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                last = (await client.get(f"/v1/fl/jobs/{job_id}")).json()
                if predicate(last):
                    return last
            if time.monotonic() > deadline:
                summary = {k: last.get(k) for k in ("state", "round", "error")}
                raise AssertionError(f"job {job_id} did not get there in {timeout}s: {summary}")
            await asyncio.sleep(interval)


async def run_job(
    api: Coordinator | Endpoint, body: Mapping[str, Any], *, timeout: float
) -> dict[str, Any]:
    """Start a job (``POST /v1/fl/jobs``) and wait until it ends; the job."""
    async with api_client(api) as client:
        r = await client.post("/v1/fl/jobs", json=dict(body))
    assert r.status_code == 201, r.text
    return await wait_job(api, r.json()["id"], ended, timeout=timeout)


def ended(job: dict[str, Any]) -> bool:
    return job.get("state") in ("done", "failed", "stopped")
