"""A coordinator with HTTP off still runs federated jobs: its features are built whether or
not HTTP is enabled. Here it leads, and a second replica (on the same database, data
directory and broker) serves the API that devices download weights from and upload to."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from lepton.coordinator.fl.feature import FLFeature
from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import eventually
from tests.coordinator.fl.conftest import FleetMaker, digits_job, run_job, wait_for_devices
from tests.support.broker import free_port

MakeCoordinator = Callable[..., AbstractAsyncContextManager[Coordinator]]


async def test_a_leader_without_http_runs_a_job_to_the_end(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker
) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    shared = {"mqtt__shared_subscriptions": True}
    async with make_coordinator(
        instance_id="headless", http__enabled=False, http__public_url=api, **shared
    ) as headless:
        assert headless.http is None
        assert headless.api_url is None
        assert any(isinstance(f, FLFeature) for f in headless.features)
        await eventually(lambda: headless.leadership.is_leader, timeout=10)
        async with make_coordinator(instance_id="web", http__port=port, **shared) as web:
            assert web.api_url == api
            fleet = await sim_fleet(web, 3)
            await wait_for_devices(web, 3)
            body = digits_job(fleet.eval_path, rounds=2, clients_per_round=3)
            job = await run_job(web, body, timeout=60)
            assert not web.leadership.is_leader
        assert headless.leadership.is_leader
    assert job["state"] == "done", job
    assert [r["round"] for r in job["history"]] == [1, 2]
    assert all(r["state"] == "closed" and r["accepted"] == 3 for r in job["history"])
    assert job["final_model"]["name"] == "digits"
