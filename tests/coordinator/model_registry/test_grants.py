"""Blob downloads by enrolled devices on a running coordinator: a device gets the blob its
own deploy names and nothing else (404, as for an unknown blob), an operator gets any; an
attempt that ended keeps its grant for ten minutes, so a retry can resume."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import httpx

from lepton.coordinator.model_registry.feature import ModelRegistryFeature
from lepton.coordinator.model_registry.grants import GRACE_S, BlobGrants
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.enrolling import bearer, enroll, make_claims, metric, operator_token
from tests.coordinator.conftest import eventually
from tests.support.broker import Broker
from tests.support.device import FakeDevice

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


async def test_a_device_gets_only_the_blobs_its_tasks_name(
    make_coordinator: MakeCoordinator, broker: Broker
) -> None:
    async with (
        make_coordinator() as c,
        httpx.AsyncClient(base_url=str(c.api_url), timeout=10) as api,
    ):
        registry = c.feature(ModelRegistryFeature).registry
        mine, other = registry.put_bytes(b"model of a"), registry.put_bytes(b"model of b")
        op = operator_token(c)
        tokens = {}
        for claim, device in zip(
            await make_claims(api, op, count=2), ("dev-a", "dev-b"), strict=True
        ):
            r = await enroll(api, claim["token"], device)
            tokens[device] = r.json()["http_token"]
        async with (
            FakeDevice(broker.port, "dev-a", behaviour="ack_only", interval_s=0.5),
            FakeDevice(broker.port, "dev-b", behaviour="ack_only", interval_s=0.5),
        ):
            params = {
                "name": "m",
                "digest": mine,
                "size": 10,
                "url": f"{c.api_url}/v1/blobs/{mine}",
                "format": "onnx",
            }
            r = await api.post(
                routes.TASKS,
                json={"kind": "deploy", "params": params, "device_id": "dev-a"},
                headers=bearer(op),
            )
            assert r.status_code == 201, r.text
            task_id = r.json()["id"]
            await eventually(lambda: c.store.tasks.get_task(task_id).state == "running")

            def blob(digest: str) -> str:
                return routes.path(routes.BLOB, digest=digest)

            r = await api.get(blob(mine), headers=bearer(tokens["dev-a"]))
            assert (r.status_code, r.content) == (200, b"model of a")
            r = await api.head(blob(mine), headers=bearer(tokens["dev-a"]))
            assert r.status_code == 200
            refused = {"reason": "blob_not_granted"}
            before = metric(c, "lepton_auth_refusals_total", refused)
            for device, digest in (("dev-b", mine), ("dev-a", other), ("dev-a", "f" * 64)):
                r = await api.get(blob(digest), headers=bearer(tokens[device]))
                assert r.status_code == 404, (device, digest)
                assert r.json()["detail"] == f"blob {digest} not found"
            assert metric(c, "lepton_auth_refusals_total", refused) == before + 3
            for digest in (mine, other):
                r = await api.get(blob(digest), headers=bearer(op))
                assert r.status_code == 200
            reader = operator_token(c, "tasks:write")  # no fleet:read
            r = await api.get(blob(mine), headers=bearer(reader))
            assert (r.status_code, r.json()["reason"]) == (403, "missing_scope")
            # The attempt ends (the device went away): its grant lasts GRACE_S more.
            now = time.time()
            c.store.devices.mark_revoked("dev-a", now)
            grants = BlobGrants(c.store.engine)
            assert grants.granted("dev-a", mine, now + GRACE_S - 1)
            assert not grants.granted("dev-a", mine, now + GRACE_S + 1)
            assert not grants.granted("dev-b", mine, now)
