"""The wire format for model weights and model updates (federated learning).

A blob is one MessagePack-encoded :class:`WeightsBlob`: a format tag and version, what it
holds (``kind``: full ``weights``, or an ``update`` = client weights minus the global weights
named by ``base``), the round it belongs to, how float tensors were compressed, and an
ordered list of named tensors. Blobs are bulk data: they travel over HTTP by sha256, never
over MQTT; MQTT carries only their digest, size and URL.

Compression applies to floating-point tensors only; integer and bool tensors (counters such
as BatchNorm's ``num_batches_tracked``) always travel exactly as dense tensors.

- ``fp32``: dense float32.
- ``fp16``: dense float16 (about half the bytes); values beyond float16's range are refused.
- ``int8``: affine INT8 (:func:`~lepton.protocol.tensors.quantize_int8`, about a quarter of the
  bytes). Tensors of rank >= 2 (conv and linear weights) are quantized per output channel
  (axis 0) when each channel holds at least ``per_channel_min`` elements, so the per-channel
  scales cost a few percent of the data at most; other tensors are quantized per tensor.
  Tensors under ``INT8_MIN_ELEMENTS`` elements (biases, mostly) travel as float16 instead
  (float32 if out of float16's range): quantization parameters would cost more than they
  save.

:func:`decode_weights` restores float tensors as float32 whatever the compression. It
enforces a size cap, validates every field and tensor, refuses non-finite values, and
raises :class:`~lepton.protocol.errors.DecodeError` (and nothing else) for anything malformed.
Nothing is ever unpickled. Pure code, no I/O.

Needs numpy (unlike the rest of :mod:`lepton.protocol`, which needs msgspec only): import it only
where tensors are handled (the agent does so once a ``train`` or ``evaluate`` task runs).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Annotated, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from lepton.protocol.errors import DecodeError
from lepton.protocol.tasks import Compression
from lepton.protocol.tensors import (
    QuantizedTensor,
    TensorPayload,
    dequantize,
    from_payload,
    quantize_int8,
    to_payload,
)

FORMAT: Final = "lepton-weights"
FORMAT_VERSION: Final = 1
MAX_TENSORS: Final = 100_000
MAX_NAME_LENGTH: Final = 256
#: Default minimum number of elements per output channel for per-channel INT8.
#: Below it, a float64 scale and a zero point per channel add over 4 % to the int8 data.
PER_CHANNEL_MIN: Final = 256
#: Float tensors smaller than this travel as float16 under ``int8``.
INT8_MIN_ELEMENTS: Final = 64
DIGEST_PATTERN: Final = r"\A[0-9a-f]{64}\Z"
# Names are free-form (torch's ``layer.0.weight``) but never hold control characters.
NAME_PATTERN: Final = r"\A[^\x00-\x1f\x7f]+\Z"

_FLOAT16_MAX: Final = float(np.finfo(np.float16).max)
_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
_NAME_RE: Final = re.compile(NAME_PATTERN)

Kind = Literal["weights", "update"]
COMPRESSIONS: Final[tuple[Compression, ...]] = ("fp32", "fp16", "int8")

TensorName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)]
Digest = Annotated[str, Meta(pattern=DIGEST_PATTERN)]


class NamedTensor(msgspec.Struct, frozen=True, kw_only=True, array_like=True, omit_defaults=True):
    """One named tensor: exactly one of ``dense`` and ``quant`` is set.

    Encoded as an array (``[name, dense, quant]``) to keep per-tensor overhead small.
    """

    name: TensorName
    dense: TensorPayload | None = None
    quant: QuantizedTensor | None = None


class WeightsBlob(msgspec.Struct, frozen=True, kw_only=True):
    """A set of model weights or one client's update, as it travels over HTTP.

    ``base`` is the sha256 (hex) of the global-weights blob an update is relative to;
    required for ``kind="update"``. ``job`` optionally names the federated job.
    """

    format: str
    version: Annotated[int, Meta(ge=1, le=1_000)]
    kind: Kind
    round: Annotated[int, Meta(ge=0, le=2**62)] = 0
    base: Digest | None = None
    job: Annotated[str, Meta(max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)] | None = None
    compression: Compression
    tensors: Annotated[list[NamedTensor], Meta(max_length=MAX_TENSORS)]


class WeightsMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`decode_weights` reports about a blob besides its tensors."""

    kind: Kind
    round: int
    base: str | None
    job: str | None
    compression: Compression
    version: int
    num_tensors: int
    num_elements: int


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(WeightsBlob)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The content address of a blob: its sha256 in lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def _encode_tensor(
    name: str, array: npt.ArrayLike, compression: Compression, per_channel_min: int | None
) -> NamedTensor:
    if not isinstance(name, str) or not _NAME_RE.search(name) or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"bad tensor name {name!r:.80}")
    arr = np.asarray(array)
    if arr.dtype.kind != "f":
        try:
            return NamedTensor(name=name, dense=to_payload(arr))
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"tensor {name!r} holds non-finite values")
    if compression == "int8" and arr.size >= INT8_MIN_ELEMENTS:
        axis = None
        if (
            per_channel_min is not None
            and arr.ndim >= 2
            and arr.shape[0] > 0
            and arr.size // arr.shape[0] >= per_channel_min
        ):
            axis = 0
        try:
            return NamedTensor(name=name, quant=quantize_int8(arr, axis=axis))
        except ValueError as exc:
            raise ValueError(f"tensor {name!r}: {exc}") from exc
    peak = float(np.max(np.abs(arr))) if arr.size else 0.0
    if peak > _FLOAT32_MAX:
        raise ValueError(f"tensor {name!r} has values beyond the float32 range")
    if compression in ("fp16", "int8"):
        beyond = peak > _FLOAT16_MAX
        if beyond and compression == "fp16":
            raise ValueError(f"tensor {name!r} has values beyond the float16 range")
        if not beyond:
            return NamedTensor(name=name, dense=to_payload(arr.astype(np.float16)))
    return NamedTensor(name=name, dense=to_payload(arr.astype(np.float32)))


