from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lepton.protocol.errors import DecodeError
from lepton.protocol.tensors import (
    ALLOWED_DTYPES,
    MAX_ELEMENTS,
    MAX_RANK,
    QuantizedTensor,
    TensorPayload,
    dequantize,
    from_payload,
    quantize_int8,
    to_payload,
)

DTYPES = sorted(ALLOWED_DTYPES)
FLOAT32_MAX = float(np.finfo(np.float32).max)

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def arrays(dtype: str) -> st.SearchStrategy[npt.NDArray[Any]]:
    return hnp.arrays(np.dtype(dtype), shapes)


def same_values(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    """Equal dtype, shape and bytes (so NaN payloads and -0.0 count too)."""
    native = b.astype(b.dtype.newbyteorder("="), order="C")
    return a.dtype == native.dtype and a.shape == native.shape and a.tobytes() == native.tobytes()


def refused(call: Any, *args: Any) -> str:
    with pytest.raises(DecodeError) as info:
        call(*args)
    return info.value.reason


# ---------------------------------------------------------------- dense payloads


def _sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> npt.NDArray[Any]:
    """Random bit patterns of ``dtype`` (NaN payloads included); bools are 0 or 1."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    if dtype == "bool":
        raw &= 1
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_allowed_dtype_round_trips(dtype: str) -> None:
    for shape in [(), (1,), (7,), (3, 4), (2, 0, 3), (2, 3, 1, 2)]:
        arr = _sample(dtype, shape)
        payload = to_payload(arr)
        assert payload.dtype == dtype
        assert payload.shape == list(shape)
        back = from_payload(payload)
        assert same_values(back, arr)
        assert back.dtype.isnative
        assert back.flags.c_contiguous
    grid = _sample(dtype, (4, 6), seed=1)
    for view in (
        grid.T,
        grid[::-1, 1::2],
        grid[:, ::-3],
        grid.astype(grid.dtype.newbyteorder(">")),
    ):
        assert to_payload(view) == to_payload(np.ascontiguousarray(view).astype(grid.dtype))
        assert same_values(from_payload(to_payload(view)), view)


@settings(max_examples=80, deadline=None)
@given(arr=st.sampled_from(DTYPES).flatmap(arrays))
def test_payload_round_trips(arr: npt.NDArray[Any]) -> None:
    payload = to_payload(arr)
    assert payload.dtype == arr.dtype.name
    assert payload.shape == list(arr.shape)
    assert len(payload.data) == arr.size * arr.dtype.itemsize
    back = from_payload(payload)
    assert same_values(back, arr)
    assert back.dtype.isnative
    assert not back.flags.writeable


@settings(max_examples=40, deadline=None)
@given(
    arr=st.sampled_from(DTYPES).flatmap(
        lambda d: hnp.arrays(np.dtype(d), hnp.array_shapes(min_dims=2, max_dims=4, min_side=2))
    ),
    big_endian=st.booleans(),
    data=st.data(),
)
def test_non_contiguous_and_big_endian_inputs_give_the_canonical_payload(
    arr: npt.NDArray[Any], big_endian: bool, data: st.DataObject
) -> None:
    if big_endian:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    view = data.draw(
        st.sampled_from(
            [arr.T, arr[::-1], arr[..., ::2], np.swapaxes(arr, 0, -1)[1:], np.asfortranarray(arr)]
        )
    )
    canonical = np.ascontiguousarray(view).astype(view.dtype.newbyteorder("="))
    assert to_payload(view) == to_payload(canonical)
    assert same_values(from_payload(to_payload(view)), view)


def test_payload_is_little_endian() -> None:
    payload = to_payload(np.array([1], dtype=">i4"))
    assert payload.data == b"\x01\x00\x00\x00"
    payload = to_payload(np.array([1.0], dtype=np.float16))
    assert payload.data == np.array([1.0], dtype="<f2").tobytes()


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 5), (2, 0, 0, 1), ()])
@pytest.mark.parametrize("dtype", ["float32", "bool", "int64"])
def test_zero_size_and_scalar_tensors_round_trip(shape: tuple[int, ...], dtype: str) -> None:
    arr = np.ones(shape, dtype=dtype)
    back = from_payload(to_payload(arr))
    assert back.shape == shape
    assert same_values(back, arr)


def test_decoded_array_is_read_only_and_owns_a_copy() -> None:
    buf = bytearray(np.arange(6, dtype="<i4").tobytes())
    arr = from_payload(TensorPayload(dtype="int32", shape=[2, 3], data=bytes(buf)))
    assert not arr.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 7
    assert arr.base is None or not np.shares_memory(arr, np.frombuffer(buf, dtype="<i4"))
    # Even a payload built over a mutable buffer is copied, not aliased.
    arr2 = from_payload(TensorPayload(dtype="int32", shape=[6], data=buf))  # type: ignore[arg-type]
    buf[0] = 99
    assert arr2[0] == 0
    assert not arr2.flags.writeable


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_never_returns_a_writeable_array(dtype: str) -> None:
    for shape in [(), (0,), (3,), (2, 2)]:
        arr = from_payload(to_payload(np.zeros(shape, dtype=dtype)))
        assert not arr.flags.writeable


@settings(max_examples=25, deadline=None)
@given(arr=hnp.arrays(np.float32, shapes))
def test_payload_struct_encoding_is_stable(arr: npt.NDArray[np.float32]) -> None:
    payload = to_payload(arr)
    wire = msgspec.msgpack.encode(payload)
    assert msgspec.msgpack.encode(payload) == wire
    back = msgspec.msgpack.decode(wire, type=TensorPayload)
    assert back == payload
    assert msgspec.msgpack.encode(back) == wire


@pytest.mark.parametrize(
    "array",
    [
        np.array([1 + 2j]),
        np.array(["text"]),
        np.array([object()], dtype=object),
        np.array(["2024-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=[("a", "<i4")]),
        np.zeros([1] * (MAX_RANK + 1), dtype=np.float32),
    ],
    ids=["complex", "str", "object", "datetime", "structured", "rank-9"],
)
def test_to_payload_refuses_what_cannot_travel(array: npt.NDArray[Any]) -> None:
    with pytest.raises(ValueError, match=r"not allowed|rank"):
        to_payload(array)


def test_to_payload_refuses_absurd_empty_shapes() -> None:
    with pytest.raises(ValueError, match="cannot send"):
        to_payload(np.empty((0, MAX_ELEMENTS, 2), dtype=np.int8))


def _valid() -> TensorPayload:
    return to_payload(np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"data": b""}, "bad_length"),
        ({"data": _valid().data[:-1]}, "bad_length"),
        ({"data": _valid().data + b"\0"}, "bad_length"),
        ({"dtype": "float64"}, "bad_length"),
        ({"dtype": "int8"}, "bad_length"),
        ({"shape": [3, 5]}, "bad_length"),
        ({"shape": [12, 1, 1]}, None),
        ({"shape": [4, 3]}, None),
        ({"shape": []}, "bad_length"),
        ({"shape": [0]}, "bad_length"),
        ({"shape": [-3, -4]}, "bad_shape"),
        ({"shape": [-12]}, "bad_shape"),
        ({"shape": [3.0, 4]}, "bad_shape"),
        ({"shape": [True, 12]}, "bad_shape"),
        ({"shape": "3,4"}, "bad_shape"),
        ({"shape": None}, "bad_shape"),
        ({"shape": [1] * (MAX_RANK + 1)}, "bad_shape"),
        ({"shape": [2**16, 2**16]}, "tensor_too_large"),
        ({"shape": [0, MAX_ELEMENTS, 2]}, "tensor_too_large"),
        ({"shape": [0, 2**62, 2**62]}, "tensor_too_large"),
        ({"dtype": "complex64"}, "bad_dtype"),
        ({"dtype": "object"}, "bad_dtype"),
        ({"dtype": "<f4"}, "bad_dtype"),
        ({"dtype": "float32 "}, "bad_dtype"),
        ({"dtype": "O"}, "bad_dtype"),
        ({"dtype": ""}, "bad_dtype"),
        ({"dtype": ["float32"]}, "bad_dtype"),
        ({"dtype": None}, "bad_dtype"),
        ({"data": "text"}, "bad_data"),
        ({"data": None}, "bad_data"),
        ({"data": [0] * 48}, "bad_data"),
    ],
)
def test_corrupted_payloads_raise_decode_error(changes: dict[str, Any], reason: str | None) -> None:
    payload = msgspec.structs.replace(_valid(), **changes)
    if reason is None:  # a consistent reshape is still a valid payload
        assert from_payload(payload).size == 12
        return
    assert refused(from_payload, payload) == reason


def test_bool_payload_bytes_must_be_zero_or_one() -> None:
    assert refused(from_payload, TensorPayload(dtype="bool", shape=[2], data=b"\x02\x00")) == (
        "bad_data"
    )
    ok = from_payload(TensorPayload(dtype="bool", shape=[2], data=b"\x01\x00"))
    assert ok.tolist() == [True, False]


def test_largest_allowed_shape_is_checked_by_length_not_refused() -> None:
    payload = TensorPayload(dtype="int8", shape=[MAX_ELEMENTS], data=b"")
    assert refused(from_payload, payload) == "bad_length"


def test_wire_decoding_enforces_the_shape_schema() -> None:
    wire = msgspec.msgpack.encode({"dtype": "int8", "shape": [-1], "data": b""})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(wire, type=TensorPayload)


junk = st.one_of(
    st.none(), st.integers(), st.floats(), st.text(max_size=4), st.booleans(), st.binary(max_size=4)
)
mutated_dtype = st.one_of(st.sampled_from(DTYPES), st.text(max_size=10), junk)
mutated_shape = st.one_of(
    st.lists(st.integers(-3, 7), max_size=MAX_RANK + 2),
    st.lists(st.integers(-(2**64), 2**64), max_size=4),
    st.lists(junk, max_size=3),
    junk,
)
mutated_data = st.one_of(st.binary(max_size=80), junk)


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from(DTYPES).flatmap(arrays),
    dtype=st.none() | mutated_dtype,
    shape=st.none() | mutated_shape,
    data=st.none() | mutated_data,
)
def test_from_payload_raises_only_decode_error_on_mutated_structs(
    base: npt.NDArray[Any], dtype: Any, shape: Any, data: Any
) -> None:
    payload = to_payload(base)
    changes = {
        k: v for k, v in {"dtype": dtype, "shape": shape, "data": data}.items() if v is not None
    }
    mutated = msgspec.structs.replace(payload, **changes)
    try:
        arr = from_payload(mutated)
    except DecodeError:
        return
    assert not arr.flags.writeable
    assert arr.dtype.name == mutated.dtype
    assert list(arr.shape) == list(mutated.shape)
    assert arr.nbytes == len(mutated.data)


# ---------------------------------------------------------------- INT8 quantization

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
f32_arrays = hnp.arrays(np.float32, shapes, elements=finite_f32)


def assert_within_bound(x: npt.NDArray[Any], qt: QuantizedTensor) -> npt.NDArray[np.float32]:
    """Dequantize and check every element against half its channel's scale."""
    y = dequantize(qt)
    assert y.dtype == np.float32
    assert y.shape == x.shape
    assert np.all(np.isfinite(y))
    bshape = [1] * x.ndim
    if qt.axis is not None:
        bshape[qt.axis] = -1
    scale = np.asarray(qt.scale, dtype=np.float64).reshape(bshape)
    x64 = x.astype(np.float64)
    # Half a step, plus float32 rounding of the result and float64 rounding on the way.
    bound = scale * (0.5 + 1e-9) + np.abs(x64) * 2.0**-23
    err = np.abs(y.astype(np.float64) - x64)
    assert np.all(err <= bound), float(np.max(err - bound))
    # Zero is always exactly representable.
    assert np.all(y[x == 0] == 0)
    return y


def assert_well_formed(qt: QuantizedTensor, shape: tuple[int, ...]) -> None:
    assert qt.shape == list(shape)
    assert len(qt.data) == int(np.prod(shape))
    channels = 1 if qt.axis is None else shape[qt.axis]
    assert len(qt.scale) == len(qt.zero_point) == channels
    for s in qt.scale:
        assert s > 0
        assert float(np.float32(s)) == s  # float32-representable, as runtimes expect
    assert all(-128 <= z <= 127 for z in qt.zero_point)
    assert qt.orig_dtype == "float32"


@settings(max_examples=100, deadline=None)
@given(x=f32_arrays)
def test_per_tensor_quantization_error_is_at_most_half_a_step(
    x: npt.NDArray[np.float32],
) -> None:
    qt = quantize_int8(x)
    assert qt.axis is None
    assert_well_formed(qt, x.shape)
    assert_within_bound(x, qt)


@settings(max_examples=100, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
        elements=finite_f32,
    ),
    data=st.data(),
)
def test_per_channel_quantization_error_is_at_most_half_a_step(
    x: npt.NDArray[np.float32], data: st.DataObject
) -> None:
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    qt = quantize_int8(x, axis=axis)
    assert qt.axis == axis % x.ndim
    assert_well_formed(qt, x.shape)
    assert_within_bound(x, qt)


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(
        np.float64,
        shapes,
        elements=st.floats(-FLOAT32_MAX, FLOAT32_MAX, allow_subnormal=True),
    )
)
def test_float64_input_in_float32_range_is_accepted(x: npt.NDArray[np.float64]) -> None:
    qt = quantize_int8(x)
    assert_within_bound(x, qt)


