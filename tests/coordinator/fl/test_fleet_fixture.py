"""The ``sim_fleet`` fixture can enrol its devices (a claim and the coordinator's URL), so FL
tests run with per-device identities once the coordinator enrols; without, as before."""

from __future__ import annotations

from tests.coordinator.fl.conftest import FleetMaker
from tests.support.agents import Sink
from tests.support.broker import Broker
from tests.support.enrolserver import FakeEnrolment
from tests.support.httpserver import HttpServer


async def test_an_enrolled_sim_fleet_runs_with_its_identities(
    broker: Broker, sim_fleet: FleetMaker
) -> None:
    with HttpServer() as server:
        fake = FakeEnrolment(server.base_url, broker_port=broker.port)
        server.post_handler = fake
        fleet = await sim_fleet.enrolled(server.base_url, fake.claim(uses=3), devices=3)
        assert sorted(fake.enrolled) == fleet.ids
        for device_id, device in fleet.devices.items():
            assert device.config.fetch.http_token == fake.enrolled[device_id].http_token
        async with Sink(broker.port) as sink:
            await sink.wait(
                lambda: all(sink.state_of(i) == "online" for i in fleet.ids), 20, "online"
            )
        plain = sim_fleet.unenrolled(devices=2, id_prefix="plain")
        assert all(d.config.fetch.http_token is None for d in plain.devices.values())
