"""A federated job cancels the train tasks nothing will use: a closed round its stragglers'
(unless late updates are folded: ``test_late_updates_are_lost_or_folded_into_a_later_round``
keeps that working), a stopped job all of its own. Real agents on the test broker."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.service import Coordinator
from lepton.coordinator.store import IN_FLIGHT, TaskRecord
from tests.coordinator.conftest import eventually
from tests.coordinator.fl.conftest import (
    FleetMaker,
    digits_job,
    ended,
    wait_for_devices,
    wait_job,
)
from tests.support.api import api_client

MakeCoordinator = Callable[..., AbstractAsyncContextManager[Coordinator]]


def job_tasks(c: Coordinator, job_id: str) -> dict[str, TaskRecord]:
    """The job's train tasks by id."""
    ids = {tid for r in FLStore(c.store.engine).list_rounds(job_id) for tid in r.tasks.values()}
    return {tid: c.store.tasks.get_task(tid) for tid in ids}


async def test_a_closed_round_leaves_no_straggler_training(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker
) -> None:
    """Two fast devices and a Raspberry Pi 5, all three asked, two updates needed: round 1
    closes on the fast ones while the Pi still trains (as in the late-update test). Its task
    is cancelled as the round closes; the Pi stops training and uploads nothing."""
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 3, mix={"x86-gateway": 2.0, "rpi5": 1.0}, host_gflops=32.0)
        pi = next(d for d in fleet.ids if "rpi5" in d)
        assert c.api_url is not None
        await wait_for_devices(c, 3)
        body = digits_job(
            fleet.eval_path,
            rounds=2,
            clients_per_round=2,
            min_results=2,
            over_select=0.5,
            epochs=2,
            late={"policy": "drop"},
        )
        async with api_client(c) as api:
            r = await api.post("/v1/fl/jobs", json=body)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
        job = await wait_job(c, job_id, ended, timeout=90)
        assert job["state"] == "done", job
        fl = FLStore(c.store.engine)
        first = fl.list_rounds(job_id)[0]
        assert sorted(first.selected) == fleet.ids
        assert pi not in (first.contributors or []), "the Pi was not late: nothing to test"
        straggler = first.tasks[pi]

        def answered() -> TaskRecord | None:
            t = c.store.tasks.get_task(straggler)
            return t if t.state == "cancelled" and t.result_id is not None else None

        task = await eventually(answered, timeout=20)
        assert task.cancel_reason == "round_closed"
        (result,) = c.store.results.results_for(straggler)
        assert (result.status, result.applied) == ("cancelled", False)
        assert pi not in {u.device_id for u in fl.updates_for(job_id, 1)}  # nothing uploaded
        # No train task of the job is left running anywhere. The last round's straggler is
        # cancelled as that round closes, which the test reaches at about the same moment as
        # its agent's answer, so its end is waited for like round 1's.

        def all_ended() -> dict[str, TaskRecord] | None:
            tasks = job_tasks(c, job_id)
            live = [t for t in tasks.values() if t.state in IN_FLIGHT or t.state == "pending"]
            return None if live else tasks

        tasks = await eventually(all_ended, timeout=20)
        for t in tasks.values():
            assert t.state in ("succeeded", "cancelled"), (t.id, t.state)
            if t.state == "cancelled":
                assert t.cancel_reason in ("round_closed", "job_done"), t.cancel_reason
    assert c.metrics.value("lepton_fl_tasks_cancelled_total", {"reason": "round_closed"}) >= 1


async def test_a_stopped_job_cancels_its_tasks(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker
) -> None:
    """Slow devices keep round 1 open; a stop cancels the round and every train task of the
    job, and the devices stop training (each answers with a cancelled result)."""
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 2, mix={"rpi4": 1.0})
        assert c.api_url is not None
        await wait_for_devices(c, 2)
        body = digits_job(fleet.eval_path, clients_per_round=2, epochs=30, deadline_s=120.0)
        async with api_client(c) as api:
            r = await api.post("/v1/fl/jobs", json=body)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]

            def training() -> bool:
                tasks = job_tasks(c, job_id)
                return len(tasks) == 2 and all(t.state == "running" for t in tasks.values())

            await eventually(training, timeout=30, interval=0.2)
            assert (await api.post(f"/v1/fl/jobs/{job_id}/stop")).status_code == 200
            job = await wait_job(c, job_id, ended, timeout=20)
        assert job["state"] == "stopped"

        def all_answered() -> dict[str, Any] | None:
            tasks = job_tasks(c, job_id)
            done = all(t.state == "cancelled" and t.result_id for t in tasks.values())
            return tasks if done else None

        tasks = await eventually(all_answered, timeout=20)
        assert {t.cancel_reason for t in tasks.values()} == {"job_stopped"}
        for tid in tasks:
            (result,) = c.store.results.results_for(tid)
            assert (result.status, result.applied) == ("cancelled", False)
    assert c.metrics.value("lepton_fl_tasks_cancelled_total", {"reason": "job_stopped"}) == 2