def test_per_channel_is_tighter_than_per_tensor_for_unequal_channels() -> None:
    x = np.stack([np.linspace(-1, 1, 50), np.linspace(-1000, 1000, 50)]).astype(np.float32)
    per_tensor = np.abs(dequantize(quantize_int8(x)) - x)[0].max()
    per_channel = np.abs(dequantize(quantize_int8(x, axis=0)) - x)[0].max()
    assert per_channel < per_tensor / 100


@pytest.mark.parametrize(
    "value", [0.0, 1.0, -1.0, 3.5e-3, -7.25e5, 1e-40, FLOAT32_MAX, -FLOAT32_MAX]
)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_constant_tensors(value: float, axis: int | None) -> None:
    x = np.full((3, 4), value, dtype=np.float32)
    qt = quantize_int8(x, axis=axis)
    assert_well_formed(qt, x.shape)
    y = assert_within_bound(x, qt)
    assert np.all(y == y.flat[0])


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_all_zero_tensor_is_exact(axis: int | None) -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    qt = quantize_int8(x, axis=axis)
    assert all(s == 1.0 for s in qt.scale)
    y = dequantize(qt)
    assert np.array_equal(y, x)
    assert not np.signbit(y).any()


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((0,), None), ((0,), 0), ((0, 3), 0), ((0, 3), 1), ((2, 0, 4), 1), ((), None)],
)
def test_zero_size_and_scalar_quantization(shape: tuple[int, ...], axis: int | None) -> None:
    x = np.ones(shape, dtype=np.float32)
    qt = quantize_int8(x, axis=axis)
    assert_well_formed(qt, shape)
    assert_within_bound(x, qt)


