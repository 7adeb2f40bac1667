"""The simulator's devices enrol with one multi-use claim (against a test server speaking the
enrolment contract), run with their identities on a real broker, and keep them on restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lepton.agent.enrol import EnrolError
from lepton.sim.enrol import Enrolment
from lepton.sim.fleet import FleetSpec, build_devices, enrol_devices, run_fleet
from tests.support.agents import Sink
from tests.support.broker import Broker
from tests.support.enrolserver import FakeEnrolment
from tests.support.httpserver import HttpServer


async def test_a_fleet_enrols_with_one_claim_and_runs_with_its_identities(
    broker: Broker, tmp_path: Path
) -> None:
    with HttpServer() as server:
        fake = FakeEnrolment(server.base_url, broker_port=broker.port, fleet="simfarm")
        fake.unavailable = 3  # the coordinator's broker is briefly away: retried
        server.post_handler = fake
        claim = fake.claim(uses=12)
        spec = FleetSpec(
            devices=12,
            state_root=tmp_path,
            fleet="ignored-when-enrolled",
            broker_port=1,  # ditto: the identity names the broker
            capacity_interval=0.5,
            seed=5,
            enrolment=Enrolment(server.base_url, claim, concurrency=4, backoff=(0.01, 0.05)),
        )
        assert await enrol_devices(spec) == 12
        assert fake.claims[claim].uses == 0
        devices = build_devices(spec)
        ids = [d.config.device.id for d in devices]
        assert sorted(ids) == sorted(fake.enrolled)
        for dev in devices:
            sent = fake.enrolled[dev.config.device.id]
            assert dev.config.device.fleet == "simfarm"
            assert dev.config.broker.port == broker.port
            assert dev.config.broker.password == sent.mqtt.password
            assert dev.config.fetch.http_token == sent.http_token
            ident = json.loads((tmp_path / dev.config.device.id / "identity.json").read_text())
            assert ident["device_id"] == dev.config.device.id
        calls = fake.calls
        # A restarted simulation keeps its identities: no request, no claim needed.
        assert await enrol_devices(spec) == 0
        assert fake.calls == calls
        stop = asyncio.Event()
        async with Sink(broker.port, fleet="simfarm") as sink:
            fleet = asyncio.create_task(run_fleet(devices, stop))
            try:
                await sink.wait(
                    lambda: all(sink.state_of(i) == "online" for i in ids), 20, "all online"
                )
            finally:
                stop.set()
                await asyncio.wait_for(fleet, 60)


async def test_a_spent_claim_stops_the_simulation_with_its_reason(tmp_path: Path) -> None:
    with HttpServer() as server:
        fake = FakeEnrolment(server.base_url)
        server.post_handler = fake
        spec = FleetSpec(
            devices=5,
            state_root=tmp_path,
            enrolment=Enrolment(server.base_url, fake.claim(uses=3), concurrency=2),
        )
        with pytest.raises(EnrolError) as err:
            await enrol_devices(spec)
        assert err.value.reason == "claim_used"
        with pytest.raises(ValueError, match="not enrolled"):
            build_devices(spec)
