"""A device with an ``install`` task may download that release's manifest and files, and
no other release's; a device without one gets 404 for all of them, as for unknown blobs."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec

from lepton.coordinator.releases.feature import ReleasesFeature
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.enrolling import bearer, enroll, make_claims, operator_token
from tests.coordinator.conftest import eventually
from tests.support.broker import Broker
from tests.support.device import FakeDevice
from tests.support.release_bundles import Trust, bundle


async def test_an_install_task_grants_its_release_files_to_its_device_only(
    releasing: Coordinator, broker: Broker, trust: Trust, tmp_path: Path
) -> None:
    c = releasing
    feature = c.feature(ReleasesFeature)
    wanted, m, _ = bundle(tmp_path / "a.tar", trust, {"a.whl": b"aaaa", "b.whl": b"bbbb"})
    other, m2, _ = bundle(tmp_path / "b.tar", trust, {"c.whl": b"cccc"}, name="other")
    (rec,) = feature.releases.publish(wanted)
    (rec2,) = feature.releases.publish(other)
    async with httpx.AsyncClient(base_url=str(c.api_url), timeout=10) as api:
        op = operator_token(c)
        tokens = {}
        for claim, device in zip(
            await make_claims(api, op, count=2), ("dev-a", "dev-b"), strict=True
        ):
            tokens[device] = (await enroll(api, claim["token"], device)).json()["http_token"]
        async with (
            FakeDevice(broker.port, "dev-a", behaviour="ack_only", interval_s=0.5),
            FakeDevice(broker.port, "dev-b", behaviour="ack_only", interval_s=0.5),
        ):
            params = msgspec.to_builtins(feature.install_params(rec, rollout="r1"))
            assert params["manifest_url"] == f"{c.api_url}/v1/blobs/{rec.manifest_digest}"
            assert params["blob_base"] == f"{c.api_url}/v1/blobs/"
            r = await api.post(
                routes.TASKS,
                json={"kind": "install", "params": params, "device_id": "dev-a"},
                headers=bearer(op),
            )
            assert r.status_code == 201, r.text
            task_id = r.json()["id"]
            await eventually(lambda: c.store.tasks.get_task(task_id).state == "running")

            async def fetch(device: str, digest: str) -> httpx.Response:
                path = routes.path(routes.BLOB, digest=digest)
                return await api.get(path, headers=bearer(tokens[device]))

            mine = [rec.manifest_digest, *(f.sha256 for f in m.files)]
            for digest in mine:
                got = await fetch("dev-a", digest)
                assert got.status_code == 200, digest
                assert got.headers["etag"] == f'"{digest}"'
            r = await api.get(params["manifest_url"], headers=bearer(tokens["dev-a"]))
            assert r.content == feature.releases.registry.read_blob(rec.manifest_digest)
            for digest in mine:
                assert (await fetch("dev-b", digest)).status_code == 404
            for digest in (rec2.manifest_digest, *(f.sha256 for f in m2.files)):
                assert (await fetch("dev-a", digest)).status_code == 404