def encode_weights(
    state: Mapping[str, npt.ArrayLike],
    *,
    kind: Kind,
    compression: Compression = "fp32",
    round: int = 0,
    base: str | None = None,
    job: str | None = None,
    per_channel_min: int | None = PER_CHANNEL_MIN,
) -> bytes:
    """Encode named arrays (kept in ``state``'s order) as a :class:`WeightsBlob`.

    ``per_channel_min`` is the least number of elements per output channel for which a
    rank >= 2 tensor is quantized per channel under ``int8`` (``0``: always, ``None``:
    never). Raises ``ValueError`` for bad arguments: an unknown kind or compression, an
    update without a ``base`` digest, non-finite values, values out of the compressed
    type's range, or a tensor the wire cannot carry. The output is deterministic.
    """
    if kind not in ("weights", "update"):
        raise ValueError(f"kind must be 'weights' or 'update', got {kind!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if kind == "update" and base is None:
        raise ValueError("an update needs the digest of the weights it is relative to (base)")
    if base is not None and not re.fullmatch(r"[0-9a-f]{64}", base):
        raise ValueError("base must be a sha256 digest in lowercase hex")
    if job is not None and (not _NAME_RE.search(job) or len(job) > MAX_NAME_LENGTH):
        raise ValueError(f"bad job name {job!r:.80}")
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round <= 2**62:
        raise ValueError(f"round must be a non-negative int, got {round!r}")
    if len(state) > MAX_TENSORS:
        raise ValueError(f"{len(state)} tensors, the format allows {MAX_TENSORS}")
    tensors = [
        _encode_tensor(name, value, compression, per_channel_min) for name, value in state.items()
    ]
    blob = WeightsBlob(
        format=FORMAT,
        version=FORMAT_VERSION,
        kind=kind,
        round=round,
        base=base,
        job=job,
        compression=compression,
        tensors=tensors,
    )
    return _encoder.encode(blob)


def _decode_tensor(item: NamedTensor) -> npt.NDArray[np.generic]:
    if (item.dense is None) == (item.quant is None):
        raise DecodeError("bad_tensor", f"{item.name!r:.80} must have exactly one representation")
    arr: npt.NDArray[np.generic]
    if item.quant is not None:
        arr = dequantize(item.quant)
    else:
        assert item.dense is not None
        dense = from_payload(item.dense)
        # A copy either way: the caller owns (and may write to) what it gets.
        arr = dense.astype(np.float32) if dense.dtype.kind == "f" else dense.copy()
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise DecodeError("non_finite", f"tensor {item.name!r:.80} holds non-finite values")
    return arr


def decode_weights(
    data: bytes | bytearray | memoryview, *, max_bytes: int
) -> tuple[WeightsMeta, dict[str, npt.NDArray[np.generic]]]:
    """Validate and decode a blob into its metadata and named arrays (in blob order).

    Float tensors come back as float32 whatever the wire compression; others keep their
    dtype. Returned arrays are owned by the caller. Raises :class:`DecodeError`, and
    nothing else, for a blob over ``max_bytes``, bytes that are not a valid blob, an
    unknown format or newer version, an update without a base, duplicate names,
    inconsistent tensors or non-finite values.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("not_bytes", type(data).__name__)
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise DecodeError("oversized", f"{size} bytes > limit {max_bytes}")
    if size == 0:
        raise DecodeError("empty")
    try:
        blob = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        raise DecodeError("malformed", str(exc)) from exc
    if blob.format != FORMAT:
        raise DecodeError("bad_format", f"format {blob.format!r:.40}, expected {FORMAT!r}")
    if blob.version > FORMAT_VERSION:
        raise DecodeError(
            "unsupported_version", f"version {blob.version}, this side reads <= {FORMAT_VERSION}"
        )
    if blob.kind == "update" and blob.base is None:
        raise DecodeError("missing_base", "an update must name the weights it is relative to")
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    elements = 0
    for item in blob.tensors:
        if item.name in arrays:
            raise DecodeError("duplicate_name", f"{item.name!r:.80}")
        arr = _decode_tensor(item)
        arrays[item.name] = arr
        elements += int(arr.size)
    meta = WeightsMeta(
        kind=blob.kind,
        round=blob.round,
        base=blob.base,
        job=blob.job,
        compression=blob.compression,
        version=blob.version,
        num_tensors=len(arrays),
        num_elements=elements,
    )
    return meta, arrays
