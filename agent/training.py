"""The ``train`` and ``evaluate`` task handlers: federated learning on the device's own data.

The device's data never leaves it. A ``train`` task fetches the round's global weights by
content address, trains the job's torch model on a named local data source, and uploads only
the update (local weights minus global weights), encoded with :mod:`protocol.weights`, over
HTTP; the result carries the update's digest, size and a few figures. torch is imported
only when one of these tasks runs, never at agent start-up.

``train`` params (the coordinator sends exactly these; other keys, such as ``timeout_s``,
are ignored):

- ``job`` (str, 1-64 chars ``[A-Za-z0-9._:/-]``): the federated job, echoed and written into
  the update blob.
- ``round`` (int >= 0): the round, likewise.
- ``model`` (str ``package.module:factory``): import path of a callable taking no
  arguments and returning a ``torch.nn.Module`` (e.g. ``models.digits:DigitsCNN``). Its
  ``state_dict()`` must have exactly the tensors of the global weights.
- ``weights`` ({``digest``: sha256 hex, ``size``: bytes, ``url``: http(s)}): the global
  weights, a ``kind="weights"`` blob. Fetched with the model manager's verified, resumable
  download into ``<state>/weights`` and cached there by digest.
- ``data`` (str): the name of a local data source (the agent's ``[data]`` table) holding
  samples ``x`` and class labels ``y`` (class ids, or one-hot). Samples are fed to the model
  as float32, as stored (normalising is the model's job). A device without this source
  refuses the task before downloading anything.
- ``epochs`` (int 1-1000, default 1), ``batch_size`` (int 1-65536, default 32),
  ``lr`` (float > 0, default 0.01), ``optimizer`` (``"sgd"`` | ``"adam"``, default sgd),
  ``momentum`` (float in [0, 1), default 0; SGD only).
- ``prox_mu`` (float >= 0, default 0): FedProx proximal term; the local loss becomes
  ``cross_entropy + prox_mu / 2 * ||w - w_global||^2`` over trainable parameters.
- ``compression`` (``"fp32"`` | ``"fp16"`` | ``"int8"``, default fp32): of the update.
- ``upload`` ({``url``: http(s)}): where the update is ``PUT``, with headers
  ``X-Lepton-Digest: sha256:<hex>``, ``Content-Length`` and
  ``Content-Type: application/octet-stream``. Connection errors and HTTP 408/425/429/5xx
  are retried with capped exponential backoff; any 2xx is success; other statuses fail.
- ``seed`` (int >= 0, default 0): seeds shuffling and the model's random layers; the same
  seed, weights and data give the same update.
- ``max_examples`` (int >= 1, optional): train on at most this many local samples.

``train`` output: ``update`` ({``digest``, ``size``, ``compression``}), ``examples``,
``loss_before`` / ``loss_after`` (mean cross-entropy over the local data with the global
and the trained weights), ``accuracy`` (after training, local data), ``train_s``,
``upload_s``; and also ``job``, ``round``, ``accuracy_before``, ``steps``, ``fetch_s``,
``weights_cached`` and ``update_norm`` (L2 norm of the update before compression).

``evaluate`` params: ``model``, ``weights``, ``data`` as above; optional ``batch_size``
(default 256), ``max_examples``, ``job`` and ``round`` (echoed). Output: ``loss``,
``accuracy``, ``examples`` (and ``eval_s``, ``job``, ``round``).

Services come through ``TaskContext.extras``: ``data_sources``
(:class:`~agent.datasources.DataSources`), optionally ``models`` (the
:class:`~agent.models.ModelManager`, whose download settings the weights cache copies),
``weights_store`` (a ModelManager used as the weights cache; made on first use) and
``train_threads`` (torch threads; default: the model manager's thread setting, else the
cores this process may use) and ``update_transform``: a callable taking the update
(``dict[str, numpy.ndarray]``, local minus global weights) and returning the update to
encode and upload, applied after training and before compression. It is the hook for
local clipping or local differential privacy on the device; the fleet simulator also uses
it to play adversarial clients. The output's ``update_norm`` is the norm of what is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from agent.datasources import DataSourceError, DataSources
from agent.handlers import TaskContext, TaskError
from agent.models import DeploySpec, ModelError, ModelManager
from protocol.errors import DecodeError
from protocol.messages import Task

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

    from agent.datasources import Dataset

    Arrays = dict[str, npt.NDArray[np.generic]]

log = logging.getLogger(__name__)
P = TypeVar("P", bound=msgspec.Struct)

SOURCES_KEY: Final = "data_sources"
MODELS_KEY: Final = "models"
WEIGHTS_KEY: Final = "weights_store"
THREADS_KEY: Final = "train_threads"
TRANSFORM_KEY: Final = "update_transform"
#: Weight blobs kept in the cache besides those used in the last ``KEEP_RECENT_S`` seconds.
KEEP_WEIGHTS: Final = 3
KEEP_RECENT_S: Final = 600.0
DIGEST_HEADER: Final = "X-Lepton-Digest"
MAX_BATCH: Final = 65536

JobName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9._:/-]+\Z")]
FactoryPath = Annotated[str, Meta(max_length=256, pattern=r"\A[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")]
Url = Annotated[str, Meta(min_length=1, max_length=4096)]
# protocol.weights.Compression, spelled out: importing protocol.weights loads numpy, which the
# agent does only once a task needs it.
Compression = Literal["fp32", "fp16", "int8"]


class WeightsRef(msgspec.Struct, frozen=True, kw_only=True):
    """Where the global weights are: content address, declared size, URL."""

    digest: Annotated[str, Meta(pattern=r"\A(sha256:)?[0-9a-fA-F]{64}\Z")]
    size: Annotated[int, Meta(gt=0)]
    url: Url


class UploadRef(msgspec.Struct, frozen=True, kw_only=True):
    url: Url


class TrainParams(msgspec.Struct, frozen=True, kw_only=True):
    """The ``train`` task's parameters (see the module docstring)."""

    job: JobName
    round: Annotated[int, Meta(ge=0, le=2**62)]
    model: FactoryPath
    weights: WeightsRef
    data: Annotated[str, Meta(min_length=1, max_length=64)]
    upload: UploadRef
    epochs: Annotated[int, Meta(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Meta(ge=1, le=MAX_BATCH)] = 32
    lr: Annotated[float, Meta(gt=0.0, le=1e3)] = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0
    prox_mu: Annotated[float, Meta(ge=0.0, le=1e6)] = 0.0
    compression: Compression = "fp32"
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    max_examples: Annotated[int, Meta(ge=1)] | None = None


class EvaluateParams(msgspec.Struct, frozen=True, kw_only=True):
    """The ``evaluate`` task's parameters (see the module docstring)."""

    model: FactoryPath
    weights: WeightsRef
    data: Annotated[str, Meta(min_length=1, max_length=64)]
    batch_size: Annotated[int, Meta(ge=1, le=MAX_BATCH)] = 256
    max_examples: Annotated[int, Meta(ge=1)] | None = None
    job: JobName | None = None
    round: Annotated[int, Meta(ge=0, le=2**62)] | None = None


def _params(params: dict[str, Any], cls: type[P]) -> P:
    try:
        return msgspec.convert(params, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise TaskError(f"bad_params: {exc}") from exc


# ---------------------------------------------------------------- services


def _sources(ctx: TaskContext) -> DataSources:
    sources = ctx.extras.get(SOURCES_KEY)
    if not isinstance(sources, DataSources):
        raise TaskError("no_data: this agent has no data sources configured")
    return sources


async def _load_data(ctx: TaskContext, name: str, limit: int | None) -> Dataset:
    """The named local data set, with labels; a clear refusal when the device lacks it."""
    sources = _sources(ctx)
    if name not in sources.names():
        known = ", ".join(sources.names()) or "none"
        raise TaskError(f"no_data: this device has no data source {name!r} (it has: {known})")
    try:
        data = await asyncio.to_thread(sources.get(name).load, limit)
    except DataSourceError as exc:
        raise TaskError(f"no_data: {exc}") from exc
    if data.y is None:
        raise TaskError(f"no_labels: data source {name!r} has no labels to train or score on")
    if len(data) == 0:
        raise TaskError(f"no_data: data source {name!r} is empty")
    return data


def _weights_store(ctx: TaskContext) -> ModelManager:
    """The weights cache: a model manager rooted at ``<state>/weights``, made on first use."""
    store = ctx.extras.get(WEIGHTS_KEY)
    if isinstance(store, ModelManager):
        return store
    models = ctx.extras.get(MODELS_KEY)
    settings: dict[str, Any] = {}
    if isinstance(models, ModelManager):
        settings = {
            "max_bytes": models.max_bytes,
            "retries": models.retries,
            "timeout": models.timeout,
            "backoff": models.backoff,
        }
    store = ModelManager(ctx.state_dir / "weights", **settings)
    ctx.extras[WEIGHTS_KEY] = store
    return store


def _threads(ctx: TaskContext) -> int:
    configured = ctx.extras.get(THREADS_KEY)
    if isinstance(configured, int) and configured > 0:
        return configured
    models = ctx.extras.get(MODELS_KEY)
    if isinstance(models, ModelManager) and models.threads > 0:
        return models.threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class _Fetched:
    digest: str
    arrays: Arrays
    cached: bool
    fetch_s: float


async def _fetch_weights(ctx: TaskContext, ref: WeightsRef) -> _Fetched:
    """Fetch (or find in the cache), verify and decode the global weights."""
    store = _weights_store(ctx)
    digest = ref.digest.lower().removeprefix("sha256:")
    started = time.perf_counter()
    try:
        spec = DeploySpec.from_params(
            # The manager's downloader only reads name, digest, size and url.
            {
                "name": "weights",
                "digest": digest,
                "size": ref.size,
                "url": ref.url,
                "format": "onnx",
            },
            max_bytes=store.max_bytes,
        )
        # The manager's verified, resumable downloader, with its cache and digest locks.
        path, downloaded = await store._fetch(spec)
        data = await asyncio.to_thread(path.read_bytes)
    except ModelError as exc:
        raise TaskError(f"weights: {exc}") from exc
    except OSError as exc:
        raise TaskError(f"weights: cannot read the cached blob: {exc}") from exc
    await asyncio.to_thread(_prune_weights, store.cache_dir, digest)
    from protocol.weights import decode_weights

    try:
        meta, arrays = await asyncio.to_thread(decode_weights, data, max_bytes=store.max_bytes)
    except DecodeError as exc:
        raise TaskError(f"weights: not a weights blob: {exc}") from exc
    if meta.kind != "weights":
        raise TaskError(f"weights: blob {digest[:12]} holds an {meta.kind}, not weights")
    return _Fetched(digest, arrays, downloaded == 0, time.perf_counter() - started)


def _prune_weights(cache_dir: Path, in_use: str) -> None:
    """Keep the newest few blobs and any used recently (another task may be reading it)."""
    try:
        files = sorted(cache_dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except FileNotFoundError:
        return
    now = time.time()
    for path in files[KEEP_WEIGHTS:]:
        try:
            if path.name != in_use and now - path.stat().st_mtime > KEEP_RECENT_S:
                path.unlink()
        except FileNotFoundError:
            continue


# ---------------------------------------------------------------- torch side


def _factory(path: str) -> Callable[[], Any]:
    module_name, attr = path.split(":", 1)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"model: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise TaskError(f"model: {path!r} not found")
    if not callable(target):
        raise TaskError(f"model: {path!r} is not callable")
    return target  # type: ignore[no-any-return]


def _build_model(path: str, weights: Arrays) -> torch.nn.Module:
    """The job's model with the global weights loaded; TaskError if they do not fit."""
    import numpy as np
    import torch

    try:
        model = _factory(path)()
    except TaskError:
        raise
    except Exception as exc:  # the factory is the job's code: report, never crash
        raise TaskError(f"model: {path} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise TaskError(f"model: {path} returned {type(model).__name__}, not a torch.nn.Module")
    own = model.state_dict()
    if set(own) != set(weights):
        missing = sorted(set(own) - set(weights))[:5]
        extra = sorted(set(weights) - set(own))[:5]
        raise TaskError(
            f"weights_mismatch: the weights do not fit {path} "
            f"(missing {missing}, unexpected {extra})"
        )
    state = {}
    for name, ref in own.items():
        arr = weights[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise TaskError(
                f"weights_mismatch: {name} is {list(arr.shape)} in the weights, "
                f"{list(ref.shape)} in {path}"
            )
        state[name] = torch.from_numpy(np.array(arr)).to(ref.dtype)
    model.load_state_dict(state, strict=True)
    return model


def _tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torch

    assert data.y is not None
    y = data.y.argmax(axis=1) if data.y.ndim == 2 else data.y
    x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    return x, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _score(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    import torch
    from torch.nn import functional

    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = model(x[start : start + batch_size])
            yb = y[start : start + batch_size]
            loss_sum += float(functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(dim=1) == yb).sum())
    return loss_sum / len(x), correct / len(x)


class _Optimizer:
    """SGD with momentum and Adam, with ``torch.optim.SGD`` / ``torch.optim.Adam``'s update
    rules (defaults: no dampening or Nesterov; Adam betas (0.9, 0.999), eps 1e-8).

    Written out because constructing any ``torch.optim`` optimizer imports ``torch._dynamo``:
    about 6 s and 70 MB of resident memory on a desktop CPU the first time in a process,
    several times that on a Raspberry Pi, for two loops of tensor arithmetic.
    """

    def __init__(self, params: list[torch.nn.Parameter], config: TrainParams) -> None:
        import torch

        self.params = params
        self.kind = config.optimizer
        self.lr = config.lr
        self.momentum = config.momentum
        self.betas = (0.9, 0.999)
        self.eps = 1e-8
        self.steps = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params] if self.kind == "adam" else []

    def step(self) -> None:
        import torch

        self.steps += 1
        b1, b2 = self.betas
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                g = p.grad
                if self.kind == "adam":
                    self.m[i].mul_(b1).add_(g, alpha=1 - b1)
                    self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (self.v[i] / (1 - b2**self.steps)).sqrt_().add_(self.eps)
                    p.addcdiv_(self.m[i], denom, value=-self.lr / (1 - b1**self.steps))
                elif self.momentum:  # from a zero buffer, the first step is the gradient
                    self.m[i].mul_(self.momentum).add_(g)
                    p.add_(self.m[i], alpha=-self.lr)
                else:
                    p.add_(g, alpha=-self.lr)


@dataclass(frozen=True, slots=True)
class _Trained:
    delta: Arrays
    examples: int
    steps: int
    loss_before: float
    accuracy_before: float
    loss_after: float
    accuracy: float
    train_s: float
    update_norm: float


def _train_sync(
    params: TrainParams, weights: Arrays, data: Dataset, threads: int, stop: threading.Event
) -> _Trained:
    """Train locally and return the update (blocking; run in a worker thread)."""
    import numpy as np
    import torch
    from torch.nn import functional

    torch.set_num_threads(threads)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        model = _build_model(params.model, weights)
        x, y = _tensors(data)
        loss_before, accuracy_before = _score(model, x, y, max(params.batch_size, 256))
        trainable = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in trainable]
        optimizer = _Optimizer(trainable, params)
        shuffle = torch.Generator().manual_seed(params.seed)
        steps = 0
        for _ in range(params.epochs):
            model.train()
            order = torch.randperm(len(x), generator=shuffle)
            for start in range(0, len(x), params.batch_size):
                if stop.is_set():
                    raise TaskError("cancelled")
                idx = order[start : start + params.batch_size]
                for p in trainable:
                    p.grad = None
                loss = functional.cross_entropy(model(x[idx]), y[idx])
                if params.prox_mu > 0:
                    prox = sum(
                        ((p - a) ** 2).sum() for p, a in zip(trainable, anchors, strict=True)
                    )
                    loss = loss + params.prox_mu / 2.0 * prox
                if not torch.isfinite(loss):
                    raise TaskError(f"diverged: the training loss became {float(loss.detach())}")
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
        loss_after, accuracy = _score(model, x, y, max(params.batch_size, 256))
    delta: Arrays = {}
    for name, tensor in model.state_dict().items():
        local = tensor.detach().cpu().numpy()
        base = weights[name]
        if local.dtype.kind == "f":
            delta[name] = local.astype(np.float32) - base.astype(np.float32)
        else:
            delta[name] = (local.astype(np.int64) - base.astype(np.int64)).astype(local.dtype)
    norm = math.sqrt(
        sum(
            float(np.square(d, dtype=np.float64).sum())
            for d in delta.values()
            if d.dtype.kind == "f"
        )
    )
    return _Trained(
        delta=delta,
        examples=len(x),
        steps=steps,
        loss_before=loss_before,
        accuracy_before=accuracy_before,
        loss_after=loss_after,
        accuracy=accuracy,
        train_s=time.perf_counter() - started,
        update_norm=norm,
    )


def _transformed(trained: _Trained, transform: Callable[[Arrays], Arrays]) -> _Trained:
    """``trained`` with its update passed through the context's ``update_transform``."""
    import dataclasses

    import numpy as np

    try:
        delta = transform(dict(trained.delta))
    except Exception as exc:  # the hook is deployment code: report it, never crash
        raise TaskError(f"update_transform: {type(exc).__name__}: {exc}") from exc
    if not isinstance(delta, dict) or set(delta) != set(trained.delta):
        raise TaskError("update_transform: must return the same tensor names")
    norm = math.sqrt(
        sum(
            float(np.square(np.asarray(d), dtype=np.float64).sum())
            for d in delta.values()
            if np.asarray(d).dtype.kind == "f"
        )
    )
    return dataclasses.replace(trained, delta=delta, update_norm=norm)


def _evaluate_sync(
    model_path: str, weights: Arrays, data: Dataset, batch_size: int, threads: int
) -> tuple[float, float]:
    import torch

    torch.set_num_threads(threads)
    model = _build_model(model_path, weights)
    x, y = _tensors(data)
    return _score(model, x, y, batch_size)


# ---------------------------------------------------------------- upload


def _check_url(url: str, what: str) -> None:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise TaskError(f"bad_params: {what} must be an http(s) URL, got {url[:80]!r}")


async def upload(
    url: str,
    body: bytes,
    *,
    digest: str,
    retries: int = 5,
    timeout: float = 30.0,
    backoff: tuple[float, float] = (0.5, 10.0),
) -> int:
    """``PUT`` ``body`` to ``url`` with its digest and length; returns the attempts made.

    Retries connection errors and HTTP 408/425/429/5xx up to ``retries`` times with capped,
    jittered exponential backoff; raises :class:`TaskError` when it gives up or on any
    other non-2xx answer.
    """
    import httpx

    headers = {
        DIGEST_HEADER: f"sha256:{digest}",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(len(body)),
    }
    attempts = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client:
        while True:
            attempts += 1
            try:
                resp = await client.put(url, content=body, headers=headers)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    return attempts
                text = resp.text[:200]
                if status not in (408, 425, 429) and status < 500:
                    raise TaskError(f"upload_refused: PUT {url}: HTTP {status} {text}")
                problem = f"HTTP {status} {text}"
            if attempts > retries:
                raise TaskError(f"upload_failed: PUT {url}: {problem} (gave up after {attempts})")
            low, high = backoff
            delay = random.uniform(low, min(high, low * 2 ** (attempts - 1)))
            log.info("upload to %s failed (%s); retry %d in %.2f s", url, problem, attempts, delay)
            await asyncio.sleep(delay)


# ---------------------------------------------------------------- handlers


async def train(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Train the job's model on local data and upload the update (see the module docstring)."""
    params = _params(task.params, TrainParams)
    _check_url(params.weights.url, "weights.url")
    _check_url(params.upload.url, "upload.url")
    data = await _load_data(ctx, params.data, params.max_examples)
    fetched = await _fetch_weights(ctx, params.weights)
    stop = threading.Event()
    try:
        trained = await asyncio.to_thread(
            _train_sync, params, fetched.arrays, data, _threads(ctx), stop
        )
    except asyncio.CancelledError:
        stop.set()  # the worker thread stops at its next batch
        raise
    from protocol.weights import encode_weights

    transform = ctx.extras.get(TRANSFORM_KEY)
    if transform is not None:
        trained = await asyncio.to_thread(_transformed, trained, transform)
    try:
        body = await asyncio.to_thread(
            encode_weights,
            trained.delta,
            kind="update",
            compression=params.compression,
            round=params.round,
            base=fetched.digest,
            job=params.job,
        )
    except ValueError as exc:
        raise TaskError(f"encode: {exc}") from exc
    digest = hashlib.sha256(body).hexdigest()
    store = _weights_store(ctx)
    started = time.perf_counter()
    await upload(
        params.upload.url,
        body,
        digest=digest,
        retries=store.retries,
        timeout=store.timeout,
        backoff=store.backoff,
    )
    upload_s = time.perf_counter() - started
    log.info(
        "job %s round %d: trained on %d examples, loss %.4f -> %.4f, update %s (%d bytes, %s)",
        params.job,
        params.round,
        trained.examples,
        trained.loss_before,
        trained.loss_after,
        digest[:12],
        len(body),
        params.compression,
    )
    return {
        "job": params.job,
        "round": params.round,
        "update": {"digest": digest, "size": len(body), "compression": params.compression},
        "examples": trained.examples,
        "steps": trained.steps,
        "loss_before": trained.loss_before,
        "loss_after": trained.loss_after,
        "accuracy_before": trained.accuracy_before,
        "accuracy": trained.accuracy,
        "update_norm": trained.update_norm,
        "train_s": trained.train_s,
        "upload_s": upload_s,
        "fetch_s": fetched.fetch_s,
        "weights_cached": fetched.cached,
    }


async def evaluate(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Score the given weights on local data: mean cross-entropy and accuracy."""
    params = _params(task.params, EvaluateParams)
    _check_url(params.weights.url, "weights.url")
    data = await _load_data(ctx, params.data, params.max_examples)
    fetched = await _fetch_weights(ctx, params.weights)
    started = time.perf_counter()
    loss, accuracy = await asyncio.to_thread(
        _evaluate_sync, params.model, fetched.arrays, data, params.batch_size, _threads(ctx)
    )
    return {
        "job": params.job,
        "round": params.round,
        "loss": loss,
        "accuracy": accuracy,
        "examples": len(data),
        "eval_s": time.perf_counter() - started,
    }