def test_tiny_and_huge_ranges_stay_within_the_bound() -> None:
    tiny = np.array([0.0, 1e-45, 3e-43, -2e-44], dtype=np.float32)  # subnormal scales
    assert_within_bound(tiny, quantize_int8(tiny))
    huge = np.array([FLOAT32_MAX, -FLOAT32_MAX, 1.0], dtype=np.float32)  # no overflow on the way
    assert_within_bound(huge, quantize_int8(huge))


@settings(max_examples=25, deadline=None)
@given(x=f32_arrays)
def test_quantized_struct_encoding_is_stable(x: npt.NDArray[np.float32]) -> None:
    qt = quantize_int8(x, axis=0 if x.ndim else None)
    wire = msgspec.msgpack.encode(qt)
    assert msgspec.msgpack.encode(qt) == wire
    back = msgspec.msgpack.decode(wire, type=QuantizedTensor)
    assert back == qt
    assert np.array_equal(dequantize(back), dequantize(qt))


def test_quantized_defaults_stay_off_the_wire_and_decode_either_way() -> None:
    qt = quantize_int8(np.linspace(-1, 1, 100, dtype=np.float32))
    assert qt.axis is None
    assert qt.orig_dtype == "float32"
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(qt))
    assert set(wire) == {"shape", "data", "scale", "zero_point"}
    explicit = msgspec.msgpack.encode({**wire, "axis": None, "orig_dtype": "float32"})
    assert msgspec.msgpack.decode(explicit, type=QuantizedTensor) == qt


