"""The ``train`` and ``evaluate`` task handlers: federated learning on the device's own data.

The device's data never leaves it. A ``train`` task fetches the round's global weights by
content address, trains the job's torch model on a named local data source, and uploads only
the update (local weights minus global weights), encoded with :mod:`lepton.protocol.weights`, over
HTTP; the result carries the update's digest, size and a few figures. torch is imported
only when one of these tasks runs, never at agent start-up. The torch loop itself is in
:mod:`lepton.agent.training.trainer`, the retried upload in :mod:`lepton.agent.training.upload`.

``train`` params (:class:`~lepton.protocol.tasks.TrainParams`, which the coordinator encodes and
this handler decodes; other keys, such as ``timeout_s``, are ignored):

- ``job`` (str, 1-64 chars ``[A-Za-z0-9._:/-]``): the federated job, echoed and written into
  the update blob.
- ``round`` (int >= 0): the round, likewise.
- ``model`` (str ``package.module:factory``): import path of a callable taking no
  arguments and returning a ``torch.nn.Module`` (e.g. ``lepton.models.digits:DigitsCNN``). Its
  ``state_dict()`` must have exactly the tensors of the global weights. Only a path the
  agent's ``agent.model_imports`` allowlist permits is resolved (the context's
  ``services.model_imports``), checked before any data, download or import.
- ``weights`` ({``digest``: sha256 hex, ``size``: bytes, ``url``: http(s)}): the global
  weights, a ``kind="weights"`` blob, at an origin the agent allows (as ``upload.url``).
  Fetched with the model manager's verified, resumable download into ``<state>/weights``
  and cached there by digest.
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
- ``upload`` ({``url``: http(s), ``token``: str, optional}): where the update is ``PUT``,
  with headers ``X-Lepton-Digest: sha256:<hex>``, ``Content-Length``,
  ``Content-Type: application/octet-stream`` and, with a ``token`` (the coordinator adds
  the slot's credential to the task's message), ``X-Lepton-Upload-Token: <token>``; at the
  coordinator's origin also the device's own ``Authorization: Bearer <http token>``. The
  token is a secret: it is not logged and not in the result. Connection errors and HTTP
  408/425/429/5xx are retried with capped exponential backoff; any 2xx is success; other
  statuses fail.
- ``seed`` (int >= 0, default 0): seeds shuffling and the model's random layers; the same
  seed, weights and data give the same update.
- ``max_examples`` (int >= 1, optional): train on at most this many local samples.

``train`` output (:class:`~lepton.protocol.tasks.TrainOutput`): ``update`` ({``digest``,
``size``, ``compression``}), ``examples``, ``loss_before`` / ``loss_after`` (mean cross-entropy
over the local data with the global and the trained weights), ``accuracy`` (after training, local
data), ``train_s``, ``upload_s``; and also ``job``, ``round``, ``accuracy_before``, ``steps``,
``fetch_s``, ``weights_cached`` and ``update_norm`` (L2 norm of the update before compression).

``evaluate`` params (:class:`~lepton.protocol.tasks.EvaluateParams`): ``model``, ``weights``,
``data`` as above; optional ``batch_size`` (default 256), ``max_examples``, ``job`` and ``round``
(echoed). Output (:class:`~lepton.protocol.tasks.EvaluateOutput`): ``loss``, ``accuracy``,
``examples`` (and ``eval_s``, ``job``, ``round``). A cancel ends ``evaluate`` before its data is
loaded, before the download, or between batches.

Services come through the context's :class:`~lepton.agent.handlers.TaskServices`:
``data_sources`` (:class:`~lepton.agent.training.datasources.DataSources`), optionally ``models``
(the :class:`~lepton.agent.inference.manager.ModelManager`, whose download settings the weights
cache copies), ``weights_store`` (a ModelManager used as the weights cache, made by
:func:`weights_cache`; the daemon makes it up front, a context without one gets one per task),
``model_imports`` (the allowlist above), ``train_threads`` (torch threads; default: the model
manager's thread setting, else the cores this process may use) and ``update_transform``: a
callable taking the update (``dict[str, numpy.ndarray]``, local minus global weights) and
returning the update to encode and upload, applied after training and before compression. It is
the hook for local clipping or local differential privacy on the device; the fleet simulator also
uses it to play adversarial clients. The output's ``update_norm`` is the norm of what is sent.
``pace``: an async callable awaited with the task once the update is encoded, just before the
upload; the fleet simulator sleeps there so that a simulated slow device's update arrives when
that device's would, not when this host finished computing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from lepton.agent.fetch import FetchError
from lepton.agent.handlers import TaskContext, TaskError
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.served import ModelError, deploy_spec
from lepton.agent.training import trainer as torchtrain
from lepton.agent.training.datasources import DataSourceError, DataSources
from lepton.agent.training.upload import check_url, upload
from lepton.protocol.errors import DecodeError
from lepton.protocol.imports import Allowlist, ImportPathError
from lepton.protocol.messages import Task
from lepton.protocol.tasks import (
    EVALUATE,
    TRAIN,
    EvaluateOutput,
    EvaluateParams,
    TrainOutput,
    TrainParams,
    UpdateRef,
    WeightsRef,
    encode_output,
    params_as,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from lepton.agent.training.datasources import Dataset

    Arrays = dict[str, npt.NDArray[np.generic]]

log = logging.getLogger(__name__)
P = TypeVar("P", bound=msgspec.Struct)

#: Weight blobs kept in the cache besides those used in the last ``KEEP_RECENT_S`` seconds.
KEEP_WEIGHTS: Final = 3
KEEP_RECENT_S: Final = 600.0


def _params(params: dict[str, Any], cls: type[P]) -> P:
    try:
        return params_as(cls, params)
    except msgspec.ValidationError as exc:
        raise TaskError(f"bad_params: {exc}") from exc


# ---------------------------------------------------------------- services


def _sources(ctx: TaskContext) -> DataSources:
    sources = ctx.services.data_sources
    if sources is None:
        raise TaskError("no_data: this agent has no data sources configured")
    return sources


async def _load_data(ctx: TaskContext, name: str, limit: int | None) -> Dataset:
    """The named local data set, with labels; a clear refusal when the device lacks it."""
    sources = _sources(ctx)
    if name not in sources.names():
        known = ", ".join(sources.names()) or "none"
        raise TaskError(f"no_data: this device has no data source {name!r} (it has: {known})")
    try:
        data = await asyncio.to_thread(sources.load, name, limit)
    except DataSourceError as exc:
        raise TaskError(f"no_data: {exc}") from exc
    if data.y is None:
        raise TaskError(f"no_labels: data source {name!r} has no labels to train or score on")
    if len(data) == 0:
        raise TaskError(f"no_data: data source {name!r} is empty")
    return data


def weights_cache(state_dir: Path, models: ModelManager | None) -> ModelManager:
    """The weights cache of ``train`` and ``evaluate``: a model manager rooted at
    ``<state>/weights``, with ``models``' download settings (origins, size cap, retries,
    timeout, backoff) where there is a model manager. Cheap: it touches no file until used."""
    settings: dict[str, Any] = {}
    if models is not None:
        settings = {
            "origins": models.origins,
            "max_bytes": models.max_bytes,
            "retries": models.retries,
            "timeout": models.timeout,
            "backoff": models.backoff,
            # The same verified HTTPS (the fetcher's context, made once) and token.
            "tls": models.fetcher.tls,
            "credentials": models.fetcher.credentials,
        }
    return ModelManager(state_dir / "weights", **settings)


def _weights_store(ctx: TaskContext) -> ModelManager:
    """The context's weights cache; without one (a bare context), one made for this call."""
    store = ctx.services.weights_store
    if store is None:
        store = weights_cache(ctx.state_dir, ctx.services.models)
    return store


