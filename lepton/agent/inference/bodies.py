"""The predict route's bodies: JSON nested lists or MessagePack ``{dtype, shape, data}``
tensors in, arrays checked against the model's input specs; outputs back in the same kind.

Anything that does not fit the model is an :class:`HttpError` 400 naming the input, the
dimension and what was expected; the server in :mod:`lepton.agent.inference.endpoint` answers it as
JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from lepton.agent.inference.runtimes.base import Array, TensorSpec
from lepton.common.errors import LeptonError

#: numpy's own limit on an array's dimensions.
MAX_DIMS: Final = 32


class HttpError(LeptonError):
    """An error answer: status, a stable code and a message for the caller."""

    def __init__(self, status: int, code: str, message: str, *, allow: str | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.allow = allow
        super().__init__(message)


def _by_name(
    raw: Any, specs: tuple[TensorSpec, ...], single: Callable[[Any], bool]
) -> dict[str, Any]:
    if single(raw):
        if len(specs) != 1:
            names = [s.name for s in specs]
            raise HttpError(400, "bad_inputs", f"model has inputs {names}; name each of them")
        return {specs[0].name: raw}
    if not isinstance(raw, dict):
        raise HttpError(400, "bad_inputs", "inputs must be an array or an object of arrays")
    known = {s.name for s in specs}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HttpError(400, "bad_inputs", f"unknown inputs {unknown}; model has {sorted(known)}")
    missing = sorted(known - set(raw))
    if missing:
        raise HttpError(400, "bad_inputs", f"missing inputs {missing}")
    return raw


def _checked_shape(arr: Array, spec: TensorSpec) -> Array:
    why = spec.mismatch(tuple(arr.shape))
    if why is not None:
        raise HttpError(400, "bad_shape", why)
    return arr


def _nesting(value: Any) -> int:
    """How deep the first elements of nested lists go (a rectangular array's rank)."""
    depth = 0
    while isinstance(value, list) and depth <= MAX_DIMS:
        depth += 1
        value = value[0] if value else None
    return depth


def json_inputs(raw: Any, specs: tuple[TensorSpec, ...]) -> dict[str, Array]:
    """Nested lists -> arrays of the inputs' dtypes; HttpError 400 on anything that does not fit."""
    import numpy as np

    out: dict[str, Array] = {}
    for name, value in _by_name(raw, specs, lambda v: isinstance(v, list)).items():
        spec = next(s for s in specs if s.name == name)
        depth = _nesting(value)
        if depth > len(spec.shape):  # checked before numpy walks the lists
            raise HttpError(
                400,
                "too_deep",
                f"input {name!r} nests {'more than ' if depth > MAX_DIMS else ''}{depth} "
                f"lists deep; the model's input has {len(spec.shape)} dimensions",
            )
        try:
            arr = np.asarray(value)
        except ValueError as exc:  # ragged nesting
            raise HttpError(400, "bad_array", f"input {name!r}: not a rectangular array") from exc
        if arr.dtype.kind not in "biuf":
            raise HttpError(
                400,
                "bad_dtype",
                f"input {name!r}: expected numbers ({spec.dtype}), got {arr.dtype}",
            )
        want = np.dtype(spec.dtype)
        if want.kind in "iu" and arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
            raise HttpError(
                400, "bad_dtype", f"input {name!r}: expected {spec.dtype}, got fractional numbers"
            )
        if want.kind == "b" and arr.dtype.kind != "b":
            raise HttpError(400, "bad_dtype", f"input {name!r}: expected booleans")
        out[name] = _checked_shape(arr.astype(want, copy=False), spec)
    return out


def tensor_inputs(raw: Any, specs: tuple[TensorSpec, ...]) -> dict[str, Array]:
    """``{dtype, shape, data}`` tensors -> arrays; dtypes must match the inputs exactly."""
    from lepton.protocol.errors import DecodeError
    from lepton.protocol.tensors import TensorPayload, from_payload

    def single(v: Any) -> bool:
        return isinstance(v, dict) and set(v) == {"dtype", "shape", "data"}

    out: dict[str, Array] = {}
    for name, value in _by_name(raw, specs, single).items():
        spec = next(s for s in specs if s.name == name)
        try:
            arr = from_payload(msgspec.convert(value, TensorPayload))
        except msgspec.ValidationError as exc:
            raise HttpError(400, "bad_tensor", f"input {name!r}: {exc}") from exc
        except DecodeError as exc:
            raise HttpError(400, exc.reason, f"input {name!r}: {exc.detail or exc}") from exc
        if arr.dtype.name != spec.dtype:
            raise HttpError(
                400, "bad_dtype", f"input {name!r}: expected dtype {spec.dtype}, got {arr.dtype}"
            )
        out[name] = _checked_shape(arr, spec)
    return out


def outputs_json(outputs: dict[str, Array]) -> dict[str, Any]:
    return {k: v.tolist() for k, v in outputs.items()}


def outputs_msgpack(outputs: dict[str, Array]) -> dict[str, Any]:
    from lepton.protocol.tensors import to_payload

    return {k: to_payload(v) for k, v in outputs.items()}