@pytest.mark.parametrize(
    "array",
    [
        np.array([1.0, np.nan], dtype=np.float32),
        np.array([np.inf]),
        np.array([-np.inf], dtype=np.float16),
        np.array([1e39]),
        np.array([-1e300]),
        np.array([1 + 1j]),
        np.array(["1.0"]),
        np.array([1.0], dtype=object),
    ],
    ids=["nan", "inf", "-inf-f16", "over-f32", "far-over-f32", "complex", "str", "object"],
)
def test_quantize_refuses_values_it_cannot_represent(array: npt.NDArray[Any]) -> None:
    with pytest.raises(ValueError, match="cannot quantize"):
        quantize_int8(array)


@pytest.mark.parametrize(("shape", "axis"), [((2, 3), 2), ((2, 3), -3), ((), 0), ((4,), 1)])
def test_quantize_refuses_a_bad_axis(shape: tuple[int, ...], axis: int) -> None:
    with pytest.raises(ValueError, match="axis"):
        quantize_int8(np.zeros(shape), axis=axis)


def test_quantize_accepts_integer_and_bool_input() -> None:
    ints = np.arange(-5, 6, dtype=np.int16)
    assert_within_bound(ints, quantize_int8(ints))
    flags = np.array([True, False, True])
    assert_within_bound(flags.astype(np.float32), quantize_int8(flags))


# ---------------------------------------------------------------- dequantize validation


def _qt(axis: int | None = 1) -> QuantizedTensor:
    return quantize_int8(np.arange(-6, 6, dtype=np.float32).reshape(3, 4), axis=axis)


