"""The per-kind task contracts: what ``Task.params`` and ``Result.output`` hold for each kind.

The envelope (:class:`~lepton.protocol.messages.Task`, :class:`~lepton.protocol.messages.Result`)
carries ``params`` and ``output`` as plain mappings, so that a message decodes whatever its kind.
This module types them: one frozen struct per kind for its parameters and one for its output.
The coordinator builds the struct and sends :func:`encode_params`'s mapping; the agent's handler
reads the mapping back with :func:`decode_params` (and the other way round for outputs, with
:func:`encode_output` and :func:`decode_output`). Both sides use the same structs, so a bound
changed here changes on both.

Decoding is strict (no string-to-number coercion) and ignores keys a struct does not name
(the coordinator may add some, such as ``timeout_s``; an older agent ignores newer fields).
Encoding leaves out parameters equal to their defaults: the agent fills them in the same way.

Kinds (:data:`TaskKind`):

- ``echo``: a liveness probe; returns its ``payload`` after ``sleep_s`` seconds.
- ``benchmark``: re-run the device micro-benchmark.
- ``deploy`` / ``undeploy``: serve a model, stop serving it (docs/agent-inference.md).
- ``infer``: run a served model over a local data source.
- ``train`` / ``evaluate``: federated learning on local data (docs/federated-learning.md).
- ``install`` / ``revert``: take a signed agent image, go back to the other slot
  (docs/releases.md).

Pure code: msgspec only (no numpy), so both sides and the CLI can import it.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeVar, get_args

import msgspec
from msgspec import Meta

from lepton.protocol.releases import (
    InstallOutput,
    InstallParams,
    RevertOutput,
    RevertParams,
)

TaskKind = Literal[
    "echo", "benchmark", "deploy", "undeploy", "infer", "train", "evaluate", "install", "revert"
]
TASK_KINDS: Final[tuple[TaskKind, ...]] = get_args(TaskKind)

ECHO: Final = "echo"
BENCHMARK: Final = "benchmark"
DEPLOY: Final = "deploy"
UNDEPLOY: Final = "undeploy"
INFER: Final = "infer"
TRAIN: Final = "train"
EVALUATE: Final = "evaluate"
INSTALL: Final = "install"
REVERT: Final = "revert"

MODEL_NAME_PATTERN: Final = r"\A[A-Za-z0-9._-]{1,64}\Z"
DIGEST_PATTERN: Final = r"\A[0-9a-f]{64}\Z"
MAX_ECHO_SLEEP_S: Final = 3600.0
MAX_INFER_BATCH: Final = 4096
MAX_TRAIN_BATCH: Final = 65536

JobName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9._:/-]+\Z")]
FactoryPath = Annotated[str, Meta(max_length=256, pattern=r"\A[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")]
Url = Annotated[str, Meta(min_length=1, max_length=4096)]
SourceName = Annotated[str, Meta(min_length=1, max_length=64)]
RoundNo = Annotated[int, Meta(ge=0, le=2**62)]
#: How an update's float tensors travel (:mod:`lepton.protocol.weights` encodes them).
Compression = Literal["fp32", "fp16", "int8"]


class _Params(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of the parameter structs: defaults are left out of the wire mapping."""


class _Output(msgspec.Struct, frozen=True, kw_only=True):
    """Base of the output structs."""


# ---------------------------------------------------------------- echo, benchmark


class EchoParams(_Params, frozen=True, kw_only=True):
    """``echo``: ``payload`` back after ``sleep_s`` seconds; ``fail`` (any true value) makes it
    fail with that text, for exercising the failure path end to end."""

    payload: Any = None
    sleep_s: Annotated[float, Meta(ge=0.0, le=MAX_ECHO_SLEEP_S)] = 0.0
    fail: Any = None


class EchoOutput(_Output, frozen=True, kw_only=True):
    echo: Any
    device_id: str


class BenchmarkParams(_Params, frozen=True, kw_only=True):
    """``benchmark`` takes no parameters."""


class BenchmarkOutput(_Output, frozen=True, kw_only=True):
    fp32_gflops: float
    int8_gops: float | None
    runtime: str
    wall_s: float


# ---------------------------------------------------------------- deploy, undeploy


