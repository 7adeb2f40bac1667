"""Two coordinator processes on one PostgreSQL and one broker: the leader is SIGKILLed, the
other takes over within a lease period, and no task is lost or run twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.coordinator.conftest import eventually
from tests.support.api import bearer, operator_token
from tests.support.broker import Broker, free_port
from tests.support.device import FakeDevice

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
LEASE_S = 2.0
TASKS = 24


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    database: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, object] | None:
        try:
            return httpx.get(f"{self.api}/v1/health", timeout=1).json()  # type: ignore[no-any-return]
        except (httpx.HTTPError, ValueError):
            return None


def start_replica(name: str, db_url: str, broker_port: int, workdir: Path) -> Replica:
    port = free_port()
    log = workdir / f"{name}.log"
    cmd = [
        sys.executable,
        "-m",
        "lepton.coordinator.cli",
        "coordinator",
        "run",
        "--instance-id",
        name,
        "--database-url",
        db_url,
        "--mqtt-port",
        str(broker_port),
        "--http-port",
        str(port),
        "--data-dir",
        str(workdir / name),
        "--set",
        "mqtt.shared_subscriptions=true",
        "--set",
        f"replica.lease_s={LEASE_S}",
        "--set",
        "scheduler.batch_interval_s=0.1",
        "--set",
        "registry.flush_interval_s=0.05",
        "--set",
        "tasks.redispatch_after_s=1",
        "--set",
        "tasks.ack_timeout_s=5",
        "--set",
        "mqtt.reconnect_min_s=0.2",
        "--set",
        "mqtt.reconnect_max_s=1",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Replica(name, port, proc, log, db_url)


@pytest.fixture
def replicas(pg_url: str, broker: Broker, tmp_path: Path) -> Iterator[list[Replica]]:
    started = [start_replica(n, pg_url, broker.port, tmp_path) for n in ("r1", "r2")]
    try:
        yield started
    finally:
        for r in started:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in started:
            try:
                r.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


async def test_leader_killed_mid_stream_nothing_lost_or_run_twice(
    replicas: list[Replica], broker: Broker
) -> None:
    def healthy() -> bool:
        hs = [r.health() for r in replicas]
        return all(h is not None and h["mqtt_connected"] for h in hs) and (
            sum(bool(h and h["leader"]) for h in hs) == 1
        )

    try:
        await eventually(lambda: asyncio.to_thread(healthy), timeout=40, interval=0.2)
    except AssertionError as exc:
        logs = "\n".join(
            f"--- {r.name} (exit {r.proc.poll()})\n{r.log.read_text()[-3000:]}" for r in replicas
        )
        raise AssertionError(f"replicas not ready:\n{logs}") from exc
    leader = next(r for r in replicas if (r.health() or {}).get("leader"))
    follower = next(r for r in replicas if r is not leader)

    devices = [
        FakeDevice(
            broker.port, f"edge-{i}", slots=2, interval_s=0.5, run_s=0.25, resend_after_s=0.5
        )
        for i in range(3)
    ]
    for d in devices:
        await d.__aenter__()
    try:
        # Both replicas check tokens on the one database.
        headers = bearer(await asyncio.to_thread(operator_token, replicas[0].database))
        async with httpx.AsyncClient(timeout=5, headers=headers) as http:

            async def devices_known() -> bool:
                r = await http.get(f"{follower.api}/v1/devices", params={"state": "online"})
                return len(r.json()) == len(devices)

            await eventually(devices_known, timeout=20)
            ids: list[str] = []
            for i in range(TASKS // 2):  # submitted through either replica
                api = (leader, follower)[i % 2].api
                r = await http.post(
                    f"{api}/v1/tasks", json={"kind": "echo", "params": {"payload": i}}
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            # Kill the leader while those tasks are being placed, run and reported.
            await asyncio.sleep(0.5)
            leader.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            leader.proc.wait(timeout=10)

            async def taken_over() -> float:
                await eventually(
                    lambda: asyncio.to_thread(lambda: (follower.health() or {}).get("leader")),
                    timeout=LEASE_S * 3,
                    interval=0.05,
                )
                return time.monotonic() - killed_at

            # Watched while the follower takes submissions, so their time is not counted.
            watcher = asyncio.create_task(taken_over())
            for i in range(TASKS // 2, TASKS):
                r = await http.post(
                    f"{follower.api}/v1/tasks", json={"kind": "echo", "params": {"payload": i}}
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            takeover_s = await watcher
            assert takeover_s <= LEASE_S + 1.0, f"took over after {takeover_s:.2f}s"

            async def all_done() -> bool:
                r = await http.get(f"{follower.api}/v1/tasks", params={"limit": 1000})
                states = [t["state"] for t in r.json()]
                return len(states) == TASKS and all(s == "succeeded" for s in states)

            await eventually(all_done, timeout=60, interval=0.25)
            for tid in ids:
                detail = (await http.get(f"{follower.api}/v1/tasks/{tid}")).json()
                applied = [r for r in detail["results"] if r["applied"]]
                assert len(applied) == 1, detail
                assert detail["output"] == {"echo": detail["params"]["payload"]}
    finally:
        for d in devices:
            await d.close(graceful=True)

    runs: dict[str, int] = {}
    for d in devices:
        for tid, n in d.executions.items():
            runs[tid] = runs.get(tid, 0) + n
    assert sorted(runs) == sorted(ids), "a task was lost"
    assert all(n == 1 for n in runs.values()), {t: n for t, n in runs.items() if n != 1}
    assert all(len(d.executions) > 0 for d in devices)
