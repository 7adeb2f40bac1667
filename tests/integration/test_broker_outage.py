"""Finding 6 of the hardening review: a broker outage must not fail queued work.

The broker is killed with SIGKILL while real agents work through a queue and restarted
after a few seconds, longer than the devices' liveness deadline (3 missed reports of 1 s).
Tasks allow a single attempt, so a requeue that burned an attempt would fail its task:
every task must succeed, each result applied once, and no device be declared offline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import api_client, eventually
from tests.integration.conftest import StartAgent
from tests.support.broker import Broker

pytestmark = pytest.mark.slow

DEVICES = ("pi-a", "pi-b", "pi-c")
TASKS = 90


@pytest.mark.timeout(240)
async def test_broker_sigkill_fails_no_queued_work(
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
    agents: StartAgent,
    broker: Broker,
) -> None:
    async with make_coordinator(tasks__ack_timeout_s=5.0) as coord:
        store = coord.store
        for d in DEVICES:
            agents(broker.port, d, outbox={"resend_after_s": 2.0})

        def reporting() -> bool:
            return all(
                store.devices.device_exists(d) and store.devices.get_device(d).report
                for d in DEVICES
            )

        await eventually(lambda: asyncio.to_thread(reporting), timeout=30, interval=0.2)
        ids: list[str] = []
        async with api_client(coord, timeout=10) as api:
            for i in range(TASKS):
                r = await api.post(
                    "/v1/tasks",
                    json={
                        "kind": "echo",
                        "params": {"sleep_s": 0.5, "payload": i},
                        "max_attempts": 1,
                    },
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])

        def counts() -> dict[str, int]:
            return store.tasks.count_tasks()

        await eventually(lambda: asyncio.to_thread(lambda: counts()["succeeded"] >= 15), timeout=60)
        broker.kill()
        await asyncio.sleep(6.0)  # twice the devices' deadline (3 reports of 1 s)
        broker.start()

        def settled() -> dict[str, int] | None:
            c = counts()
            return c if c["pending"] + c["assigned"] + c["running"] == 0 else None

        final = await eventually(lambda: asyncio.to_thread(settled), timeout=150, interval=0.5)
        applied: dict[str, Any] = {
            t: [r for r in store.results.results_for(t) if r.applied] for t in ids
        }
        deadline_offline = coord.metrics.value(
            "lepton_devices_offline_transitions_total", {"cause": "deadline"}
        )
    assert final["failed"] == 0, final
    assert final["succeeded"] == TASKS, final
    assert {t: len(rs) for t, rs in applied.items() if len(rs) != 1} == {}
    assert deadline_offline == 0
