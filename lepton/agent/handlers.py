"""Task handlers: one async function per task kind, looked up in a registry.

A handler receives the validated :class:`~lepton.protocol.messages.Task` and a :class:`TaskContext`
and returns the result's ``output`` mapping; raising :class:`TaskError` (or any exception)
turns into a ``failed`` result with the error text. A handler that can take long checks its
context's ``cancel`` token where it can stop cleanly (:mod:`lepton.agent.cancellation`); once the
token is set, the task's result is ``cancelled`` however the handler ends. Heavy
dependencies (onnxruntime, torch) are imported inside the handlers that need them, never at
agent start-up.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from lepton.agent.cancellation import CancelToken
from lepton.common.errors import LeptonError
from lepton.protocol.messages import Task
from lepton.protocol.tasks import (
    BENCHMARK,
    DEPLOY,
    ECHO,
    EVALUATE,
    INFER,
    TRAIN,
    UNDEPLOY,
    BenchmarkOutput,
    EchoOutput,
    EchoParams,
    encode_output,
    params_as,
)


class TaskError(LeptonError):
    """A handler could not complete its task; the message becomes the result's error."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskContext:
    """What a handler may use: the device's identity, its state directory, shared services,
    and its task's cancel token (the runner gives each task its own)."""

    device_id: str
    state_dir: Path
    agent_version: str
    extras: dict[str, Any] = field(default_factory=dict)
    cancel: CancelToken = field(default_factory=CancelToken)


Handler = Callable[[Task, TaskContext], Awaitable[dict[str, Any]]]


class HandlerRegistry:
    """Maps task kinds to handlers."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    def get(self, kind: str) -> Handler | None:
        return self._handlers.get(kind)

    def kinds(self) -> list[str]:
        return sorted(self._handlers)


async def echo(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Return ``params["payload"]`` after ``params["sleep_s"]`` seconds (a liveness probe).

    ``params["fail"]`` makes it fail on purpose, for exercising the failure path end to end.
    A cancel ends the sleep at once.
    """
    try:
        params = params_as(EchoParams, task.params)
    except msgspec.ValidationError as exc:
        raise TaskError(f"bad_params: {exc}") from exc
    if params.sleep_s and await ctx.cancel.sleep(params.sleep_s):
        raise TaskError(f"cancelled: {ctx.cancel.reason}")
    if params.fail:
        raise TaskError(str(params.fail))
    return encode_output(ECHO, EchoOutput(echo=params.payload, device_id=ctx.device_id))


async def benchmark(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Re-run the device micro-benchmark and return fresh throughput figures.

    A cancel ends it before the benchmark starts or, once it runs, as soon as it arrives (the
    probe's measuring process is killed, nothing is cached)."""
    from lepton.agent.telemetry.probe import load_probe

    if ctx.cancel.is_set():
        raise TaskError(f"cancelled: {ctx.cancel.reason}")
    started = time.perf_counter()
    result = await ctx.cancel.interrupt(
        load_probe(ctx.state_dir, agent_version=ctx.agent_version, refresh=True)
    )
    if result is None:
        raise TaskError(f"cancelled: {ctx.cancel.reason}")
    if result.bench is None:
        raise TaskError(f"benchmark failed: {result.details.get('error', 'unknown error')}")
    output = BenchmarkOutput(
        fp32_gflops=result.bench.fp32_gflops,
        int8_gops=result.bench.int8_gops,
        runtime=result.bench.runtime,
        wall_s=time.perf_counter() - started,
    )
    return encode_output(BENCHMARK, output)


def default_registry() -> HandlerRegistry:
    # Imported here: agent.inference and agent.training import this module. They load
    # numpy, the runtimes and torch only when a task of theirs runs.
    from lepton.agent.inference import tasks as inference
    from lepton.agent.training import tasks as training

    registry = HandlerRegistry()
    registry.register(ECHO, echo)
    registry.register(BENCHMARK, benchmark)
    registry.register(DEPLOY, inference.deploy)
    registry.register(UNDEPLOY, inference.undeploy)
    registry.register(INFER, inference.infer)
    registry.register(TRAIN, training.train)
    registry.register(EVALUATE, training.evaluate)
    return registry
