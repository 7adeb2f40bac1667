"""Task cancellation end to end: the coordinator, a real broker, a real agent process and the
``lepton`` CLI. A pending task is cancelled before any device exists; a queued and a running
task are cancelled on the agent; a device that ignores cancels (an older agent) delivers a
success after the cancel, which is stored and acknowledged but not applied."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from lepton.coordinator.cli import main
from lepton.coordinator.cli.exitcodes import EXIT_TASK_FINISHED
from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import api_client, cli_token, eventually
from tests.integration.conftest import StartAgent
from tests.support.device import FakeDevice

pytestmark = pytest.mark.slow

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


async def lepton(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a worker thread (the coordinator shares this event loop)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def state_of(api: httpx.AsyncClient, task_id: str, *states: str) -> dict[str, Any] | None:
    task: dict[str, Any] = (await api.get(f"/v1/tasks/{task_id}")).json()
    return task if task["state"] in states else None


async def test_a_pending_task_is_cancelled_before_any_device_exists(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    api_url = coordinator.api_url or ""
    cli_token(monkeypatch, coordinator)
    async with api_client(coordinator, timeout=10) as api:
        r = await api.post("/v1/tasks", json={"kind": "echo", "params": {"payload": 1}})
        task_id = r.json()["id"]
        code, out, _ = await lepton(
            capsys, "--api", api_url, "tasks", "cancel", task_id, "--reason", "not needed"
        )
        assert code == 0
        assert out.strip() == f"{task_id} cancelled"
        task = (await api.get(f"/v1/tasks/{task_id}")).json()
        assert (task["state"], task["cancel_reason"]) == ("cancelled", "not needed")
        assert task["attempts"] == []
        # Idempotent; an unknown id exits 3.
        code, out, _ = await lepton(capsys, "--api", api_url, "--json", "tasks", "cancel", task_id)
        assert code == 0
        assert '"state": "cancelled"' in out
        code, _, err = await lepton(capsys, "--api", api_url, "tasks", "cancel", "ghost")
        assert (code, "404" in err) == (3, True)
        code, out, _ = await lepton(
            capsys, "--api", api_url, "--json", "tasks", "ls", "--state", "cancelled"
        )
        assert [t["id"] for t in json.loads(out)] == [task_id]
    assert coordinator.metrics.value("lepton_task_cancels_total", {"outcome": "cancelled"}) == 2


async def test_queued_and_running_tasks_are_cancelled_on_a_real_agent(
    make_coordinator: MakeCoordinator,
    agents: StartAgent,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with make_coordinator() as coord:
        api_url = coord.api_url or ""
        cli_token(monkeypatch, coord)
        agent = agents(coord.config.mqtt.port, "pi-1", agent={"slots": 1})
        async with api_client(coord, timeout=10) as api:

            async def online() -> bool:
                devs = (await api.get("/v1/devices")).json()
                return any(d["id"] == "pi-1" and d["capacity"] for d in devs)

            await eventually(online, timeout=30, interval=0.2)

            async def submit(**params: Any) -> str:
                r = await api.post(
                    "/v1/tasks", json={"kind": "echo", "params": params, "device_id": "pi-1"}
                )
                assert r.status_code == 201, r.text
                task_id: str = r.json()["id"]
                return task_id

            long_id = await submit(sleep_s=60, payload="long")
            await eventually(lambda: state_of(api, long_id, "running"), timeout=15, interval=0.1)
            queued_id = await submit(payload="queued")
            await eventually(lambda: state_of(api, queued_id, "running"), timeout=15, interval=0.1)

            # The queued one: the agent retires it at once with a cancelled result.
            r = await api.post(f"/v1/tasks/{queued_id}/cancel", json={"reason": "user"})
            assert r.status_code == 202, r.text
            task = await eventually(
                lambda: state_of(api, queued_id, "cancelled"), timeout=10, interval=0.1
            )
            assert task["output"] is None
            (result,) = task["results"]
            assert (result["status"], result["applied"]) == ("cancelled", False)
            assert result["error"] == "cancelled: user"

            # The running one, through the CLI: it stops long before its 60 s.
            started = time.monotonic()
            code, out, _ = await lepton(capsys, "--api", api_url, "tasks", "cancel", long_id)
            assert code == 0
            assert "cancel sent" in out
            task = await eventually(
                lambda: state_of(api, long_id, "cancelled"), timeout=15, interval=0.1
            )
            assert time.monotonic() - started < 15
            assert [r["status"] for r in task["results"]] == ["cancelled"]
            assert task["attempts"][0]["outcome"] == "cancelled"

            # The agent is free again and runs the next task; a cancel of a task that ended
            # otherwise exits EXIT_TASK_FINISHED (7) and changes nothing.
            done_id = await submit(payload="after")
            done = await eventually(
                lambda: state_of(api, done_id, "succeeded"), timeout=15, interval=0.1
            )
            code, _, err = await lepton(capsys, "--api", api_url, "tasks", "cancel", done_id)
            assert code == EXIT_TASK_FINISHED
            assert "already succeeded" in err
            assert (await api.get(f"/v1/tasks/{done_id}")).json()["output"] == done["output"]
            # Every result was acknowledged: the agent's outbox drains.
            await eventually(
                lambda: coord.store.devices.get_device("pi-1").report["outbox_pending"] == 0,  # type: ignore[index]
                timeout=10,
                interval=0.2,
            )
        assert agent.proc is not None
        assert agent.proc.poll() is None
    m = coord.metrics
    assert m.value("lepton_task_cancels_total", {"outcome": "requested"}) == 2
    assert m.value("lepton_task_cancels_total", {"outcome": "finished"}) == 1
    assert m.value("lepton_results_total", {"outcome": "cancelled"}) == 2
    assert m.value("lepton_task_cancels_sent_total") >= 2


async def test_a_success_after_the_cancel_is_kept_but_not_applied(
    coordinator: Coordinator,
) -> None:
    """A device that ignores the cancel channel (an agent older than cancellation) finishes
    the task: its success is stored and acknowledged, the task stays cancelled."""
    port = coordinator.config.mqtt.port
    async with (
        FakeDevice(port, "old-1", interval_s=0.2) as sim,
        api_client(coordinator, timeout=10) as api,
    ):
        store = coordinator.store
        await eventually(
            lambda: (
                store.devices.device_exists("old-1")
                and store.devices.get_device("old-1").report is not None
            )
        )
        r = await api.post(
            "/v1/tasks", json={"kind": "echo", "params": {"sleep_s": 1.5, "payload": "x"}}
        )
        task_id = r.json()["id"]
        await eventually(lambda: state_of(api, task_id, "running"), timeout=10, interval=0.05)
        r = await api.post(f"/v1/tasks/{task_id}/cancel")
        assert r.status_code == 202, r.text
        task = await eventually(
            lambda: state_of(api, task_id, "cancelled"), timeout=10, interval=0.05
        )
        (result,) = task["results"]
        assert (result["status"], result["applied"]) == ("succeeded", False)
        assert task["output"] is None
        assert task["result_id"] == result["id"]
        await eventually(lambda: result["id"] in sim.acked, timeout=10)
        assert sim.executions[task_id] == 1


async def test_an_unanswered_cancel_is_resent_then_given_up_on(
    make_coordinator: MakeCoordinator,
) -> None:
    """A device that takes the task and then stays silent gets the cancel three times, one
    ``tasks.ack_timeout_s`` apart; then the task is cancelled without its answer."""
    # Liveness gets 20 report intervals (4 s): on a loaded host a 0.6 s gap between reports
    # would take the device offline before the third send, ending the task another way.
    async with make_coordinator(tasks__ack_timeout_s=0.5, liveness__missed_reports=20) as coord:
        store = coord.store
        async with (
            FakeDevice(coord.config.mqtt.port, "mute-1", interval_s=0.2, behaviour="ack_only"),
            api_client(coord, timeout=10) as api,
        ):
            await eventually(
                lambda: (
                    store.devices.device_exists("mute-1")
                    and store.devices.get_device("mute-1").report
                )
            )
            r = await api.post("/v1/tasks", json={"kind": "echo", "params": {"payload": 1}})
            task_id = r.json()["id"]
            await eventually(lambda: state_of(api, task_id, "running"), timeout=10, interval=0.05)
            assert (await api.post(f"/v1/tasks/{task_id}/cancel")).status_code == 202
            task = await eventually(
                lambda: state_of(api, task_id, "cancelled"), timeout=10, interval=0.05
            )
            assert task["attempts"][0]["outcome"] == "cancel_unanswered"
            assert task["results"] == []
        assert coord.metrics.value("lepton_task_cancels_sent_total") == 3
