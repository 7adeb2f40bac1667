"""The ``deploy`` and ``infer`` task handlers.

``deploy`` fetches, verifies and swaps in a model (see :mod:`lepton.agent.inference.manager`).
``infer`` runs a served model over a named local data source in batches and reports accuracy (when
the source has labels), latency percentiles per batch and per sample, and throughput. Both reach
their services through the context's :class:`~lepton.agent.handlers.TaskServices` (``models``:
the :class:`~lepton.agent.inference.manager.ModelManager`, ``data_sources``: the
:class:`~lepton.agent.training.datasources.DataSources`), and their results go through the outbox
like every handler's.

Parameter and output contracts: :mod:`lepton.protocol.tasks` (``DeployParams``/``DeployOutput``,
``UndeployParams``/``UndeployOutput``, ``InferParams``/``InferOutput``; also in
docs/agent-inference.md):

- ``deploy``: ``name``, ``digest`` (sha256 hex), ``size`` (bytes), ``url`` (http/https),
  ``format`` (``onnx`` | ``tflite``), optional ``precision`` and ``input``
  (``{name, shape, dtype, mean, std}``).
- ``undeploy``: ``name``; stops serving the model (requests in flight finish on it) and
  deletes its cached file unless another name uses it.
- ``infer``: ``model``, ``source``, optional ``batch_size`` (default 32), ``limit`` (samples),
  ``warmup`` (untimed batches first, default 1), ``output`` (the output holding predictions;
  default the first).

A cancel ends ``deploy`` before its download, load or swap, ``undeploy`` before it starts and
``infer`` between batches.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from lepton.agent.handlers import TaskContext, TaskError
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.runtimes.base import Array, TensorSpec
from lepton.agent.inference.served import ModelError, ServedModel, deploy_spec
from lepton.agent.training.datasources import DataSourceError
from lepton.protocol.messages import Task
from lepton.protocol.tasks import (
    DEPLOY,
    INFER,
    MAX_INFER_BATCH,
    UNDEPLOY,
    DeployOutput,
    InferLatency,
    InferOutput,
    InferParams,
    InputSpec,
    LatencySummary,
    UndeployOutput,
    UndeployParams,
    encode_output,
    params_as,
)

if TYPE_CHECKING:
    from lepton.agent.training.datasources import Dataset

MAX_BATCH: Final = MAX_INFER_BATCH


def _manager(ctx: TaskContext) -> ModelManager:
    manager = ctx.services.models
    if manager is None:
        raise TaskError("this agent has no model manager")
    return manager


# ---------------------------------------------------------------- deploy


async def deploy(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Fetch, verify, load and serve a model; refuse with a clear error and keep the old one.

    A cancel ends it before the download, before the load or before the swap."""
    manager = _manager(ctx)
    try:
        spec = deploy_spec(task.params, max_bytes=manager.max_bytes)
        outcome = await manager.deploy(spec, cancelled=ctx.cancel.is_set)
    except ModelError as exc:
        raise TaskError(str(exc)) from exc
    output = DeployOutput(
        name=outcome.name,
        digest=outcome.digest,
        format=spec.format,
        precision=spec.precision,
        bytes_downloaded=outcome.downloaded,
        cached=outcome.cached,
        load_s=outcome.load_s,
        previous_digest=outcome.previous,
        runtime=outcome.runtime,
        threads=outcome.threads,
        evicted=list(outcome.evicted),
    )
    return encode_output(DEPLOY, output)