@pytest.mark.parametrize(
    ("axis", "changes", "reason"),
    [
        (None, {"scale": [0.1, 0.1]}, "bad_quant_params"),
        (None, {"scale": []}, "bad_quant_params"),
        (None, {"zero_point": [0, 0]}, "bad_quant_params"),
        (1, {"scale": [0.1] * 3}, "bad_quant_params"),
        (1, {"scale": [0.1] * 5}, "bad_quant_params"),
        (1, {"zero_point": [0] * 3}, "bad_quant_params"),
        (1, {"axis": 0}, "bad_quant_params"),  # 3 channels on axis 0, params for 4
        (None, {"scale": [0.0]}, "bad_quant_params"),
        (None, {"scale": [-0.0]}, "bad_quant_params"),
        (None, {"scale": [-0.5]}, "bad_quant_params"),
        (None, {"scale": [float("nan")]}, "bad_quant_params"),
        (None, {"scale": [float("inf")]}, "bad_quant_params"),
        (None, {"scale": [1e300]}, "bad_quant_params"),
        (None, {"scale": ["0.5"]}, "bad_quant_params"),
        (None, {"scale": [None]}, "bad_quant_params"),
        (None, {"scale": [True]}, "bad_quant_params"),
        (None, {"scale": 0.5}, "bad_quant_params"),
        (None, {"zero_point": [128]}, "bad_quant_params"),
        (None, {"zero_point": [-129]}, "bad_quant_params"),
        (None, {"zero_point": [10**400]}, "bad_quant_params"),
        (None, {"zero_point": [0.0]}, "bad_quant_params"),
        (None, {"zero_point": [False]}, "bad_quant_params"),
        (None, {"zero_point": None}, "bad_quant_params"),
        (1, {"axis": 2}, "bad_axis"),
        (1, {"axis": -1}, "bad_axis"),
        (1, {"axis": True}, "bad_axis"),
        (1, {"axis": 1.0}, "bad_axis"),
        (1, {"axis": "1"}, "bad_axis"),
        (1, {"data": b"\0" * 11}, "bad_length"),
        (1, {"data": b"\0" * 13}, "bad_length"),
        (1, {"data": "x" * 12}, "bad_data"),
        (1, {"shape": [3, -4]}, "bad_shape"),
        (1, {"shape": None}, "bad_shape"),
        (1, {"shape": [2**20, 2**20]}, "tensor_too_large"),
    ],
)
def test_dequantize_validates_its_input(
    axis: int | None, changes: dict[str, Any], reason: str
) -> None:
    qt = msgspec.structs.replace(_qt(axis), **changes)
    assert refused(dequantize, qt) == reason


def test_dequantize_clips_instead_of_overflowing() -> None:
    qt = QuantizedTensor(shape=[2], data=b"\x7f\x80", scale=[FLOAT32_MAX], zero_point=[-128])
    y = dequantize(qt)
    assert np.all(np.isfinite(y))
    assert y.tolist() == [FLOAT32_MAX, 0.0]


def test_dequantize_returns_a_fresh_array() -> None:
    qt = _qt()
    a, b = dequantize(qt), dequantize(qt)
    assert not np.shares_memory(a, b)
    a[0, 0] = 123.0
    assert b[0, 0] != 123.0


mutated_scale = st.one_of(
    st.lists(st.floats(), max_size=6),
    st.lists(st.one_of(st.floats(-1e40, 1e40), st.integers(-(2**70), 2**70)), max_size=6),
    st.lists(junk, max_size=3),
    junk,
)
mutated_zp = st.one_of(
    st.lists(st.integers(-300, 300), max_size=6), st.lists(junk, max_size=3), junk
)
mutated_axis = st.one_of(st.integers(-3, 5), junk)


@settings(max_examples=150, deadline=None)
@given(
    base=f32_arrays,
    shape=st.none() | mutated_shape,
    data=st.none() | mutated_data,
    scale=st.none() | mutated_scale,
    zero_point=st.none() | mutated_zp,
    axis=st.none() | mutated_axis,
)
def test_dequantize_raises_only_decode_error_on_mutated_structs(
    base: npt.NDArray[np.float32], shape: Any, data: Any, scale: Any, zero_point: Any, axis: Any
) -> None:
    qt = quantize_int8(base)
    fields = {"shape": shape, "data": data, "scale": scale, "zero_point": zero_point, "axis": axis}
    mutated = msgspec.structs.replace(qt, **{k: v for k, v in fields.items() if v is not None})
    try:
        y = dequantize(mutated)
    except DecodeError:
        return
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y))
    assert list(y.shape) == list(mutated.shape)
