"""Task handlers: one async function per task kind, looked up in a registry.

A handler receives the validated :class:`~lepton.protocol.messages.Task` and a :class:`TaskContext`
and returns the result's ``output`` mapping; raising :class:`TaskError` (or any exception)
turns into a ``failed`` result with the error text. A handler that can take long checks its
context's ``cancel`` token where it can stop cleanly (:mod:`lepton.agent.cancellation`); once the
token is set, the task's result is ``cancelled`` however the handler ends. The agent's services
(model manager, data sources, ...) reach a handler as the context's typed
:class:`TaskServices`. Heavy dependencies (onnxruntime, torch, numpy) are imported inside the
handlers that need them, never at agent start-up: this module names the services' types for
the type checker only.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from lepton.agent.cancellation import CancelToken
from lepton.common.errors import LeptonError
from lepton.protocol.imports import Allowlist
from lepton.protocol.messages import Task
from lepton.protocol.tasks import (
    BENCHMARK,
    DEPLOY,
    ECHO,
    EVALUATE,
    INFER,
    INSTALL,
    REVERT,
    TRAIN,
    UNDEPLOY,
    BenchmarkOutput,
    EchoOutput,
    EchoParams,
    encode_output,
    params_as,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from lepton.agent.inference.manager import ModelManager
    from lepton.agent.training.datasources import DataSources
    from lepton.agent.update.updater import Updater

    #: Named tensors: a model's weights, or an update (local minus global weights).
    Arrays = dict[str, npt.NDArray[np.generic]]
    #: Takes the update a device trained and returns the update it sends.
    UpdateTransform = Callable[[Arrays], Arrays]
    #: Awaited with the task at a handler's pace point.
    Pace = Callable[[Task], Awaitable[None]]

#: The model factories a context allows unless it is given an allowlist (the agent's default
#: ``agent.model_imports``), plus the installed plugins'.
DEFAULT_MODEL_IMPORTS: Final = ("lepton.models.*",)


def default_model_imports() -> Allowlist:
    """``lepton.models.*`` plus every installed plugin's model factories."""
    return Allowlist(DEFAULT_MODEL_IMPORTS).with_plugins()


class TaskError(LeptonError):
    """A handler could not complete its task; the message becomes the result's error."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskServices:
    """The agent's services, shared by every task's handler: one typed field per service.

    Frozen: the daemon builds every service once, up front (each is cheap to make and loads no
    model, runtime, torch or numpy), and no handler replaces one. A service a context lacks is
    ``None`` and the handlers that need it refuse the task (or, for ``weights_store``, make a
    private one for the task). The fleet simulator gives its handlers a copy with more set
    (``dataclasses.replace``): ``pace``, ``train_threads``, ``update_transform``.
    """

    #: The model manager: deploys, serves and caches this device's models
    #: (``deploy``, ``undeploy``, ``infer``; its download settings are the weights cache's).
    models: ModelManager | None = None
    #: The device's named local data sets (``infer``, ``train``, ``evaluate``).
    data_sources: DataSources | None = None
    #: The weights cache of ``train`` and ``evaluate``: a model manager rooted at
    #: ``<state>/weights`` that fetches global weights by digest
    #: (:func:`lepton.agent.training.tasks.weights_cache`). ``None``: each task makes its own.
    weights_store: ModelManager | None = None
    #: The model factories ``train`` and ``evaluate`` may import: only what the device's own
    #: ``agent.model_imports`` allows, never what a task names.
    model_imports: Allowlist = field(default_factory=default_model_imports)
    #: torch threads for ``train`` and ``evaluate``; ``None``: the model manager's thread
    #: setting, else the cores this process may use.
    train_threads: int | None = None
    #: Applied to a trained update (local minus global weights) before it is encoded and
    #: uploaded: local clipping or differential privacy on the device, an attack in the
    #: simulator. The result's ``update_norm`` is the norm of what is sent.
    update_transform: UpdateTransform | None = None
    #: Awaited with the task once a ``train`` update is encoded, just before its upload: the
    #: simulator sleeps there so that a slow device's update leaves when that device's would.
    pace: Pace | None = None
    #: A/B updates of this device's agent image (``install``, ``revert``); ``None`` where
    #: ``[update]`` is off.
    updater: Updater | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskContext:
    """What a handler may use: the device's identity, its state directory, the agent's
    services, and its task's cancel token (the runner gives each task its own)."""

    device_id: str
    state_dir: Path
    agent_version: str
    services: TaskServices = field(default_factory=TaskServices)
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
    from lepton.agent.update import tasks as update

    registry = HandlerRegistry()
    registry.register(ECHO, echo)
    registry.register(BENCHMARK, benchmark)
    registry.register(DEPLOY, inference.deploy)
    registry.register(UNDEPLOY, inference.undeploy)
    registry.register(INFER, inference.infer)
    registry.register(TRAIN, training.train)
    registry.register(EVALUATE, training.evaluate)
    registry.register(INSTALL, update.install)
    registry.register(REVERT, update.revert)
    return registry
