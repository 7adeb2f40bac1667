"""Tensors on the wire: raw bytes with dtype and shape, and an INT8 affine-quantized form.

Never pickle: a payload is validated (dtype allow-list, shape bounds, byte length) before a
single byte is interpreted, and decoding returns a read-only array over a copy of the data.
Every inconsistency in a received payload raises :class:`~lepton.protocol.errors.DecodeError`;
``ValueError`` is kept for bad arguments on the sending side.

Needs numpy (unlike the rest of :mod:`lepton.protocol`, which needs msgspec only): import it only
where tensors are handled.
"""

from __future__ import annotations

import math
from typing import Annotated, Final

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from lepton.protocol.errors import DecodeError

ALLOWED_DTYPES: Final = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
MAX_RANK: Final = 8
# Bound on the product of a shape's non-zero dimensions (so also on the element count).
MAX_ELEMENTS: Final = 1 << 31

_FLOAT32_MAX: Final = float(np.finfo(np.float32).max)

Shape = Annotated[list[Annotated[int, Meta(ge=0, le=MAX_ELEMENTS)]], Meta(max_length=MAX_RANK)]


class TensorPayload(msgspec.Struct, frozen=True, kw_only=True):
    """A dense little-endian tensor."""

    dtype: str
    shape: Shape
    data: bytes


