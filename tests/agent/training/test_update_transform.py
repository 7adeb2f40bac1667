"""The ``update_transform`` hook: what a device sends is the transform of what it trained."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from lepton.agent.handlers import TaskContext, TaskError
from lepton.agent.training.tasks import train
from lepton.protocol.weights import decode_weights
from lepton.sim.attacks import sign_flip
from tests.agent.training.conftest import Servers, task, train_params

if TYPE_CHECKING:
    from lepton.agent.handlers import UpdateTransform


async def sent(ctx: TaskContext, servers: Servers) -> tuple[dict[str, Any], dict[str, Any]]:
    params = train_params(servers)
    out = await train(task("train", **params), ctx)
    _meta, delta = decode_weights(servers.uploads.body(params["upload"]["url"]), max_bytes=1 << 24)
    return out, delta


def transforming(ctx: TaskContext, transform: UpdateTransform) -> TaskContext:
    return dataclasses.replace(
        ctx, services=dataclasses.replace(ctx.services, update_transform=transform)
    )


async def test_transform_applies_before_encoding(ctx: TaskContext, servers: Servers) -> None:
    honest_out, honest = await sent(ctx, servers)
    flipped_out, flipped = await sent(transforming(ctx, sign_flip(10.0)), servers)
    for name, value in honest.items():
        np.testing.assert_allclose(flipped[name], -10.0 * value, rtol=1e-4, atol=1e-6)
    assert flipped_out["update_norm"] == pytest.approx(10.0 * honest_out["update_norm"], rel=1e-4)
    assert flipped_out["loss_after"] == honest_out["loss_after"]  # training itself is unchanged


async def test_a_broken_transform_fails_the_task(ctx: TaskContext, servers: Servers) -> None:
    drops = transforming(ctx, lambda delta: {"only": delta[next(iter(delta))]})
    with pytest.raises(TaskError, match="update_transform"):
        await sent(drops, servers)

    def boom(delta: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("no")

    with pytest.raises(TaskError, match="RuntimeError"):
        await sent(transforming(ctx, boom), servers)
