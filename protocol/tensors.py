"""Tensors on the wire: raw bytes with dtype and shape, and an INT8 affine-quantized form.

Never pickle: a payload is validated (dtype allow-list, shape bounds, byte length) before a
single byte is interpreted, and decoding returns a read-only array over a copy of the data.
"""

from __future__ import annotations

import math
from typing import Annotated, Final

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from protocol.errors import DecodeError

ALLOWED_DTYPES: Final = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
MAX_RANK: Final = 8
MAX_ELEMENTS: Final = 1 << 31

Shape = Annotated[list[Annotated[int, Meta(ge=0, le=MAX_ELEMENTS)]], Meta(max_length=MAX_RANK)]


class TensorPayload(msgspec.Struct, frozen=True, kw_only=True):
    """A dense little-endian tensor."""

    dtype: str
    shape: Shape
    data: bytes


class QuantizedTensor(msgspec.Struct, frozen=True, kw_only=True):
    """``x ~= (q - zero_point) * scale``, int8, per tensor (``axis`` None) or per channel."""

    shape: Shape
    data: bytes
    scale: list[float]
    zero_point: list[int]
    axis: int | None = None
    orig_dtype: str = "float32"


def _numel(shape: list[int]) -> int:
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise DecodeError("tensor_too_large", f"{n} elements")
    return n


def to_payload(array: npt.ArrayLike) -> TensorPayload:
    """Encode an array (any layout) as a little-endian dense payload."""
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {name} is not allowed on the wire")
    if arr.ndim > MAX_RANK:
        raise ValueError(f"rank {arr.ndim} > {MAX_RANK}")
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return TensorPayload(dtype=name, shape=list(arr.shape), data=le.tobytes())


def from_payload(payload: TensorPayload) -> npt.NDArray[np.generic]:
    """Validate and decode a payload; raise :class:`DecodeError` on any inconsistency."""
    if payload.dtype not in ALLOWED_DTYPES:
        raise DecodeError("bad_dtype", payload.dtype)
    if len(payload.shape) > MAX_RANK:
        raise DecodeError("bad_shape", f"rank {len(payload.shape)}")
    dt = np.dtype(payload.dtype).newbyteorder("<")
    expected = _numel(payload.shape) * dt.itemsize
    if len(payload.data) != expected:
        raise DecodeError("bad_length", f"{len(payload.data)} bytes, shape needs {expected}")
    arr = np.frombuffer(payload.data, dtype=dt).reshape(payload.shape).astype(dt.newbyteorder("="))
    arr.flags.writeable = False
    return arr


def quantize_int8(
    array: npt.ArrayLike, *, axis: int | None = None
) -> QuantizedTensor:
    """Affine INT8 quantization (min/max calibrated), per tensor or per channel along ``axis``."""
    x = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize non-finite values")
    if axis is None:
        lo = np.minimum(x.min(initial=0.0), 0.0).reshape(1)
        hi = np.maximum(x.max(initial=0.0), 0.0).reshape(1)
    else:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis {axis} out of range for rank {x.ndim}")
        axis %= x.ndim
        moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        lo = np.minimum(moved.min(axis=1, initial=0.0), 0.0)
        hi = np.maximum(moved.max(axis=1, initial=0.0), 0.0)
    scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zp = np.clip(np.round(-128.0 - lo / scale), -128, 127).astype(np.int32)
    bshape = [1] * x.ndim
    if axis is not None:
        bshape[axis] = -1
    q = np.clip(np.round(x / scale.reshape(bshape)) + zp.reshape(bshape), -128, 127).astype(np.int8)
    return QuantizedTensor(
        shape=list(x.shape),
        data=q.tobytes(),
        scale=[float(s) for s in scale],
        zero_point=[int(z) for z in zp],
        axis=axis,
        orig_dtype="float32",
    )


def dequantize(qt: QuantizedTensor) -> npt.NDArray[np.float32]:
    """Inverse of :func:`quantize_int8`; validates the payload first."""
    n = _numel(qt.shape)
    if len(qt.data) != n:
        raise DecodeError("bad_length", f"{len(qt.data)} bytes, shape needs {n}")
    channels = 1 if qt.axis is None else None
    if qt.axis is not None:
        if not 0 <= qt.axis < len(qt.shape):
            raise DecodeError("bad_axis", str(qt.axis))
        channels = qt.shape[qt.axis]
    if len(qt.scale) != channels or len(qt.zero_point) != channels:
        raise DecodeError("bad_quant_params", f"need {channels} scale/zero-point values")
    scale = np.asarray(qt.scale, dtype=np.float32)
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise DecodeError("bad_quant_params", "scale must be finite and positive")
    zp = np.asarray(qt.zero_point, dtype=np.float32)
    bshape = [1] * len(qt.shape)
    if qt.axis is not None:
        bshape[qt.axis] = -1
    q = np.frombuffer(qt.data, dtype=np.int8).reshape(qt.shape).astype(np.float32)
    return ((q - zp.reshape(bshape)) * scale.reshape(bshape)).astype(np.float32)
