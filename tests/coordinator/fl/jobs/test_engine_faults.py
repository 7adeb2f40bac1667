"""Federated rounds under faults: the coordinator SIGKILLed mid-round, an agent killed
mid-round, hostile uploads to a running job."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from lepton.agent.identity import read_identity
from lepton.coordinator.fl.feature import FLFeature
from lepton.coordinator.fl.jobs import planning
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.service import Coordinator
from lepton.coordinator.store import Store
from lepton.protocol import routes
from lepton.protocol.weights import encode_weights
from tests.coordinator.fl.conftest import (
    FleetMaker,
    digits_job,
    ended,
    wait_for_devices,
    wait_job,
)
from tests.support.api import Endpoint, api_client, enrol_devices, operator_token
from tests.support.broker import Broker, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[4]
MakeCoordinator = Callable[..., AbstractAsyncContextManager[Coordinator]]


class CoordinatorProcess:
    """``lepton coordinator run`` on a fixed port and data directory, restartable."""

    def __init__(
        self, workdir: Path, broker_port: int, settings: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.settings = dict(settings or {})
        self.port = free_port()
        self.broker_port = broker_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> str:
        return f"sqlite:///{self.workdir / 'data' / 'coordinator.db'}"

    @property
    def endpoint(self) -> Endpoint:
        """The API with an operator token made on the coordinator's database (once it has
        made the database: after :meth:`healthy`)."""
        return Endpoint(self.api, operator_token(self.database))

    def start(self) -> None:
        self.starts += 1
        log = (self.workdir / f"coordinator-{self.starts}.log").open("wb")
        settings = {
            "scheduler.batch_interval_s": "0.1",
            "registry.flush_interval_s": "0.05",
            "tasks.redispatch_after_s": "1",
            "mqtt.reconnect_min_s": "0.2",
            "mqtt.reconnect_max_s": "1",
            "replica.lease_s": "3",
            "liveness.max_check_s": "0.5",
            "database.sqlite_synchronous": "normal",
            "fl.eval_dir": str(self.workdir),
            "mqtt.accounts": "none",  # the plain test broker has no dynamic security plugin
            **self.settings,
        }
        cmd = [
            sys.executable,
            "-m",
            "lepton.coordinator.cli",
            "coordinator",
            "run",
            "--instance-id",
            "fl-kill",
            "--data-dir",
            str(self.workdir / "data"),
            "--mqtt-port",
            str(self.broker_port),
            "--http-port",
            str(self.port),
        ]
        for key, value in settings.items():
            cmd += ["--set", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env={**env, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log
        )
        log.close()

    async def healthy(self, timeout: float = 30.0) -> None:
        async def ok() -> bool:
            try:
                async with httpx.AsyncClient(timeout=1) as client:
                    h = (await client.get(f"{self.api}/v1/health")).json()
                return bool(h["mqtt_connected"] and h["leader"])
            except (httpx.HTTPError, ValueError):
                return False

        async with asyncio.timeout(timeout):
            while not await ok():
                assert self.proc is not None
                assert self.proc.poll() is None, self.logs()
                await asyncio.sleep(0.2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.workdir.glob("*.log"))
        )


@pytest.fixture
def coordinator_process(broker: Broker, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    c = CoordinatorProcess(tmp_path, broker.port)
    c.start()
    yield c
    c.stop()


async def test_coordinator_sigkilled_mid_round_resumes_without_loss_or_double_count(
    coordinator_process: CoordinatorProcess, sim_fleet: FleetMaker, tmp_path: Path
) -> None:
    c = coordinator_process
    # rpi5 devices train about three times slower than the host: rounds last long enough
    # to be caught in the middle.
    await c.healthy()
    fleet = await sim_fleet(c.endpoint, 4, mix={"rpi5": 1.0})
    await wait_for_devices(c.endpoint, 4)
    job_body = digits_job(fleet.eval_path, rounds=2, epochs=3, deadline_s=40.0, min_results=2)
    async with api_client(c.endpoint) as api:
        r = await api.post("/v1/fl/jobs", json=job_body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

    def mid_round_two(job: dict[str, Any]) -> bool:
        rounds = job.get("history") or []
        return (
            len(rounds) >= 2
            and rounds[1]["state"] == "open"
            and (rounds[1]["uploaded"] or 0) >= 1
            and (rounds[1]["accepted"] or 0) < 4
        )

    try:
        await wait_job(c.endpoint, job_id, mid_round_two, timeout=40, interval=0.05)
    except AssertionError:
        raise AssertionError(c.logs()) from None
    c.kill()
    store = Store.open(c.database, create=False)
    fl = FLStore(store.engine)
    before = {u.device_id: u.digest for u in fl.updates_for(job_id, 2)}
    assert before, "killed before any update of round 2 was recorded"
    c.start()
    try:
        job = await wait_job(c.endpoint, job_id, ended, timeout=45)
    except AssertionError:
        raise AssertionError(c.logs()) from None
    assert job["state"] == "done", job
    assert [r["state"] for r in job["history"]] == ["closed", "closed"]
    for rnd in fl.list_rounds(job_id):
        ups = fl.updates_for(job_id, rnd.round)
        counted = sorted(u.device_id for u in ups if u.complete)
        contributors = rnd.contributors or []
        # Counted once each: the aggregate holds every complete update and nothing else.
        assert sorted(contributors) == counted, (rnd.round, contributors, counted)
        assert len(set(contributors)) == len(contributors)
        assert (rnd.metrics or {})["accepted"] == len(counted)
    # Nothing recorded before the kill was lost: each of those updates counted in round 2.
    round2 = {u.device_id: u for u in fl.updates_for(job_id, 2)}
    for device, digest in before.items():
        assert round2[device].digest == digest
        assert round2[device].complete, f"{device}'s update, recorded before the kill, lost"
    assert set(before) <= set(fl.get_round(job_id, 2).contributors or [])  # type: ignore[union-attr]
    store.close()


async def test_agent_killed_mid_round_does_not_stall_past_the_deadline(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker
) -> None:
    # Three fast devices and one slow one (an rpi4 trains ~8x slower than this host): the
    # slow one is killed while it trains. The deadline leaves the fast ones time to finish
    # on a loaded host (a few seconds each when it is not).
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 4, mix={"x86-gateway": 3.0, "rpi4": 1.0})
        victim = next(d for d in fleet.ids if "rpi4" in d)
        deadline_s = 15.0
        assert c.api_url is not None
        await wait_for_devices(c, 4)
        body = digits_job(fleet.eval_path, rounds=2, epochs=4, deadline_s=deadline_s, min_results=3)
        async with api_client(c) as api:
            job_id = (await api.post("/v1/fl/jobs", json=body)).json()["id"]
            task_id = planning.task_id(job_id, 1, victim)

            async def victim_running() -> bool:
                r = await api.get(f"/v1/tasks/{task_id}")
                return r.status_code == 200 and r.json()["state"] == "running"

            async with asyncio.timeout(30):
                while not await victim_running():
                    await asyncio.sleep(0.05)
        await fleet.kill(victim)
        job = await wait_job(c, job_id, ended, timeout=60)
    assert job["state"] == "done", job
    first, second = job["history"]
    assert first["state"] == "closed"
    assert victim in first["devices"]
    assert first["accepted"] == 3
    assert victim not in (first["contributors"] or [])
    # Closed at its deadline: not before it (the victim might have come back), and not
    # stalled past it.
    assert deadline_s - 0.5 <= first["wall_s"] <= deadline_s + 3.0, first["wall_s"]
    # The dead device is offline and no longer chosen.
    assert victim not in second["devices"]
    assert second["accepted"] == 3


async def test_hostile_uploads_to_a_running_job_are_refused_and_counted(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker, tmp_path: Path
) -> None:
    # Slow devices keep round 1 open while the uploads below are made.
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 3, mix={"rpi4": 1.0})
        assert c.api_url is not None
        await wait_for_devices(c, 3)
        body = digits_job(
            fleet.eval_path, rounds=1, clients_per_round=3, min_results=2, deadline_s=30.0
        )
        async with api_client(c) as api:
            job_id = (await api.post("/v1/fl/jobs", json=body)).json()["id"]
            job = await wait_job(c, job_id, lambda j: bool(j.get("history")), timeout=20)
            rnd = job["history"][0]
            target = rnd["devices"][0]
            task = (await api.get(f"/v1/tasks/{planning.task_id(job_id, 1, target)}")).json()
            url: str = task["params"]["upload"]["url"]
            # Finding 3 of the hardening review: no view holds a slot's credential.
            signer = c.feature(FLFeature).engine.signer
            assert signer is not None
            secret = signer.token(job_id, 1, target)
            views = [
                (await api.get(path)).text
                for path in ("/v1/tasks", f"/v1/fl/jobs/{job_id}", "/v1/fl/jobs")
            ]
            assert all("token" not in v and secret not in v for v in [*views, json.dumps(task)])
            assert "?" not in url
            path = url.removeprefix(c.api_url)

            own = fleet.devices[target].config.fetch.http_token
            other = next(d for d in rnd["devices"] if d != target)
            others = fleet.devices[other].config.fetch.http_token
            # An enrolled device the round did not select (never online).
            await enrol_devices(c, {"bystander": tmp_path / "bystander"})
            bystander = read_identity(tmp_path / "bystander")
            assert own
            assert others
            assert bystander is not None

            async def put(
                body: bytes, at: str = path, token: str = secret, device: str | None = own
            ) -> tuple[int, str]:
                """A PUT as a device: its own token (``device``), the slot's (``token``)."""
                digest = hashlib.sha256(body).hexdigest()
                headers = {"X-Lepton-Digest": f"sha256:{digest}"}
                if token:
                    headers[routes.UPLOAD_TOKEN_HEADER] = token
                if device:
                    headers["Authorization"] = f"Bearer {device}"
                async with httpx.AsyncClient(base_url=c.api_url) as client:
                    r = await client.put(at, content=body, headers=headers)
                return r.status_code, r.json().get("reason", "ok")

            # Another client, with the URL from the task view, cannot fill the slot: not
            # without a device token, not with another device's, not as an operator, not
            # without the slot's credential and not with another slot's.
            honest = encode_weights(
                {k: np.zeros(v, dtype=np.float32) for k, v in (await _tensors(c, job_id)).items()},
                kind="update",
                base=task["params"]["weights"]["digest"],
                round=1,
                job=job_id,
            )
            assert await put(honest, device=None) == (401, "missing_token")
            assert await put(honest, device=others) == (403, "wrong_device")
            assert await put(honest, device=operator_token(c)) == (403, "device_only")
            assert await put(honest, token="") == (403, "bad_token")
            assert await put(honest, token=signer.token(job_id, 1, other)) == (
                403,
                "bad_token",
            )
            assert await put(b"\x00garbage") == (400, "malformed")
            assert await put(b"\x00" * (8 << 20)) == (413, "oversized")
            wrong_round = path.replace(f"/{job_id}/1/", f"/{job_id}/2/")
            assert await put(b"x", at=wrong_round) == (409, "wrong_round")
            stranger = path.replace(f"/1/{target}", "/1/bystander")
            assert await put(b"x", at=stranger) == (403, "wrong_device")
            by = bystander.data.http_token
            assert await put(b"x", at=stranger, device=by) == (403, "not_selected")
            shapes = {
                k: np.zeros(v, dtype=np.float32) for k, v in (await _tensors(c, job_id)).items()
            }
            stale = encode_weights(shapes, kind="update", base="0" * 64, round=1, job=job_id)
            assert await put(stale) == (400, "wrong_base")
            job = await wait_job(c, job_id, ended, timeout=60)
            metrics = (await api.get("/metrics")).text
        assert job["state"] == "done"
        rnd = job["history"][0]
        assert rnd["rejects"] == {
            "malformed": 1,
            "oversized": 1,
            "not_selected": 1,
            "bad_token": 2,
            "wrong_base": 1,
        }
        # The devices' own updates were not disturbed.
        assert rnd["accepted"] == 3
        for reason in ("malformed", "oversized", "wrong_round", "not_selected", "device_only"):
            assert f'lepton_fl_upload_rejects_total{{reason="{reason}"}} 1.0' in metrics
        assert 'lepton_fl_upload_rejects_total{reason="bad_token"} 2.0' in metrics
        assert 'lepton_fl_upload_rejects_total{reason="wrong_device"} 2.0' in metrics


