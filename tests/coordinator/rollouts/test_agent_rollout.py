"""An agent-image rollout against a real coordinator: a signed release published through
the API, devices on a real Mosquitto that take the ``install`` task, answer ``staged``, then
report how it ended in their birth message (``State.update``), as an A/B agent does. The
install result alone is never success: the rollout waits for the device's committed status;
a rollback fails the device with the reason it gave. The update listener wakes the leader."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.coordinator.rollouts.feature import RolloutsFeature
from lepton.coordinator.service import Coordinator
from lepton.protocol import codec, topics
from lepton.protocol.messages import Result, State, Task, UpdateStatus
from lepton.protocol.releases import InstallParams
from lepton.protocol.tasks import INSTALL, params_as
from tests.coordinator.conftest import eventually
from tests.support.api import api_client
from tests.support.device import FakeDevice
from tests.support.release_bundles import Trust, bundle


@dataclass
class AbDevice(FakeDevice):
    """Stages an install, then reports ``ends_as`` for it in a birth (``rolled_back`` keeps
    the old version)."""

    ends_as: str = "committed"
    running: str = "1.0.0"

    def birth(self, status: UpdateStatus) -> None:
        state = State(
            state="online", agent_version=status.version, device_class="rpi5", update=status
        )
        self.publish(topics.STATE, codec.encode(state))

    async def _run(self, task: Task) -> None:
        assert task.kind == INSTALL
        params = params_as(InstallParams, task.params)
        now = time.time()
        output: dict[str, Any] = {
            "release": params.release,
            "version": params.version,
            "outcome": "staged",
        }
        result = Result(
            task_id=task.task_id,
            status="succeeded",
            attempt=task.attempt,
            output=output,
            started_at=now,
            finished_at=now,
        )
        self.outbox[result.id] = result
        self.publish(topics.RESULT, codec.encode(result))
        await asyncio.sleep(0.3)  # the trial: a restart into the new slot, checks
        version = params.version if self.ends_as == "committed" else self.running
        self.birth(
            UpdateStatus(
                version=version,
                outcome=self.ends_as,
                target=params.version,
                reason="" if self.ends_as == "committed" else "crash loop",
                slot="b",
                floor="0.0.0",
                task_id=task.task_id,
                at=time.time(),
            )
        )


async def test_agent_images_succeed_on_commit_and_fail_on_rollback(
    releasing: Coordinator, trust: Trust, tmp_path: Path
) -> None:
    c = releasing
    # Only events move the rollout on here: the idle bound is out of reach.
    c.feature(RolloutsFeature).idle_s = 3600.0
    path, _, _ = bundle(tmp_path / "b.tar", trust, {"wheels/x.whl": b"w" * 64}, version="1.1.0")
    async with api_client(c, timeout=30) as api:
        r = await api.post("/v1/releases", content=path.read_bytes())
        assert r.status_code == 201, r.text
        devices = [
            AbDevice(c.config.mqtt.port, "ab-1", interval_s=0.3),
            AbDevice(c.config.mqtt.port, "ab-2", interval_s=0.3),
            AbDevice(c.config.mqtt.port, "ab-3", interval_s=0.3, ends_as="rolled_back"),
            AbDevice(c.config.mqtt.port, "jet-1", interval_s=0.3, device_class="jetson"),
        ]
        for d in devices:
            await d.__aenter__()
        try:
            for d in devices[:3]:
                d.birth(UpdateStatus(version="1.0.0", outcome="committed", at=time.time() - 100))

            async def online() -> bool:
                devs = (await api.get("/v1/devices")).json()
                return len([x for x in devs if x["state"] == "online"]) == 4

            await eventually(online, timeout=20)
            plan = {
                "kind": "agent",
                "name": "lepton-agent",
                "version": "1.1.0",
                "success_threshold": 0.5,
                "abort_failure_share": 0.5,
                "abort_min_finished": 3,
            }
            r = await api.post("/v1/rollouts", json=plan)
            assert r.status_code == 201, r.text
            rollout_id = r.json()["id"]
            assert r.json()["total"] == 3  # no build for the jetson

            async def ended() -> dict[str, Any] | None:
                s = (await api.get(f"/v1/rollouts/{rollout_id}")).json()
                return s if s["state"] in ("completed", "aborted", "failed") else None

            status = await eventually(ended, timeout=30, interval=0.2)
        finally:
            for d in devices:
                await d.__aexit__(None, None, None)
    rows = {d["device_id"]: d for d in status["devices"]}
    assert status["state"] == "completed", status
    assert (rows["ab-1"]["state"], rows["ab-2"]["state"]) == ("succeeded", "succeeded")
    assert rows["ab-1"]["reason"] == "committed 1.1.0"
    assert (rows["ab-3"]["state"], rows["ab-3"]["reason"]) == ("rolled_back", "crash loop")
    stored = c.feature(RolloutsFeature).store.devices(rollout_id)
    assert {r.from_version for r in stored} == {"1.0.0"}