class InputSpec(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the coordinator declares about the model's input, checked against the model.

    ``mean`` and ``std`` (scalars, or one value per element of the last axis) normalise raw
    data-source samples before inference: ``(x - mean) / std``.
    """

    name: str | None = None
    shape: Annotated[list[int | None], Meta(max_length=8)] | None = None
    dtype: str | None = None
    mean: float | list[float] | None = None
    std: float | list[float] | None = None


class DeployParams(_Params, frozen=True, kw_only=True):
    """``deploy``: fetch the model at ``url`` (``size`` bytes, sha256 ``digest``), verify,
    load and serve it as ``name``. :func:`decode_params` lower-cases the digest first."""

    name: Annotated[str, Meta(pattern=MODEL_NAME_PATTERN)]
    digest: Annotated[str, Meta(pattern=DIGEST_PATTERN)]
    size: Annotated[int, Meta(gt=0)]
    url: Annotated[str, Meta(max_length=4096)]
    format: Literal["onnx", "tflite"]
    precision: Annotated[str, Meta(max_length=32)] = ""
    input: InputSpec | None = None


class DeployOutput(_Output, frozen=True, kw_only=True):
    name: str
    digest: str
    format: str
    precision: str
    bytes_downloaded: int
    cached: bool
    load_s: float
    previous_digest: str | None
    runtime: str
    threads: int
    evicted: list[str]


class UndeployParams(_Params, frozen=True, kw_only=True):
    """``undeploy``: stop serving ``name``; its cached file goes unless another name uses it."""

    name: Annotated[str, Meta(pattern=MODEL_NAME_PATTERN)]


class UndeployOutput(_Output, frozen=True, kw_only=True):
    """``digest``: of the model it served (None if it was indexed but not loaded)."""

    name: str
    digest: str | None
    removed_bytes: int


# ---------------------------------------------------------------- infer


class InferParams(_Params, frozen=True, kw_only=True):
    """``infer``: run served model ``model`` over local data source ``source``."""

    model: SourceName
    source: SourceName
    batch_size: Annotated[int, Meta(ge=1, le=MAX_INFER_BATCH)] = 32
    limit: Annotated[int, Meta(ge=1)] | None = None
    warmup: Annotated[int, Meta(ge=0, le=100)] = 1
    output: str | None = None
    # The precision the submitter expects of the served model. The agent does not use it;
    # the fleet simulator paces a task by it.
    precision: Annotated[str, Meta(max_length=32)] | None = None


class LatencySummary(_Output, frozen=True, kw_only=True):
    """Milliseconds; all None when nothing ran."""

    p50: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    max: float | None


class InferLatency(_Output, frozen=True, kw_only=True):
    batch: LatencySummary
    sample: LatencySummary


class InferOutput(_Output, frozen=True, kw_only=True):
    model: str
    digest: str
    format: str
    precision: str
    source: str
    count: int
    batch_size: int
    batches: int
    labelled: bool
    correct: int | None
    accuracy: float | None
    latency_ms: InferLatency
    throughput_sps: float | None
    wall_s: float
    runtime: str
    providers: list[str]
    threads: int


# ---------------------------------------------------------------- train, evaluate


class WeightsRef(_Params, frozen=True, kw_only=True):
    """Where the global weights are: content address, declared size, URL."""

    digest: Annotated[str, Meta(pattern=r"\A(sha256:)?[0-9a-fA-F]{64}\Z")]
    size: Annotated[int, Meta(gt=0)]
    url: Url


class UploadRef(_Params, frozen=True, kw_only=True):
    url: Url
    # The slot's upload credential; secret: sent only as a header, never logged or returned.
    # The coordinator adds it to the message at dispatch, never to the stored task.
    token: Annotated[str, Meta(max_length=256)] | None = None


class TrainParams(_Params, frozen=True, kw_only=True):
    """The ``train`` task's parameters (:mod:`lepton.agent.training.tasks` documents each)."""

    job: JobName
    round: RoundNo
    model: FactoryPath
    weights: WeightsRef
    data: SourceName
    upload: UploadRef
    epochs: Annotated[int, Meta(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Meta(ge=1, le=MAX_TRAIN_BATCH)] = 32
    lr: Annotated[float, Meta(gt=0.0, le=1e3)] = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0
    prox_mu: Annotated[float, Meta(ge=0.0, le=1e6)] = 0.0
    compression: Compression = "fp32"
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    max_examples: Annotated[int, Meta(ge=1)] | None = None


class UpdateRef(_Output, frozen=True, kw_only=True):
    """The uploaded update: its sha256 (hex), size in bytes and compression."""

    digest: str
    size: int
    compression: Compression


class TrainOutput(_Output, frozen=True, kw_only=True):
    """What a ``train`` task reports. ``loss_*`` are mean cross-entropy over the local data
    with the global and the trained weights; ``accuracy`` is after training."""

    job: str
    round: int
    update: UpdateRef
    examples: int
    steps: int
    loss_before: float
    loss_after: float
    accuracy_before: float
    accuracy: float
    update_norm: float
    train_s: float
    upload_s: float
    fetch_s: float
    weights_cached: bool


class EvaluateParams(_Params, frozen=True, kw_only=True):
    """The ``evaluate`` task's parameters (:mod:`lepton.agent.training.tasks`)."""

    model: FactoryPath
    weights: WeightsRef
    data: SourceName
    batch_size: Annotated[int, Meta(ge=1, le=MAX_TRAIN_BATCH)] = 256
    max_examples: Annotated[int, Meta(ge=1)] | None = None
    job: JobName | None = None
    round: RoundNo | None = None


class EvaluateOutput(_Output, frozen=True, kw_only=True):
    job: str | None
    round: int | None
    loss: float
    accuracy: float
    examples: int
    eval_s: float


# ---------------------------------------------------------------- the registry

PARAMS: Final[dict[TaskKind, type[msgspec.Struct]]] = {
    "echo": EchoParams,
    "benchmark": BenchmarkParams,
    "deploy": DeployParams,
    "undeploy": UndeployParams,
    "infer": InferParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "install": InstallParams,
    "revert": RevertParams,
}
OUTPUTS: Final[dict[TaskKind, type[msgspec.Struct]]] = {
    "echo": EchoOutput,
    "benchmark": BenchmarkOutput,
    "deploy": DeployOutput,
    "undeploy": UndeployOutput,
    "infer": InferOutput,
    "train": TrainOutput,
    "evaluate": EvaluateOutput,
    "install": InstallOutput,
    "revert": RevertOutput,
}

S = TypeVar("S", bound=msgspec.Struct)


def is_kind(kind: str) -> bool:
    """Whether ``kind`` is one of :data:`TaskKind` (a user may submit others)."""
    return kind in PARAMS


def _struct(table: dict[TaskKind, type[msgspec.Struct]], kind: str, what: str) -> Any:
    try:
        return table[kind]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"no {what} contract for task kind {kind!r}") from None


def _checked(kind: str, value: msgspec.Struct, table: dict[TaskKind, type[msgspec.Struct]]) -> None:
    cls = _struct(table, kind, "task")
    if type(value) is not cls:
        raise TypeError(f"a {kind!r} task takes {cls.__name__}, not {type(value).__name__}")


def encode_params(kind: TaskKind, params: msgspec.Struct) -> dict[str, Any]:
    """The ``Task.params`` mapping of ``params`` (defaults left out).

    A struct's constructor does not check bounds, so the mapping is decoded once more as the
    agent will: :class:`msgspec.ValidationError` here, not a refusal on the device.
    """
    _checked(kind, params, PARAMS)
    out: dict[str, Any] = msgspec.to_builtins(params)
    decode_params(kind, out)
    return out


def decode_params(kind: str, params: dict[str, Any]) -> Any:
    """``Task.params`` as ``kind``'s parameter struct.

    Raises ``ValueError`` for a kind without a contract and :class:`msgspec.ValidationError`
    (naming the offending field, ``$.field``) for parameters that break it.
    """
    cls = _struct(PARAMS, kind, "params")
    if cls is DeployParams and isinstance(params.get("digest"), str):
        params = {**params, "digest": params["digest"].lower()}
    return msgspec.convert(params, cls, strict=True)


def encode_output(kind: TaskKind, output: msgspec.Struct) -> dict[str, Any]:
    """The ``Result.output`` mapping of ``output`` (an agent's handler returns it)."""
    _checked(kind, output, OUTPUTS)
    out: dict[str, Any] = msgspec.to_builtins(output)
    return out


def decode_output(kind: str, output: dict[str, Any]) -> Any:
    """``Result.output`` as ``kind``'s output struct (``ValueError`` for a kind without a
    contract, :class:`msgspec.ValidationError` for an output that breaks it)."""
    return msgspec.convert(output, _struct(OUTPUTS, kind, "output"), strict=True)


def params_as(cls: type[S], params: dict[str, Any]) -> S:
    """``params`` as the parameter struct ``cls`` (strictly typed, as :func:`decode_params`)."""
    kind = next((k for k, c in PARAMS.items() if c is cls), None)
    if kind is None:
        raise ValueError(f"{cls.__name__} is not a task's parameter struct")
    out: S = decode_params(kind, params)
    return out


def output_as(cls: type[S], output: dict[str, Any]) -> S:
    """``output`` as the output struct ``cls`` (strictly typed, as :func:`decode_output`)."""
    kind = next((k for k, c in OUTPUTS.items() if c is cls), None)
    if kind is None:
        raise ValueError(f"{cls.__name__} is not a task's output struct")
    out: S = decode_output(kind, output)
    return out


def blob_digests(kind: str, params: dict[str, Any]) -> frozenset[str]:
    """The blobs a task of ``kind`` makes its device fetch (``deploy``: the model;
    ``train`` / ``evaluate``: the global weights; ``install``: the signed manifest, whose
    files the release registry grants), as lower-case hex without ``sha256:``.
    Parameters that break the kind's contract name none (the device could not run them)."""
    if kind not in (DEPLOY, TRAIN, EVALUATE, INSTALL):
        return frozenset()
    try:
        parsed = decode_params(kind, params)
    except (ValueError, msgspec.ValidationError):
        return frozenset()
    if isinstance(parsed, InstallParams):
        return frozenset({parsed.manifest_digest})
    digest = parsed.digest if isinstance(parsed, DeployParams) else parsed.weights.digest
    return frozenset({digest.lower().removeprefix("sha256:")})
