"""INT8 inference end to end, all real: quantize -> register -> deploy to two agents -> infer.

A mosquitto broker, the coordinator service (API, scheduler, registry, blob routes) and two
agents from the agent package; the agents fetch the model over HTTP by digest and report
accuracy through their outboxes. A corrupted artifact is refused and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lepton.agent.config import load_config
from lepton.agent.daemon import Agent
from lepton.coordinator.model_registry.calibration import load_eval_set
from lepton.coordinator.model_registry.quantize import quantize_and_publish
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.service import Coordinator
from lepton.models.data import digits_splits
from tests.coordinator.conftest import eventually
from tests.support.api import api_client, enrol_devices

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "lepton" / "models" / "artifacts"
TEST_SET = ARTIFACTS / "digits_test.npz"

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def agent(port: int, state: Path, device_id: str, coordinator: str) -> AsyncIterator[Agent]:
    """An in-process agent run as ``device_id`` (enrolled already: its identity in ``state``)."""
    config = load_config(
        None,
        env={},
        overrides={
            "device.id": device_id,
            "broker.port": port,
            "broker.keepalive_s": 5,
            "broker.reconnect_min_s": 0.1,
            "broker.reconnect_max_s": 1.0,
            "agent.state_dir": state,
            "agent.capacity_interval_s": 0.5,
            "agent.capacity_min_interval_s": 0.1,
            "agent.probe": False,
            "data": {"digits-test": str(TEST_SET)},
            "fetch.coordinator_url": coordinator,
        },
    )
    async with Agent(config) as a:
        runner = asyncio.create_task(a.run())
        try:
            yield a
        finally:
            a.stop()
            await asyncio.wait_for(runner, 30)


async def submit(api: httpx.AsyncClient, **body: Any) -> str:
    r = await api.post("/v1/tasks", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def finished(api: httpx.AsyncClient, task_id: str, timeout: float = 60) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        t = (await api.get(f"/v1/tasks/{task_id}")).json()
        return t if t["state"] in ("succeeded", "failed", "expired") else None

    task: dict[str, Any] = await eventually(check, timeout=timeout, interval=0.2)
    return task


def output(task: dict[str, Any]) -> dict[str, Any]:
    """The applied result's output, plus its error (for failed tasks)."""
    return dict(task.get("output") or {}) | {"_error": task.get("last_error")}


async def test_quantize_register_deploy_infer_and_refuse_corrupt(
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
    tmp_path: Path,
) -> None:
    splits = digits_splits()
    async with make_coordinator() as coord:
        registry = ModelRegistry(
            coord.store.engine, Path(coord.config.data_dir), create_tables=False
        )
        published = await asyncio.to_thread(
            quantize_and_publish,
            registry,
            name="digits",
            source=ARTIFACTS / "digits_fp32.onnx",
            calibration=[splits.calibration.x[i : i + 32] for i in range(0, 256, 32)],
            evaluation=load_eval_set(TEST_SET),
        )
        int8 = published.int8
        assert int8.precision == "int8"
        assert published.report.drop_points <= 1.0
        assert coord.api_url is not None
        await enrol_devices(coord, {"edge-a": tmp_path / "a", "edge-b": tmp_path / "b"})
        async with (
            api_client(coord, timeout=10) as api,
            agent(coord.config.mqtt.port, tmp_path / "a", "edge-a", coord.api_url),
            agent(coord.config.mqtt.port, tmp_path / "b", "edge-b", coord.api_url),
        ):

            async def both_online() -> bool:
                devs = (await api.get("/v1/devices")).json()
                return {d["id"] for d in devs if d["state"] == "online"} >= {"edge-a", "edge-b"}

            await eventually(both_online, timeout=20, interval=0.2)

            def deploy(device: str, record: Any) -> Any:
                return submit(
                    api,
                    kind="deploy",
                    device_id=device,
                    params={
                        "name": "digits",
                        "digest": record.digest,
                        "size": record.size,
                        "url": f"{coord.api_url}/v1/blobs/{record.digest}",
                        "format": "onnx",
                        "precision": record.precision,
                    },
                )

            deploys = [await deploy(d, int8) for d in ("edge-a", "edge-b")]
            for tid in deploys:
                task = await finished(api, tid)
                assert task["state"] == "succeeded", (task["id"], output(task))
                assert output(task)["digest"] == int8.digest

            # Inference placed by the scheduler on whichever device it picks.
            infers = [
                await submit(
                    api,
                    kind="infer",
                    data_source="digits-test",
                    params={"model": "digits", "source": "digits-test"},
                )
                for _ in range(4)
            ]
            ran_on: set[str] = set()
            for tid in infers:
                task = await finished(api, tid)
                assert task["state"] == "succeeded", task
                out = output(task)
                assert out["digest"] == int8.digest
                assert out["count"] == 450
                # The device measures the same accuracy the gate measured centrally.
                assert out["accuracy"] == pytest.approx(int8.accuracy_int8, abs=1e-9)
                assert out["latency_ms"]["sample"]["p50"] > 0
                ran_on.add(task["device_id"])
            assert ran_on <= {"edge-a", "edge-b"}

            # A corrupted artifact: register a new version, then damage its blob on disk.
            bad = registry.import_file(
                ARTIFACTS / "digits_fp32.onnx", name="digits-next", format="onnx", precision="fp32"
            )
            blob = registry.blob_path(bad.digest)
            os.chmod(blob, 0o644)
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
            refused = await finished(api, await deploy("edge-a", bad))
            assert refused["state"] == "failed"
            assert "digest_mismatch" in str(output(refused)["_error"])

            # The old model still serves on that device, with the same accuracy.
            again = await finished(
                api,
                await submit(
                    api,
                    kind="infer",
                    device_id="edge-a",
                    params={"model": "digits", "source": "digits-test"},
                ),
            )
            assert again["state"] == "succeeded"
            assert output(again)["digest"] == int8.digest
            assert output(again)["accuracy"] == pytest.approx(int8.accuracy_int8, abs=1e-9)
