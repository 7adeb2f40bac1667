"""Finding 5 of the hardening review, end to end: a device that borrows another device's
client id on the shipped broker templates neither disconnects it nor costs it its work.

A real agent (dev-a) runs a task for a real coordinator; dev-b, with its own valid
credentials, connects again and again with dev-a's client id and a clean start (which, with
the earlier templates, ended dev-a's session and published its Last Will).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import coordinator_config, eventually
from tests.deploy.conftest import ShippedFactory
from tests.support.agents import AgentProcess, write_agent_config
from tests.support.api import api_client

pytestmark = pytest.mark.slow

USERS = {u: f"pw-{u}" for u in ("dev-a", "dev-b", "coordinator")}


@pytest.fixture
def agent_a(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for p in started:
        p.kill()


async def test_borrowed_client_id_does_not_take_a_device_offline(
    shipped_broker_factory: ShippedFactory, tmp_path: Path, agent_a: list[AgentProcess]
) -> None:
    broker = shipped_broker_factory(USERS)
    cfg = coordinator_config(
        tmp_path, broker.port, mqtt__username="coordinator", mqtt__password="pw-coordinator"
    )
    async with Coordinator(cfg) as coord:
        assert await coord.link.wait_connected(10)
        conf = write_agent_config(
            tmp_path / "dev-a.toml",
            device_id="dev-a",
            port=broker.port,
            state_dir=tmp_path / "dev-a",
            broker={"username": "dev-a", "password": "pw-dev-a"},
        )
        proc = AgentProcess(config_path=conf, log_path=tmp_path / "dev-a.log")
        proc.start()
        agent_a.append(proc)

        def reporting() -> bool:
            return (
                coord.store.devices.device_exists("dev-a")
                and coord.store.devices.get_device("dev-a").report is not None
            )

        await eventually(lambda: asyncio.to_thread(reporting), timeout=30, interval=0.2)
        async with api_client(coord) as api:
            r = await api.post(
                "/v1/tasks", json={"kind": "echo", "params": {"sleep_s": 4.0, "payload": "x"}}
            )
            assert r.status_code == 201, r.text
            tid = r.json()["id"]
        await eventually(lambda: coord.store.tasks.get_task(tid).state == "running", timeout=15)

        for _ in range(5):
            async with aiomqtt.Client(
                "127.0.0.1",
                broker.port,
                username="dev-b",
                password="pw-dev-b",
                identifier="dev-a",
                clean_session=True,
            ):
                await asyncio.sleep(0.2)

        def finished() -> bool:
            return coord.store.tasks.get_task(tid).state in ("succeeded", "failed", "expired")

        await eventually(lambda: asyncio.to_thread(finished), timeout=20, interval=0.2)
        task = coord.store.tasks.get_task(tid)
        attempts = coord.store.tasks.attempts(tid)
        device = coord.store.devices.get_device("dev-a")
        wills = coord.metrics.value("lepton_devices_offline_transitions_total", {"cause": "will"})
    assert task.state == "succeeded"
    assert [(a.device_id, a.outcome) for a in attempts] == [("dev-a", "succeeded")]
    assert device.state == "online"
    assert wills == 0
    assert "broker connection lost" not in proc.log()
