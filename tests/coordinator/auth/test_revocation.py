"""Revocation end to end: a real Mosquitto with the dynamic security plugin (as ``lepton
broker init`` configures it), a real coordinator driving it, enrolled devices on their own
broker accounts. After ``POST /v1/devices/{id}/revoke`` the device's HTTP token is refused,
its MQTT session is dropped, it cannot connect again, and its running task goes to another
device. On a broker without per-device accounts, the coordinator ignores what a revoked
device still sends.

``-s`` prints the measured times (``REVOCATION ...`` lines)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.conftest import FLEET, Device, DynsecBroker
from tests.coordinator.auth.enrolling import bearer, enroll, make_claims, metric, operator_token
from tests.coordinator.conftest import coordinator_config, eventually
from tests.support.device import FakeDevice

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


@contextlib.asynccontextmanager
async def dynsec_coordinator(broker: DynsecBroker, tmp_path: Path) -> AsyncIterator[Coordinator]:
    cfg = coordinator_config(
        tmp_path,
        broker.port,
        fleet=FLEET,
        mqtt__username="coordinator",
        mqtt__password=broker.coordinator_password,
        mqtt__accounts="dynsec",
    )
    async with Coordinator(cfg) as c:
        assert await c.link.wait_connected(10)
        yield c


def online(c: Coordinator, device_id: str) -> bool:
    return c.store.devices.device_exists(device_id) and (
        c.store.devices.get_device(device_id).state == "online"
    )


async def enrol_pair(c: Coordinator, api: httpx.AsyncClient, op: str) -> list[dict[str, Any]]:
    claims = await make_claims(api, op, count=2)
    out = []
    for claim, device_id in zip(claims, ("dev-a", "dev-b"), strict=True):
        r = await enroll(api, claim["token"], device_id, device_class="rpi5")
        assert r.status_code == 201, r.text
        out.append(r.json())
    return out


async def submit_echo(api: httpx.AsyncClient, op: str) -> str:
    r = await api.post(
        routes.TASKS, json={"kind": "echo", "params": {"sleep_s": 600}}, headers=bearer(op)
    )
    assert r.status_code == 201, r.text
    task_id: str = r.json()["id"]
    return task_id


async def test_revocation_end_to_end_with_dynsec(
    dynsec_broker: DynsecBroker, tmp_path: Path
) -> None:
    port = dynsec_broker.port
    async with (
        dynsec_coordinator(dynsec_broker, tmp_path) as c,
        httpx.AsyncClient(base_url=str(c.api_url), timeout=10) as api,
    ):
        op = operator_token(c)
        a, b = await enrol_pair(c, api, op)
        acct = {d["device_id"]: (d["mqtt"]["username"], d["mqtt"]["password"]) for d in (a, b)}
        dev_a = FakeDevice(
            port,
            "dev-a",
            fleet=FLEET,
            username=acct["dev-a"][0],
            password=acct["dev-a"][1],
            interval_s=0.5,
        )
        dev_b = FakeDevice(
            port,
            "dev-b",
            fleet=FLEET,
            username=acct["dev-b"][0],
            password=acct["dev-b"][1],
            interval_s=0.5,
            behaviour="ack_only",
        )
        # Nobody connects as dev-a with another password, or anonymously.
        assert not await asyncio.to_thread(Device(port, "dev-a", "wrong").connect)
        async with dev_a:
            await eventually(lambda: c.store.devices.device_exists("dev-a"))
            task_id = await submit_echo(api, op)
            await eventually(lambda: c.store.tasks.get_task(task_id).state == "running")
            assert c.store.tasks.get_task(task_id).device_id == "dev-a"
            async with dev_b:
                await eventually(lambda: online(c, "dev-b"))
                started = time.monotonic()
                r = await api.post(
                    routes.path(routes.DEVICE_REVOKE, device_id="dev-a"),
                    json={"reason": "stolen"},
                    headers=bearer(op),
                )
                answered = time.monotonic()
                assert r.status_code == 200, r.text
                done = r.json()
                assert done["requeued"] == [task_id]
                assert done["broker_account_removed"] is True
                # (a) the HTTP token
                blob = routes.path(routes.BLOB, digest="0" * 64)
                r = await api.get(blob, headers=bearer(a["http_token"]))
                token_refused = time.monotonic()
                assert (r.status_code, r.json()["reason"]) == (401, "revoked_device")
                # (b) the session, (c) a reconnect
                await eventually(lambda: dev_a.disconnected_at > 0, timeout=10, interval=0.005)
                kicked = dev_a.disconnected_at
                assert not await asyncio.to_thread(Device(port, *acct["dev-a"]).connect)
                reconnect_refused = time.monotonic()
                # (d) the task, on the other device
                await eventually(
                    lambda: c.store.tasks.get_task(task_id).device_id == "dev-b",
                    timeout=10,
                    interval=0.005,
                )
                requeued_to_b = time.monotonic()
                assert c.store.tasks.get_task(task_id).state in ("assigned", "running")
        device = c.store.devices.get_device("dev-a")
        assert (device.state, device.offline_reason) == ("offline", "revoked")
        audit = [r for r in c.auth.store.audit_log(action="revoke") if r.target == "dev-a"]
        assert len(audit) == 1
        assert audit[0].detail["reason"] == "stolen"
        assert audit[0].actor.startswith("operator:")
    ms = {
        "call": answered - started,
        "token_refused": token_refused - answered,
        "session_dropped": kicked - answered,
        "reconnect_refused": reconnect_refused - answered,
        "task_on_other_device": requeued_to_b - answered,
    }
    print("REVOCATION " + " ".join(f"{k}={v * 1000:.1f}ms" for k, v in ms.items()))
    assert ms["task_on_other_device"] < 5.0


async def test_a_revoked_device_is_ignored_on_a_broker_without_accounts(
    make_coordinator: MakeCoordinator, broker: Any
) -> None:
    """accounts = none: nothing at the broker stops the device, so the coordinator drops what
    it sends (births, reports, results), counted as revoked_device rejects."""
    async with (
        make_coordinator() as c,
        httpx.AsyncClient(base_url=str(c.api_url), timeout=10) as api,
    ):
        op = operator_token(c)
        (claim,) = await make_claims(api, op)
        assert (await enroll(api, claim["token"], "dev-a")).status_code == 201
        async with FakeDevice(broker.port, "dev-a", interval_s=0.1) as dev:
            await eventually(lambda: c.store.devices.device_exists("dev-a"))
            task_id = await submit_echo(api, op)
            await eventually(lambda: c.store.tasks.get_task(task_id).state == "running")
            r = await api.post(
                routes.path(routes.DEVICE_REVOKE, device_id="dev-a"), headers=bearer(op)
            )
            assert r.status_code == 200
            assert r.json()["requeued"] == [task_id], r.json()
            assert "dev-a" in c.revoked
            rejects = "lepton_ingest_rejects_total"
            before = metric(c, rejects, {"reason": "revoked_device"})
            dev.send_report()
            await eventually(lambda: metric(c, rejects, {"reason": "revoked_device"}) >= before + 3)
            await asyncio.sleep(0.3)  # reports keep coming; none brings it back
            device = c.store.devices.get_device("dev-a")
            assert (device.state, device.offline_reason) == ("offline", "revoked"), device
            task = c.store.tasks.get_task(task_id)
            assert (task.state, task.device_id) == ("pending", None), task
