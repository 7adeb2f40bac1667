"""The ``install`` and ``revert`` handlers in a real agent (in-process, on a real broker)
against a real coordinator: the agent fetches a published release's signed manifest and
files over HTTP with its own device token, verifies them against its pinned root and stages
them with its updater. The updater here is a stand-in that only records what it is handed
(the A/B installer has tests of its own); refusals (a tampered file served, another device
class, an older version, no updater) fail the task with ``refused: <reason>``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec

from lepton.agent.config import load_config
from lepton.agent.daemon import Agent
from lepton.agent.handlers import Handler, HandlerRegistry, TaskContext, default_registry
from lepton.common.releases import ReleaseRefused, load_root
from lepton.coordinator.model_registry.feature import ModelRegistryFeature
from lepton.coordinator.releases.feature import ReleasesFeature
from lepton.coordinator.releases.records import ReleaseRecord
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from lepton.protocol.messages import Task
from lepton.protocol.releases import Manifest, Root
from tests.coordinator import conftest as coordinator_fixtures
from tests.coordinator.conftest import eventually
from tests.coordinator.releases.conftest import MakeCoordinator
from tests.support.api import api_client, enrol_devices
from tests.support.release_bundles import Trust, bundle

# The coordinator fixture, here beside agents (this folder's conftest belongs to the A/B tests).
make_coordinator = coordinator_fixtures.make_coordinator

FILES = {"wheels/lepton_fleet-1.1.0-py3-none-any.whl": b"W" * 50_000, "trust/README": b"r"}


@dataclasses.dataclass
class RecordingUpdater:
    """Stands in for :class:`lepton.agent.update.updater.Updater`: the device's trust root,
    version, floor and class, a staging directory per task, and a record of what it was
    asked to stage or revert to."""

    root_raw: bytes
    staging: Path
    device_class: str = "rpi5"
    running: str = "1.0.0"
    floor_version: str = "1.0.0"
    previous: str | None = None
    staged: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    reverts: list[str] = dataclasses.field(default_factory=list)

    def trust_root(self) -> Root:
        return load_root(self.root_raw, trusted=None, now=time.time())

    def running_version(self) -> str:
        return self.running

    def floor(self) -> str:
        return self.floor_version

    def staging_dir(self, task_id: str) -> Path:
        path = self.staging / task_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def stage(
        self,
        *,
        manifest_raw: bytes,
        manifest: Manifest,
        files_dir: Path,
        task_id: str,
        deadline_s: float,
    ) -> None:
        files = {
            p.relative_to(files_dir).as_posix(): p.read_bytes()
            for p in files_dir.rglob("*")
            if p.is_file()
        }
        self.staged.append(
            {
                "raw": manifest_raw,
                "manifest": manifest,
                "files": files,
                "task_id": task_id,
                "deadline_s": deadline_s,
            }
        )

    def request_revert(self, *, to_version: str, task_id: str, deadline_s: float) -> None:
        if to_version != self.previous:
            raise ReleaseRefused("rollback", f"the other slot holds {self.previous}")
        self.reverts.append(to_version)


def with_updater(updater: RecordingUpdater | None) -> HandlerRegistry:
    """The default handlers, each given ``updater`` as its context's updater."""
    base = default_registry()
    registry = HandlerRegistry()

    def wrap(handler: Handler) -> Handler:
        async def run(task: Task, ctx: TaskContext) -> dict[str, Any]:
            services = dataclasses.replace(ctx.services, updater=updater)  # type: ignore[arg-type]
            return await handler(task, dataclasses.replace(ctx, services=services))

        return run

    for kind in base.kinds():
        handler = base.get(kind)
        assert handler is not None
        registry.register(kind, wrap(handler))
    return registry


@contextlib.asynccontextmanager
async def agent(
    c: Coordinator, state: Path, device_id: str, updater: RecordingUpdater | None
) -> AsyncIterator[Agent]:
    config = load_config(
        None,
        env={},
        overrides={
            "device.id": device_id,
            "broker.port": c.config.mqtt.port,
            "broker.keepalive_s": 5,
            "broker.reconnect_min_s": 0.1,
            "broker.reconnect_max_s": 1.0,
            "agent.state_dir": state,
            "agent.capacity_interval_s": 0.5,
            "agent.capacity_min_interval_s": 0.1,
            "agent.probe": False,
            "fetch.coordinator_url": str(c.api_url),
        },
    )
    async with Agent(config, registry=with_updater(updater)) as a:
        runner = asyncio.create_task(a.run())
        try:
            yield a
        finally:
            a.stop()
            await asyncio.wait_for(runner, 30)


async def run_task(api: httpx.AsyncClient, kind: str, params: Any, device: str) -> dict[str, Any]:
    body = {
        "kind": kind,
        "params": msgspec.to_builtins(params),
        "device_id": device,
        "max_attempts": 1,
    }
    r = await api.post(routes.TASKS, json=body)
    assert r.status_code == 201, r.text
    task_id = r.json()["id"]

    async def done() -> dict[str, Any] | None:
        t = (await api.get(routes.path(routes.TASK, task_id=task_id))).json()
        return t if t["state"] in ("succeeded", "failed", "expired") else None

    task: dict[str, Any] = await eventually(done, timeout=30, interval=0.1)
    return task


