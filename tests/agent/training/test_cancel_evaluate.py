"""A cancel reaches the evaluate handler at its step boundaries: before its data is loaded,
after the weights' download (before any scoring), and between scoring batches."""

from __future__ import annotations

import asyncio
import time

import pytest

from lepton.agent.handlers import TaskContext, TaskError
from lepton.agent.training.tasks import evaluate
from lepton.protocol.tasks import EVALUATE, EvaluateParams, WeightsRef, encode_params
from tests.agent.training.conftest import CNN, Partition, Servers, initial_weights, task
from tests.support.httpserver import Fault


def _params(servers: Servers, **kw: int) -> dict[str, object]:
    ref = WeightsRef(**servers.weights(CNN))
    return encode_params(EVALUATE, EvaluateParams(model=CNN, weights=ref, data="digits", **kw))


async def test_an_evaluate_cancelled_before_it_starts_downloads_nothing(
    servers: Servers, ctx: TaskContext
) -> None:
    ctx.cancel.set("user")
    with pytest.raises(TaskError, match="cancelled: user"):
        await evaluate(task(EVALUATE, **_params(servers)), ctx)
    assert servers.blobs.requests == []


async def test_an_evaluate_cancelled_during_its_download_scores_nothing(
    servers: Servers, ctx: TaskContext
) -> None:
    params = _params(servers)
    digest = params["weights"]["digest"]  # type: ignore[index]
    servers.blobs.fault(digest, Fault("slow", delay=0.002))
    running = asyncio.create_task(evaluate(task(EVALUATE, **params), ctx))
    deadline = time.monotonic() + 20
    while not servers.blobs.requests:
        assert time.monotonic() < deadline, "the download never started"
        await asyncio.sleep(0.01)
    ctx.cancel.set("user")
    with pytest.raises(TaskError, match="cancelled: user"):
        await running


def test_scoring_stops_at_the_next_batch_once_stopped(partition: Partition) -> None:
    """The check between scoring batches, which ``evaluate`` hands its cancel event."""
    import threading

    from lepton.agent.training.datasources import ArraySource
    from lepton.agent.training.trainer import evaluate_local
    from lepton.protocol.imports import Allowlist

    data = ArraySource(partition.x, partition.y).load(None)
    weights = initial_weights(CNN)
    allow = Allowlist(("lepton.models.*",))
    stop = threading.Event()
    loss, accuracy = evaluate_local(CNN, weights, data, 64, 1, allow=allow, stop=stop)
    assert loss > 0.0
    assert 0.0 <= accuracy <= 1.0
    stop.set()
    with pytest.raises(TaskError, match="cancelled"):
        evaluate_local(CNN, weights, data, 64, 1, allow=allow, stop=stop)
