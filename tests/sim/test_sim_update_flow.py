"""A virtual device takes signed agent images end to end: the agent's real install handler
fetches the manifest and files over HTTP and verifies them against the pinned root, the
simulated updater restarts the agent into the new slot, and the birth messages say what a real
device's would (version, outcome, reason)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lepton.common.signing import canonical_json, generate_key, public_key, sign
from lepton.protocol.messages import Result, State
from lepton.protocol.releases import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    AgentInstall,
    FileEntry,
    InstallParams,
    Manifest,
    RevertParams,
    Root,
)
from lepton.sim.fleet import FleetSpec, build_devices, run_fleet
from lepton.sim.updater import CRASH_MARKER
from tests.support.agents import Sink
from tests.support.broker import Broker
from tests.support.httpserver import HttpServer

ROOT_KEY, RELEASE_KEY, STRANGER = generate_key(), generate_key(), generate_key()


def root_file(path: Path) -> Path:
    root = Root(
        version=1,
        expires=int(time.time()) + 3600,
        root_keys=[public_key(ROOT_KEY)],
        release_keys=[public_key(RELEASE_KEY)],
    )
    path.write_bytes(sign(canonical_json(root), ROOT_TYPE, [ROOT_KEY]))
    return path


def publish(
    server: HttpServer, version: str, *, crashes: bool = False, key: Ed25519PrivateKey = RELEASE_KEY
) -> dict[str, Any]:
    """Serve a signed release's files and manifest; the install task's parameters."""
    files = {"wheels/lepton_fleet.whl": f"agent {version}".encode()}
    if crashes:
        files[f"models/{CRASH_MARKER}"] = b"crashes on start"
    for data in files.values():
        server.add(data)
    m = Manifest(
        kind="agent",
        name="lepton-agent",
        version=version,
        device_classes=["rpi*", "x86-*", "jetson-*"],
        files=[
            FileEntry(path=p, sha256=hashlib.sha256(d).hexdigest(), length=len(d))
            for p, d in files.items()
        ],
        security_floor="0.0.0",
        created=int(time.time()),
        expires=int(time.time()) + 3600,
        install=AgentInstall(requirement=f"lepton-fleet=={version}"),
    )
    raw = sign(canonical_json(m), MANIFEST_TYPE, [key])
    digest = server.add(raw)
    return msgspec.to_builtins(
        InstallParams(
            release="lepton-agent",
            version=version,
            manifest_digest=digest,
            manifest_size=len(raw),
            manifest_url=server.url(digest),
            blob_base=f"{server.origin}/blobs/",
            health_deadline_s=30,
        )
    )


async def test_install_commit_revert_and_a_crash_loop_rolling_back(
    broker: Broker, tmp_path: Path
) -> None:
    spec = FleetSpec(
        devices=1,
        state_root=tmp_path / "fleet",
        broker_port=broker.port,
        capacity_interval=0.5,
        release_root=root_file(tmp_path / "root.json"),
        agent_version="1.0.0",
        trial_s=0.2,
    )
    (device,) = build_devices(spec)
    dev = device.config.device.id
    stop = asyncio.Event()

    def births(sink: Sink) -> list[State]:
        return [s for _, s in sink.states.get(dev, []) if s.state == "online"]

    def reports(sink: Sink, version: str, outcome: str) -> bool:
        b = births(sink)
        return (
            bool(b)
            and b[-1].agent_version == version
            and b[-1].update is not None
            and (b[-1].update.outcome == outcome)
        )

    async def run_task(sink: Sink, kind: str, params: dict[str, Any]) -> Result:
        task = await sink.send_task(dev, kind, **params)
        await sink.wait(lambda: len(sink.results_for({task.task_id})) == 1, 30, f"{kind} result")
        return sink.results_for({task.task_id})[task.task_id]

    with HttpServer() as server:
        async with Sink(broker.port) as sink:
            fleet = asyncio.create_task(run_fleet([device], stop))
            try:
                await sink.wait(lambda: reports(sink, "1.0.0", "none"), 20, "online on 1.0.0")

                # A release signed by a key the root does not name: refused on the device.
                result = await run_task(sink, "install", publish(server, "1.1.0", key=STRANGER))
                assert result.status == "failed"
                assert result.error is not None
                assert "refused: unknown_key" in result.error

                result = await run_task(sink, "install", publish(server, "1.1.0"))
                assert result.status == "succeeded"
                assert result.output["outcome"] == "staged"
                await sink.wait(lambda: reports(sink, "1.1.0", "committed"), 30, "1.1.0 committed")
                outcomes = [b.update.outcome for b in births(sink) if b.update is not None]
                assert outcomes[-2:] == ["trial", "committed"]
                assert births(sink)[-1].update.slot == "b"

                result = await run_task(
                    sink, "revert", msgspec.to_builtins(RevertParams(to_version="1.0.0"))
                )
                assert result.output["outcome"] == "staged"
                await sink.wait(lambda: reports(sink, "1.0.0", "reverted"), 30, "back on 1.0.0")

                # A build that crashes: the device goes down without a goodbye (the will),
                # and comes back on the old slot saying why.
                seen = len(sink.states[dev])
                result = await run_task(sink, "install", publish(server, "1.2.0", crashes=True))
                assert result.output["outcome"] == "staged"
                await sink.wait(lambda: reports(sink, "1.0.0", "rolled_back"), 30, "rolled back")
                last = births(sink)[-1].update
                assert last is not None
                assert (last.target, last.reason, last.slot) == ("1.2.0", "crash_loop", "a")
                later = [s for _, s in sink.states[dev][seen:]]
                assert any(s.state == "online" and s.agent_version == "1.2.0" for s in later)
                assert any(s.state == "offline" and s.reason == "connection lost" for s in later)
                # The failed slot was never committed: going "back" to it is refused.
                result = await run_task(
                    sink, "revert", msgspec.to_builtins(RevertParams(to_version="1.2.0"))
                )
                assert result.status == "failed"
                assert result.error is not None
                assert "refused: rollback" in result.error
            finally:
                stop.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fleet, 60)