class QuantizedTensor(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``x ~= (q - zero_point) * scale``, int8, per tensor (``axis`` None) or per channel.

    Defaults are left off the wire (about 25 bytes a tensor, 1 % of a small CNN's INT8
    update); decoders fill them in, so blobs written either way decode alike.
    """

    shape: Shape
    data: bytes
    scale: list[float]
    zero_point: list[int]
    axis: int | None = None
    orig_dtype: str = "float32"


def _checked_shape(shape: object) -> list[int]:
    """A received shape as a list; raises :class:`DecodeError` if it is not a valid wire shape."""
    if not isinstance(shape, (list, tuple)):
        raise DecodeError("bad_shape", f"shape is {type(shape).__name__}, not a list")
    if len(shape) > MAX_RANK:
        raise DecodeError("bad_shape", f"rank {len(shape)} > {MAX_RANK}")
    dims: list[int] = []
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise DecodeError("bad_shape", f"dimension {dim!r:.40} is not a non-negative int")
        dims.append(dim)
    # Non-zero dimensions are bounded even in an empty tensor: numpy refuses shapes whose
    # extent overflows, and nothing sensible needs them.
    if math.prod(dim for dim in dims if dim) > MAX_ELEMENTS:
        raise DecodeError("tensor_too_large", f"shape {dims!r:.80} exceeds {MAX_ELEMENTS} elements")
    return dims


def _check_outgoing_shape(shape: tuple[int, ...]) -> None:
    try:
        _checked_shape(shape)
    except DecodeError as exc:
        raise ValueError(f"cannot send this tensor: {exc.detail}") from exc


def _data(value: object) -> bytes | bytearray:
    if not isinstance(value, (bytes, bytearray)):
        raise DecodeError("bad_data", f"data is {type(value).__name__}, not bytes")
    return value


def to_payload(array: npt.ArrayLike) -> TensorPayload:
    """Encode an array (any layout or byte order) as a little-endian dense payload."""
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {name} is not allowed on the wire")
    _check_outgoing_shape(arr.shape)
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return TensorPayload(dtype=name, shape=list(arr.shape), data=le.tobytes())


def from_payload(payload: TensorPayload) -> npt.NDArray[np.generic]:
    """Validate and decode a payload into a read-only native-endian array owning its data.

    Raises :class:`DecodeError` (and nothing else) on any inconsistency, including payload
    structs built by hand with fields of the wrong type.
    """
    dtype = payload.dtype
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise DecodeError("bad_dtype", f"{dtype!r:.40}")
    shape = _checked_shape(payload.shape)
    data = _data(payload.data)
    dt = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise DecodeError("bad_length", f"{len(data)} bytes, shape needs {expected}")
    if dtype == "bool" and data.translate(None, b"\x00\x01"):
        # numpy would keep other byte values as-is inside a bool array.
        raise DecodeError("bad_data", "bool elements must be 0 or 1")
    arr = np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
    arr.flags.writeable = False
    return arr


def _scales(lo: npt.NDArray[np.float64], hi: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per-channel scales, float32-representable and never below ``(hi - lo) / 255``."""
    exact = (hi - lo) / 255.0
    s32 = exact.astype(np.float32)
    # Rounding a scale down would map the channel maximum past 127, so round up instead.
    s32 = np.where(s32.astype(np.float64) < exact, np.nextafter(s32, np.float32(np.inf)), s32)
    s32 = np.where(s32 > 0, s32, np.float32(1.0))
    return s32.astype(np.float64)


def quantize_int8(array: npt.ArrayLike, *, axis: int | None = None) -> QuantizedTensor:
    """Affine INT8 quantization (min/max calibrated), per tensor or per channel along ``axis``.

    Each channel's range is widened to include zero, so zero is exact. Every element is
    restored by :func:`dequantize` to within half its channel's scale (plus float32 rounding).
    Raises ``ValueError`` for non-real or non-finite input, values outside the float32 range,
    a bad ``axis`` or a shape too large for the wire.
    """
    raw = np.asarray(array)
    if raw.dtype.kind not in "biuf":
        raise ValueError(f"cannot quantize dtype {raw.dtype}")
    x = raw.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values")
    if x.size and float(np.max(np.abs(x))) > _FLOAT32_MAX:
        raise ValueError("cannot quantize values outside the float32 range")
    _check_outgoing_shape(x.shape)
    bshape = [1] * x.ndim
    if axis is None:
        lo = np.array([min(float(x.min(initial=0.0)), 0.0)])
        hi = np.array([max(float(x.max(initial=0.0)), 0.0)])
    else:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis {axis} out of range for rank {x.ndim}")
        axis %= x.ndim
        channels = x.shape[axis]
        # Explicit sizes: reshape(channels, -1) is ambiguous when there are no channels.
        rows = np.moveaxis(x, axis, 0).reshape(channels, x.size // channels if channels else 0)
        lo = np.minimum(rows.min(axis=1, initial=0.0), 0.0)
        hi = np.maximum(rows.max(axis=1, initial=0.0), 0.0)
        bshape[axis] = -1
    scale = _scales(lo, hi)
    zp = np.clip(np.round(-128.0 - lo / scale), -128, 127)
    q = np.clip(np.round(x / scale.reshape(bshape)) + zp.reshape(bshape), -128, 127)
    return QuantizedTensor(
        shape=list(x.shape),
        data=q.astype(np.int8).tobytes(),
        scale=[float(s) for s in scale],
        zero_point=[int(z) for z in zp],
        axis=axis,
        orig_dtype="float32",
    )


def _quant_params(qt: QuantizedTensor, channels: int) -> tuple[list[float], list[int]]:
    scale, zero_point = qt.scale, qt.zero_point
    if not isinstance(scale, list) or not isinstance(zero_point, list):
        raise DecodeError("bad_quant_params", "scale and zero_point must be lists")
    if len(scale) != channels or len(zero_point) != channels:
        raise DecodeError("bad_quant_params", f"need {channels} scale/zero-point values")
    for s in scale:
        # Written so that NaN fails too.
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= _FLOAT32_MAX:
            raise DecodeError("bad_quant_params", f"scale {s!r:.40} is not in (0, float32 max]")
    for z in zero_point:
        if isinstance(z, bool) or not isinstance(z, int) or not -128 <= z <= 127:
            raise DecodeError("bad_quant_params", f"zero point {z!r:.40} is not an int8")
    return scale, zero_point


def dequantize(qt: QuantizedTensor) -> npt.NDArray[np.float32]:
    """Inverse of :func:`quantize_int8`; validates the payload first.

    Returns a new float32 array the caller owns. Raises :class:`DecodeError` (and nothing
    else) for an inconsistent payload.
    """
    shape = _checked_shape(qt.shape)
    n = math.prod(shape)
    data = _data(qt.data)
    if len(data) != n:
        raise DecodeError("bad_length", f"{len(data)} bytes, shape needs {n}")
    axis = qt.axis
    rank = len(shape)
    bshape = [1] * rank
    if axis is None:
        channels = 1
    elif isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < rank:
        raise DecodeError("bad_axis", f"{axis!r:.40} for rank {rank}")
    else:
        channels = shape[axis]
        bshape[axis] = -1
    scale, zero_point = _quant_params(qt, channels)
    s = np.asarray(scale, dtype=np.float64).reshape(bshape)
    zp = np.asarray(zero_point, dtype=np.float64).reshape(bshape)
    q = np.frombuffer(data, dtype=np.int8).reshape(shape).astype(np.float64)
    # In float64 and clipped: a hostile scale must not overflow float32 into inf.
    x = np.clip((q - zp) * s, -_FLOAT32_MAX, _FLOAT32_MAX)
    return x.astype(np.float32)