def publish(c: Coordinator, path: Path) -> ReleaseRecord:
    (rec,) = c.feature(ReleasesFeature).releases.publish(path)
    return rec


async def test_a_real_agent_fetches_verifies_and_stages_a_release(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    trust = Trust()
    root_file = trust.write_root(tmp_path / "root.json")
    updater = RecordingUpdater(root_file.read_bytes(), tmp_path / "staging")
    async with make_coordinator(releases__root_file=str(root_file)) as c:
        feature = c.feature(ReleasesFeature)
        good = publish(c, bundle(tmp_path / "good.tar", trust, FILES, version="1.1.0")[0])
        older = publish(c, bundle(tmp_path / "old.tar", trust, FILES, version="0.9.0")[0])
        jetson = publish(
            c, bundle(tmp_path / "j.tar", trust, FILES, version="1.2.0", classes=("jetson-*",))[0]
        )
        bad_files = {**FILES, "trust/README": b"served bytes differ"}
        tampered = publish(c, bundle(tmp_path / "t.tar", trust, bad_files, version="1.3.0")[0])
        # The coordinator's copy of one file is damaged after it was published: the device
        # gets bytes that do not hash to the signed sha256.
        victim = hashlib.sha256(bad_files["trust/README"]).hexdigest()
        blob = c.feature(ModelRegistryFeature).registry.blobs.path(victim)
        blob.chmod(0o644)
        blob.write_bytes(b"evil bytes, differs")
        await enrol_devices(c, {"edge-a": tmp_path / "a"})
        async with api_client(c) as api, agent(c, tmp_path / "a", "edge-a", updater):
            await eventually(
                lambda: (
                    c.store.devices.device_exists("edge-a")
                    and c.store.devices.get_device("edge-a").state == "online"
                ),
                timeout=20,
            )
            task = await run_task(api, "install", feature.install_params(good), "edge-a")
            assert task["state"] == "succeeded", task
            out = task["output"]
            assert (out["outcome"], out["version"], out["running_version"]) == (
                "staged",
                "1.1.0",
                "1.0.0",
            )
            assert out["bytes_downloaded"] == good.manifest_size + sum(
                len(b) for b in FILES.values()
            )
            (staged,) = updater.staged
            assert staged["files"] == FILES
            assert hashlib.sha256(staged["raw"]).hexdigest() == good.manifest_digest
            assert staged["manifest"].version == "1.1.0"
            assert staged["task_id"] == task["id"]
            for record, reason in (
                (older, "rollback"),
                (jetson, "wrong_class"),
                (tampered, "tampered"),
            ):
                task = await run_task(api, "install", feature.install_params(record), "edge-a")
                assert task["state"] == "failed", task
                assert f"refused: {reason}" in (task["last_error"] or ""), task
            assert len(updater.staged) == 1
            # Only the staged bundle is kept: its download cache and refused tasks' files go.
            staged_dir = tmp_path / "staging"
            assert [p.name for p in staged_dir.iterdir()] == [staged["task_id"]]
            assert [p.name for p in (staged_dir / staged["task_id"]).iterdir()] == ["bundle"]
            # The version it runs already: nothing fetched but the manifest.
            updater.running = "1.1.0"
            task = await run_task(api, "install", feature.install_params(good), "edge-a")
            assert task["state"] == "succeeded", task
            assert task["output"]["outcome"] == "already_running"
            # revert: to what the other slot holds, else refused.
            updater.previous = "1.0.0"
            task = await run_task(api, "revert", {"to_version": "1.0.0"}, "edge-a")
            assert (task["state"], task["output"]["outcome"]) == ("succeeded", "staged"), task
            assert updater.reverts == ["1.0.0"]
            task = await run_task(api, "revert", {"to_version": "0.5.0"}, "edge-a")
            assert task["state"] == "failed"
            assert "refused: rollback" in task["last_error"]


async def test_an_agent_without_updates_refuses_installs(
    make_coordinator: MakeCoordinator, tmp_path: Path
) -> None:
    trust = Trust()
    root_file = trust.write_root(tmp_path / "root.json")
    async with make_coordinator(releases__root_file=str(root_file)) as c:
        rec = publish(c, bundle(tmp_path / "good.tar", trust, FILES)[0])
        await enrol_devices(c, {"edge-b": tmp_path / "b"})
        async with api_client(c) as api, agent(c, tmp_path / "b", "edge-b", None):
            await eventually(
                lambda: (
                    c.store.devices.device_exists("edge-b")
                    and c.store.devices.get_device("edge-b").state == "online"
                ),
                timeout=20,
            )
            params = c.feature(ReleasesFeature).install_params(rec)
            task = await run_task(api, "install", params, "edge-b")
            assert task["state"] == "failed"
            assert "refused: updates_disabled" in task["last_error"]