async def undeploy(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Unload and remove a served model (see the module docstring); a cancel that arrives
    before it starts ends it with the model still served."""
    manager = _manager(ctx)
    try:
        params = params_as(UndeployParams, task.params)
    except msgspec.ValidationError as exc:
        raise TaskError(f"bad_params: {exc}") from exc
    if ctx.cancel.is_set():
        raise TaskError(f"cancelled: {ctx.cancel.reason}")
    try:
        removed = await manager.undeploy(params.name)
    except ModelError as exc:
        raise TaskError(str(exc)) from exc
    return encode_output(UNDEPLOY, msgspec.convert(removed, UndeployOutput))


# ---------------------------------------------------------------- infer


@dataclass(frozen=True, slots=True)
class Evaluation:
    count: int
    batch_size: int
    batch_s: list[float]
    batch_sizes: list[int]
    wall_s: float
    correct: int | None


def prepare_input(x: Array, spec: TensorSpec, meta: InputSpec | None) -> Array:
    """Samples as the model wants them: normalised, cast to the input dtype, reshaped.

    Two reshapes are safe and done: flattening (8x8 images for a 64-feature model) and
    adding or dropping axes of length 1 (``[1, 8, 8]`` for ``[8, 8, 1]``). Any other
    difference is a :class:`TaskError`, never a silent reinterpretation of the layout.
    """
    import numpy as np

    if meta is not None and (meta.mean is not None or meta.std is not None):
        x = x.astype(np.float32)
        if meta.mean is not None:
            x = x - np.asarray(meta.mean, dtype=np.float32)
        if meta.std is not None:
            x = x / np.asarray(meta.std, dtype=np.float32)
    want = np.dtype(spec.dtype)
    if want.kind in "iub" and x.dtype.kind == "f":
        raise TaskError(f"input {spec.name!r} is {want}, the data source holds {x.dtype} values")
    x = x.astype(want, copy=False)
    sample = spec.shape[1:]
    have = tuple(x.shape[1:])
    if len(sample) == len(have) and all(
        w is None or w == g for w, g in zip(sample, have, strict=True)
    ):
        return np.ascontiguousarray(x)
    fixed = [d for d in sample if d is not None]
    same_size = len(fixed) == len(sample) and math.prod(fixed) == math.prod(have)
    squeezed_equal = [d for d in fixed if d != 1] == [d for d in have if d != 1]
    if same_size and (len(fixed) == 1 or squeezed_equal):
        return np.ascontiguousarray(x.reshape((x.shape[0], *fixed)))
    raise TaskError(
        f"data source samples have shape {list(have)}, model input {spec.name!r} "
        f"wants {['?' if d is None else d for d in sample]} per sample"
    )


def predicted_labels(out: Array) -> Array:
    """Class ids from a model output: argmax of scores, integer labels as they are, or a
    single probability per sample thresholded at 0.5."""
    import numpy as np

    n = out.shape[0]
    flat = out.reshape(n, -1)
    labels: Array
    if out.dtype.kind in "iub":
        labels = flat[:, 0].astype(np.int64)
    elif flat.shape[1] > 1:
        labels = flat.argmax(axis=1)
    else:
        labels = (flat[:, 0] > 0.5).astype(np.int64)
    return labels


def evaluate(
    model: ServedModel,
    data: Dataset,
    *,
    batch_size: int,
    warmup: int,
    output: str | None,
    stop: threading.Event,
) -> Evaluation:
    """Run ``model`` over ``data`` in batches (blocking; call in a worker thread)."""
    import numpy as np

    runtime = model.runtime
    if len(runtime.inputs) != 1:
        raise TaskError(f"infer needs a single-input model; {model.name} has {len(runtime.inputs)}")
    spec = runtime.inputs[0]
    out_name = output or runtime.outputs[0].name
    if out_name not in {s.name for s in runtime.outputs}:
        raise TaskError(f"model {model.name} has no output {out_name!r}")
    if spec.shape and spec.shape[0] is not None:
        batch_size = spec.shape[0]  # a fixed batch dimension wins
    x = prepare_input(data.x, spec, model.input)
    n = len(x)
    for _ in range(warmup if n else 0):  # first runs allocate and tune; not timed
        runtime.run({spec.name: x[:batch_size]})
    batch_s: list[float] = []
    outs: list[Array] = []
    run = runtime.single(spec.name, out_name)
    stopped = stop.is_set
    clock = time.perf_counter
    started = clock()
    for start in range(0, n, batch_size):
        if stopped():
            raise TaskError("cancelled")
        xb = x[start : start + batch_size]
        t0 = clock()
        outs.append(run(xb))
        batch_s.append(clock() - t0)
    wall = clock() - started
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    correct = None
    if data.y is not None and n:
        y = data.y.argmax(axis=1) if data.y.ndim == 2 else data.y
        pred = np.concatenate([predicted_labels(o) for o in outs])
        correct = int(np.count_nonzero(pred == y.astype(np.int64)))
    return Evaluation(
        count=n,
        batch_size=batch_size,
        batch_s=batch_s,
        batch_sizes=sizes,
        wall_s=wall,
        correct=correct,
    )


def latency_summary(seconds: list[float]) -> LatencySummary:
    import numpy as np

    if not seconds:
        return LatencySummary(p50=None, p95=None, p99=None, mean=None, max=None)
    ms = np.asarray(seconds) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return LatencySummary(
        p50=float(p50), p95=float(p95), p99=float(p99), mean=float(ms.mean()), max=float(ms.max())
    )


async def infer(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Run a served model over a local data source and report accuracy, latency, throughput."""
    manager = _manager(ctx)
    sources = ctx.services.data_sources
    if sources is None:
        raise TaskError("this agent has no data sources configured")
    try:
        params = params_as(InferParams, task.params)
    except msgspec.ValidationError as exc:
        raise TaskError(f"bad_params: {exc}") from exc
    try:
        source = sources.get(params.source)
        data = await asyncio.to_thread(source.load, params.limit)
    except DataSourceError as exc:
        raise TaskError(f"data_source: {exc}") from exc
    with manager.lease(params.model) as model:
        if model is None:
            why = manager.unavailable(params.model) or "is not deployed here"
            raise TaskError(f"unknown_model: model {params.model!r} {why}")
        stop = ctx.cancel.event  # set by a cancel, or below by a shutdown
        try:
            ev = await asyncio.to_thread(
                evaluate,
                model,
                data,
                batch_size=params.batch_size,
                warmup=params.warmup,
                output=params.output,
                stop=stop,
            )
        except asyncio.CancelledError:
            stop.set()  # the worker thread ends after its current batch
            raise
        per_sample = [s / k for s, k in zip(ev.batch_s, ev.batch_sizes, strict=True)]
        output = InferOutput(
            model=model.name,
            digest=model.digest,
            format=model.format,
            precision=model.precision,
            source=params.source,
            count=ev.count,
            batch_size=ev.batch_size,
            batches=len(ev.batch_s),
            labelled=ev.correct is not None,
            correct=ev.correct,
            accuracy=None if ev.correct is None else ev.correct / ev.count,
            latency_ms=InferLatency(
                batch=latency_summary(ev.batch_s), sample=latency_summary(per_sample)
            ),
            throughput_sps=ev.count / ev.wall_s if ev.wall_s > 0 else None,
            wall_s=ev.wall_s,
            runtime=model.runtime.description,
            providers=list(model.runtime.providers),
            threads=model.runtime.threads,
        )
        return encode_output(INFER, output)
