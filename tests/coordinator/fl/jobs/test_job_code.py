"""What a federated job may make the coordinator run (finding 1 of the hardening review):
only allowed model factories, checked at submission; a factory that raises fails its job;
one that kills the coordinator fails its job after a few restarts instead of killing every
one. On a real coordinator process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.coordinator.fl.conftest import ended, wait_job
from tests.coordinator.fl.jobs.test_engine_faults import CoordinatorProcess
from tests.support.api import Endpoint, api_client
from tests.support.broker import Broker

pytestmark = pytest.mark.slow

CODE = "tests.coordinator.fl.job_code"


def job(model: str, **extra: Any) -> dict[str, Any]:
    return {"name": "crash", "model": model, "data": "digits", "rounds": 1, **extra}


async def post(api: Endpoint, body: dict[str, Any]) -> httpx.Response:
    async with api_client(api, timeout=10) as client:
        return await client.post("/v1/fl/jobs", json=body)


async def exited(c: CoordinatorProcess, timeout: float = 60.0) -> int:
    assert c.proc is not None
    async with asyncio.timeout(timeout):
        while (rc := c.proc.poll()) is None:
            await asyncio.sleep(0.1)
    return rc


async def test_a_job_whose_factory_kills_the_coordinator_is_failed_not_resumed(
    broker: Broker, tmp_path: Path
) -> None:
    c = CoordinatorProcess(
        tmp_path, broker.port, {"fl.allowed_imports": f"lepton.models.*,{CODE}:*"}
    )
    c.start()
    try:
        await c.healthy()
        # Not on the list: refused at submission, naming why, and nothing is imported.
        r = await post(c.endpoint, job("os:abort"))
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "model"]
        assert "not_allowed" in r.json()["detail"][0]["msg"]
        assert c.proc is not None
        assert c.proc.poll() is None

        # Allowed, and it aborts the process while the job loads: each start dies in it...
        r = await post(c.endpoint, job(f"{CODE}:aborting_model"))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert await exited(c) == -signal.SIGABRT
        c.start()
        assert await exited(c) == -signal.SIGABRT  # fl.max_load_attempts = 2 by default
        # ...until the count of interrupted loads fails the job: this start stays up.
        c.start()
        await c.healthy()
        failed = await wait_job(c.endpoint, job_id, ended, timeout=30)
        assert failed["state"] == "failed"
        assert failed["error"].startswith("crashed_loader"), failed["error"]
        await asyncio.sleep(1.0)
        assert c.proc.poll() is None, c.logs()

        # A factory that raises fails its job with the reason, once, the process untouched.
        r = await post(c.endpoint, job(f"{CODE}:raising_model"))
        assert r.status_code == 201, r.text
        raised = await wait_job(c.endpoint, r.json()["id"], ended, timeout=60)
        assert raised["state"] == "failed"
        assert "RuntimeError: this factory always fails" in raised["error"]
        r = await post(
            c.endpoint, job("subprocess:run", eval="os:getcwd")
        )  # counted by this process
        assert r.status_code == 422, r.text
        async with api_client(c.endpoint) as client:
            metrics = (await client.get("/metrics")).text
        assert 'lepton_fl_job_failures_total{reason="crashed_loader"} 1.0' in metrics
        assert 'lepton_fl_job_failures_total{reason="model_error"} 1.0' in metrics
        assert 'lepton_fl_job_refusals_total{key="model"} 1.0' in metrics
        assert c.proc.poll() is None
    finally:
        c.stop()
