"""A cancel reaches the deploy and undeploy handlers at their step boundaries: a deploy
cancelled during its download ends before the swap (the model served before stays served),
an undeploy cancelled before it starts leaves the model served."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lepton.agent.handlers import TaskContext, TaskError, TaskServices
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.tasks import deploy, undeploy
from lepton.protocol.messages import Task
from lepton.protocol.tasks import DEPLOY, UNDEPLOY, DeployParams, UndeployParams, encode_params
from tests.agent.inference.conftest import Linear
from tests.support.httpserver import Fault, HttpServer


def _task(kind: str, params: dict[str, Any]) -> Task:
    return Task(task_id=f"t-{kind}", kind=kind, params=params, expires_at=time.time() + 60)


def _deploy(blobs: HttpServer, data: bytes) -> Task:
    digest = blobs.add(data)
    params = DeployParams(
        name="clf", digest=digest, size=len(data), url=blobs.url(digest), format="onnx"
    )
    return _task(DEPLOY, encode_params(DEPLOY, params))


def _ctx(tmp_path: Any, manager: ModelManager) -> TaskContext:
    return TaskContext(
        device_id="dev",
        state_dir=tmp_path,
        agent_version="test",
        services=TaskServices(models=manager),
    )


async def test_a_deploy_cancelled_during_its_download_keeps_the_served_model(
    tmp_path: Any, manager: ModelManager, blobs: HttpServer, linear: Linear, big: Linear
) -> None:
    first = await deploy(_deploy(blobs, linear.onnx), _ctx(tmp_path, manager))
    second = _deploy(blobs, big.onnx)  # ~130 kB: 1 KiB pieces, 10 ms apart
    digest = second.params["digest"]
    blobs.fault(digest, Fault("slow", delay=0.01))
    ctx = _ctx(tmp_path, manager)
    running = asyncio.create_task(deploy(second, ctx))
    deadline = time.monotonic() + 10
    while not any(r.path.endswith(digest) for r in blobs.requests):
        assert time.monotonic() < deadline, "the download never started"
        await asyncio.sleep(0.01)
    ctx.cancel.set("user")
    with pytest.raises(TaskError, match="cancelled"):
        await running
    assert blobs.sent(digest) > 0  # it was downloading; it stopped before the swap
    with manager.lease("clf") as model:
        assert model is not None
        assert model.digest == first["digest"]  # not swapped


async def test_an_undeploy_cancelled_before_it_starts_leaves_the_model_served(
    tmp_path: Any, manager: ModelManager, blobs: HttpServer, linear: Linear
) -> None:
    await deploy(_deploy(blobs, linear.onnx), _ctx(tmp_path, manager))
    ctx = _ctx(tmp_path, manager)
    ctx.cancel.set("user")
    task = _task(UNDEPLOY, encode_params(UNDEPLOY, UndeployParams(name="clf")))
    with pytest.raises(TaskError, match="cancelled: user"):
        await undeploy(task, ctx)
    with manager.lease("clf") as model:
        assert model is not None
    # Not cancelled, it goes.
    out = await undeploy(task, _ctx(tmp_path, manager))
    assert out["name"] == "clf"
    with manager.lease("clf") as model:
        assert model is None
