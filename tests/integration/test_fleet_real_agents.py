"""The coordinator with real agent processes on a real broker: devices appear, tasks flow,
a killed device goes offline and its running task is reassigned and finishes elsewhere."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

import pytest

from lepton.coordinator.auth.enrolment_store import EnrolmentStore
from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import api_client, eventually
from tests.integration.conftest import StartAgent

pytestmark = pytest.mark.slow


async def test_devices_tasks_offline_and_reassignment(
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
    agents: StartAgent,
) -> None:
    async with make_coordinator() as coord:
        port = coord.config.mqtt.port
        # Each enrols first, as a real device does: it runs with its own identity.
        procs = {d: agents(port, d, coordinator=coord) for d in ("pi-a", "pi-b")}
        async with api_client(coord, timeout=10) as api:

            async def devices() -> dict[str, Any]:
                return {d["id"]: d for d in (await api.get("/v1/devices")).json()}

            async def online() -> bool:
                # Online (the state message) and reporting (the first capacity report, which
                # may be stored a moment later).
                devs = await devices()
                return all(
                    devs.get(d, {}).get("state") == "online" and devs[d].get("capacity")
                    for d in procs
                )

            await eventually(online, timeout=30, interval=0.2)
            devs = await devices()
            assert devs["pi-a"]["capacity"]["slots_total"] == 2
            enrolled = EnrolmentStore(coord.store.engine)
            assert all(enrolled.identity(d) is not None for d in procs)

            # Tasks flow end to end and are spread over both devices.
            ids = []
            for i in range(12):
                r = await api.post(
                    "/v1/tasks", json={"kind": "echo", "params": {"sleep_s": 0.2, "payload": i}}
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])

            async def all_done() -> list[dict[str, Any]] | None:
                tasks = [(await api.get(f"/v1/tasks/{t}")).json() for t in ids]
                return tasks if all(t["state"] == "succeeded" for t in tasks) else None

            tasks = await eventually(all_done, timeout=30, interval=0.2)
            assert sorted(t["output"]["echo"] for t in tasks) == list(range(12))
            assert {t["device_id"] for t in tasks} == {"pi-a", "pi-b"}

            # A long task; kill whichever device runs it, mid-task.
            r = await api.post(
                "/v1/tasks",
                json={
                    "kind": "echo",
                    "params": {"sleep_s": 4.0, "payload": "long"},
                    "max_attempts": 3,
                },
            )
            long_id = r.json()["id"]

            async def running() -> dict[str, Any] | None:
                t = (await api.get(f"/v1/tasks/{long_id}")).json()
                return t if t["state"] == "running" else None

            first = await eventually(running, timeout=15, interval=0.1)
            victim = first["device_id"]
            survivor = next(d for d in procs if d != victim)
            procs[victim].signal(signal.SIGKILL)
            procs[victim].wait()

            async def victim_offline() -> bool:
                return (await devices())[victim]["state"] == "offline"

            await eventually(victim_offline, timeout=10, interval=0.1)

            async def finished() -> dict[str, Any] | None:
                t = (await api.get(f"/v1/tasks/{long_id}")).json()
                return t if t["state"] in ("succeeded", "failed", "expired") else None

            done = await eventually(finished, timeout=30, interval=0.2)
            assert done["state"] == "succeeded"
            assert done["device_id"] == survivor
            assert done["attempt"] >= 2
            assert done["output"]["echo"] == "long"
            detail = (await api.get(f"/v1/tasks/{long_id}")).json()
            assert [a["device_id"] for a in detail["attempts"]][:1] == [victim]