async def _tensors(c: Coordinator, job_id: str) -> dict[str, list[int]]:
    job = await asyncio.to_thread(c.feature(FLFeature).fl.get_job, job_id)
    return dict(job.tensors or {})


async def test_a_forged_example_count_is_bounded_by_the_size_the_device_reported(
    make_coordinator: MakeCoordinator, sim_fleet: FleetMaker
) -> None:
    """Finding 4 of the hardening review, on real agents: a device whose train results claim
    10^9 examples. Round 1 opens before any device has loaded its data, so no size is known
    and the per-update cap holds the claim; the agents then report their data sizes, and
    round 2 weights the liar by the size it reported before the round."""
    forged = 10**9
    async with make_coordinator() as c:
        fleet = await sim_fleet(c, 4, adversarial=1, attack="none", forged_examples=forged)
        [liar] = [i for i, d in fleet.devices.items() if d.claim_examples is not None]
        data = {i: fleet.state_root / i / "data" / "digits.npz" for i in fleet.ids}
        sizes = {i: len(np.load(path)["y"]) for i, path in data.items()}
        assert c.api_url is not None
        await wait_for_devices(c, 4)
        # The count clamps alone: no median bound, no norm screen.
        body = digits_job(
            fleet.eval_path, rounds=2, examples_ratio=None, norm_ratio=None, final_check=False
        )
        async with api_client(c) as api:
            r = await api.post("/v1/fl/jobs", json=body)
            assert r.status_code == 201, r.text
            job = await wait_job(c, r.json()["id"], ended, timeout=120)
            metrics = (await api.get("/metrics")).text
        rounds = await asyncio.to_thread(c.feature(FLFeature).fl.list_rounds, job["id"])
    assert job["state"] == "done", job.get("error")
    first, second = job["history"]
    assert first["accepted"] == second["accepted"] == 4
    assert rounds[0].reported_sizes == {}
    assert rounds[1].reported_sizes == sizes
    cap = 100_000  # fl.max_examples_per_update
    honest = sum(n for i, n in sizes.items() if i != liar)
    assert first["metrics"]["clamped_examples"] == {
        liar: {"claimed": forged, "used": cap, "reason": "examples_clamped"}
    }
    assert first["metrics"]["examples"] == honest + cap
    assert second["metrics"]["clamped_examples"] == {
        liar: {"claimed": forged, "used": sizes[liar], "reason": "above_reported_size"}
    }
    assert second["metrics"]["examples"] == honest + sizes[liar]
    assert 'lepton_fl_updates_screened_total{reason="examples_clamped"} 1.0' in metrics
    assert 'lepton_fl_updates_screened_total{reason="above_reported_size"} 1.0' in metrics