def _model_factory_allowed(ctx: TaskContext, path: str) -> Allowlist:
    """The context's import allowlist, once it permits ``path``; checked on the string,
    before any data is loaded or anything is imported or downloaded."""
    allow = ctx.services.model_imports
    try:
        allow.check(path)
    except ImportPathError as exc:
        raise TaskError(f"model: {exc}") from exc
    return allow


def _check_origins(store: ModelManager, **urls: str) -> None:
    """Each URL is at an origin the agent may reach (checked before any connection)."""
    fetcher = store.fetcher
    for what, url in urls.items():
        try:
            fetcher.check_url(url)
        except FetchError as exc:
            raise TaskError(f"{what}: {exc}") from exc


def _threads(ctx: TaskContext) -> int:
    configured = ctx.services.train_threads
    if configured is not None and configured > 0:
        return configured
    models = ctx.services.models
    if models is not None and models.threads > 0:
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


async def _fetch_weights(store: ModelManager, ref: WeightsRef) -> _Fetched:
    """Fetch (or find in the cache), verify and decode the global weights."""
    digest = ref.digest.lower().removeprefix("sha256:")
    started = time.perf_counter()
    try:
        spec = deploy_spec(
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
    from lepton.protocol.weights import decode_weights

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


# ---------------------------------------------------------------- handlers


def _stop_if_cancelled(ctx: TaskContext) -> None:
    """End the task here, between two steps, once it is cancelled."""
    if ctx.cancel.is_set():
        raise TaskError(f"cancelled: {ctx.cancel.reason}")


async def train(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Train the job's model on local data and upload the update (see the module docstring)."""
    params = _params(task.params, TrainParams)
    allow = _model_factory_allowed(ctx, params.model)
    check_url(params.weights.url, "weights.url")
    check_url(params.upload.url, "upload.url")
    store = _weights_store(ctx)
    _check_origins(store, weights=params.weights.url, upload=params.upload.url)
    data = await _load_data(ctx, params.data, params.max_examples)
    fetched = await _fetch_weights(store, params.weights)
    stop = ctx.cancel.event  # set by a cancel, or below by a shutdown
    try:
        trained = await asyncio.to_thread(
            torchtrain.train_local,
            params,
            fetched.arrays,
            data,
            _threads(ctx),
            stop,
            allow=allow,
        )
    except asyncio.CancelledError:
        stop.set()  # the worker thread stops at its next batch
        raise
    from lepton.protocol.weights import encode_weights

    transform = ctx.services.update_transform
    if transform is not None:
        trained = await asyncio.to_thread(torchtrain.transformed, trained, transform)
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
    pace = ctx.services.pace
    if pace is not None:
        await ctx.cancel.interrupt(pace(task))
    if ctx.cancel.is_set():  # the update of a cancelled task is not sent
        raise TaskError(f"cancelled: {ctx.cancel.reason}")
    started = time.perf_counter()
    await upload(
        params.upload.url,
        body,
        digest=digest,
        token=params.upload.token,
        retries=store.retries,
        timeout=store.timeout,
        backoff=store.backoff,
        tls=await store.fetcher.tls_context(),
        credentials=store.fetcher.credentials,
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
    output = TrainOutput(
        job=params.job,
        round=params.round,
        update=UpdateRef(digest=digest, size=len(body), compression=params.compression),
        examples=trained.examples,
        steps=trained.steps,
        loss_before=trained.loss_before,
        loss_after=trained.loss_after,
        accuracy_before=trained.accuracy_before,
        accuracy=trained.accuracy,
        update_norm=trained.update_norm,
        train_s=trained.train_s,
        upload_s=upload_s,
        fetch_s=fetched.fetch_s,
        weights_cached=fetched.cached,
    )
    return encode_output(TRAIN, output)


async def evaluate(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Score the given weights on local data: mean cross-entropy and accuracy."""
    params = _params(task.params, EvaluateParams)
    allow = _model_factory_allowed(ctx, params.model)
    check_url(params.weights.url, "weights.url")
    store = _weights_store(ctx)
    _check_origins(store, weights=params.weights.url)
    _stop_if_cancelled(ctx)
    data = await _load_data(ctx, params.data, params.max_examples)
    _stop_if_cancelled(ctx)  # before the download
    fetched = await _fetch_weights(store, params.weights)
    _stop_if_cancelled(ctx)
    stop = ctx.cancel.event  # set by a cancel, or below by a shutdown
    started = time.perf_counter()
    try:
        loss, accuracy = await asyncio.to_thread(
            torchtrain.evaluate_local,
            params.model,
            fetched.arrays,
            data,
            params.batch_size,
            _threads(ctx),
            allow=allow,
            stop=stop,
        )
    except asyncio.CancelledError:
        stop.set()  # the worker thread stops at its next batch
        raise
    output = EvaluateOutput(
        job=params.job,
        round=params.round,
        loss=loss,
        accuracy=accuracy,
        examples=len(data),
        eval_s=time.perf_counter() - started,
    )
    return encode_output(EVALUATE, output)
